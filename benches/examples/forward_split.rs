//! Where `eval --ids` spends its time: the model's forward (logits) against the NLL on top.
//! `cargo run --release -p diep-benches --example forward_split -- MODEL_DIR IDS.json`
use std::time::Instant;

use diep_models::{DeviceSpec, MoeModel};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = DeviceSpec::from_test_env().and_then(|d| d.device()).expect("device");
    let model = MoeModel::load(&args[1], &device).expect("model");
    let ids: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    let batch: Vec<Vec<u32>> = ids.into_iter().take(16).collect();
    let tokens = (batch.len() * batch[0].len()) as f64;
    let _ = model.forward(&batch).unwrap().into_data();
    let reps: usize = std::env::var("REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    for _ in 0..reps {
        let t = Instant::now();
        let _ = model.forward(&batch).unwrap().into_data();
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = diep_eval::sequence_nll(&model, &batch).unwrap();
        let n = t.elapsed().as_secs_f64();
        println!("forward {:.0} tok/s ({f:.3}s), forward+nll {:.0} tok/s ({n:.3}s)", tokens / f, tokens / n);
    }
}
