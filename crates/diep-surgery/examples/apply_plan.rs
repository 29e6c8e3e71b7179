//! Apply a pruning plan (`pruning.json`) to a checkpoint without any tensor framework: the
//! output keeps the checkpoint's own layout and dtype, with the removed experts gone.
//!
//! ```sh
//! cargo xtask prune --model fixtures/trained-moe --method frequency --ratio 0.25 \
//!     --calib fixtures/trained-moe/calib.txt --samples 8 --seq-len 128 --out /tmp/pruned
//! cargo run -p diep-surgery --example apply_plan -- fixtures/trained-moe /tmp/pruned/pruning.json /tmp/again
//! ```

use std::path::PathBuf;

use diep_surgery::{PruningPlan, SurgeryOptions, apply_plan};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model, plan, out] = args.as_slice() else {
        return Err("usage: apply_plan MODEL_DIR PLAN.json OUT_DIR".into());
    };
    let plan = PruningPlan::read(plan)?;
    let opts = SurgeryOptions { force: true, max_shard_bytes: 5_000_000_000, progress: None };
    // Written to a staging directory beside OUT_DIR and renamed into place at the end.
    let report = apply_plan(model, &plan, out, &opts)?;
    for (layer, kept) in &report.kept_experts {
        println!("layer {layer}: kept {} of {} experts {:?}", kept.len(), report.experts_before[layer], kept);
    }
    println!(
        "{} → {} parameters; {} tensors, {:.1} MB in {} shard(s) written to {}",
        report.params_before,
        report.params_after,
        report.tensors_written,
        report.bytes_written as f64 / 1e6,
        report.shards,
        report.out_dir.display()
    );
    Ok(())
}
