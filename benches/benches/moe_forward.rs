//! MoE compute benchmarks.
//!
//! - `moe_layer/*`: one Mixtral-shaped MoE layer (hidden 1024, 8 experts of width 2816, top-2)
//!   on 512 tokens, grouped dispatch against the dense reference.
//! - `model_forward/*`: the shipped `tiny-qwen2-moe` fixture end to end (tokens/s).
//! - `eval_nll/*`: what `cargo xtask eval --ids` times: next-token NLL of 16 × 256 tokens on
//!   the trained fixture (Mixtral, hidden 128, 4 layers, vocab 2048), by the burn model with
//!   the fused CPU kernels (`burn`; run with `DIEP_REFERENCE_KERNELS=1` for plain burn ops) and
//!   by the fused CPU engine of `diep-infer` (`fused-cpu`).
//!
//! Run: `cargo bench -p diep-benches --bench moe_forward`.

use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diep_models::burn::tensor::{Device, Tensor, TensorData};
use diep_models::moe::{MoeBlock, MoeForwardOptions};
use diep_models::nn::{Linear, SwiGlu};
use diep_models::{CausalLm, DeviceSpec, MoeModel};

fn random(shape: [usize; 2], seed: u64, scale: f32, device: &Device) -> Tensor<2> {
    let mut s = seed;
    let v: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn block(device: &Device) -> MoeBlock {
    let (h, i, e) = (1024, 2816, 8);
    let lin = |inp, out, seed| Linear::new(random([inp, out], seed, 0.05, device), None);
    let experts = (0..e).map(|j| SwiGlu::new(lin(h, 2 * i, 10 + j as u64), lin(i, h, 100 + j as u64))).collect();
    MoeBlock::new(lin(h, e, 1), experts, None, 2, true)
}

fn device() -> Device {
    DeviceSpec::from_test_env().and_then(|d| d.device()).expect("device")
}

fn moe_layer(c: &mut Criterion) {
    let device = device();
    let b = block(&device);
    let tokens = 512;
    let x = random([tokens, 1024], 7, 1.0, &device);
    let mut g = c.benchmark_group("moe_layer");
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens as u64));
    g.bench_function("grouped", |bench| {
        bench.iter(|| b.forward(x.clone()).into_data());
    });
    let reference = MoeForwardOptions { reference: true, ..Default::default() };
    g.bench_function("reference", |bench| {
        bench.iter(|| b.forward_detailed(x.clone(), &reference).output.into_data());
    });
    g.finish();
}

fn model_forward(c: &mut Criterion) {
    let device = device();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/tiny-qwen2-moe");
    let model = MoeModel::load(dir, &device).expect("fixture");
    let ids: Vec<Vec<u32>> = (0..8).map(|b| (0..128).map(|t| ((b * 131 + t * 17) % 320) as u32).collect()).collect();
    let mut g = c.benchmark_group("model_forward");
    g.sample_size(10);
    g.throughput(Throughput::Elements((8 * 128) as u64));
    g.bench_function("tiny-qwen2-moe/8x128", |bench| {
        bench.iter(|| model.forward(&ids).expect("forward").into_data());
    });
    g.finish();
}

fn eval_nll(c: &mut Criterion) {
    let device = device();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/trained-moe");
    let model = MoeModel::load(&dir, &device).expect("fixture");
    let vocab = model.config().vocab_size;
    let ids: Vec<Vec<u32>> =
        (0..16).map(|b| (0..256).map(|t| ((b * 7919 + t * 104_729) % vocab) as u32).collect()).collect();
    let mut g = c.benchmark_group("eval_nll");
    g.sample_size(10);
    g.throughput(Throughput::Elements((16 * 256) as u64));
    g.bench_function("trained-moe/16x256/burn", |bench| {
        bench.iter(|| model.next_token_nll(&ids).expect("forward"));
    });
    #[cfg(feature = "cpu")]
    if device == Device::flex() {
        let engine = diep_infer::CpuModel::from_model(model).expect("supported");
        g.bench_function("trained-moe/16x256/fused-cpu", |bench| {
            bench.iter(|| engine.next_token_nll(&ids).expect("forward"));
        });
    }
    g.finish();
}

criterion_group!(benches, moe_layer, model_forward, eval_nll);
criterion_main!(benches);
