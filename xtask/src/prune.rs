//! `cargo xtask prune`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use diep_checkpoint::{Checkpoint, ModelConfig};
use diep_models::{DeviceSpec, StreamingModel};
use diep_prune::calib::{CalibrationSpec, sample_calibration};
use diep_prune::criteria::check_ratio;
use diep_prune::{Allocation, BaselineSpec, Method, PruningPlan, StatsOptions};
use diep_surgery::{SurgeryOptions, SurgeryReport, apply_plan};

use crate::util::progress_bar;

/// Arguments of `cargo xtask prune`.
#[derive(Args)]
pub struct PruneArgs {
    /// HuggingFace model directory to prune.
    #[arg(long)]
    model: PathBuf,
    /// Output directory for the pruned checkpoint (written atomically; must not exist
    /// unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Apply an existing pruning.json instead of computing a plan.
    #[arg(long, conflicts_with_all = ["method", "ratio", "calib"])]
    plan: Option<PathBuf>,
    /// Pruning criterion: random, frequency, soft-activation, reap or naee.
    #[arg(long)]
    method: Option<Method>,
    /// Budget allocation: uniform (same count per layer) or global (one ranking over layers).
    #[arg(long, default_value = "uniform")]
    allocation: Allocation,
    /// Fraction of routed experts to remove in total, 0 < R < 1.
    #[arg(long, allow_negative_numbers = true)]
    ratio: Option<f64>,
    /// Calibration text: plain text, or JSONL with a `text` field (repeatable).
    #[arg(long)]
    calib: Vec<PathBuf>,
    /// Calibration sequences.
    #[arg(long, default_value_t = 128)]
    samples: usize,
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
    /// Calibration sequences per forward batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
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
}

pub fn run(args: PruneArgs) -> Result<()> {
    let start = Instant::now();
    // Cheap checks first, before any heavy work.
    if args.out.exists() && !args.force {
        bail!("output directory {} already exists (use --force to replace it)", args.out.display());
    }
    let config = ModelConfig::from_dir(&args.model)?;
    let plan = match &args.plan {
        Some(path) => {
            let plan = PruningPlan::read(path)?;
            plan.validate(&config)
                .with_context(|| format!("{} does not fit {}", path.display(), args.model.display()))?;
            plan
        }
        None => compute_plan(&args, &config)?,
    };

    let total = Checkpoint::open(&args.model)?.data_bytes() as u64;
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
    print_summary(&args, &plan, &report, start.elapsed().as_secs_f64());
    Ok(())
}

fn compute_plan(args: &PruneArgs, config: &ModelConfig) -> Result<PruningPlan> {
    let method = args.method.context("--method is required unless --plan is given")?;
    let ratio = args.ratio.context("--ratio is required unless --plan is given")?;
    check_ratio(ratio)?;
    let device = args.device.device()?;
    let tokenizer = diep_models::tokenizer::load_tokenizer(&args.model)?;
    let spec =
        CalibrationSpec { files: args.calib.clone(), samples: args.samples, seq_len: args.seq_len, seed: args.seed };
    let samples = sample_calibration(&tokenizer, &spec)?;

    let spec = BaselineSpec {
        method,
        allocation: args.allocation,
        ratio,
        min_experts: args.min_experts,
        seed: args.seed,
        naee_max_subsets: args.naee_max_subsets,
    };
    // Settings are checked (budget, floors, NAEE's subset count) before any computation.
    let stats_opts: StatsOptions = diep_prune::stats_options(config, &spec, args.batch_size, args.naee_tokens)?;
    // Layers are streamed from the memory-mapped checkpoint: one layer's weights at a time.
    let model = StreamingModel::open(&args.model, &device)?;
    eprintln!(
        "model: {} ({}), {} MoE layers × {} experts, top-{}; calibration {} × {} tokens on {}",
        args.model.display(),
        config.architecture.model_type(),
        config.moe_layers().len(),
        config.moe.num_experts,
        config.moe.top_k,
        args.samples,
        args.seq_len,
        args.device
    );
    let pb = progress_bar(config.num_layers as u64, "layers");
    let stats = diep_prune::collect_statistics(&model, &samples, &stats_opts, |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();
    let select = Instant::now();
    let mut plan = diep_prune::plan_baseline(config, &stats, &spec)?;
    plan.timings.insert("selection_s".into(), select.elapsed().as_secs_f64());
    plan.settings["calibration"] = serde_json::json!({
        "files": args.calib, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed,
    });
    plan.settings["device"] = args.device.to_string().into();
    Ok(plan)
}

fn print_summary(args: &PruneArgs, plan: &PruningPlan, report: &SurgeryReport, seconds: f64) {
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
    for (layer, ids) in &plan.kept_experts {
        let ids: Vec<String> = ids.iter().map(|e| e.to_string()).collect();
        println!(
            "{layer:>7}  {:>2}/{:<2}  {}",
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
}
