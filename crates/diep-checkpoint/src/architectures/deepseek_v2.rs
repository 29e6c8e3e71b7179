//! `deepseek_v2` (DeepSeek-V2, V2-Lite, V2.5, Coder-V2).
//!
//! - Layer `i` is MoE iff `i ≥ first_k_dense_replace` (transformers 5.x ignores
//!   `moe_layer_freq`; configs with a value other than 1 are refused).
//! - Router `mlp.gate.weight [E, H]`; experts `mlp.experts.{e}.{gate,up,down}_proj.weight`;
//!   shared experts `mlp.shared_experts.{gate,up,down}_proj.weight`, added without a gate.
//! - Routing: f32 softmax; `topk_method: greedy` (plain top-k) or `group_limited_greedy` (only
//!   the `topk_group` groups with the largest maximum score); weights times
//!   `routed_scaling_factor`, never renormalised by transformers 5.x (it ignores
//!   `norm_topk_prob`).
//! - Attention: multi-head latent attention ([`MLA`]); RoPE as complex multiplication on
//!   interleaved pairs, optionally yarn-scaled.

use super::{MlaKeys, MoeKeys};

/// DeepSeek-V2's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    router: "gate",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: None,
    shared_experts: Some("shared_experts"),
    router_correction_bias: None,
    router_bias: None,
    fused_experts: None,
};

/// Multi-head latent attention tensor names, relative to `model.layers.{i}.self_attn.`.
pub const MLA: MlaKeys = MlaKeys {
    q_proj: "q_proj",
    q_a_proj: "q_a_proj",
    q_a_layernorm: "q_a_layernorm",
    q_b_proj: "q_b_proj",
    kv_a_proj_with_mqa: "kv_a_proj_with_mqa",
    kv_a_layernorm: "kv_a_layernorm",
    kv_b_proj: "kv_b_proj",
    o_proj: "o_proj",
};
