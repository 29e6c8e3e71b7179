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
    /// Skip a token's second expert when its weight is below γ times the first's, with the
    /// per-layer γ tables that `prune --dynamic-skip` wrote into the model's pruning.json.
    #[arg(long)]
    dynamic_skip: bool,
}

/// Installs the `dynamic_skip` tables of `DIR/pruning.json` on the model.
fn install_dynamic_skip(model: &mut MoeModel, dir: &std::path::Path) -> Result<Vec<diep_models::DynamicSkip>> {
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

pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.device.device()?;
    let ids = diep_eval::read_ids_file(&args.ids)?;
    let load_start = Instant::now();
    let mut model =
        MoeModel::load(&args.model, &device).with_context(|| format!("loading model from {}", args.model.display()))?;
    let skip_rules = if args.dynamic_skip { install_dynamic_skip(&mut model, &args.model)? } else { Vec::new() };
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

    let mut out = json!({
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
    if args.dynamic_skip {
        let (skipped, eligible) = skip_rules.iter().map(|r| r.counts()).fold((0, 0), |(a, b), (s, e)| (a + s, b + e));
        out["dynamic_skip"] = json!({
            "skipped": skipped,
            "eligible": eligible,
            "fraction": skipped as f64 / eligible.max(1) as f64,
        });
    }
    let text = serde_json::to_string_pretty(&out)?;
    println!("{text}");
    if let Some(path) = &args.json {
        write_atomic(path, format!("{text}\n").as_bytes())?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
