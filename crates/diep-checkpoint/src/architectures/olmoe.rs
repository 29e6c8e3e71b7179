//! `olmoe` (OLMoE-1B-7B).
//!
//! - Every layer is MoE; keys as Qwen (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`).
//! - qk-norm over the whole projection, before the head split (`self_attn.q_norm.weight
//!   [heads·head_dim]`, `k_norm.weight [kv_heads·head_dim]`), then q, k and v are clamped to
//!   ±`clip_qkv` when it is set, then RoPE.
//! - `norm_topk_prob` false in the released models.

use super::MoeKeys;
use super::spec::{ArchSpec, AttentionParts, Defaults};
use crate::config::QkNorm;
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "olmoe";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_experts"];

/// OLMoE's MoE tensor names.
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

/// OLMoE's config rules.
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
        Defaults { rms_norm_eps: 1e-5, rope_theta: 10_000.0, max_position_embeddings: 4096 }
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let clip_qkv = f.opt_f64("clip_qkv")?;
        Ok(AttentionParts { qkv_bias: bias, o_bias: bias, qk_norm: QkNorm::Full, clip_qkv, ..AttentionParts::PLAIN })
    }
}
