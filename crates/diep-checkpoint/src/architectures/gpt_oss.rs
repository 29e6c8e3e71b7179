//! `gpt_oss` (gpt-oss-20b, gpt-oss-120b).
//!
//! - Every layer is MoE. Router `mlp.router.weight [E, H]` plus `mlp.router.bias [E]`.
//! - Experts fused on disk, one tensor per layer and kind ([`FUSED`]):
//!   `mlp.experts.gate_up_proj [E, H, 2I]` (interleaved columns: gate = even, up = odd),
//!   `mlp.experts.gate_up_proj_bias [E, 2I]`, `mlp.experts.down_proj [E, I, H]`,
//!   `mlp.experts.down_proj_bias [E, H]`; `x · W` layout (no transpose).
//! - MXFP4 checkpoints replace each of the two weights with `{name}_blocks [E, out, in/32, 16]`
//!   (uint8, two FP4 E2M1 values a byte, low nibble first) and `{name}_scales [E, out, in/32]`
//!   (uint8 exponent, `2^(s−127)`), stored transposed (`gate_up_proj_blocks` is
//!   `[E, 2I, H/32, 16]`); the biases stay in bf16.
//! - Routing: `z = x·Wᵀ + b`, top-k of `z`, softmax over the k selected logits (equal to a
//!   full softmax renormalised over the top-k).
//! - Experts: `g = min(g, limit)`, `u = clamp(u, ±limit)`,
//!   `out = (u + 1) · g · sigmoid(α·g)`, then `down` + bias (`swiglu_alpha` 1.702,
//!   `swiglu_limit` 7).
//! - Attention: q/k/v/o biases (`attention_bias`), a per-head `self_attn.sinks [heads]` logit
//!   that joins the softmax and is dropped after it, `layer_types` of `sliding_attention` /
//!   `full_attention` with `sliding_window`; yarn RoPE on halves (`rotate_half`).

use super::{FusedExpertKeys, MoeKeys};

/// gpt-oss's fused expert tensor names, relative to `model.layers.{i}.mlp.experts.`.
pub const FUSED: FusedExpertKeys = FusedExpertKeys {
    gate_up: "gate_up_proj",
    gate_up_bias: "gate_up_proj_bias",
    down: "down_proj",
    down_bias: "down_proj_bias",
};

/// gpt-oss's MoE tensor names. The per-expert names are unused (the experts are fused).
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    router: "router",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: None,
    shared_experts: None,
    router_correction_bias: None,
    router_bias: Some("bias"),
    fused_experts: Some(FUSED),
};

/// Suffix of an MXFP4 tensor's packed 4-bit values.
pub const MXFP4_BLOCKS: &str = "_blocks";
/// Suffix of an MXFP4 tensor's per-32-value exponents.
pub const MXFP4_SCALES: &str = "_scales";
