//! `cargo xtask bench-step`: seconds per DiEP optimiser step, the best of `--reps` after one
//! warm-up: the step (forward under the relaxation, backward to α and β) with the default
//! settings (routed-gated relaxation, implicit threshold, `kl` against the stored reference), on
//! a model directory and token ids, with the weights in memory or streamed from disk. Prints one
//! JSON line. Used by `scripts/bench_torch_diep_step.py` (against PyTorch) and
//! `scripts/gpu-check.sh` (on cuda and wgpu).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use diep_models::{DeviceSpec, LayerSource, MoeModel, StreamingModel};
use diep_optim::{DiepSettings, DiepState, Stepper, StreamOptions, fingerprint};

/// Arguments of `cargo xtask bench-step`.
#[derive(Args)]
pub struct BenchStepArgs {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Token ids: a JSON list of equal-length lists.
    #[arg(long)]
    ids: PathBuf,
    /// Sequences per step (the first of `--ids`).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Timed steps after the warm-up; the best is reported.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Reference tokens kept per position (0: the whole vocabulary).
    #[arg(long, default_value_t = 64)]
    reference_top_k: usize,
    /// Stream the layers from disk (one resident) instead of loading the model.
    #[arg(long)]
    stream: bool,
    /// Compute device: cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

pub fn run(a: BenchStepArgs) -> Result<()> {
    let device = a.device.device()?.autodiff();
    let text = std::fs::read_to_string(&a.ids).with_context(|| format!("reading {}", a.ids.display()))?;
    let ids: Vec<Vec<u32>> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected a JSON list of token-id lists", a.ids.display()))?;
    let ids: Vec<Vec<u32>> = ids.into_iter().take(a.batch.max(1)).collect();
    if ids.is_empty() || a.reps == 0 {
        bail!("need at least one sequence in {} and --reps ≥ 1", a.ids.display());
    }
    let settings = DiepSettings { batch_size: ids.len(), reference_top_k: a.reference_top_k, ..Default::default() };
    let rows: Vec<usize> = (0..ids.len()).collect();
    let best = if a.stream {
        let model = StreamingModel::open(&a.model, &device)?;
        time_steps(&model, &ids, &rows, &settings, a.reps)?
    } else {
        let model = MoeModel::load(&a.model, &device)?;
        time_steps(&model, &ids, &rows, &settings, a.reps)?
    };
    println!(
        "{}",
        serde_json::json!({"seconds_per_step": best, "tokens": ids.len() * ids[0].len(), "batch": ids.len(),
            "seq_len": ids[0].len(), "reference_top_k": a.reference_top_k,
            "weights": if a.stream { "disk" } else { "memory" }, "device": a.device.to_string(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)})
    );
    Ok(())
}

fn time_steps<S: LayerSource>(
    model: &S,
    ids: &[Vec<u32>],
    rows: &[usize],
    settings: &DiepSettings,
    reps: usize,
) -> Result<f64> {
    let state = DiepState::new(settings.clone(), fingerprint(ids), &diep_plan::expert_counts(model.config()));
    let stepper = Stepper::new(model, ids, settings, &StreamOptions::default())?;
    let mut best = f64::INFINITY;
    for rep in 0..=reps {
        let t = Instant::now();
        stepper.step(rows, &state, true, 0.05)?;
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}
