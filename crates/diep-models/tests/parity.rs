//! Parity against transformers: logits, router logits and hidden states of checkpoints that
//! `scripts/gen_parity_fixtures.py` generated and saved with transformers (references computed
//! there, never by this crate).
//!
//! The device comes from `DIEP_TEST_DEVICE` (`cpu` by default; CI also runs `wgpu`).

use std::path::PathBuf;

use diep_checkpoint::Checkpoint;
use diep_models::burn::tensor::{Device, Tensor};
use diep_models::{DeviceSpec, MoeForwardOptions, MoeModel};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap()
}

struct Reference {
    json: Value,
    tensors: Checkpoint,
}

impl Reference {
    fn load(name: &str) -> Self {
        let dir = fixtures().join("parity").join(name);
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let tensors = Checkpoint::open_file(dir.join("reference.safetensors")).unwrap();
        Reference { json, tensors }
    }

    fn ids(&self) -> Vec<Vec<u32>> {
        serde_json::from_value(self.json["ids"].clone()).unwrap()
    }

    fn tensor(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let t = self.tensors.get(name).unwrap();
        (t.to_f32().unwrap(), t.shape.to_vec())
    }
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Largest `|a − b| / (1 + |b|)`: relative for large values, absolute near zero.
fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
}

fn logits_std(v: &[f32]) -> f32 {
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
}

fn check_model(name: &str, reference_key: &str, tol: f32) {
    let reference = Reference::load(name);
    let model = MoeModel::load(fixtures().join("models").join(name), &device()).unwrap();
    let ids = reference.ids();

    let mut router = Vec::new();
    let logits = model
        .forward_with(&ids, &MoeForwardOptions::default(), |layer, _, out| {
            router.push((layer, to_vec(out.routing.logits)))
        })
        .unwrap();
    let (expected, shape) = reference.tensor(reference_key);
    assert_eq!(logits.dims().to_vec(), shape, "{name}: logits shape");
    let got = to_vec(logits);
    // The fixture must be far from uniform for the comparison to mean something.
    assert!(logits_std(&expected) > 0.5, "{name}: reference logits are nearly uniform");
    let err = max_rel_err(&got, &expected);
    eprintln!("{name}: logits max rel err vs transformers {err:.3e}");
    assert!(err <= tol, "{name}: logits differ from transformers by {err:.3e} (tolerance {tol:.0e})");

    let moe_layers: Vec<usize> = serde_json::from_value(reference.json["moe_layers"].clone()).unwrap();
    assert_eq!(model.moe_layers(), moe_layers, "{name}: MoE layer placement");
    for (layer, got) in router {
        let key = format!("router_logits.{layer}");
        if reference.tensors.contains(&key) && reference_key == "logits" {
            let (expected, _) = reference.tensor(&key);
            let err = max_rel_err(&got, &expected);
            assert!(err <= tol, "{name}: router logits of layer {layer} differ by {err:.3e}");
        }
    }
}

#[test]
fn mixtral_matches_transformers() {
    check_model("tiny-mixtral", "logits", 1e-4);
}

#[test]
fn mixtral_sliding_window_matches_transformers() {
    check_model("tiny-mixtral-swa", "logits", 1e-4);
}

#[test]
fn qwen2_moe_sharded_with_shared_expert_matches_transformers() {
    check_model("tiny-qwen2-moe", "logits", 1e-4);
}

#[test]
fn qwen3_moe_matches_transformers() {
    check_model("tiny-qwen3-moe", "logits", 1e-4);
}

#[test]
fn qwen3_moe_saved_by_transformers_4x_matches() {
    check_model("tiny-qwen3-moe-tf4", "logits", 1e-4);
}

#[test]
fn olmoe_matches_transformers() {
    check_model("tiny-olmoe", "logits", 1e-4);
}

#[test]
fn deepseek_v3_matches_transformers() {
    // MLA with q_lora_rank, yarn RoPE on interleaved pairs, sigmoid routing with a correction
    // bias and group limit, shared expert, a leading dense layer.
    check_model("tiny-deepseek-v3", "logits", 1e-4);
}

#[test]
fn glm4_moe_matches_transformers() {
    // q/k/v biases, per-head qk-norm, partial RoPE (8 of 16), DeepSeek-V3 routing with groups,
    // a shared expert, a leading dense layer; `num_nextn_predict_layers: 1` without MTP weights.
    check_model("tiny-glm4-moe", "logits", 1e-4);
}

#[test]
fn minimax_m2_matches_transformers() {
    // Full-projection qk-norm, `rotary_dim` 8 of 16, sigmoid routing with a block-level bias.
    check_model("tiny-minimax-m2", "logits", 1e-4);
}

#[test]
fn ernie4_5_moe_matches_transformers() {
    // Interleaved RoPE, a dense first layer, softmax routing with the `moe_statics` bias
    // `[1, E]`, two shared experts, tied embeddings.
    check_model("tiny-ernie4-5-moe", "logits", 1e-4);
}

/// The experts each token selects, and their weights, equal transformers' router outputs
/// (`topk_idx.{layer}` / `topk_weight.{layer}`, ids sorted per token), correction biases and
/// renormalisation included.
#[test]
fn new_families_select_the_experts_transformers_selects() {
    for name in
        ["tiny-glm4-moe", "tiny-minimax-m2", "tiny-ernie4-5-moe", "tiny-llama4-text", "tiny-llama4", "tiny-qwen3-next"]
    {
        let reference = Reference::load(name);
        let model = MoeModel::load(fixtures().join("models").join(name), &device()).unwrap();
        let mut routed = Vec::new();
        model
            .forward_with(&reference.ids(), &MoeForwardOptions::default(), |layer, _, out| {
                let idx: Vec<i64> = out.routing.experts.clone().into_data().iter::<i64>().collect();
                routed.push((layer, idx, to_vec(out.routing.weights.clone())));
            })
            .unwrap();
        assert!(!routed.is_empty());
        for (layer, idx, w) in routed {
            let ckpt =
                Checkpoint::open_file(fixtures().join("parity").join(name).join("reference.safetensors")).unwrap();
            let t = ckpt.get(&format!("topk_idx.{layer}")).unwrap();
            assert_eq!(t.dtype, diep_models::checkpoint::Dtype::I64);
            let want_idx: Vec<i64> =
                t.bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            let (want_w, _) = reference.tensor(&format!("topk_weight.{layer}"));
            let k = idx.len() / (want_idx.len() / 2);
            assert_eq!(k, 2, "{name}: top-k");
            for t in 0..idx.len() / k {
                let mut got: Vec<(i64, f32)> = (0..k).map(|j| (idx[t * k + j], w[t * k + j])).collect();
                got.sort_by_key(|p| p.0);
                for j in 0..k {
                    assert_eq!(got[j].0, want_idx[t * k + j], "{name} layer {layer} token {t}");
                    let d = (got[j].1 - want_w[t * k + j]).abs();
                    assert!(d < 1e-5, "{name} layer {layer} token {t}: weight {} vs {}", got[j].1, want_w[t * k + j]);
                }
            }
        }
    }
}

#[test]
fn llama4_text_matches_transformers() {
    // Fused experts weighted on their input, a shared expert, dense layers of
    // `intermediate_size_mlp`, chunked attention (6) on the RoPE layers, a NoPE layer with
    // temperature tuning, weightless qk-norm after RoPE, llama3-scaled RoPE on interleaved pairs.
    check_model("tiny-llama4-text", "logits", 1e-4);
    check_masked("tiny-llama4-text");
}

/// Qwen3-Next: Gated DeltaNet layers (checked against transformers' chunked form, and its
/// recurrent form, 1.8e-5 apart), gated full attention with partial RoPE, zero-centred norms,
/// a sigmoid-gated shared expert.
#[test]
fn qwen3_next_matches_transformers() {
    check_model("tiny-qwen3-next", "logits", 1e-4);
    check_model("tiny-qwen3-next", "logits_recurrent", 1e-4);
    check_masked("tiny-qwen3-next");
}

/// The multimodal `llama4` checkpoint (`Llama4ForConditionalGeneration`): its text model read
/// from `text_config` and `language_model.*`, the vision tower ignored; transformers' text-only
/// forward.
#[test]
fn llama4_multimodal_text_model_matches_transformers() {
    check_model("tiny-llama4", "logits", 1e-4);
    check_masked("tiny-llama4");
}

#[test]
fn new_families_expert_masks_equal_removing_experts_in_transformers() {
    for name in ["tiny-glm4-moe", "tiny-minimax-m2", "tiny-ernie4-5-moe"] {
        check_masked(name);
    }
}

/// DeepSeek-V3 in DeepSeek's FP8 block format (16×16 blocks, partial edge blocks) with an MTP
/// layer: transformers ran on the dequantised weights, the MTP layer ignored.
#[test]
fn deepseek_v3_fp8_with_mtp_matches_transformers_on_dequantized_weights() {
    check_model("tiny-deepseek-v3-fp8", "logits", 1e-4);
}

/// The MTP module (`diep_models::mtp`) on the trunk's final hidden states: its projected input
/// and its router logits equal transformers' decoder layer run on the same inputs.
#[test]
fn deepseek_v3_mtp_layer_routing_matches_transformers() {
    let name = "tiny-deepseek-v3-fp8";
    let reference = Reference::load(name);
    let dir = fixtures().join("models").join(name);
    let model = diep_models::StreamingModel::open(&dir, &device()).unwrap();
    let config = model.config().clone();
    assert_eq!((config.num_layers, config.mtp_layers), (3, 1));
    let ids = reference.ids();
    let (final_hidden, shape) = reference.tensor("hidden_states.3");
    let rows = shape[0] * shape[1];
    let h =
        Tensor::<2>::from_data(diep_models::burn::tensor::TensorData::new(final_hidden, [rows, shape[2]]), &device());
    let mtp = model.load_mtp(0).unwrap();
    assert_eq!(mtp.index, 3);
    let (x, out) = mtp.forward(&ids, h, &config.attention, &MoeForwardOptions::default()).unwrap();
    let (want_x, _) = reference.tensor("mtp_hidden_in");
    let err = max_rel_err(&to_vec(x), &want_x);
    assert!(err <= 1e-5, "MTP input differs by {err:.3e}");
    let (want, _) = reference.tensor("mtp_router_logits");
    let got = to_vec(out.moe.expect("the MTP layer is an MoE layer").routing.logits);
    let err = max_rel_err(&got, &want);
    eprintln!("{name}: MTP router logits max rel err {err:.3e}");
    assert!(err <= 1e-4, "MTP router logits differ from transformers by {err:.3e}");
}

#[test]
fn deepseek_v2_matches_transformers() {
    // MLA without q_lora_rank, yarn RoPE, softmax group_limited_greedy routing, scaling factor.
    check_model("tiny-deepseek-v2", "logits", 1e-4);
}

#[test]
fn deepseek_moe_matches_remote_code_reference() {
    // DeepSeek-MoE (`deepseek`, remote code; the generator builds the reference from transformers'
    // Llama pieces plus the remote code's MoE block): standard attention with GQA, rotate-half
    // RoPE, softmax greedy top-2 without renormalisation, 2 shared experts, a leading dense layer.
    check_model("tiny-deepseek", "logits", 1e-4);
}

#[test]
fn deepseek_moe_layer_freq_linear_rope_and_tied_embeddings_match() {
    // `moe_layer_freq: 2` after `first_k_dense_replace: 1` (only layer 2 is MoE), norm_topk_prob,
    // no shared experts, linear RoPE scaling, tied embeddings.
    check_model("tiny-deepseek-freq2", "logits", 1e-4);
}

#[test]
fn gpt_oss_matches_transformers() {
    // Fused experts (interleaved gate/up) with biases, router bias, clamped SwiGLU that clamps,
    // attention sinks, sliding and full layers, yarn RoPE.
    check_model("tiny-gpt-oss", "logits", 1e-4);
}

#[test]
fn gpt_oss_mxfp4_matches_transformers() {
    // Experts stored as MXFP4 `*_blocks` + `*_scales`; transformers dequantised them on load.
    check_model("tiny-gpt-oss-mxfp4", "logits", 1e-4);
}

#[test]
fn bf16_checkpoint_matches_f32_compute() {
    // bf16 weights upcast to f32 and run in f32 by transformers: the same arithmetic as ours.
    check_model("tiny-mixtral-bf16", "logits", 1e-4);
}

/// Mean next-token cross-entropy of `[batch, len, vocab]` logits, in f64.
fn mean_nll(logits: &[f32], ids: &[Vec<u32>], vocab: usize) -> f64 {
    let len = ids[0].len();
    let (mut sum, mut n) = (0f64, 0usize);
    for (b, seq) in ids.iter().enumerate() {
        for t in 0..len - 1 {
            let row = &logits[(b * len + t) * vocab..(b * len + t + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)) as f64;
            let lse = max + row.iter().map(|x| (*x as f64 - max).exp()).sum::<f64>().ln();
            sum += lse - row[seq[t + 1] as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

#[test]
fn bf16_checkpoint_is_close_to_transformers_bf16_compute() {
    // transformers running in bf16 rounds every activation to 8 bits of mantissa, and on this
    // random router that flips one token's top-k choice (the generator records it), so its
    // logits differ from any f32 computation by O(1) at a few positions. The loss is the
    // meaningful comparison: within 1% (bf16's unit roundoff is 0.4%).
    let name = "tiny-mixtral-bf16";
    let reference = Reference::load(name);
    let model = MoeModel::load(fixtures().join("models").join(name), &device()).unwrap();
    let ids = reference.ids();
    let got = to_vec(model.forward(&ids).unwrap());
    let loss = mean_nll(&got, &ids, model.config().vocab_size);
    let expected = reference.json["loss_bf16"].as_f64().unwrap();
    let rel = (loss - expected).abs() / expected;
    assert!(rel < 1e-2, "{name}: loss {loss} vs transformers bf16 {expected} ({rel:.2e})");
    // And the f32-compute loss agrees to 1e-5 relative.
    let f32_loss = reference.json["loss"].as_f64().unwrap();
    assert!((loss - f32_loss).abs() / f32_loss < 1e-5, "{name}: loss {loss} vs {f32_loss}");
}

/// Masking experts must equal transformers with those experts' router logits set to −∞
/// (which the generator checked equals physically removing them).
fn check_masked(name: &str) {
    let reference = Reference::load(name);
    let mut model = MoeModel::load(fixtures().join("models").join(name), &device()).unwrap();
    let masked: std::collections::BTreeMap<String, Vec<usize>> =
        serde_json::from_value(reference.json["masked_experts"].clone()).unwrap();
    for (layer, ids) in &masked {
        let layer: usize = layer.parse().unwrap();
        let n = model.moe_block(layer).unwrap().num_experts();
        let keep: Vec<bool> = (0..n).map(|e| !ids.contains(&e)).collect();
        model.set_expert_mask(layer, Some(&keep)).unwrap();
    }
    let dir = fixtures().join("parity").join(name);
    let masked_ref = Checkpoint::open_file(dir.join("masked.safetensors")).unwrap();
    let expected = masked_ref.get("logits").unwrap().to_f32().unwrap();
    let got = to_vec(model.forward(&reference.ids()).unwrap());
    let err = max_rel_err(&got, &expected);
    assert!(err <= 1e-4, "{name}: masked logits differ by {err:.3e}");
    // And masking changed something.
    let (unmasked, _) = reference.tensor("logits");
    assert!(max_rel_err(&got, &unmasked) > 1e-3, "{name}: mask had no effect");
}

#[test]
fn mixtral_expert_mask_matches_transformers() {
    check_masked("tiny-mixtral");
}

#[test]
fn qwen2_moe_expert_mask_matches_transformers() {
    check_masked("tiny-qwen2-moe");
}

#[test]
fn gpt_oss_expert_mask_matches_transformers() {
    // Router logits (bias included) set to −∞; the generator checked this equals removal.
    check_masked("tiny-gpt-oss");
}

#[test]
fn deepseek_v3_expert_mask_equals_removing_experts_in_transformers() {
    // One expert per routing group masked; the reference deleted them in transformers.
    check_masked("tiny-deepseek-v3");
}

#[test]
fn deepseek_v2_expert_mask_equals_removing_experts_in_transformers() {
    check_masked("tiny-deepseek-v2");
}

#[test]
fn deepseek_moe_expert_mask_equals_removing_experts() {
    for name in ["tiny-deepseek", "tiny-deepseek-freq2"] {
        check_masked(name);
    }
}

#[test]
fn deepseek_moe_logits_and_loss_parity() {
    for name in ["tiny-deepseek", "tiny-deepseek-freq2"] {
        let reference = Reference::load(name);
        let model = MoeModel::load(fixtures().join("models").join(name), &device()).unwrap();
        let ids = reference.ids();
        let got = to_vec(model.forward(&ids).unwrap());
        let (expected, _) = reference.tensor("logits");
        let max_abs = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let loss = mean_nll(&got, &ids, model.config().vocab_size);
        let want = reference.json["loss"].as_f64().unwrap();
        let rel = (loss - want).abs() / want;
        eprintln!("{name}: max |dlogit| {max_abs:.3e}, loss {loss:.7} vs {want:.7} (rel {rel:.2e})");
        assert!(max_abs < 1e-3, "{name}: max |dlogit| {max_abs:.3e}");
        assert!(rel < 1e-5, "{name}: loss {loss} vs reference {want} ({rel:.2e})");
    }
}

#[test]
fn deepseek_and_gpt_oss_loss_matches_transformers() {
    for name in [
        "tiny-deepseek-v3",
        "tiny-deepseek-v2",
        "tiny-gpt-oss",
        "tiny-gpt-oss-mxfp4",
        "tiny-glm4-moe",
        "tiny-minimax-m2",
        "tiny-ernie4-5-moe",
        "tiny-llama4-text",
        "tiny-llama4",
        "tiny-qwen3-next",
    ] {
        let reference = Reference::load(name);
        let model = MoeModel::load(fixtures().join("models").join(name), &device()).unwrap();
        let ids = reference.ids();
        let loss = mean_nll(&to_vec(model.forward(&ids).unwrap()), &ids, model.config().vocab_size);
        let expected = reference.json["loss"].as_f64().unwrap();
        let rel = (loss - expected).abs() / expected;
        assert!(rel < 1e-5, "{name}: loss {loss} vs transformers {expected} ({rel:.2e})");
    }
}

#[test]
fn tokenizer_matches_python_tokenizers() {
    for name in ["tiny-mixtral", "tiny-qwen2-moe"] {
        let reference = Reference::load(name);
        let tok = diep_models::tokenizer::load_tokenizer(fixtures().join("models").join(name)).unwrap();
        let text = reference.json["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(reference.json["text_ids"].clone()).unwrap();
        assert_eq!(diep_models::tokenizer::encode(&tok, text).unwrap(), expected, "{name}");
    }
}
