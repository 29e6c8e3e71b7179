//! `mixtral` (Mixtral 8x7B, 8x22B and Mistral-style MoE).
//!
//! - Router `model.layers.{i}.block_sparse_moe.gate.weight [E, H]`.
//! - Experts `model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`: `w1` is the
//!   gate projection, `w3` the up projection, `w2` the down projection.
//! - softmax → top-k → always renormalised; no attention biases; GQA; optional sliding window.

use super::MoeKeys;

/// Mixtral's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "block_sparse_moe",
    router: "gate",
    expert_gate: "w1",
    expert_up: "w3",
    expert_down: "w2",
    shared_expert: None,
    shared_experts: None,
    router_correction_bias: None,
    router_bias: None,
    fused_experts: None,
};
