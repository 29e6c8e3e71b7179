//! The fused CPU engine against transformers: every fixture it supports, logits compared with
//! the references `scripts/gen_parity_fixtures.py` computed in transformers (never by this
//! project), plain and with experts masked; and against the burn model on a trained
//! checkpoint, through the next-token NLL.

use std::path::PathBuf;

use diep_checkpoint::Checkpoint;
use diep_infer::CpuModel;
use diep_models::burn::tensor::Device;
use diep_models::{CausalLm, MoeModel};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
}

fn reference(name: &str) -> (Value, PathBuf) {
    let dir = fixtures().join("parity").join(name);
    (serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap(), dir)
}

fn load(name: &str) -> MoeModel {
    MoeModel::load(fixtures().join("models").join(name), &Device::flex()).unwrap()
}

/// Logits of the engine against transformers' for one fixture, unmasked and masked.
fn check(name: &str) {
    let (json, dir) = reference(name);
    let ids: Vec<Vec<u32>> = serde_json::from_value(json["ids"].clone()).unwrap();
    let want =
        Checkpoint::open_file(dir.join("reference.safetensors")).unwrap().get("logits").unwrap().to_f32().unwrap();
    // Converted from a loaded burn model, and streamed from disk.
    let converted = CpuModel::from_model(load(name)).unwrap();
    let streamed = CpuModel::load(fixtures().join("models").join(name)).unwrap();
    for (how, engine) in [("converted", converted), ("streamed", streamed)] {
        let got = engine.forward_host(&ids).unwrap();
        let err = max_rel_err(&got, &want);
        eprintln!("{name} ({how}): engine logits max rel err vs transformers {err:.3e}");
        assert!(err <= 1e-4, "{name} ({how}): engine logits differ from transformers by {err:.3e}");
    }

    let Some(masked) = json.get("masked_experts") else { return };
    let masked: std::collections::BTreeMap<String, Vec<usize>> = serde_json::from_value(masked.clone()).unwrap();
    let mut model = load(name);
    for (layer, experts) in &masked {
        let layer: usize = layer.parse().unwrap();
        let n = model.moe_block(layer).unwrap().num_experts();
        let keep: Vec<bool> = (0..n).map(|e| !experts.contains(&e)).collect();
        model.set_expert_mask(layer, Some(&keep)).unwrap();
    }
    let engine = CpuModel::from_model(model).unwrap();
    let got = engine.forward_host(&ids).unwrap();
    let want = Checkpoint::open_file(dir.join("masked.safetensors")).unwrap().get("logits").unwrap().to_f32().unwrap();
    let err = max_rel_err(&got, &want);
    eprintln!("{name}: masked engine logits max rel err vs transformers {err:.3e}");
    assert!(err <= 1e-4, "{name}: masked engine logits differ from transformers by {err:.3e}");
}

#[test]
fn mixtral() {
    check("tiny-mixtral");
}

#[test]
fn mixtral_bf16_stays_bf16_in_memory() {
    check("tiny-mixtral-bf16");
    let bf16 = CpuModel::from_model(load("tiny-mixtral-bf16")).unwrap();
    let f32 = CpuModel::from_model(load("tiny-mixtral")).unwrap();
    let ((b_bytes, b_types), (f_bytes, f_types)) = (bf16.resident_weights(), f32.resident_weights());
    assert_eq!(b_types, ["bf16"], "every matrix of a bf16 checkpoint is held as bf16");
    assert_eq!(f_types, ["f32"]);
    assert_eq!(b_bytes * 2, f_bytes, "same shapes, half the bytes");
}

#[test]
fn mixtral_sliding_window() {
    check("tiny-mixtral-swa");
}

#[test]
fn qwen2_moe_shared_expert() {
    check("tiny-qwen2-moe");
}

#[test]
fn qwen3_moe_per_head_qk_norm() {
    check("tiny-qwen3-moe");
    check("tiny-qwen3-moe-tf4");
}

#[test]
fn olmoe_full_qk_norm() {
    check("tiny-olmoe");
}

#[test]
fn deepseek_moe_dense_first_and_shared_experts() {
    check("tiny-deepseek");
    check("tiny-deepseek-freq2");
}

#[test]
fn gpt_oss_sinks_biases_clamped_swiglu_sliding_layers() {
    check("tiny-gpt-oss");
    check("tiny-gpt-oss-mxfp4");
}

#[test]
fn deepseek_v3_latent_attention_sigmoid_group_routing() {
    check("tiny-deepseek-v3");
}

/// FP8 block-quantised weights (dequantised at load) and an MTP layer (skipped).
#[test]
fn deepseek_v3_fp8_with_mtp_layer() {
    check("tiny-deepseek-v3-fp8");
}

#[test]
fn deepseek_v2_latent_attention_group_limited_greedy() {
    check("tiny-deepseek-v2");
}

/// GLM-4.5 (partial RoPE, per-head qk-norm, q/k/v biases, grouped sigmoid routing), MiniMax-M2
/// (full-projection qk-norm, partial RoPE, block-level selection bias), ERNIE-4.5 (interleaved
/// RoPE, softmax routing with a `[1, E]` selection bias, biased MLPs and LM head).
#[test]
fn glm4_minimax_m2_and_ernie45() {
    check("tiny-glm4-moe");
    check("tiny-minimax-m2");
    check("tiny-ernie4-5-moe");
}

/// Llama 4's text model: input-weighted fused experts, chunked and NoPE layers, L2 qk-norm,
/// temperature tuning, llama3 RoPE.
#[test]
fn llama4_text() {
    check("tiny-llama4-text");
    check("tiny-llama4");
}

/// Qwen3-Next: Gated DeltaNet layers, gated attention, zero-centred norms.
#[test]
fn qwen3_next_gated_deltanet() {
    check("tiny-qwen3-next");
}

#[test]
fn dynamic_skipping_needs_the_burn_model() {
    let mut model = load("tiny-mixtral");
    let layer = model.moe_layers()[0];
    let n = model.moe_block(layer).unwrap().num_experts();
    model.set_dynamic_skip(layer, Some(diep_models::DynamicSkip::new(vec![0.5; n * n], n).unwrap())).unwrap();
    assert!(CpuModel::unsupported(&load("tiny-deepseek-v3")).is_none());
    let reason = CpuModel::unsupported(&model).unwrap_or_default();
    assert!(reason.contains("dynamic expert skipping"), "{reason}");
    let err = CpuModel::from_model(model).unwrap_err().to_string();
    assert!(err.contains("dynamic expert skipping"), "{err}");
}

/// On the trained fixture (long sequences, several attention blocks), the engine's NLL equals
/// the burn model's to 1e-4 per position.
#[test]
fn trained_model_nll_matches_burn() {
    let dir = fixtures().join("trained-moe");
    let burn = MoeModel::load(&dir, &Device::flex()).unwrap();
    let engine = CpuModel::from_model(MoeModel::load(&dir, &Device::flex()).unwrap()).unwrap();
    let vocab = engine.config.vocab_size as u32;
    // Deterministic pseudo-random ids, 3 sequences of 150 tokens (3 blocks of 64 query rows).
    let mut s = 7u64;
    let ids: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            (0..150)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 33) % vocab as u64) as u32
                })
                .collect()
        })
        .collect();
    let want = burn.next_token_nll(&ids).unwrap();
    let got = engine.next_token_nll(&ids).unwrap();
    let mut worst = 0f32;
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        worst = worst.max((g - w).abs() / (1.0 + w.abs()));
    }
    eprintln!("trained-moe: engine NLL max rel err vs burn {worst:.3e}");
    assert!(worst <= 1e-4, "NLL differs from the burn model by {worst:.3e}");
    // The tensor interface returns the same logits.
    let t = engine.logits(&ids[..1]).unwrap();
    assert_eq!(t.dims(), [1, 150, engine.config.vocab_size]);
}

#[test]
fn bad_batches_are_refused() {
    let engine = CpuModel::from_model(load("tiny-mixtral")).unwrap();
    let err = engine.forward_host(&[vec![1, 2], vec![3]]).unwrap_err().to_string();
    assert!(err.contains("equal lengths"), "{err}");
    let err = engine.forward_host(&[vec![1, 100_000]]).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}
