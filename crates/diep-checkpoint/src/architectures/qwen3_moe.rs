//! `qwen3_moe` (Qwen3-30B-A3B, Qwen3-235B-A22B).
//!
//! - As Qwen2-MoE without the shared expert and without attention biases (unless
//!   `attention_bias`), with an explicit `head_dim`.
//! - qk-norm: RMSNorm over each head (`self_attn.q_norm.weight [head_dim]`, `k_norm`), applied
//!   before RoPE.
//! - The expert count is `num_experts` (transformers 4.x) or `num_local_experts` (5.x).

use super::MoeKeys;

/// Qwen3-MoE's MoE tensor names.
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
