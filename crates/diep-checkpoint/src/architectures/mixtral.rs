//! `mixtral` (Mixtral 8x7B, 8x22B and Mistral-style MoE).
//!
//! - Router `model.layers.{i}.block_sparse_moe.gate.weight [E, H]`.
//! - Experts `model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`: `w1` is the
//!   gate projection, `w3` the up projection, `w2` the down projection.
//! - softmax → top-k → always renormalised; no attention biases; GQA; optional sliding window.

use super::MoeKeys;
use super::spec::{ArchSpec, AttentionParts, Defaults};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "mixtral";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_local_experts"];

/// Mixtral's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "block_sparse_moe",
    dense_block: "mlp",
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

/// Mixtral's config rules.
pub(crate) struct Spec;

impl ArchSpec for Spec {
    fn model_type(&self) -> &'static str {
        MODEL_TYPE
    }

    fn moe_keys(&self) -> MoeKeys {
        MOE_KEYS
    }

    fn expert_count_keys(&self) -> &'static [&'static str] {
        EXPERT_COUNT_KEYS
    }

    fn defaults(&self) -> Defaults {
        Defaults { rms_norm_eps: 1e-5, rope_theta: 1e6, max_position_embeddings: 4096 }
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        Ok(AttentionParts { sliding_window: f.opt_usize("sliding_window")?, ..AttentionParts::PLAIN })
    }

    /// Mixtral always renormalises the top-k weights.
    fn norm_topk_prob(&self, _f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(true)
    }
}
