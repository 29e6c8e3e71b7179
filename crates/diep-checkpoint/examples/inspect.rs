//! Inspect a HuggingFace MoE checkpoint without loading its weights: the normalised config,
//! the MoE layers and their experts, and the tensors of the first MoE layer as stored.
//!
//! ```sh
//! cargo run -p diep-checkpoint --example inspect -- fixtures/trained-moe
//! ```

use diep_checkpoint::{Checkpoint, ModelConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: inspect MODEL_DIR")?;
    let config = ModelConfig::from_dir(&dir)?;
    println!(
        "{}: {} layers, hidden {}, vocabulary {}",
        config.architecture.model_type(),
        config.num_layers,
        config.hidden_size,
        config.vocab_size
    );
    let moe_layers = config.moe_layers();
    println!(
        "MoE layers {:?}: {} routed experts of width {}, top-{}",
        moe_layers, config.moe.num_experts, config.moe.expert_intermediate_size, config.moe.top_k
    );

    // The weights are memory-mapped; nothing is read until a tensor's bytes are used.
    let checkpoint = Checkpoint::open(&dir)?;
    println!(
        "{} tensors, {:.1} MB in {} file(s), mostly {:?}",
        checkpoint.names().count(),
        checkpoint.data_bytes() as f64 / 1e6,
        checkpoint.files().count(),
        checkpoint.dominant_dtype()
    );
    if let Some(first) = moe_layers.first() {
        let prefix = format!("model.layers.{first}.");
        let mut names: Vec<&str> = checkpoint.names().filter(|n| n.starts_with(&prefix)).collect();
        names.sort_unstable();
        for name in names.iter().take(12) {
            let t = checkpoint.get(name)?;
            println!("  {name}: {:?} {:?}", t.dtype, t.shape);
        }
        if names.len() > 12 {
            println!("  ... and {} more", names.len() - 12);
        }
    }
    Ok(())
}
