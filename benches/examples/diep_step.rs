//! Seconds per DiEP optimiser step, for `scripts/bench_torch_diep_step.py`: the streamed step
//! (forward under the relaxation layer by layer, backward to α), the default settings
//! (routed-gated relaxation, implicit threshold, `kl` against the stored reference), on a model
//! directory and token ids. Prints one JSON line.
//!
//! `cargo run --release -p diep-benches --example diep_step -- MODEL_DIR IDS.json [BATCH] [REPS] [TOP_K]`
use std::time::Instant;

use diep_models::{DeviceSpec, MoeModel, StreamingModel};
use diep_optim::{DiepSettings, DiepState, Stepper, StreamOptions, fingerprint};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = DeviceSpec::from_test_env().and_then(|d| d.device()).expect("device").autodiff();
    let ids: Vec<Vec<u32>> = serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    let batch: usize = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(16);
    let reps: usize = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(5);
    let top_k: usize = args.get(5).and_then(|k| k.parse().ok()).unwrap_or(64);
    let streamed = std::env::var("DIEP_STREAM").is_ok_and(|v| v == "1");
    let ids: Vec<Vec<u32>> = ids.into_iter().take(batch).collect();
    let settings = DiepSettings { batch_size: batch, reference_top_k: top_k, ..Default::default() };
    let rows: Vec<usize> = (0..ids.len()).collect();
    let time = |stepper: &dyn Fn() -> f64| {
        let _ = stepper(); // warm-up
        (0..reps).map(|_| stepper()).fold(f64::INFINITY, f64::min)
    };
    fn timed<S: diep_models::LayerSource>(stepper: &Stepper<'_, S>, rows: &[usize], state: &DiepState) -> f64 {
        let t = Instant::now();
        let _ = stepper.step(rows, state, true, 0.05).unwrap();
        t.elapsed().as_secs_f64()
    }
    let (best, source) = if streamed {
        let model = StreamingModel::open(&args[1], &device).expect("model");
        let state = DiepState::new(settings.clone(), fingerprint(&ids), &diep_plan::expert_counts(model.config()));
        let stepper = Stepper::new(&model, &ids, &settings, &StreamOptions::default()).expect("stepper");
        (time(&|| timed(&stepper, &rows, &state)), "disk")
    } else {
        let model = MoeModel::load(&args[1], &device).expect("model");
        let state = DiepState::new(settings.clone(), fingerprint(&ids), &diep_plan::expert_counts(model.config()));
        let stepper = Stepper::new(&model, &ids, &settings, &StreamOptions::default()).expect("stepper");
        (time(&|| timed(&stepper, &rows, &state)), "memory")
    };
    let tokens = ids.len() * ids[0].len();
    println!(
        "{}",
        serde_json::json!({"seconds_per_step": best, "tokens": tokens, "batch": ids.len(), "seq_len": ids[0].len(),
            "reference_top_k": top_k, "weights": source, "threads": rayon_threads()})
    );
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
