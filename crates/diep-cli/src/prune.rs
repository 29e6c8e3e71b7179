//! `diep prune` (also `cargo xtask prune`): computes a pruning plan with a criterion on
//! calibration text, or reads one, and writes the smaller checkpoint.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use diep_checkpoint::{Checkpoint, ModelConfig};
use diep_models::{DeviceSpec, StreamingModel};
use diep_optim::{DiepSettings, DiepState, Event, Objective, OptimizerKind, RelaxationKind, ThresholdMode};
use diep_plan::{Allocation, Constraints, PruningPlan, check_ratio};
use diep_prune::calib::{CalibrationMix, CalibrationSpec, sample_calibration};
use diep_prune::{BaselineSpec, Method};
use diep_surgery::{SurgeryOptions, SurgeryReport, apply_plan};

use crate::util::progress_bar;

/// Arguments of `diep prune`.
#[derive(Args)]
pub struct PruneArgs {
    /// HuggingFace model directory to prune, or a hub id `org/name[@revision]` found in the
    /// local HuggingFace hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`).
    #[arg(long)]
    model: PathBuf,
    /// Output directory for the pruned checkpoint (written atomically; must not exist
    /// unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Apply an existing pruning.json instead of computing a plan.
    #[arg(long, conflicts_with_all = ["method", "ratio", "calib"])]
    plan: Option<PathBuf>,
    /// Pruning method: diep (learned α/β, non-uniform), greedy-search (remove one expert at a
    /// time by the calibration objective; slow, a reference), or a baseline criterion: random,
    /// frequency, soft-activation, reap or naee.
    #[arg(long)]
    method: Option<PruneMethod>,
    /// Budget allocation: uniform (same count per layer) or global (one ranking over layers).
    /// Default: global for diep, uniform for the baselines.
    #[arg(long)]
    allocation: Option<Allocation>,
    /// Fraction of routed experts to remove in total, 0 < R < 1.
    #[arg(long, allow_negative_numbers = true)]
    ratio: Option<f64>,
    /// Calibration text: plain text, or JSONL with a `text` field (repeatable).
    #[arg(long)]
    calib: Vec<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    samples: usize,
    /// How the samples are shared among several --calib files: `pooled` (one stream, each file
    /// in proportion to its tokens) or `equal` (the same number of samples from every file).
    #[arg(long, default_value = "pooled")]
    calib_mix: CalibrationMix,
    /// Tokens per calibration sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Seed of calibration sampling and of the random method.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Minimum experts kept per layer (at least num_experts_per_tok).
    #[arg(long, default_value_t = 0)]
    min_experts: usize,
    /// Compute device: cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Calibration sequences per batch (default 8; for diep 16, the paper's, per step).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Calibration tokens whose MoE inputs/outputs NAEE caches per layer.
    #[arg(long, default_value_t = 2048)]
    naee_tokens: usize,
    /// NAEE refuses layers with more expert subsets than this.
    #[arg(long, default_value_t = 100_000)]
    naee_max_subsets: u128,
    /// Largest output shard in bytes (transformers' default is 5 GB).
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_bytes: u64,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// Fold each removed expert into its most similar kept expert (normalised CKA of expert
    /// outputs; merge weights softmax over the similarities) instead of dropping it.
    #[arg(long)]
    merge: bool,
    /// Compute per-layer γ tables for dynamic skipping of the second expert at evaluation
    /// (`eval --dynamic-skip`), stored in pruning.json.
    #[arg(long)]
    dynamic_skip: bool,
    /// Calibration tokens per layer on which expert similarity (CKA) is measured.
    #[arg(long, default_value_t = 512)]
    similarity_tokens: usize,
    /// Rounds of local search after the plan is computed (any method): in every layer the best
    /// swap of a kept and a removed expert, and under a global allocation the best move of an
    /// expert between layers, each kept only if it is clearly better on the calibration objective
    /// (KL to the original model; --refine-margin). Rounds after the first look within the layers
    /// the round before changed (and between layers); it stops when a round changes nothing.
    /// 0: none. Default: up to 3 for diep under a global allocation, else 0.
    #[arg(long)]
    refine: Option<usize>,
    /// Calibration sequences the greedy search and --refine score plans on (the first ones
    /// sampled; 0: all).
    #[arg(long, default_value_t = 0)]
    search_samples: usize,
    /// --refine considers, in each layer, the N lowest-scored kept and the N highest-scored removed
    /// experts of the method's scores (0: every expert).
    #[arg(long, default_value_t = 0)]
    refine_width: usize,
    /// --refine screens candidates on this many of the scored sequences (spread evenly over
    /// them; 0: all of them) cut to --refine-screen-tokens, and scores only the best
    /// --refine-confirm that lower the objective there on the whole sequences (a move between
    /// layers: the best-ranked pair always).
    #[arg(long, default_value_t = 0)]
    refine_screen: usize,
    /// Tokens of each sequence --refine's screening scores (0: whole sequences, no screening
    /// unless --refine-screen). Default: a quarter of --seq-len.
    #[arg(long)]
    refine_screen_tokens: Option<usize>,
    /// Candidates per decision --refine scores on the whole sequences after screening.
    #[arg(long, default_value_t = 2)]
    refine_confirm: usize,
    /// --refine accepts a change only when its paired t over the per-sequence objective is at
    /// most −M or it lowers the objective by the fraction --refine-gain; 0 and 0 (the default):
    /// any decrease, as the greedy search.
    #[arg(long, default_value_t = 0.0)]
    refine_margin: f64,
    /// See --refine-margin.
    #[arg(long, default_value_t = 0.0)]
    refine_gain: f64,
    /// A --refine round estimated above this many forward passes over the calibration set looks
    /// only at the experts nearest each layer's cut (the widest --refine-width that fits); when
    /// even one each side does not fit, DiEP's default round is skipped and an explicit
    /// --refine refused, naming the estimate.
    #[arg(long, default_value_t = 32.0)]
    refine_max_passes: f64,
    /// The greedy search refuses to start when its estimated cost exceeds this many forward
    /// passes over the scored sequences.
    #[arg(long, default_value_t = 20_000.0)]
    search_max_passes: f64,
    #[command(flatten)]
    diep: DiepArgs,
}

/// The options of `--method diep`.
#[derive(Args)]
#[command(next_help_heading = "DiEP (--method diep)")]
pub struct DiepArgs {
    /// Relaxation of the expert-combination space: `routed-gated` (router bias log p and
    /// contributions gated by p), `routed` (router bias only) — both exact at hard masks — or
    /// `paper` (routed contributions scaled by β·N·softmax(α)).
    #[arg(long, default_value = "routed-gated")]
    relaxation: RelaxationKind,
    /// Objective: `kl` (to the original model's next-token distribution; the default),
    /// `ce-norm` (the paper's CE + λ‖F′−F‖; with `--lr 5e-3` the paper's settings) or
    /// `layer-wise` (per-block reconstruction; streams the model).
    #[arg(long, default_value = "kl")]
    objective: Objective,
    /// Routed relaxation: `implicit` gives the global threshold θ the budget's gradient
    /// (zero-sum keep budget); `fixed` treats it as a constant of each step.
    #[arg(long, default_value = "implicit")]
    threshold: ThresholdMode,
    /// Passes over the calibration set. Default: 2 under a global allocation (then --refine 3),
    /// the paper's 10 under a uniform one.
    #[arg(long)]
    epochs: Option<usize>,
    /// Peak learning rate (cosine schedule); the paper's is 5e-3.
    #[arg(long, default_value_t = 0.02)]
    lr: f64,
    /// Update rule: adam or sgd.
    #[arg(long, default_value = "adam")]
    optimizer: OptimizerKind,
    /// α steps : β steps in each alternation cycle.
    #[arg(long, default_value = "3:1")]
    alternation: String,
    /// λ of the ce-norm objective.
    #[arg(long, default_value_t = 0.01)]
    lambda: f64,
    /// Temperature of the routed relaxation at the first step.
    #[arg(long, default_value_t = 0.1)]
    tau_start: f64,
    /// Temperature at the last step (annealed geometrically).
    #[arg(long, default_value_t = 0.01)]
    tau_end: f64,
    /// Sampled masks: each step's forward pass runs on a mask drawn around the keep
    /// probabilities, `σ(((s − θ)/τ + logistic noise)/t)`, with this concrete temperature `t`
    /// (smaller: harder masks). 0: the deterministic relaxation.
    #[arg(long, default_value_t = 0.0)]
    mask_noise: f64,
    /// Where α/β state is saved after every epoch (default: `<out>.diep-state.json`).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Continue from the saved state (same settings and calibration data) instead of
    /// starting afresh.
    #[arg(long)]
    resume: bool,
    /// How α starts: from the original model's experts on the calibration set, `reap` (REAP's
    /// score: mean over routed tokens of gate × output norm), `soft-activation` (mean router
    /// probability) or `frequency` (top-k selections), α = scale · ln(share) and, under a global
    /// allocation, β set so the start ranks every expert as the criterion's global plan; the
    /// start's own plan is the first candidate of the epoch selection. `auto`: each of the three
    /// plans is scored by the calibration objective and the lowest is the start. `zero`: α = 0,
    /// β = 1 (the paper's start).
    #[arg(long, default_value = "auto")]
    alpha_init: diep_optim::AlphaInit,
    /// The scale of a statistics-based α start (smaller: the optimiser moves the ranking more
    /// easily).
    #[arg(long, default_value_t = 0.5)]
    alpha_init_scale: f64,
    /// Which epoch's scores make the plan: `best` (every epoch's plan is scored by the kl
    /// objective with hard masks on the calibration set) or `last`.
    #[arg(long, default_value = "best", value_parser = ["best", "last"])]
    select_epoch: String,
    /// Calibration sequences the epochs' plans are scored on (the first ones; 0: all).
    #[arg(long, default_value_t = 0)]
    select_samples: usize,
    /// How clearly an epoch's plan must beat the best so far (at first the statistics-based
    /// start's) to replace it: in standard errors of the two plans' paired per-sequence kl
    /// difference. 0: any lower mean replaces it.
    #[arg(long, default_value_t = 2.0)]
    select_margin: f64,
    /// An epoch's plan whose kl is lower than the selected plan's by at least this fraction of
    /// it replaces that plan whatever the margin says (a large gain confined to a few
    /// sequences); 0: the margin alone decides.
    #[arg(long, default_value_t = 0.1)]
    select_gain: f64,
    /// Stop once this many epochs in a row have not replaced the selected plan (the schedules
    /// stay those of the whole run); 0: run every epoch (the default: a late epoch can still
    /// win, docs/METHOD.md).
    #[arg(long, default_value_t = 0)]
    patience: usize,
    /// Tokens per position kept of the original model's next-token distribution for the `kl`
    /// objective (the rest is one "other" outcome); 0 keeps the whole vocabulary (exact).
    /// Default: exact while the whole reference fits in 1 GiB (samples × seq-len × vocabulary
    /// × 4 bytes), else 64.
    #[arg(long)]
    reference_top_k: Option<usize>,
    /// Calibration sequences per micro-batch within a step (0: the whole batch): bounds the
    /// autodiff memory of one layer's recomputation; the gradient is the same.
    #[arg(long, default_value_t = 0)]
    micro_batch: usize,
    /// Where the hidden states at layer boundaries are kept during a step: `auto` (host for
    /// GPUs), `device` or `host`.
    #[arg(long, default_value = "auto")]
    boundaries: String,
}

/// `--method`: DiEP, the greedy search or a baseline criterion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PruneMethod {
    /// Differentiable expert pruning.
    Diep,
    /// Greedy removal by the calibration objective (the quality reference).
    GreedySearch,
    /// A baseline criterion.
    Baseline(Method),
}

impl FromStr for PruneMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "diep" => return Ok(PruneMethod::Diep),
            "greedy-search" => return Ok(PruneMethod::GreedySearch),
            _ => {}
        }
        s.parse::<Method>().map(PruneMethod::Baseline).map_err(|_| {
            let names: Vec<&str> =
                ["diep", "greedy-search"].into_iter().chain(Method::ALL.iter().map(|m| m.name())).collect();
            format!("unknown method `{s}`; expected one of {}", names.join(", "))
        })
    }
}

/// Runs `diep prune`: computes (or reads) the plan, applies it and prints the summary.
pub fn run(mut args: PruneArgs) -> Result<()> {
    let start = Instant::now();
    args.model = crate::util::model_dir(&args.model)?;
    // Cheap checks first, before any heavy work.
    if args.out.exists() && !args.force {
        bail!("output directory {} already exists (use --force to replace it)", args.out.display());
    }
    check_refine_args(&args)?;
    let mut config = ModelConfig::from_dir(&args.model)?;
    let ckpt = Checkpoint::open(&args.model)?;
    config.drop_absent_mtp_layers(&ckpt);
    if args.merge
        && let Some(scheme) = config.fp8()
    {
        bail!(
            "--merge folds experts into a weighted sum, but {} holds FP8 experts ({}): the merged weights would \
             have to be re-quantised with the same scheme and new scales, which this toolkit does not do; prune \
             without --merge (kept FP8 experts are copied byte for byte), or dequantise the checkpoint first",
            args.model.display(),
            scheme.describe()
        );
    }
    let positions = args.samples * args.seq_len;
    args.diep.reference_top_k.get_or_insert(default_reference_top_k(positions, config.vocab_size));
    let plan = match &args.plan {
        Some(path) => {
            let plan = PruningPlan::read(path)?;
            plan.validate(&config)
                .with_context(|| format!("{} does not fit {}", path.display(), args.model.display()))?;
            (plan, None)
        }
        None => compute_plan(&args, &config)?,
    };
    let (mut plan, reference) = plan;
    if refine_rounds(&args) > 0 {
        if args.plan.is_some() {
            bail!("--refine improves a computed plan; it cannot be added to an existing --plan");
        }
        refine_plan(&args, &config, &mut plan, reference)?;
    } else {
        // Not held through the surgery (up to EXACT_REFERENCE_BYTES).
        drop(reference);
    }
    if args.merge || args.dynamic_skip {
        if args.plan.is_some() {
            bail!("--merge and --dynamic-skip are computed with a plan; they cannot be added to an existing --plan");
        }
        similarity_steps(&args, &config, &mut plan)?;
    }
    if args.plan.is_none() {
        mtp_layers(&args, &config, &mut plan)?;
    }

    let total = ckpt.data_bytes() as u64;
    let pb = progress_bar(total, "writing");
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let progress = |p: diep_surgery::SurgeryProgress| pb.set_position(p.bytes_written);
    let opts = SurgeryOptions { force: args.force, max_shard_bytes: args.max_shard_bytes, progress: Some(&progress) };
    let report = apply_plan(&args.model, &plan, &args.out, &opts)?;
    pb.finish_and_clear();
    for stale in &report.stale_staging_removed {
        eprintln!("removed {}, left by an interrupted run (process {} is gone)", stale.path.display(), stale.pid);
    }
    let seconds = start.elapsed().as_secs_f64();
    print_summary(&args, &plan, &report, seconds, peak_rss_mb());
    Ok(())
}

/// The process's peak resident set size in MB (`VmHWM` of `/proc/self/status`, Linux only;
/// `None` elsewhere or when it cannot be read).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// The reference form `--reference-top-k` defaults to: the whole vocabulary (exact) while the
/// reference of `positions` calibration positions fits in [`EXACT_REFERENCE_BYTES`], else the top
/// [`REFERENCE_TOP_K`] tokens per position. Measured: top-64 changes a few kept experts on the
/// 2048-token fixture and top-1024 none (`docs/PERFORMANCE.md`), and exact is what fits there.
pub fn default_reference_top_k(positions: usize, vocab: usize) -> usize {
    if (positions as u128) * (vocab as u128) * 4 <= u128::from(EXACT_REFERENCE_BYTES) { 0 } else { REFERENCE_TOP_K }
}

/// The largest whole-vocabulary reference `--reference-top-k` keeps by default: 1 GiB.
pub const EXACT_REFERENCE_BYTES: u64 = 1 << 30;

/// Tokens per position of the compact reference beyond [`EXACT_REFERENCE_BYTES`].
pub const REFERENCE_TOP_K: usize = 64;

/// The refinement's settings, checked before any work.
fn check_refine_args(args: &PruneArgs) -> Result<()> {
    if !(args.refine_margin.is_finite() && args.refine_margin >= 0.0) {
        bail!("--refine-margin must be a finite number ≥ 0, got {}", args.refine_margin);
    }
    if !(args.refine_gain.is_finite() && (0.0..1.0).contains(&args.refine_gain)) {
        bail!("--refine-gain must be a fraction in [0, 1), got {}", args.refine_gain);
    }
    if args.refine_confirm == 0 {
        bail!("--refine-confirm must be at least 1");
    }
    if !(args.refine_max_passes.is_finite() && args.refine_max_passes > 0.0) {
        bail!("--refine-max-passes must be a positive number, got {}", args.refine_max_passes);
    }
    Ok(())
}

/// Whether DiEP's allocation is global (its default).
fn global(args: &PruneArgs) -> bool {
    args.allocation.unwrap_or(Allocation::Global) == Allocation::Global
}

/// Rounds of `--refine`: as given, else up to 3 after DiEP under a global allocation (with 2 epochs,
/// `docs/METHOD.md`, "The default") and 0 otherwise.
fn refine_rounds(args: &PruneArgs) -> usize {
    let diep = matches!(args.method, Some(PruneMethod::Diep)) && args.plan.is_none();
    args.refine.unwrap_or(if diep && global(args) { 3 } else { 0 })
}

/// The plan of `--method`, with the reference distributions DiEP computed (for `--refine`).
fn compute_plan(args: &PruneArgs, config: &ModelConfig) -> Result<(PruningPlan, Option<diep_optim::ReferenceStore>)> {
    let method = args.method.context("--method is required unless --plan is given")?;
    let ratio = args.ratio.context("--ratio is required unless --plan is given")?;
    check_ratio(ratio)?;
    let method = match method {
        PruneMethod::Diep => return diep_plan(args, config, ratio),
        PruneMethod::GreedySearch => return Ok((greedy_plan(args, config, ratio)?, None)),
        PruneMethod::Baseline(m) => m,
    };
    let device = args.device.device()?;
    let samples = calibration(args)?;

    let batch_size = args.batch_size.unwrap_or(8);
    let spec = BaselineSpec {
        method,
        allocation: args.allocation.unwrap_or(Allocation::Uniform),
        ratio,
        min_experts: args.min_experts,
        seed: args.seed,
        naee_max_subsets: args.naee_max_subsets,
    };
    // Settings are checked (budget, floors, NAEE's subset count) before any computation.
    diep_prune::prepare(config, &spec)?;
    let stats_opts = diep_prune::stats_options(&spec, batch_size, args.naee_tokens);
    // Layers are streamed from the memory-mapped checkpoint: one layer's weights at a time.
    let model = StreamingModel::open(&args.model, &device)?;
    print_model_line(args, config, args.samples);
    let calibrated = Instant::now();
    let pb = progress_bar(config.num_layers as u64, "layers");
    let (stats, mut plan) =
        diep_prune::run_baseline(&model, &samples, &spec, &stats_opts, |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    plan.timings.insert("statistics_s".into(), stats.seconds);
    plan.timings.insert("selection_s".into(), (calibrated.elapsed().as_secs_f64() - stats.seconds).max(0.0));
    record_run(&mut plan, args);
    Ok((plan, None))
}

/// The model the discrete searches run on, without gradients: in memory when it is small (every
/// candidate then reuses the loaded layers), streamed from disk otherwise.
fn search_source(args: &PruneArgs) -> Result<Box<dyn SearchRunner>> {
    let device = args.device.device()?;
    let bytes = Checkpoint::open(&args.model)?.data_bytes();
    Ok(if bytes <= SEARCH_IN_MEMORY_BYTES {
        Box::new(diep_models::MoeModel::load(&args.model, &device)?)
    } else {
        Box::new(StreamingModel::open(&args.model, &device)?)
    })
}

/// Checkpoints up to this size are loaded whole for the searches.
const SEARCH_IN_MEMORY_BYTES: usize = 2_000_000_000;

/// The searches over either kind of model.
trait SearchRunner {
    fn greedy(
        &self,
        ids: &[Vec<u32>],
        ratio: f64,
        allocation: Allocation,
        c: &Constraints,
        opts: &diep_optim::SearchOptions,
        max: f64,
        progress: &mut dyn FnMut(usize, usize, f64) -> diep_optim::Result<()>,
    ) -> diep_optim::Result<diep_optim::SearchOutcome>;
    #[allow(clippy::too_many_arguments)]
    fn refine(
        &self,
        ids: &[Vec<u32>],
        kept: &diep_plan::Kept,
        reference: Option<diep_optim::ReferenceStore>,
        scores: Option<&std::collections::BTreeMap<usize, Vec<f64>>>,
        rounds: usize,
        allocation: Allocation,
        c: &Constraints,
        opts: &diep_optim::SearchOptions,
        progress: &mut dyn FnMut(usize, usize, f64) -> diep_optim::Result<()>,
    ) -> diep_optim::Result<diep_optim::SearchOutcome>;
}

impl<S: diep_models::LayerSource> SearchRunner for S {
    fn greedy(
        &self,
        ids: &[Vec<u32>],
        ratio: f64,
        allocation: Allocation,
        c: &Constraints,
        opts: &diep_optim::SearchOptions,
        max: f64,
        progress: &mut dyn FnMut(usize, usize, f64) -> diep_optim::Result<()>,
    ) -> diep_optim::Result<diep_optim::SearchOutcome> {
        diep_optim::greedy_search(self, ids, ratio, allocation, c, opts, max, progress)
    }
    fn refine(
        &self,
        ids: &[Vec<u32>],
        kept: &diep_plan::Kept,
        reference: Option<diep_optim::ReferenceStore>,
        scores: Option<&std::collections::BTreeMap<usize, Vec<f64>>>,
        rounds: usize,
        allocation: Allocation,
        c: &Constraints,
        opts: &diep_optim::SearchOptions,
        progress: &mut dyn FnMut(usize, usize, f64) -> diep_optim::Result<()>,
    ) -> diep_optim::Result<diep_optim::SearchOutcome> {
        match reference {
            // The reference the method computed on these sequences: no second pass for it.
            Some(store) => {
                let eval =
                    diep_optim::Evaluator::with_reference(self, ids, std::borrow::Cow::Owned(store), Some(kept), opts)?;
                diep_optim::refine_from(eval, ids, scores, rounds, allocation, c, opts, progress)
            }
            None => diep_optim::refine(self, ids, kept, scores, rounds, allocation, c, opts, progress),
        }
    }
}

fn search_options(args: &PruneArgs) -> diep_optim::SearchOptions {
    diep_optim::SearchOptions {
        samples: args.search_samples,
        reference_top_k: args.diep.reference_top_k.unwrap_or(REFERENCE_TOP_K),
        width: args.refine_width,
        screen_samples: args.refine_screen,
        screen_tokens: args.refine_screen_tokens.unwrap_or(args.seq_len / 4),
        confirm: args.refine_confirm,
        accept_margin: args.refine_margin,
        accept_gain: args.refine_gain,
        ..Default::default()
    }
}

/// `--method greedy-search`: remove one expert at a time by the calibration objective.
fn greedy_plan(args: &PruneArgs, config: &ModelConfig, ratio: f64) -> Result<PruningPlan> {
    let allocation = args.allocation.unwrap_or(Allocation::Global);
    let constraints = Constraints::for_model(config, args.min_experts);
    diep_plan::check_feasible(&diep_plan::expert_counts(config), ratio, allocation, &constraints)?;
    let started = Instant::now();
    let samples = calibration(args)?;
    print_model_line(args, config, samples.len());
    let model = search_source(args)?;
    let pb = progress_bar(0, "removed");
    let opts = search_options(args);
    let outcome = model.greedy(
        &samples,
        ratio,
        allocation,
        &constraints,
        &opts,
        args.search_max_passes,
        &mut |done, total, loss| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            pb.set_message(format!("kl {loss:.5}"));
            Ok(())
        },
    )?;
    pb.finish_and_clear();
    eprintln!(
        "greedy search: {} removals, {} plans evaluated ({:.0} forward passes over {} sequences), kl {:.5} -> {:.5}",
        outcome.moves.len(),
        outcome.evaluations,
        outcome.forward_passes,
        outcome.samples,
        outcome.loss_before,
        outcome.loss_after
    );
    let mut plan = PruningPlan::new(
        config.architecture.model_type(),
        diep_plan::expert_counts(config),
        outcome.kept.clone(),
        "greedy-search",
    );
    plan.allocation = Some(allocation.name().into());
    plan.ratio = Some(ratio);
    plan.settings = serde_json::json!({"min_experts": args.min_experts, "floor": constraints.floor, "objective": "kl",
        "reference_top_k": opts.reference_top_k, "max_forward_passes": args.search_max_passes});
    plan.extra.insert("search".into(), serde_json::to_value(&outcome)?);
    plan.timings.insert("search_s".into(), started.elapsed().as_secs_f64());
    record_run(&mut plan, args);
    Ok(plan)
}

/// `--refine N`: local search from the computed plan, against the method's own reference
/// distributions when it computed them on the same sequences.
fn refine_plan(
    args: &PruneArgs,
    config: &ModelConfig,
    plan: &mut PruningPlan,
    reference: Option<diep_optim::ReferenceStore>,
) -> Result<()> {
    let rounds = refine_rounds(args);
    let started = Instant::now();
    let allocation = match plan.allocation.as_deref() {
        Some("uniform") => Allocation::Uniform,
        _ if plan.is_uniform() && plan.method != "diep" && plan.method != "greedy-search" => Allocation::Uniform,
        _ => Allocation::Global,
    };
    let constraints = Constraints::for_model(config, args.min_experts);
    let samples = calibration(args)?;
    let mut opts = search_options(args);
    let counts = diep_plan::expert_counts(config);
    let (n, len) = (opts.scored(samples.len()), samples.first().map_or(0, Vec::len));
    let cost = |o: &diep_optim::SearchOptions| {
        diep_optim::refine_round_cost(
            &plan.kept_experts,
            &counts,
            config.num_layers,
            allocation,
            &constraints,
            o,
            n,
            len,
        )
    };
    let full = cost(&opts);
    if full > args.refine_max_passes {
        let widest = plan.kept_experts.iter().map(|(l, k)| k.len().max(counts[l] - k.len())).max().unwrap_or(0);
        let fits = (!plan.scores.is_empty())
            .then(|| {
                (1..=widest)
                    .rev()
                    .find(|w| cost(&diep_optim::SearchOptions { width: *w, ..opts.clone() }) <= args.refine_max_passes)
            })
            .flatten();
        match fits {
            Some(w) => {
                eprintln!(
                    "refine: a round over every expert would take about {full:.0} forward passes (--refine-max-passes {}); \
                     looking at the {w} experts each side of each layer's cut",
                    args.refine_max_passes
                );
                opts.width = w;
            }
            None if args.refine.is_none() => {
                eprintln!(
                    "refine: skipped: a round would take about {full:.0} forward passes over the calibration set even \
                     looking at one expert each side of each layer's cut, above --refine-max-passes {}",
                    args.refine_max_passes
                );
                plan.settings["refine"] = serde_json::json!({"skipped": true, "estimated_passes": full, "max_passes": args.refine_max_passes});
                return Ok(());
            }
            None => bail!(
                "--refine: a round would take about {full:.0} forward passes over the calibration set{}, above \
                 --refine-max-passes {}; raise the limit, screen on fewer tokens (--refine-screen-tokens) or score \
                 fewer sequences (--search-samples)",
                if plan.scores.is_empty() {
                    " (the method gives no scores to narrow it by)"
                } else {
                    " even at one expert each side of each layer's cut"
                },
                args.refine_max_passes
            ),
        }
    }
    let model = search_source(args)?;
    let pb = progress_bar(rounds as u64, "refine");
    // The method's reference is used when it is of the kind asked for and scores every sequence.
    let reference = reference.filter(|r| {
        let k = opts.reference_top_k;
        n == samples.len() && (if k == 0 { r.is_exact() } else { r.k() == k })
    });
    let scores = (!plan.scores.is_empty()).then_some(&plan.scores);
    let outcome = model.refine(
        &samples,
        &plan.kept_experts,
        reference,
        scores,
        rounds,
        allocation,
        &constraints,
        &opts,
        &mut |round, _, loss| {
            pb.set_position(round as u64);
            pb.set_message(format!("kl {loss:.5}"));
            Ok(())
        },
    )?;
    pb.finish_and_clear();
    eprintln!(
        "refine: {} move(s) in {} round(s) (at most {}), {} plans evaluated ({:.0} forward passes over {} sequences{}), kl {:.5} -> {:.5}",
        outcome.moves.len(),
        outcome.rounds,
        rounds,
        outcome.evaluations,
        outcome.forward_passes,
        outcome.samples,
        if outcome.screen_samples > 0 {
            format!("; screened on {} × {} tokens", outcome.screen_samples, outcome.screen_tokens)
        } else {
            String::new()
        },
        outcome.loss_before,
        outcome.loss_after
    );
    let estimated = cost(&opts);
    plan.kept_experts = outcome.kept.clone();
    plan.settings["refine"] = serde_json::json!({"rounds": rounds, "samples": outcome.samples,
        "objective": "kl", "reference_top_k": opts.reference_top_k, "screen_samples": outcome.screen_samples,
        "screen_tokens": outcome.screen_tokens, "confirm": opts.confirm, "accept_margin": opts.accept_margin,
        "accept_gain": opts.accept_gain, "width": opts.width, "estimated_passes_per_round": estimated,
        "max_passes": args.refine_max_passes});
    plan.extra.insert("refine".into(), serde_json::to_value(&outcome)?);
    plan.timings.insert("refine_s".into(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Expert merging and dynamic-skip tables from one similarity pass through the pruned model.
fn similarity_steps(args: &PruneArgs, config: &ModelConfig, plan: &mut PruningPlan) -> Result<()> {
    let started = Instant::now();
    let device = args.device.device()?;
    let samples = calibration(args)?;
    let model = StreamingModel::open(&args.model, &device)?;
    let keep: std::collections::BTreeMap<usize, Vec<bool>> = plan
        .kept_experts
        .iter()
        .map(|(l, kept)| (*l, (0..plan.original_experts[l]).map(|e| kept.contains(&e)).collect()))
        .collect();
    let pb = progress_bar(config.num_layers as u64, "similarity");
    let sim = diep_prune::similarity::expert_similarity(&model, &samples, &keep, args.similarity_tokens, |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    if args.merge {
        plan.merge = diep_prune::similarity::merge_groups(&sim, &plan.kept_experts);
        plan.settings["merge"] = serde_json::json!({"similarity": "linear CKA", "tokens": args.similarity_tokens});
    }
    if args.dynamic_skip {
        let mut tables = serde_json::Map::new();
        for (l, s) in &sim {
            let (Some(kept), Some(gamma1)) = (plan.kept_experts.get(l), s.median_weight_ratio) else { continue };
            let pairs: Vec<f64> =
                kept.iter().flat_map(|a| kept.iter().filter(move |b| *b != a).map(move |b| s.cka[*a][*b])).collect();
            let mean = pairs.iter().sum::<f64>() / pairs.len().max(1) as f64;
            let gamma: Vec<Vec<f64>> =
                kept.iter().map(|a| kept.iter().map(|b| gamma1 * s.cka[*a][*b] / mean.max(1e-12)).collect()).collect();
            tables.insert(
                l.to_string(),
                serde_json::json!({"gamma1": gamma1, "mean_cka": mean, "gamma": gamma, "tokens": s.tokens}),
            );
        }
        plan.extra.insert("dynamic_skip".into(), tables.into());
    }
    plan.timings.insert("similarity_s".into(), started.elapsed().as_secs_f64());
    Ok(())
}

/// The one-line description of the model and calibration a computed plan starts with.
/// Adds the MTP layers ([`ModelConfig::mtp_layers`]) to a computed plan that lacks them (the
/// baselines add them from their own statistics pass; DiEP and the searches score the trunk
/// only): one more streamed statistics pass gives the MTP layers' routing.
fn mtp_layers(args: &PruneArgs, config: &ModelConfig, plan: &mut PruningPlan) -> Result<()> {
    let missing = config.mtp_layer_indices().any(|l| !plan.kept_experts.contains_key(&l));
    if !missing {
        return Ok(());
    }
    let device = args.device.device()?;
    let samples = calibration(args)?;
    let model = StreamingModel::open(&args.model, &device)?;
    eprintln!("MTP layers {:?}: ranking their experts by routing frequency", config.mtp_layer_indices());
    let pb = progress_bar(config.num_layers as u64, "MTP stats");
    let opts = diep_prune::StatsOptions { batch_size: args.batch_size.unwrap_or(8), naee_tokens: 0 };
    let stats = diep_prune::collect_statistics(&model, &samples, &opts, |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    let constraints = Constraints::for_model(config, args.min_experts);
    diep_prune::add_mtp_layers(plan, config, &stats, &constraints)?;
    plan.timings.insert("mtp_statistics_s".into(), stats.seconds);
    Ok(())
}

fn print_model_line(args: &PruneArgs, config: &ModelConfig, samples: usize) {
    eprintln!(
        "model: {} ({}), {} MoE layers × {} experts, top-{}; calibration {samples} × {} tokens on {}",
        args.model.display(),
        config.architecture.model_type(),
        config.moe_layers().len(),
        config.moe.num_experts,
        config.moe.top_k,
        args.seq_len,
        args.device
    );
}

/// Calibration settings and device, recorded in every computed plan.
fn record_run(plan: &mut PruningPlan, args: &PruneArgs) {
    plan.settings["calibration"] = serde_json::json!({
        "files": args.calib, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
        "mix": args.calib_mix.name(),
    });
    plan.settings["device"] = args.device.to_string().into();
}

/// Tokenised, sampled calibration sequences.
fn calibration(args: &PruneArgs) -> Result<Vec<Vec<u32>>> {
    let tokenizer = diep_models::tokenizer::load_tokenizer(&args.model)?;
    let spec = CalibrationSpec {
        files: args.calib.clone(),
        samples: args.samples,
        seq_len: args.seq_len,
        seed: args.seed,
        mix: args.calib_mix,
    };
    Ok(sample_calibration(&tokenizer, &spec)?)
}

/// The DiEP settings the command line asks for.
fn diep_settings(args: &PruneArgs, ratio: f64) -> Result<DiepSettings> {
    let d = &args.diep;
    let (a, b) = d
        .alternation
        .split_once(':')
        .and_then(|(a, b)| Some((a.trim().parse::<usize>().ok()?, b.trim().parse::<usize>().ok()?)))
        .with_context(|| format!("--alternation must look like `3:1` (α steps : β steps), got `{}`", d.alternation))?;
    let settings = DiepSettings {
        relaxation: d.relaxation,
        objective: d.objective,
        threshold: d.threshold,
        lambda: d.lambda,
        ratio,
        epochs: d.epochs.unwrap_or(if global(args) { 2 } else { 10 }),
        batch_size: args.batch_size.unwrap_or(16),
        lr: d.lr,
        optimizer: d.optimizer,
        alpha_steps: a,
        beta_steps: b,
        tau_start: d.tau_start,
        tau_end: d.tau_end,
        seed: args.seed,
        reference_top_k: d.reference_top_k.unwrap_or(REFERENCE_TOP_K),
        alpha_init: d.alpha_init,
        alpha_init_scale: d.alpha_init_scale,
        min_experts: args.min_experts,
        select_epoch: d.select_epoch == "best",
        select_samples: d.select_samples,
        select_margin: d.select_margin,
        select_gain: d.select_gain,
        patience: d.patience,
        allocation: args.allocation.unwrap_or(Allocation::Global),
        mask_noise: d.mask_noise,
    };
    settings.validate().map_err(anyhow::Error::msg)?;
    Ok(settings)
}

/// Where the α/β state is saved.
fn state_path(args: &PruneArgs) -> PathBuf {
    args.diep.state.clone().unwrap_or_else(|| {
        let name = args.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pruned".into());
        args.out.with_file_name(format!("{name}.diep-state.json"))
    })
}

/// `--method diep`: optimise α and β on the calibration set, then rank.
fn diep_plan(
    args: &PruneArgs,
    config: &ModelConfig,
    ratio: f64,
) -> Result<(PruningPlan, Option<diep_optim::ReferenceStore>)> {
    let allocation = args.allocation.unwrap_or(Allocation::Global);
    let settings = diep_settings(args, ratio)?;
    let constraints = Constraints::for_model(config, args.min_experts);
    // The budget, floors and routing groups are checked before any computation.
    diep_plan::check_feasible(&diep_plan::expert_counts(config), ratio, allocation, &constraints)?;
    let state_file = state_path(args);
    let resume = if args.diep.resume {
        let state = DiepState::read(&state_file).context("--resume")?;
        Some(state)
    } else {
        None
    };
    let device = args.device.device()?.autodiff();
    let started = Instant::now();
    let samples = calibration(args)?;
    let calibrated = Instant::now();
    print_model_line(args, config, samples.len());
    eprintln!(
        "diep: {} relaxation, {} objective, α from {}, {} epochs × {} steps (batch {}), lr {}, α:β {}, state {}",
        settings.relaxation,
        settings.objective,
        match settings.alpha_init {
            diep_optim::AlphaInit::Zero => "zero".to_string(),
            init => format!("{init} × {}", settings.alpha_init_scale),
        },
        settings.epochs,
        samples.len().div_ceil(settings.batch_size),
        settings.batch_size,
        settings.lr,
        args.diep.alternation,
        state_file.display()
    );
    if settings.objective == Objective::Kl {
        let form = match settings.reference_top_k {
            0 => "the whole vocabulary per position (exact)".to_string(),
            k => format!("top {k} tokens per position, the rest as one outcome"),
        };
        eprintln!("diep: reference distributions of the original model: {form}");
    }
    let pb = progress_bar(0, "epoch");
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let epochs = settings.epochs;
    // Lines above the progress bar; they also go to logs when stderr is not a terminal.
    let say = |line: String| {
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
    };
    let on_event = |event: Event<'_>| -> diep_optim::Result<()> {
        match event {
            Event::Started { steps_per_epoch, epochs_done, .. } => {
                pb.set_length(steps_per_epoch as u64);
                if epochs_done > 0 {
                    pb.println(format!("resuming after epoch {epochs_done} from {}", state_file.display()));
                }
            }
            Event::WarmStart { candidates, chosen } => {
                let all: Vec<String> = candidates.iter().map(|(k, d)| format!("{k} {d:.5}")).collect();
                say(format!("epoch   0/{epochs}  warm start from {chosen}  plan kl: {}", all.join(", ")));
            }
            Event::Reference { done, total } => {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
                pb.set_message("reference".to_string());
            }
            Event::Layer { epoch, step, phase, done, total } => {
                pb.set_message(format!("epoch {epoch}/{epochs} step {step} {phase} {done}/{total}"));
            }
            Event::Step { epoch, step, loss, .. } => {
                pb.set_position(step as u64);
                pb.set_message(format!("epoch {epoch}/{epochs} loss {loss:.4}"));
            }
            Event::StoppedEarly { epochs_done, selected } => {
                say(format!(
                    "stopped after epoch {epochs_done}/{epochs}: {} epochs without a better plan than epoch {selected}'s (--patience)",
                    epochs_done - selected
                ));
            }
            Event::Epoch { record, state } => {
                state.save(&state_file)?;
                let line = format!(
                    "epoch {:>3}/{epochs}  loss {:.5}  ce {:.5}  reg {:.5}  lr {:.2e}  τ {:.3e}  {:.1}s{}",
                    record.epoch,
                    record.loss,
                    record.ce,
                    record.reg,
                    record.lr,
                    record.tau,
                    record.seconds,
                    record
                        .discrete
                        .map(|d| {
                            let best = state.best.as_ref().map(|b| format!(" (selected: epoch {})", b.epoch));
                            format!("  plan kl {d:.5}{}", best.unwrap_or_default())
                        })
                        .unwrap_or_default()
                );
                say(line);
                pb.set_position(0);
            }
            _ => {}
        }
        Ok(())
    };
    // Layers are streamed from the memory-mapped checkpoint: one layer's weights at a time.
    let model = StreamingModel::open(&args.model, &device)?;
    let stream = diep_optim::StreamOptions {
        micro_batch: args.diep.micro_batch,
        offload: match args.diep.boundaries.as_str() {
            "auto" => diep_optim::Offload::Auto,
            "device" => diep_optim::Offload::Device,
            "host" => diep_optim::Offload::Host,
            other => bail!("--boundaries must be auto, device or host, got `{other}`"),
        },
    };
    let (state, reference) =
        diep_optim::optimise_keeping_reference(&model, &samples, &settings, resume, &stream, on_event)?;
    pb.finish_and_clear();
    let optimised = Instant::now();
    let mut plan = diep_optim::pruning_plan(config, &state, &constraints, args.min_experts, allocation, &device)?;
    plan.timings.insert("calibration_s".into(), (calibrated - started).as_secs_f64());
    plan.timings.insert("optimise_s".into(), (optimised - calibrated).as_secs_f64());
    plan.timings.insert("selection_s".into(), optimised.elapsed().as_secs_f64());
    record_run(&mut plan, args);
    plan.settings["state_file"] = state_file.display().to_string().into();
    Ok((plan, reference))
}

fn print_summary(args: &PruneArgs, plan: &PruningPlan, report: &SurgeryReport, seconds: f64, rss_mb: Option<f64>) {
    let original: usize = plan.original_experts.values().sum();
    let kept: usize = plan.kept_experts.values().map(Vec::len).sum();
    println!("pruned {} -> {}", args.model.display(), args.out.display());
    println!(
        "method {}{}{}",
        plan.method,
        plan.allocation.as_deref().map(|a| format!(", {a} allocation")).unwrap_or_default(),
        plan.ratio.map(|r| format!(", ratio {r}")).unwrap_or_default()
    );
    println!("{:>7}  {:>5}  kept experts", "layer", "kept");
    let mtp: Vec<usize> = plan
        .extra
        .get(diep_plan::MTP_RULE_KEY)
        .and_then(|m| serde_json::from_value(m["layers"].clone()).ok())
        .unwrap_or_default();
    for (layer, ids) in &plan.kept_experts {
        let ids: Vec<String> = ids.iter().map(|e| e.to_string()).collect();
        let name = if mtp.contains(layer) { format!("MTP {layer}") } else { layer.to_string() };
        println!(
            "{name:>7}  {:>2}/{:<2}  {}",
            ids.len(),
            plan.original_experts.get(layer).copied().unwrap_or(0),
            ids.join(" ")
        );
    }
    println!(
        "experts   {original} -> {kept} ({} removed, {:.1}%)",
        original - kept,
        100.0 * (original - kept) as f64 / original.max(1) as f64
    );
    println!(
        "params    {} -> {} ({:.1}% of the original)",
        report.params_before,
        report.params_after,
        100.0 * report.params_after as f64 / report.params_before.max(1) as f64
    );
    println!("written   {} bytes in {} file(s)", report.bytes_written, report.files_written.len());
    println!("time      {seconds:.1}s");
    if let Some(mb) = rss_mb {
        println!("peak rss  {mb:.0} MB");
    }
}
