//! `cargo xtask bench-methods`: prune one model with every method at every ratio, evaluate each
//! pruned checkpoint (held-out perplexity per domain, multiple choice), and write
//! `results.json`, `RESULTS.md` and a retention chart (`retention.svg`).
//!
//! Every prune runs as a subprocess (`xtask prune ...`) so its wall time and peak memory are
//! its own; evaluation runs in this process on the CPU.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use diep_models::{DeviceSpec, MoeModel};
use serde_json::{Value, json};

use crate::util::workspace_root;

/// The methods `--methods` accepts, in the default order.
/// `greedy-search` (the quality reference, slow) runs only when named.
const METHODS: [&str; 7] = ["random", "frequency", "soft-activation", "reap", "naee", "diep", "greedy-search"];

/// The held-out perplexity domains: `<model>/heldout/<domain>.ids.json`.
const DOMAINS: [&str; 2] = ["english", "code"];

/// Input tokens per forward batch, for perplexity and multiple choice.
const BATCH_TOKENS: usize = 4096;

/// Arguments of `cargo xtask bench-methods`.
#[derive(Args)]
pub struct BenchArgs {
    /// Model directory with `calib.txt`, `heldout/{english,code}.ids.json`, `mc.jsonl` and
    /// `tokenizer.json` (default: the shipped `fixtures/trained-moe`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Comma-separated methods: random, frequency, soft-activation, reap, naee, diep, and
    /// greedy-search (the reference the "vs greedy" column divides by; not run by default).
    #[arg(long, value_delimiter = ',', default_value = "random,frequency,soft-activation,reap,naee,diep")]
    methods: Vec<String>,
    /// Comma-separated pruning ratios (fraction of routed experts removed).
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.5")]
    ratios: Vec<f64>,
    /// Output directory (written atomically; must not exist unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// Also run DiEP's ablations: the `paper` and `routed` relaxations (global allocation), and
    /// the paper's α = 0 start instead of the warm start (both allocations).
    #[arg(long)]
    ablations: bool,
    /// Comma-separated calibration seeds: every configuration is pruned once per seed, and the
    /// tables give the mean ± sample standard deviation (rows ranked by the mean).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Calibration sequences per prune.
    #[arg(long, default_value_t = 32, hide = true)]
    samples: usize,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 256, hide = true)]
    seq_len: usize,
    /// Evaluate only the first N held-out sequences per domain (for quick tests).
    #[arg(long, hide = true)]
    heldout_limit: Option<usize>,
    /// Evaluate only the first N multiple-choice items (for quick tests).
    #[arg(long, hide = true)]
    mc_limit: Option<usize>,
}

/// One pruning configuration.
#[derive(Debug, Clone)]
struct RunSpec {
    method: &'static str,
    /// DiEP's relaxation (`routed-gated`, `paper`, `routed`); `None` for baselines.
    variant: Option<&'static str>,
    allocation: &'static str,
    ratio: f64,
    seed: u64,
    /// DiEP with the paper's schedule and no refinement (`--epochs 10 --refine 0`) instead of
    /// the global allocation's default (2 epochs, then up to 3 rounds of `--refine`).
    classic: bool,
    /// DiEP with `--alpha-init zero` (the paper's start) instead of the default warm start.
    zero_init: bool,
}

impl RunSpec {
    /// Directory name under `runs/`.
    fn name(&self) -> String {
        let variant = self.variant.map(|v| format!("-{v}")).unwrap_or_default();
        let refine = if self.classic { "-classic" } else { "" };
        let zero = if self.zero_init { "-zero" } else { "" };
        format!("r{}-{}{variant}-{}{refine}{zero}-s{}", self.ratio, self.method, self.allocation, self.seed)
    }

    /// What differs from the method's defaults: ` 10 ep, no refine`, ` α=0`.
    fn extras(&self) -> String {
        format!("{}{}", if self.classic { " 10 ep, no refine" } else { "" }, if self.zero_init { " α=0" } else { "" })
    }

    /// Method, variant and allocation: what a table row (and a chart bar) is about.
    fn label(&self) -> String {
        let refine = self.extras();
        match self.variant {
            Some(v) => format!("{} {v} {}{refine}", self.method, self.allocation),
            None => format!("{} {}{refine}", self.method, self.allocation),
        }
    }

    /// DiEP's default configuration (routed-gated relaxation, global allocation).
    fn is_diep_default(&self) -> bool {
        self.method == "diep"
            && self.variant == Some("routed-gated")
            && self.allocation == "global"
            && !self.classic
            && !self.zero_init
    }
}

/// The runs of one method at one ratio.
/// The runs of one method at one ratio, one per calibration seed (random's seed also draws its
/// experts).
fn expand(method: &'static str, ratio: f64, seeds: &[u64], ablations: bool) -> Vec<RunSpec> {
    // (relaxation, allocation, classic, zero_init)
    let mut configs: Vec<(Option<&'static str>, &'static str, bool, bool)> = match method {
        "random" | "naee" => vec![(None, "uniform", false, false)],
        "diep" => vec![
            (Some("routed-gated"), "global", false, false),
            (Some("routed-gated"), "uniform", false, false),
            (Some("routed-gated"), "global", true, false),
        ],
        _ => vec![(None, "uniform", false, false), (None, "global", false, false)],
    };
    if method == "diep" && ablations {
        configs.extend([
            (Some("paper"), "global", false, false),
            (Some("routed"), "global", false, false),
            (Some("routed-gated"), "global", false, true),
            (Some("routed-gated"), "uniform", false, true),
        ]);
    }
    configs
        .into_iter()
        .flat_map(|(variant, allocation, classic, zero_init)| {
            seeds.iter().map(move |&seed| RunSpec { method, variant, allocation, ratio, seed, classic, zero_init })
        })
        .collect()
}

/// Perplexity per domain and multiple-choice accuracy of one model.
#[derive(Debug, Clone)]
struct Scores {
    perplexity: BTreeMap<&'static str, f64>,
    mc: McScores,
}

/// Multiple-choice results.
#[derive(Debug, Clone)]
struct McScores {
    acc: f64,
    acc_norm: f64,
    items: usize,
    /// Per item, per choice: the summed log-probability of the choice's tokens.
    loglik: Vec<Vec<f64>>,
}

/// One tokenised multiple-choice item.
struct McItem {
    /// Context ids followed by each choice's ids (tokenised separately, as lm-eval does).
    sequences: Vec<Vec<u32>>,
    context_len: usize,
    /// Each choice's length in characters (Unicode code points), as lm-eval normalises.
    choice_chars: Vec<usize>,
    label: usize,
}

/// The evaluation data, loaded once.
struct EvalData {
    heldout: Vec<(&'static str, Vec<Vec<u32>>)>,
    mc: Vec<McItem>,
}

/// A finished run.
struct RunResult {
    spec: RunSpec,
    scores: Scores,
    retention: f64,
    seconds: f64,
    peak_rss_mb: Option<f64>,
    kept_per_layer: Vec<usize>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    // Cheap checks first.
    let methods: Vec<&'static str> = args
        .methods
        .iter()
        .map(|m| {
            METHODS.iter().copied().find(|k| *k == m.trim()).with_context(|| {
                format!("unknown method `{}` in --methods; expected some of {}", m.trim(), METHODS.join(", "))
            })
        })
        .collect::<Result<_>>()?;
    if methods.is_empty() || args.ratios.is_empty() || args.seeds.is_empty() {
        bail!("--methods, --ratios and --seeds must each name at least one value");
    }
    for r in &args.ratios {
        diep_plan::check_ratio(*r).with_context(|| format!("--ratios {r}"))?;
    }
    if args.out.exists() && !args.force {
        bail!("output directory {} already exists (use --force to replace it)", args.out.display());
    }
    let model_dir = args.model.clone().unwrap_or_else(|| workspace_root().join("fixtures/trained-moe"));
    let calib = model_dir.join("calib.txt");
    if !calib.is_file() {
        bail!("{}: calibration text not found (bench-methods needs <model>/calib.txt)", calib.display());
    }
    let data = load_eval_data(&model_dir, &args)?;
    let specs: Vec<RunSpec> = args
        .ratios
        .iter()
        .flat_map(|r| methods.iter().flat_map(|m| expand(m, *r, &args.seeds, args.ablations)))
        .collect();

    // Everything is built in a temporary directory beside --out and renamed at the end.
    diep_common::remove_stale_staging(&args.out)?;
    let staging = diep_common::Staging::create(&args.out)?;
    let tmp = staging.path().to_path_buf();
    std::fs::create_dir_all(tmp.join("runs")).with_context(|| format!("creating {}", tmp.display()))?;
    // On error the staging directory removes itself.
    bench_into(&args, &model_dir, &data, &specs, &tmp, started)?;
    staging.commit(&args.out, true)?;
    eprintln!("wrote {} in {:.1}s", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs every prune and evaluation and writes the reports into `dir`.
fn bench_into(
    args: &BenchArgs,
    model_dir: &Path,
    data: &EvalData,
    specs: &[RunSpec],
    dir: &Path,
    started: Instant,
) -> Result<()> {
    let device = DeviceSpec::Cpu.device()?;
    let exe = std::env::current_exe().context("locating the xtask executable")?;

    let t = Instant::now();
    let base = evaluate(model_dir, data, &device).context("evaluating the base model")?;
    eprintln!(
        "base: ppl {}  mc acc {:.3}  ({:.1}s)",
        fmt_ppl(&base.perplexity),
        base.mc.acc,
        t.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let name = spec.name();
        let run_dir = dir.join("runs").join(&name);
        let mut cmd = Command::new(&exe);
        cmd.arg("prune").arg("--model").arg(model_dir).arg("--out").arg(&run_dir);
        cmd.args(["--method", spec.method, "--allocation", spec.allocation]);
        cmd.args(["--ratio", &spec.ratio.to_string()]);
        cmd.arg("--calib").arg(model_dir.join("calib.txt"));
        cmd.args(["--samples", &args.samples.to_string(), "--seq-len", &args.seq_len.to_string()]);
        cmd.args(["--seed", &spec.seed.to_string()]);
        if let Some(v) = spec.variant {
            cmd.args(["--relaxation", v]);
        }
        if spec.classic {
            cmd.args(["--epochs", "10", "--refine", "0"]);
        }
        if spec.zero_init {
            cmd.args(["--alpha-init", "zero"]);
        }
        let t = Instant::now();
        let out = cmd.output().with_context(|| format!("starting {}", exe.display()))?;
        let seconds = t.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            bail!("prune run {name} failed ({}):\n{}", out.status, tail.join("\n"));
        }
        let peak_rss_mb = parse_peak_rss(&stdout);
        let plan = diep_surgery::PruningPlan::read(run_dir.join("pruning.json"))
            .with_context(|| format!("run {name}: reading its pruning.json"))?;
        let kept_per_layer: Vec<usize> = plan.kept_experts.values().map(Vec::len).collect();
        let scores = evaluate(&run_dir, data, &device).with_context(|| format!("evaluating run {name}"))?;
        let retention = retention(&base.perplexity, &scores.perplexity);
        eprintln!(
            "[{:>2}/{}] {name:<44} ppl {}  retention {retention:.3}  mc acc {:.3}  prune {seconds:.1}s  ({:.0}s elapsed)",
            i + 1,
            specs.len(),
            fmt_ppl(&scores.perplexity),
            scores.mc.acc,
            started.elapsed().as_secs_f64()
        );
        results.push(RunResult { spec: spec.clone(), scores, retention, seconds, peak_rss_mb, kept_per_layer });
    }

    let command = command_line();
    let results_json = results_json(&base, &results, args, model_dir, &command);
    std::fs::write(dir.join("results.json"), format!("{}\n", serde_json::to_string_pretty(&results_json)?))
        .context("writing results.json")?;
    let ratios = &args.ratios;
    std::fs::write(dir.join("retention.svg"), retention_svg(&results, ratios)).context("writing retention.svg")?;
    let md = results_markdown(&base, &results, args, &command, started.elapsed().as_secs_f64());
    std::fs::write(dir.join("RESULTS.md"), &md).context("writing RESULTS.md")?;
    print!("{}", summary_table(&base, &results));
    Ok(())
}

/// The command line as typed (`cargo xtask bench-methods ...`).
fn command_line() -> String {
    let rest: Vec<String> = std::env::args().skip(2).collect();
    let mut s = String::from("cargo xtask bench-methods");
    for a in rest {
        s.push(' ');
        s.push_str(&a);
    }
    s
}

/// Reads the `peak rss  N MB` line of `xtask prune`'s summary.
fn parse_peak_rss(stdout: &str) -> Option<f64> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("peak rss"))?;
    line.trim().strip_suffix("MB")?.trim().parse().ok()
}

/// Mean over domains of base perplexity / pruned perplexity.
fn retention(base: &BTreeMap<&'static str, f64>, pruned: &BTreeMap<&'static str, f64>) -> f64 {
    let ratios: Vec<f64> = base.iter().map(|(d, b)| b / pruned[d]).collect();
    ratios.iter().sum::<f64>() / ratios.len() as f64
}

fn fmt_ppl(p: &BTreeMap<&'static str, f64>) -> String {
    DOMAINS.iter().map(|d| format!("{d} {:.2}", p[d])).collect::<Vec<_>>().join(" ")
}

/// Held-out ids and tokenised multiple-choice items of `model_dir`.
fn load_eval_data(model_dir: &Path, args: &BenchArgs) -> Result<EvalData> {
    let mut heldout = Vec::new();
    for d in DOMAINS {
        let path = model_dir.join("heldout").join(format!("{d}.ids.json"));
        let mut ids = diep_eval::read_ids_file(&path)?;
        if let Some(n) = args.heldout_limit {
            ids.truncate(n.max(1));
        }
        heldout.push((d, ids));
    }
    let tokenizer = diep_models::tokenizer::load_tokenizer(model_dir)?;
    let path = model_dir.join("mc.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut mc = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if args.mc_limit.is_some_and(|k| mc.len() >= k) {
            break;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let item: Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let context = item["context"].as_str().with_context(|| format!("{}: `context` must be a string", at()))?;
        let choices: Vec<&str> = item["choices"]
            .as_array()
            .and_then(|c| c.iter().map(Value::as_str).collect())
            .with_context(|| format!("{}: `choices` must be an array of strings", at()))?;
        let label = item["label"]
            .as_u64()
            .map(|l| l as usize)
            .filter(|l| *l < choices.len())
            .with_context(|| format!("{}: `label` must index `choices`", at()))?;
        let ctx = diep_models::tokenizer::encode(&tokenizer, context)?;
        if ctx.is_empty() {
            bail!("{}: the context has no tokens", at());
        }
        let mut sequences = Vec::new();
        for c in &choices {
            let ids = diep_models::tokenizer::encode(&tokenizer, c)?;
            if ids.is_empty() {
                bail!("{}: a choice has no tokens", at());
            }
            sequences.push(ctx.iter().chain(&ids).copied().collect());
        }
        mc.push(McItem {
            sequences,
            context_len: ctx.len(),
            choice_chars: choices.iter().map(|c| c.chars().count()).collect(),
            label,
        });
    }
    if mc.is_empty() {
        bail!("{}: no multiple-choice items", path.display());
    }
    Ok(EvalData { heldout, mc })
}

/// Perplexity per domain and multiple choice of the model in `dir`, on the CPU.
fn evaluate(dir: &Path, data: &EvalData, device: &diep_models::burn::tensor::Device) -> Result<Scores> {
    let model = MoeModel::load(dir, device).with_context(|| format!("loading model from {}", dir.display()))?;
    let mut perplexity = BTreeMap::new();
    for (d, ids) in &data.heldout {
        let report = diep_eval::perplexity(&model, ids, BATCH_TOKENS, |_, _| {})?;
        perplexity.insert(*d, report.perplexity);
    }
    let mc = multiple_choice(&model, &data.mc)?;
    Ok(Scores { perplexity, mc })
}

/// Scores every choice by the summed log-probability of its tokens given the context; `acc`
/// takes the argmax, `acc_norm` the argmax of the sum divided by the choice's length in
/// characters, with ties resolved as lm-eval does (`diep_eval::np_argmax`: the first maximum).
///
/// Sequences are sorted by length and batched with right padding (token 0): the model is
/// causal, so padding after a sequence does not change its own positions' logits, and only
/// the real positions are read.
fn multiple_choice(model: &MoeModel, items: &[McItem]) -> Result<McScores> {
    let mut seqs: Vec<(usize, usize)> =
        items.iter().enumerate().flat_map(|(i, it)| (0..it.sequences.len()).map(move |c| (i, c))).collect();
    seqs.sort_by_key(|(i, c)| items[*i].sequences[*c].len());
    let mut loglik: Vec<Vec<f64>> = items.iter().map(|it| vec![0.0; it.sequences.len()]).collect();
    let mut start = 0;
    while start < seqs.len() {
        // Sorted ascending: the last sequence of a batch is its longest.
        let mut end = start + 1;
        while end < seqs.len() {
            let (i, c) = seqs[end];
            if (end + 1 - start) * items[i].sequences[c].len() > BATCH_TOKENS {
                break;
            }
            end += 1;
        }
        let (li, lc) = seqs[end - 1];
        let len = items[li].sequences[lc].len();
        let batch: Vec<Vec<u32>> = seqs[start..end]
            .iter()
            .map(|(i, c)| {
                let mut s = items[*i].sequences[*c].clone();
                s.resize(len, 0);
                s
            })
            .collect();
        let nll = diep_eval::sequence_nll(model, &batch)?;
        for (k, (i, c)) in seqs[start..end].iter().enumerate() {
            let item = &items[*i];
            let real = item.sequences[*c].len();
            // Position t scores token t + 1: the choice's tokens are context_len..real.
            loglik[*i][*c] = -nll[k][item.context_len - 1..real - 1].iter().sum::<f64>();
        }
        start = end;
    }
    let argmax = diep_eval::np_argmax;
    let mut correct = 0usize;
    let mut correct_norm = 0usize;
    for (item, ll) in items.iter().zip(&loglik) {
        correct += usize::from(argmax(ll) == item.label);
        let norm: Vec<f64> = ll.iter().zip(&item.choice_chars).map(|(l, c)| l / (*c).max(1) as f64).collect();
        correct_norm += usize::from(argmax(&norm) == item.label);
    }
    let n = items.len() as f64;
    Ok(McScores { acc: correct as f64 / n, acc_norm: correct_norm as f64 / n, items: items.len(), loglik })
}

fn scores_json(s: &Scores) -> Value {
    json!({
        "perplexity": s.perplexity,
        "mc": {"acc": s.mc.acc, "acc_norm": s.mc.acc_norm, "items": s.mc.items},
    })
}

fn results_json(base: &Scores, results: &[RunResult], args: &BenchArgs, model_dir: &Path, command: &str) -> Value {
    let mut base_json = scores_json(base);
    base_json["mc"]["loglik"] = json!(base.mc.loglik);
    let runs: Vec<Value> = results
        .iter()
        .map(|r| {
            let mut v = json!({
                "name": r.spec.name(),
                "method": r.spec.method,
                "allocation": r.spec.allocation,
                "ratio": r.spec.ratio,
                "seed": r.spec.seed,
            });
            if r.spec.classic {
                v["classic"] = "--epochs 10 --refine 0".into();
            }
            if r.spec.zero_init {
                v["alpha_init"] = "zero".into();
            }
            if let Some(variant) = r.spec.variant {
                v["variant"] = variant.into();
            }
            let s = scores_json(&r.scores);
            v["perplexity"] = s["perplexity"].clone();
            v["mc"] = s["mc"].clone();
            v["retention"] = r.retention.into();
            v["seconds"] = r.seconds.into();
            v["peak_rss_mb"] = r.peak_rss_mb.into();
            v["kept_per_layer"] = json!(r.kept_per_layer);
            v["checkpoint"] = format!("runs/{}", r.spec.name()).into();
            v
        })
        .collect();
    json!({
        "command": command,
        "model": model_dir,
        "settings": {
            "samples": args.samples, "seq_len": args.seq_len, "calib": model_dir.join("calib.txt"),
            "heldout_sequences": args.heldout_limit, "mc_items": base.mc.items, "device": "cpu",
        },
        "base": base_json,
        "runs": runs,
    })
}

/// One row of a results table: a configuration, with random's seeds aggregated.
struct Row {
    label: String,
    variant: String,
    method: String,
    allocation: String,
    kept: String,
    /// (mean, spread) per column; spread is the sample standard deviation over seeds (0 for one run).
    ppl: BTreeMap<&'static str, (f64, f64)>,
    retention: (f64, f64),
    acc: (f64, f64),
    seconds: (f64, f64),
    rss: Option<f64>,
    runs: usize,
    diep_default: bool,
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 { (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (mean, sd)
}

/// Rows of one ratio, sorted by (mean) retention, best first.
fn rows(results: &[RunResult], ratio: f64) -> Vec<Row> {
    let mut groups: Vec<(String, Vec<&RunResult>)> = Vec::new();
    for r in results.iter().filter(|r| r.spec.ratio == ratio) {
        let label = r.spec.label();
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, g)) => g.push(r),
            None => groups.push((label, vec![r])),
        }
    }
    let mut rows: Vec<Row> = groups
        .into_iter()
        .map(|(label, g)| {
            let col = |f: &dyn Fn(&RunResult) -> f64| mean_sd(&g.iter().map(|r| f(r)).collect::<Vec<_>>());
            let kept: Vec<String> = g.iter().map(|r| kept_str(&r.kept_per_layer)).collect();
            let mut distinct = kept.clone();
            distinct.dedup();
            Row {
                variant: format!("{}{}", g[0].spec.variant.unwrap_or(""), g[0].spec.extras()),
                method: g[0].spec.method.to_string(),
                allocation: g[0].spec.allocation.to_string(),
                kept: distinct.join(", "),
                ppl: DOMAINS.iter().map(|d| (*d, col(&|r| r.scores.perplexity[d]))).collect(),
                retention: col(&|r| r.retention),
                acc: col(&|r| r.scores.mc.acc),
                seconds: col(&|r| r.seconds),
                rss: g.iter().filter_map(|r| r.peak_rss_mb).reduce(f64::max),
                runs: g.len(),
                diep_default: g[0].spec.is_diep_default(),
                label,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.retention.0.total_cmp(&a.retention.0));
    rows
}

fn kept_str(k: &[usize]) -> String {
    k.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("/")
}

/// `mean` or `mean ± sd` when the row aggregates several seeds.
fn pm(v: (f64, f64), runs: usize, digits: usize) -> String {
    if runs > 1 { format!("{:.digits$} ± {:.digits$}", v.0, v.1) } else { format!("{:.digits$}", v.0) }
}

fn unique_ratios(ratios: &[f64]) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    for r in ratios {
        if !out.contains(r) {
            out.push(*r);
        }
    }
    out
}

/// `RESULTS.md`: command, machine, base numbers, one table per ratio, the chart and an analysis.
fn results_markdown(base: &Scores, results: &[RunResult], args: &BenchArgs, command: &str, seconds: f64) -> String {
    let ratios = &args.ratios;
    let seeds = args.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let mut md = String::new();
    let _ = writeln!(md, "# Expert-pruning methods compared\n");
    let _ = writeln!(md, "Produced by\n\n```sh\n{command}\n```\n");
    let _ = writeln!(
        md,
        "in {:.0} s (prunes as subprocesses, evaluation in-process) on {} ({} CPU cores as seen by the \
         process), burn's CPU backend. Every prune: `--calib <model>/calib.txt --samples {} --seq-len {} --seed S` \
         (S = {seeds}), other settings default (DiEP under a global allocation runs 2 epochs and up to 3 rounds of `--refine`, under a uniform one the paper's 10 epochs; its global `10 ep, no refine` rows add `--epochs 10 --refine 0`, the paper's schedule). Perplexity: held-out `heldout/{{english,code}}.ids.json`; \
         retention = mean over the two domains of base perplexity / pruned perplexity (1 = unchanged). \
         MC: `mc.jsonl` ({} items, 4 choices), each choice scored by the summed log-probability of its tokens \
         given the context (context and choice tokenised separately and concatenated, as lm-evaluation-harness \
         does); `acc_norm` divides by the choice's length in characters, ties go to the first maximum \
         (lm-eval's rules, `diep_eval::np_argmax`). Seconds and peak RSS are those of the prune \
         subprocess. Every row is the mean ± sample standard deviation over the seeds, ranked by mean \
         retention.\n",
        seconds,
        cpu_model(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        args.samples,
        args.seq_len,
        base.mc.items,
    );
    let _ = writeln!(
        md,
        "Base model: perplexity english {:.2}, code {:.2}; MC acc {:.3}, acc_norm {:.3}.\n",
        base.perplexity["english"], base.perplexity["code"], base.mc.acc, base.mc.acc_norm
    );
    for ratio in unique_ratios(ratios) {
        let _ = writeln!(md, "## Ratio {ratio} (fraction of experts removed)\n");
        let rows = rows(results, ratio);
        // Retention relative to greedy-search of the same allocation, when it ran.
        let greedy = |alloc: &str| rows.iter().find(|r| r.method == "greedy-search" && r.allocation == alloc);
        let with_greedy = rows.iter().any(|r| r.method == "greedy-search");
        let _ = writeln!(
            md,
            "| method | variant | allocation | kept per layer | ppl english | ppl code | retention |{} MC acc | MC acc_norm | seconds | peak RSS MB |",
            if with_greedy { " vs greedy |" } else { "" }
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|{}---|---|---|---|", if with_greedy { "---|" } else { "" });
        for r in rows.iter() {
            let acc_norm = mean_sd(
                &results
                    .iter()
                    .filter(|x| x.spec.ratio == ratio && x.spec.label() == r.label)
                    .map(|x| x.scores.mc.acc_norm)
                    .collect::<Vec<_>>(),
            );
            let method = if r.diep_default { format!("**{}**", r.method) } else { r.method.clone() };
            let vs_greedy = match (with_greedy, greedy(&r.allocation)) {
                (false, _) => String::new(),
                (true, Some(g)) => format!(" {:.3} |", r.retention.0 / g.retention.0),
                (true, None) => " – |".into(),
            };
            let _ = writeln!(
                md,
                "| {method} | {} | {} | {} | {} | {} | {} |{vs_greedy} {} | {} | {} | {} |",
                r.variant,
                r.allocation,
                r.kept,
                pm(r.ppl["english"], r.runs, 2),
                pm(r.ppl["code"], r.runs, 2),
                pm(r.retention, r.runs, 3),
                pm(r.acc, r.runs, 3),
                pm(acc_norm, r.runs, 3),
                pm(r.seconds, r.runs, 1),
                r.rss.map(|m| format!("{m:.0}")).unwrap_or_else(|| "–".into()),
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "## Retention chart\n\n![retention per method and ratio](retention.svg)\n");
    // The prose about the shipped fixture's redundancy only describes the shipped fixture.
    let is_fixture = args.model.as_ref().is_none_or(|m| {
        let shipped = workspace_root().join("fixtures/trained-moe");
        matches!((m.canonicalize(), shipped.canonicalize()), (Ok(a), Ok(b)) if a == b)
    });
    let _ = writeln!(md, "## Analysis\n\n{}", analysis(results, ratios, is_fixture));
    md
}

/// A short, number-driven reading of the results.
fn analysis(results: &[RunResult], ratios: &[f64], is_fixture: bool) -> String {
    let mut text = String::new();
    let mut diep_always_best = true;
    let mut diep_present = false;
    for ratio in unique_ratios(ratios) {
        let rows = rows(results, ratio);
        let Some(best) = rows.first() else { continue };
        let _ = write!(
            text,
            "At ratio {ratio}, the best retention is {} ({:.3}; ppl english {:.2}, code {:.2}). ",
            best.label, best.retention.0, best.ppl["english"].0, best.ppl["code"].0
        );
        if let Some(d) = rows.iter().find(|r| r.diep_default) {
            diep_present = true;
            let baselines: Vec<&Row> = rows.iter().filter(|r| r.method != "diep").collect();
            let beaten_by: Vec<String> = baselines
                .iter()
                .filter(|b| b.retention.0 >= d.retention.0)
                .map(|b| format!("{} ({:.3})", b.label, b.retention.0))
                .collect();
            if beaten_by.is_empty() {
                let _ = write!(
                    text,
                    "DiEP (routed-gated, global; {:.3}) beats every baseline configuration here{}. ",
                    d.retention.0,
                    baselines
                        .first()
                        .map(|b| format!(", the best of which is {} ({:.3})", b.label, b.retention.0))
                        .unwrap_or_default()
                );
            } else {
                diep_always_best = false;
                let _ = write!(
                    text,
                    "DiEP (routed-gated, global; {:.3}) does not beat every baseline here: {} {} at least as well. ",
                    d.retention.0,
                    beaten_by.join(", "),
                    if beaten_by.len() == 1 { "does" } else { "do" }
                );
            }
            let mc_better: Vec<String> = baselines
                .iter()
                .filter(|b| b.acc.0 > d.acc.0)
                .map(|b| format!("{} ({:.3})", b.label, b.acc.0))
                .collect();
            if mc_better.is_empty() {
                let _ = write!(text, "On MC accuracy DiEP ({:.3}) is not below any baseline. ", d.acc.0);
            } else {
                let _ = write!(text, "On MC accuracy ({:.3}) it is below {}. ", d.acc.0, mc_better.join(", "));
            }
        }
        // Within each allocation: DiEP against the best baseline of the same allocation (a
        // uniform checkpoint competes with uniform baselines only).
        for alloc in ["uniform", "global"] {
            let Some(b) = rows.iter().find(|r| r.method != "diep" && r.allocation == alloc) else { continue };
            for d in rows
                .iter()
                .filter(|r| r.method == "diep" && r.allocation == alloc && r.variant.starts_with("routed-gated"))
            {
                let verdict = if d.retention.0 > b.retention.0 { "ahead of" } else { "not ahead of" };
                // A difference smaller than either row's spread over seeds is said to be one.
                let diff = d.retention.0 - b.retention.0;
                let spread = d.retention.1.max(b.retention.1);
                let within = if d.runs > 1 && diff.abs() < spread { ", within one standard deviation" } else { "" };
                let _ = write!(
                    text,
                    "Among {alloc} plans, {} ({}) is {verdict} the best {alloc} baseline, {} ({}; difference {diff:+.4}{within}). ",
                    d.label,
                    pm(d.retention, d.runs, 3),
                    b.label,
                    pm(b.retention, b.runs, 3)
                );
            }
        }
        text.push_str("\n\n");
    }
    // The paper's Mixtral-8x7B figure: 92% retained with half of the experts removed.
    let half = rows(results, 0.5);
    if let Some(d) = half.iter().find(|r| r.diep_default) {
        let best_baseline = half.iter().filter(|r| r.method != "diep").map(|r| r.retention.0).fold(0.0, f64::max);
        let _ = write!(
            text,
            "Target: the paper reports that DiEP keeps about 92% of Mixtral-8x7B's quality with half of the experts \
             removed. Here DiEP's default retains {:.3} of the perplexity at ratio 0.5, so that figure is {}. ",
            d.retention.0,
            if d.retention.0 >= 0.92 { "reached" } else { "NOT reached" }
        );
        if d.retention.0 < 0.92 && is_fixture {
            let _ = write!(
                text,
                "This fixture has much less redundancy than Mixtral-8x7B: it is a 4-layer model with 8 experts of width \
                 192 per layer, trained for 25 minutes on two domains, so its experts are few, small and specialised \
                 (expert usage per domain in fixtures/trained-moe/summary.json), and no selection can remove half of \
                 them cheaply: the best baseline keeps {best_baseline:.3}. Retention also multiplies through only 4 layers \
                 with no dense FFN to fall back on. The ranking between methods, not the absolute level, is what this \
                 benchmark measures."
            );
        }
        text.push_str("\n\n");
    }
    if diep_present {
        if diep_always_best {
            text.push_str(
                "In sum: DiEP's default configuration has the best retention of all baselines at every ratio measured.\n",
            );
        } else {
            text.push_str(
                "In sum: DiEP's default configuration does NOT beat every baseline at every ratio measured; \
                 see the tables above for where it falls behind.\n",
            );
        }
    } else {
        text.push_str("DiEP was not among the methods run.\n");
    }
    text.push_str(
        "Each row is a mean over the calibration seeds above, on one small model with 32 × 256 calibration \
         tokens; a difference smaller than the rows' standard deviations is not a ranking.\n",
    );
    text
}

/// The CPU model from `/proc/cpuinfo` (Linux), or `unknown CPU`.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A grouped bar chart: one group per configuration (method, variant, allocation), one bar per
/// ratio; random's bars are the mean over seeds with a ±sd whisker.
fn retention_svg(results: &[RunResult], ratios: &[f64]) -> String {
    let ratios = unique_ratios(ratios);
    let mut labels: Vec<String> = Vec::new();
    for r in results {
        if !labels.contains(&r.spec.label()) {
            labels.push(r.spec.label());
        }
    }
    let value = |label: &str, ratio: f64| -> Option<(f64, f64)> {
        let xs: Vec<f64> =
            results.iter().filter(|r| r.spec.ratio == ratio && r.spec.label() == label).map(|r| r.retention).collect();
        (!xs.is_empty()).then(|| mean_sd(&xs))
    };
    let ymax = results.iter().map(|r| r.retention).fold(1.0f64, f64::max);
    let ymax = (ymax * 10.0).ceil() / 10.0;
    let colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948"];
    let (left, top, plot_h, bottom) = (60.0, 40.0, 300.0, 150.0);
    let bar_w = 14.0;
    let group_w = bar_w * ratios.len() as f64 + 16.0;
    let width = left + group_w * labels.len() as f64 + 20.0;
    let height = top + plot_h + bottom;
    let y = |v: f64| top + plot_h * (1.0 - v / ymax);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">Retention (mean over domains of base ppl / pruned ppl) per configuration and ratio</text>"#
    );
    // Axis, grid and ticks.
    let ticks = (ymax * 10.0).round() as usize;
    for t in 0..=ticks {
        let v = t as f64 / 10.0;
        if ticks > 10 && t % 2 == 1 {
            continue;
        }
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="{}" stroke-width="1"/>"##,
            width - 20.0,
            if (v - 1.0).abs() < 1e-9 { "#888" } else { "#e5e5e5" }
        );
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.1}</text>"#, left - 6.0, yy + 4.0);
    }
    let _ = writeln!(s, r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="black"/>"#, top + plot_h);
    for (gi, label) in labels.iter().enumerate() {
        let gx = left + 8.0 + group_w * gi as f64;
        for (ri, ratio) in ratios.iter().enumerate() {
            let Some((m, sd)) = value(label, *ratio) else { continue };
            let x = gx + bar_w * ri as f64;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} @ {ratio}: {m:.3}</title></rect>"#,
                y(m),
                bar_w - 1.0,
                (top + plot_h - y(m)).max(0.0),
                colors[ri % colors.len()],
                diep_common::xml::escape(label)
            );
            if sd > 0.0 {
                let cx = x + (bar_w - 1.0) / 2.0;
                let _ = writeln!(
                    s,
                    r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="black"/>"#,
                    y(m + sd),
                    y((m - sd).max(0.0))
                );
            }
        }
        let lx = gx + bar_w * ratios.len() as f64 / 2.0;
        let ly = top + plot_h + 10.0;
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" text-anchor="end" transform="rotate(-50 {lx:.1} {ly:.1})">{}</text>"#,
            diep_common::xml::escape(label)
        );
    }
    // Legend.
    for (ri, ratio) in ratios.iter().enumerate() {
        let x = width - 140.0;
        let yy = top + 16.0 * ri as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{yy:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">ratio {ratio}</text>"#,
            colors[ri % colors.len()],
            x + 14.0,
            yy + 9.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The final table on stdout: every run, in run order.
fn summary_table(base: &Scores, results: &[RunResult]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<44} {:>12} {:>10} {:>10} {:>9} {:>7} {:>8} {:>8}",
        "run", "kept", "ppl en", "ppl code", "retention", "mc acc", "seconds", "rss MB"
    );
    let _ = writeln!(
        t,
        "{:<44} {:>12} {:>10.2} {:>10.2} {:>9.3} {:>7.3} {:>8} {:>8}",
        "base", "", base.perplexity["english"], base.perplexity["code"], 1.0, base.mc.acc, "", ""
    );
    for r in results {
        let _ = writeln!(
            t,
            "{:<44} {:>12} {:>10.2} {:>10.2} {:>9.3} {:>7.3} {:>8.1} {:>8}",
            r.spec.name(),
            kept_str(&r.kept_per_layer),
            r.scores.perplexity["english"],
            r.scores.perplexity["code"],
            r.retention,
            r.scores.mc.acc,
            r.seconds,
            r.peak_rss_mb.map(|m| format!("{m:.0}")).unwrap_or_else(|| "–".into())
        );
    }
    t
}
