//! `olmoe` (OLMoE-1B-7B).
//!
//! - Every layer is MoE; keys as Qwen (`mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`).
//! - qk-norm over the whole projection, before the head split (`self_attn.q_norm.weight
//!   [heads·head_dim]`, `k_norm.weight [kv_heads·head_dim]`), then q, k and v are clamped to
//!   ±`clip_qkv` when it is set, then RoPE.
//! - `norm_topk_prob` false in the released models.

use super::MoeKeys;

/// OLMoE's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
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
