//! `qwen2_moe` (Qwen1.5-MoE, Qwen2-MoE).
//!
//! - Router `mlp.gate.weight [E, H]`; experts `mlp.experts.{e}.{gate,up,down}_proj.weight`.
//! - Shared expert `mlp.shared_expert.{gate,up,down}_proj.weight`, gated by
//!   `sigmoid(x · mlp.shared_expert_gate.weight [1, H])`.
//! - q/k/v projections carry biases (`qkv_bias`, default true); o_proj has none.
//! - Layer `i` is MoE iff `i ∉ mlp_only_layers` and `(i+1) % decoder_sparse_step == 0`;
//!   other layers are dense `mlp.{gate,up,down}_proj` of `intermediate_size`.
//! - `norm_topk_prob` (false in the released models) decides renormalisation.

use super::MoeKeys;

/// Qwen2-MoE's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    router: "gate",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: Some(("shared_expert", "shared_expert_gate")),
    shared_experts: None,
    router_correction_bias: None,
    router_bias: None,
    fused_experts: None,
};
