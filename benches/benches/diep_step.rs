//! One DiEP optimiser step (forward with the relaxation, backward, Adam update of α or β) on
//! the shipped trained fixture (`fixtures/trained-moe`: 4 MoE layers × 8 experts, hidden 128),
//! 16 calibration sequences of 256 tokens — the paper's batch size.
//!
//! Run: `cargo bench -p diep-benches --bench diep_step`.

use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diep_models::{DeviceSpec, MoeModel};
use diep_optim::DiepSettings;

fn diep_step(c: &mut Criterion) {
    let device = DeviceSpec::from_test_env().and_then(|d| d.device()).expect("device").autodiff();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/trained-moe");
    let model = MoeModel::load(&dir, &device).expect("fixture");
    let text: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("heldout/english.ids.json")).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> = text.into_iter().take(16).collect();
    let settings = DiepSettings { epochs: 1, batch_size: 16, ..DiepSettings::paper() };
    let mut g = c.benchmark_group("diep_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements((16 * ids[0].len()) as u64));
    // One epoch over one batch of 16 = one optimiser step.
    g.bench_function("trained-moe/16x256/ce-norm", |bench| {
        bench.iter(|| diep_optim::optimise(&model, &ids, &settings, None, |_| Ok(())).expect("step"));
    });
    g.finish();
}

criterion_group!(benches, diep_step);
criterion_main!(benches);
