//! `diep compare` (also `cargo xtask compare`): evaluates a base and a pruned model on the same
//! inputs and writes the retention table (Markdown and JSON) and figures (kept experts per layer, retention bars).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use diep_eval::report::{kept_heatmap_svg, mean_retention, retention_markdown, retention_svg, retention_table};
use serde_json::json;

use crate::eval::{EvalInputs, evaluate};
use crate::util::write_atomic;

/// Arguments of `diep compare`.
#[derive(Args)]
pub struct CompareArgs {
    /// The original model directory, or a hub id `org/name[@revision]` in the local hub cache.
    #[arg(long)]
    base: PathBuf,
    /// The pruned model directory (with the pruning.json that `prune` wrote, for the figure of
    /// kept experts).
    #[arg(long)]
    pruned: PathBuf,
    #[command(flatten)]
    inputs: EvalInputs,
    /// Output directory: compare.json, compare.md, retention.svg and (with a pruning.json)
    /// kept-experts.svg. Default: PRUNED/compare.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Per MoE layer: `(layer, original experts, kept ids)`.
type KeptLayers = Vec<(usize, usize, Vec<usize>)>;

/// The kept experts of a pruned model's pruning.json, if it has one, and a description of the plan.
fn kept_layers(pruned: &Path) -> Result<Option<(KeptLayers, String)>> {
    let path = pruned.join("pruning.json");
    if !path.is_file() {
        return Ok(None);
    }
    let plan = diep_surgery::PruningPlan::read(&path)?;
    let layers = plan
        .kept_experts
        .iter()
        .map(|(l, kept)| (*l, plan.original_experts.get(l).copied().unwrap_or(kept.len()), kept.clone()))
        .collect();
    let what = format!(
        "{}{}{}",
        plan.method,
        plan.allocation.as_ref().map(|a| format!(", {a} allocation")).unwrap_or_default(),
        plan.ratio.map(|r| format!(", ratio {r}")).unwrap_or_default()
    );
    Ok(Some((layers, what)))
}

/// Runs `diep compare`: evaluates both models, writes the report and prints the table.
pub fn run(mut args: CompareArgs) -> Result<()> {
    args.base = crate::util::model_dir(&args.base)?;
    let out = args.out.clone().unwrap_or_else(|| args.pruned.join("compare"));
    // Read the plan first: a broken pruning.json fails before any evaluation.
    let kept = kept_layers(&args.pruned)?;
    eprintln!("== base: {}", args.base.display());
    let base = evaluate(&args.base, &args.inputs, false)?;
    eprintln!("== pruned: {}", args.pruned.display());
    let pruned = evaluate(&args.pruned, &args.inputs, false)?;
    let rows = retention_table(&base.metrics, &pruned.metrics);
    let md = format!(
        "# Retention: {} vs {}\n\n{}{}",
        args.pruned.display(),
        args.base.display(),
        kept.as_ref().map(|(_, what)| format!("Pruning: {what}.\n\n")).unwrap_or_default(),
        retention_markdown(&rows)
    );
    let report = json!({
        "base": base.json,
        "pruned": pruned.json,
        "retention": rows,
        "mean_retention": mean_retention(&rows),
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join("compare.json"), format!("{}\n", serde_json::to_string_pretty(&report)?).as_bytes())?;
    write_atomic(&out.join("compare.md"), md.as_bytes())?;
    let title = format!("Retention of {}", args.pruned.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    write_atomic(&out.join("retention.svg"), retention_svg(&rows, &title).as_bytes())?;
    if let Some((layers, what)) = &kept {
        let svg = kept_heatmap_svg(layers, &format!("Kept experts per layer ({what})"));
        write_atomic(&out.join("kept-experts.svg"), svg.as_bytes())?;
    }
    println!("{md}");
    eprintln!(
        "wrote {}/compare.{{md,json}}, retention.svg{}",
        out.display(),
        if kept.is_some() { ", kept-experts.svg" } else { "" }
    );
    Ok(())
}
