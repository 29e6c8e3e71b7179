//! `deepseek_v3` (DeepSeek-V3, R1, and models built on them such as Kimi-K2 / Moonlight).
//!
//! - Layer `i` is MoE iff `i ≥ first_k_dense_replace`; earlier layers are dense
//!   `mlp.{gate,up,down}_proj` of `intermediate_size`.
//! - Router `mlp.gate.weight [E, H]` plus `mlp.gate.e_score_correction_bias [E]` (f32);
//!   experts `mlp.experts.{e}.{gate,up,down}_proj.weight` of `moe_intermediate_size`; shared
//!   experts `mlp.shared_experts.{gate,up,down}_proj.weight` of
//!   `n_shared_experts · moe_intermediate_size`, added without a gate.
//! - Routing: `s = sigmoid(x·Wᵀ)` in f32; selection on `s + bias`, limited to the `topk_group`
//!   groups (contiguous blocks of `E / n_group`) with the largest sum of their two best scores;
//!   weights `s[idx]`, divided by their sum (+1e-20) if `norm_topk_prob`, times
//!   `routed_scaling_factor`.
//! - Attention: multi-head latent attention, see [`MLA`]; yarn RoPE on interleaved pairs
//!   (`rope_interleave`, default true) with the softmax scale multiplied by
//!   `mscale(factor, mscale_all_dim)²`.

use super::{MlaKeys, MoeKeys};

/// DeepSeek-V3's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    router: "gate",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: None,
    shared_experts: Some("shared_experts"),
    router_correction_bias: Some("e_score_correction_bias"),
    router_bias: None,
    fused_experts: None,
};

/// DeepSeek-V3's attention tensor names (shared with V2).
pub const MLA: MlaKeys = super::deepseek_v2::MLA;
