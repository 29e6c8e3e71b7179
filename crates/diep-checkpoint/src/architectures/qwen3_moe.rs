//! `qwen3_moe` (Qwen3-30B-A3B, Qwen3-235B-A22B).
//!
//! - As Qwen2-MoE without the shared expert and without attention biases (unless
//!   `attention_bias`), with an explicit `head_dim`.
//! - qk-norm: RMSNorm over each head (`self_attn.q_norm.weight [head_dim]`, `k_norm`), applied
//!   before RoPE.
//! - The expert count is `num_experts` (transformers 4.x) or `num_local_experts` (5.x).

use super::MoeKeys;
use super::spec::{ArchSpec, AttentionParts, Defaults};
use crate::config::QkNorm;
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "qwen3_moe";

/// The routed-expert count keys: transformers 4.x reads `num_experts`, 5.x writes
/// `num_local_experts`; parsing takes the first present, surgery writes both.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_experts", "num_local_experts"];

/// Qwen3-MoE's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    dense_block: "mlp",
    router: "gate",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: None,
    shared_experts: None,
    router_correction_bias: None,
    router_bias: None,
    fused_experts: None,
};

/// Qwen3-MoE's config rules.
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
        Defaults { rms_norm_eps: 1e-6, rope_theta: 10_000.0, max_position_embeddings: 4096 }
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        super::qwen2_moe::refuse_sliding_window(f)?;
        Ok(AttentionParts { qkv_bias: bias, o_bias: bias, qk_norm: QkNorm::PerHead, ..AttentionParts::PLAIN })
    }

    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        Some("moe_intermediate_size")
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, num_experts: usize) -> Result<Vec<bool>> {
        super::qwen2_moe::moe_layers(f, num_layers, num_experts)
    }
}
