//! `cargo xtask eval`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use diep_models::{DeviceSpec, MoeModel};
use serde_json::json;

use crate::util::{progress_bar, write_atomic};

/// Arguments of `cargo xtask eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// HuggingFace model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// JSON array of token-id sequences to score, e.g. `[[1, 2, 3], [4, 5, 6]]`.
    #[arg(long)]
    ids: PathBuf,
    /// Compute device: cpu, wgpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Largest number of input tokens in one forward batch.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.device.device()?;
    let ids = diep_eval::read_ids_file(&args.ids)?;
    let load_start = Instant::now();
    let model =
        MoeModel::load(&args.model, &device).with_context(|| format!("loading model from {}", args.model.display()))?;
    let load_seconds = load_start.elapsed().as_secs_f64();
    let c = &model.config;
    eprintln!(
        "model: {} ({}), {} layers ({} MoE), {} experts, top-{}, loaded in {:.2}s on {}",
        args.model.display(),
        c.architecture.model_type(),
        c.num_layers,
        model.moe_layers().len(),
        c.moe.num_experts,
        c.moe.top_k,
        load_seconds,
        args.device
    );

    let pb = progress_bar(ids.len() as u64, "sequences");
    let report = diep_eval::perplexity(&model, &ids, args.batch_tokens, |done, _| pb.set_position(done as u64))?;
    pb.finish_and_clear();

    let out = json!({
        "perplexity": report.perplexity,
        "tokens": report.tokens,
        "tokens_per_second": report.tokens_per_second,
        "predictions": report.predictions,
        "mean_nll": report.mean_nll,
        "seconds": report.seconds,
        "model": args.model,
        "model_type": c.architecture.model_type(),
        "device": args.device.to_string(),
    });
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(path) = &args.json {
        write_atomic(path, format!("{text}\n").as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
