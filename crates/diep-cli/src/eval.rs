//! `diep eval` (also `cargo xtask eval`): perplexity over token ids and text files, and
//! multiple-choice tasks scored as lm-evaluation-harness scores them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use diep_eval::report::{Metrics, TaskMetric};
use diep_eval::{LmTokenizer, TaskFormat};
use diep_models::{CausalLm, DeviceSpec, MoeModel};
use serde_json::{Value, json};

use crate::util::{progress_bar, write_atomic};

/// What to evaluate: shared by `eval` and `compare`.
#[derive(Args, Clone)]
pub struct EvalInputs {
    /// JSON array of token-id sequences, e.g. `[[1, 2, 3], [4, 5, 6]]` (repeatable).
    #[arg(long, value_name = "FILE")]
    ids: Vec<PathBuf>,
    /// Text file: tokenised whole with no special tokens, cut into non-overlapping windows of
    /// --seq-len tokens (the last partial window is dropped); perplexity over all windows
    /// (repeatable).
    #[arg(long, value_name = "FILE")]
    text: Vec<PathBuf>,
    /// Multiple-choice task `NAME=FILE.jsonl` or `NAME:FORMAT=FILE.jsonl` (repeatable). The
    /// format is lm-eval's zero-shot template of that task, reading the HF dataset's own fields:
    /// boolq, rte, openbookqa, arc_easy, arc_challenge, hellaswag, winogrande, piqa, mmlu,
    /// `mmlu_<subject>`; or `generic` ({"context", "choices", "gold"}). Without `:FORMAT` the
    /// name is the format.
    #[arg(long, value_name = "NAME=FILE")]
    task: Vec<String>,
    /// Window length in tokens for --text.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Score at most this many documents of each task (the first ones), like lm-eval's --limit.
    #[arg(long)]
    limit: Option<usize>,
    /// Largest number of (padded) input tokens in one forward batch.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// Score every request with its own forward pass. By default requests whose context +
    /// continuation[:-1] tokens are equal share one, as lm-eval's default `logits_cache=True`
    /// does (needed to reproduce its numbers exactly; see docs/EVALUATION.md).
    #[arg(long)]
    no_logits_cache: bool,
    /// Compute device: cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Forward engine. `auto`: on `--device cpu` without `--dynamic-skip`, the fused CPU
    /// engine (crate `diep-infer`: plain weight buffers, bf16 kept 16-bit, fused attention,
    /// MoE and NLL kernels), else the burn model; `burn`: always the burn model that pruning
    /// uses; `fused`: the fused engine or an error saying why not.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
}

/// The forward engine of `eval` (see `--engine`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The fused CPU engine where possible, else burn.
    Auto,
    /// The burn model.
    Burn,
    /// The fused CPU engine, or an error.
    Fused,
}

/// The loaded model behind one of the engines.
#[allow(clippy::large_enum_variant)] // one per run
enum Loaded {
    Burn(MoeModel),
    #[cfg(feature = "cpu")]
    Fused(diep_infer::CpuModel),
}

impl Loaded {
    fn lm(&self) -> &dyn CausalLm {
        match self {
            Loaded::Burn(m) => m,
            #[cfg(feature = "cpu")]
            Loaded::Fused(m) => m,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Loaded::Burn(_) => "burn",
            #[cfg(feature = "cpu")]
            Loaded::Fused(_) => "fused-cpu",
        }
    }
}

/// Loads the model behind the engine `--engine` picks (see [`Engine`]), with the dynamic
/// skipping rules installed when asked for (burn only).
fn load_model(dir: &Path, inputs: &EvalInputs, dynamic_skip: bool) -> Result<(Loaded, Vec<diep_models::DynamicSkip>)> {
    // A bad config.json fails here, the same way whichever engine would have run.
    diep_models::checkpoint::ModelConfig::from_dir(dir)?;
    let why_not = if inputs.engine == Engine::Burn {
        Some("--engine burn".to_string())
    } else if inputs.device != DeviceSpec::Cpu {
        Some(format!("it runs on the CPU only (--device {})", inputs.device))
    } else if dynamic_skip {
        Some("--dynamic-skip needs the burn model".to_string())
    } else if !cfg!(feature = "cpu") {
        Some("this build has no `cpu` feature".to_string())
    } else {
        // The engine covers every architecture; `CpuModel::load` still checks each layer.
        None
    };
    match (why_not, inputs.engine) {
        (None, _) => Ok((fused(dir)?, Vec::new())),
        (Some(why), Engine::Fused) => bail!("--engine fused: the fused CPU engine cannot run this model: {why}"),
        (Some(why), engine) => {
            // The device first: a missing GPU is the one line printed.
            let device = inputs.device.device()?;
            if engine == Engine::Auto {
                eprintln!("engine: burn (the fused CPU engine does not apply: {why})");
            }
            let mut model =
                MoeModel::load(dir, &device).with_context(|| format!("loading model from {}", dir.display()))?;
            let rules = if dynamic_skip { install_dynamic_skip(&mut model, dir)? } else { Vec::new() };
            Ok((Loaded::Burn(model), rules))
        }
    }
}

#[cfg(feature = "cpu")]
fn fused(dir: &Path) -> Result<Loaded> {
    let model = diep_infer::CpuModel::load(dir).with_context(|| format!("loading model from {}", dir.display()))?;
    let (bytes, types) = model.resident_weights();
    eprintln!("fused CPU engine: weights held in {} ({:.1} MB)", types.join("/"), bytes as f64 / 1e6);
    Ok(Loaded::Fused(model))
}

#[cfg(not(feature = "cpu"))]
fn fused(_: &Path) -> Result<Loaded> {
    unreachable!("load_model picks the burn model in builds without the cpu feature")
}

/// Arguments of `diep eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// HuggingFace model directory (config.json + safetensors, tokenizer.json for --text/--task),
    /// or a hub id `org/name[@revision]` found in the local HuggingFace hub cache.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    inputs: EvalInputs,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one JSON line per task document (log-likelihoods, predictions, gold) to this file.
    #[arg(long, value_name = "FILE")]
    log_samples: Option<PathBuf>,
    /// Skip a token's second expert when its weight is below γ times the first's, with the
    /// per-layer γ tables that `prune --dynamic-skip` wrote into the model's pruning.json.
    #[arg(long)]
    dynamic_skip: bool,
}

/// A parsed `--task` argument.
struct TaskSpec {
    name: String,
    format: TaskFormat,
    file: PathBuf,
}

fn parse_task(arg: &str) -> Result<TaskSpec> {
    let (lhs, file) = arg.split_once('=').with_context(|| format!("--task {arg:?}: expected NAME=FILE.jsonl"))?;
    let (name, format) = match lhs.split_once(':') {
        Some((name, format)) => (name, format.parse::<TaskFormat>().map_err(anyhow::Error::msg)?),
        None => (
            lhs,
            TaskFormat::from_task_name(lhs).with_context(|| {
                format!(
                    "--task {arg:?}: `{lhs}` is not a known task; name the format as NAME:FORMAT=FILE (formats: {})",
                    TaskFormat::NAMES
                )
            })?,
        ),
    };
    if name.is_empty() || file.is_empty() {
        bail!("--task {arg:?}: expected NAME=FILE.jsonl");
    }
    Ok(TaskSpec { name: name.to_owned(), format, file: PathBuf::from(file) })
}

/// The key an input file is reported under: its file name, or the whole path when two
/// inputs share a file name.
fn input_keys(paths: &[&PathBuf]) -> Vec<String> {
    let names: Vec<String> =
        paths.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    names
        .iter()
        .zip(paths)
        .map(|(n, p)| if names.iter().filter(|m| *m == n).count() > 1 { p.display().to_string() } else { n.clone() })
        .collect()
}

/// Installs the `dynamic_skip` tables of `DIR/pruning.json` on the model.
fn install_dynamic_skip(model: &mut MoeModel, dir: &Path) -> Result<Vec<diep_models::DynamicSkip>> {
    let path = dir.join("pruning.json");
    let plan = diep_surgery::PruningPlan::read(&path)?;
    let tables = plan.extra.get("dynamic_skip").and_then(|v| v.as_object()).with_context(|| {
        format!("{}: no `dynamic_skip` field; prune with --dynamic-skip to compute the γ tables", path.display())
    })?;
    let mut rules = Vec::new();
    for (layer, table) in tables {
        let l: usize = layer.parse().with_context(|| format!("{}: `dynamic_skip` key `{layer}`", path.display()))?;
        let gamma: Vec<f32> = table["gamma"]
            .as_array()
            .with_context(|| format!("{}: `dynamic_skip.{layer}.gamma` is missing", path.display()))?
            .iter()
            .flat_map(|row| row.as_array().into_iter().flatten())
            .map(|v| v.as_f64().map(|x| x as f32))
            .collect::<Option<_>>()
            .with_context(|| format!("{}: `dynamic_skip.{layer}.gamma` must be a matrix of numbers", path.display()))?;
        let n = model.moe_block(l).map(|b| b.num_experts()).unwrap_or(0);
        let rule = diep_models::DynamicSkip::new(gamma, n).with_context(|| format!("{}: layer {l}", path.display()))?;
        model.set_dynamic_skip(l, Some(rule.clone())).with_context(|| format!("{}: layer {l}", path.display()))?;
        rules.push(rule);
    }
    Ok(rules)
}

/// Everything one evaluation produced.
pub struct Evaluation {
    /// Perplexities and task accuracies.
    pub metrics: Metrics,
    /// The full JSON report.
    pub json: Value,
    /// Per-document task results, one JSON object each.
    pub samples: Vec<Value>,
}

/// Reads and checks every input before the model is loaded, so bad input fails fast.
struct LoadedInputs {
    ids: Vec<(String, Vec<Vec<u32>>)>,
    text: Vec<(String, PathBuf)>,
    tasks: Vec<(TaskSpec, Vec<diep_eval::McDoc>)>,
}

fn load_inputs(inputs: &EvalInputs) -> Result<LoadedInputs> {
    if inputs.ids.is_empty() && inputs.text.is_empty() && inputs.task.is_empty() {
        bail!("nothing to evaluate: give --ids FILE, --text FILE or --task NAME=FILE.jsonl");
    }
    let mut all: Vec<&PathBuf> = inputs.ids.iter().chain(&inputs.text).collect();
    let keys = input_keys(&all);
    let ids = inputs
        .ids
        .iter()
        .zip(&keys)
        .map(|(p, k)| Ok((k.clone(), diep_eval::read_ids_file(p)?)))
        .collect::<Result<Vec<_>>>()?;
    let text = inputs.text.iter().zip(&keys[inputs.ids.len()..]).map(|(p, k)| (k.clone(), p.clone())).collect();
    all.clear();
    let mut tasks: Vec<(TaskSpec, Vec<diep_eval::McDoc>)> = Vec::new();
    for arg in &inputs.task {
        let spec = parse_task(arg)?;
        if tasks.iter().any(|(t, _)| t.name == spec.name) {
            bail!("--task {arg:?}: the name `{}` is given twice", spec.name);
        }
        let mut docs = diep_eval::load_task(&spec.file, &spec.format)?;
        if let Some(k) = inputs.limit {
            docs.truncate(k);
        }
        tasks.push((spec, docs));
    }
    Ok(LoadedInputs { ids, text, tasks })
}

/// Evaluates a model directory on `inputs`.
pub fn evaluate(model_dir: &Path, inputs: &EvalInputs, dynamic_skip: bool) -> Result<Evaluation> {
    let loaded = load_inputs(inputs)?;
    let needs_tokenizer = !loaded.text.is_empty() || !loaded.tasks.is_empty();
    let tokenizer = if needs_tokenizer {
        Some(LmTokenizer::from_dir(model_dir).with_context(|| format!("tokenizer of {}", model_dir.display()))?)
    } else {
        None
    };
    let load_start = Instant::now();
    let (loaded_model, skip_rules) = load_model(model_dir, inputs, dynamic_skip)?;
    let c = diep_models::checkpoint::ModelConfig::from_dir(model_dir)?;
    eprintln!(
        "model: {} ({}), {} layers ({} MoE), {} experts, top-{}, loaded in {:.2}s on {}",
        model_dir.display(),
        c.architecture.model_type(),
        c.num_layers,
        c.layers.iter().filter(|k| matches!(k, diep_models::checkpoint::LayerKind::Moe { .. })).count(),
        c.moe.num_experts,
        c.moe.top_k,
        load_start.elapsed().as_secs_f64(),
        inputs.device
    );
    eprintln!("engine: {}", loaded_model.name());
    let model = loaded_model.lm();

    let mut metrics = Metrics::default();
    let mut details = serde_json::Map::new();
    let (mut fwd_tokens, mut fwd_seconds) = (0usize, 0f64);
    let mut sequences: Vec<(String, Vec<Vec<u32>>)> = loaded.ids;
    for (key, path) in &loaded.text {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let windows = diep_eval::text_windows(tokenizer.as_ref().expect("loaded"), &text, inputs.seq_len)?;
        if windows.is_empty() {
            let n = tokenizer.as_ref().expect("loaded").encode_plain(&text)?.len();
            bail!(
                "{}: {n} tokens, fewer than one window of --seq-len {}; lower --seq-len or give more text",
                path.display(),
                inputs.seq_len
            );
        }
        sequences.push((key.clone(), windows));
    }
    for (key, seqs) in &sequences {
        let pb = progress_bar(seqs.len() as u64, "sequences");
        let report = diep_eval::perplexity(model, seqs, inputs.batch_tokens, |done, _| pb.set_position(done as u64))?;
        pb.finish_and_clear();
        eprintln!(
            "{key}: perplexity {:.4} over {} predictions ({:.0} tok/s)",
            report.perplexity, report.predictions, report.tokens_per_second
        );
        fwd_tokens += report.tokens;
        fwd_seconds += report.seconds;
        metrics.perplexity.insert(key.clone(), report.perplexity);
        details.insert(key.clone(), serde_json::to_value(&report)?);
    }

    let mut task_json = serde_json::Map::new();
    let mut samples = Vec::new();
    if !loaded.tasks.is_empty() {
        let tok = tokenizer.as_ref().expect("loaded");
        let max_length = diep_eval::lm_eval_max_length(model_dir)?;
        let requests: usize = loaded.tasks.iter().flat_map(|(_, docs)| docs).map(|d| d.requests.len()).sum();
        let opts = diep_eval::LoglikOptions {
            max_length,
            max_batch_tokens: inputs.batch_tokens,
            logits_cache: !inputs.no_logits_cache,
        };
        // All tasks in one pass, as lm-eval's evaluator runs them.
        let pb = progress_bar(requests as u64, "requests");
        let start = Instant::now();
        let task_docs: Vec<&[diep_eval::McDoc]> = loaded.tasks.iter().map(|(_, d)| d.as_slice()).collect();
        let all = diep_eval::evaluate_tasks(model, tok, &task_docs, opts, |done, _| pb.set_position(done as u64))?;
        pb.finish_and_clear();
        eprintln!("{requests} multiple-choice requests in {:.1}s", start.elapsed().as_secs_f64());
        for ((spec, _), scores) in loaded.tasks.iter().zip(all) {
            eprintln!(
                "{}: acc {:.4}  acc_norm {:.4}  ({} documents)",
                spec.name, scores.acc, scores.acc_norm, scores.n
            );
            metrics
                .tasks
                .insert(spec.name.clone(), TaskMetric { acc: scores.acc, acc_norm: scores.acc_norm, n: scores.n });
            task_json.insert(
                spec.name.clone(),
                json!({"acc": scores.acc, "acc_norm": scores.acc_norm, "n": scores.n,
                       "format": format!("{:?}", spec.format), "file": spec.file}),
            );
            for d in &scores.docs {
                let mut v = serde_json::to_value(d)?;
                v["task"] = json!(spec.name);
                v["acc"] = json!((d.pred == d.gold) as u8 as f64);
                v["acc_norm"] = json!((d.pred_norm == d.gold) as u8 as f64);
                samples.push(v);
            }
        }
    }

    let mut out = json!({
        "perplexity": metrics.perplexity,
        "tasks": task_json,
        "details": details,
        "tokens": fwd_tokens,
        "tokens_per_second": if fwd_seconds > 0.0 { fwd_tokens as f64 / fwd_seconds } else { 0.0 },
        "model": model_dir,
        "model_type": c.architecture.model_type(),
        "device": inputs.device.to_string(),
        "engine": loaded_model.name(),
    });
    if !loaded.text.is_empty() {
        out["seq_len"] = json!(inputs.seq_len);
    }
    if dynamic_skip {
        let (skipped, eligible) = skip_rules.iter().map(|r| r.counts()).fold((0, 0), |(a, b), (s, e)| (a + s, b + e));
        out["dynamic_skip"] = json!({
            "skipped": skipped,
            "eligible": eligible,
            "fraction": skipped as f64 / eligible.max(1) as f64,
        });
    }
    Ok(Evaluation { metrics, json: out, samples })
}

/// Writes `samples` as JSON lines, atomically.
pub fn write_samples(path: &Path, samples: &[Value]) -> Result<()> {
    let mut buf = Vec::new();
    for s in samples {
        serde_json::to_writer(&mut buf, s)?;
        buf.write_all(b"\n")?;
    }
    write_atomic(path, &buf)
}

/// Runs `diep eval`: evaluates the model on every input, prints the results and writes them
/// with `--json`.
pub fn run(args: EvalArgs) -> Result<()> {
    let model = crate::util::model_dir(&args.model)?;
    let eval = evaluate(&model, &args.inputs, args.dynamic_skip)?;
    let text = serde_json::to_string_pretty(&eval.json)?;
    println!("{text}");
    if let Some(path) = &args.json {
        write_atomic(path, format!("{text}\n").as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.log_samples {
        write_samples(path, &eval.samples)?;
        eprintln!("wrote {} ({} documents)", path.display(), eval.samples.len());
    }
    Ok(())
}
