//! Load a HuggingFace MoE checkpoint and run a forward pass: next-token perplexity of a text
//! under the model, and the experts its first MoE layer routes the last token to.
//!
//! ```sh
//! cargo run --release -p diep-models --example forward -- fixtures/trained-moe "def main():"
//! ```

use diep_models::burn::tensor::activation::log_softmax;
use diep_models::tokenizer::{encode, load_tokenizer};
use diep_models::{DeviceSpec, MoeModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: forward MODEL_DIR [TEXT]")?;
    let text = args.next().unwrap_or_else(|| "The quick brown fox jumps over the lazy dog.".into());

    // `cpu`, `wgpu`, `cuda` or `cuda:N`; the backend must be compiled in (cargo features).
    let device = "cpu".parse::<DeviceSpec>()?.device()?;
    let model = MoeModel::load(&dir, &device)?;
    let ids = encode(&load_tokenizer(&dir)?, &text)?;
    if ids.len() < 2 {
        return Err("the text must be at least two tokens long".into());
    }

    // Logits [batch, tokens, vocabulary] for one sequence.
    let logits = model.forward(std::slice::from_ref(&ids))?;
    let logp: Vec<f32> = log_softmax(logits, 2).into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let vocab = model.config().vocab_size;
    let nll: f64 = (0..ids.len() - 1).map(|t| -f64::from(logp[t * vocab + ids[t + 1] as usize])).sum::<f64>()
        / (ids.len() - 1) as f64;
    println!("{} tokens, perplexity {:.3} (mean NLL {nll:.4} nats)", ids.len(), nll.exp());

    let last = &logp[(ids.len() - 1) * vocab..];
    let next = (0..vocab).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap_or(0);
    println!("most likely next token: id {next} (p = {:.3})", f64::from(last[next]).exp());
    Ok(())
}
