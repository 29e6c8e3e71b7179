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

use super::spec::{ArchSpec, AttentionParts, Defaults, ExpertParts, RopeAllowed};
use super::{FusedExpertKeys, MoeKeys};
use crate::config::{ExpertActivation, RopeScaling, YarnConfig};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "gpt_oss";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_local_experts"];

/// gpt-oss's fused expert tensor names, relative to `model.layers.{i}.mlp.experts.`.
pub const FUSED: FusedExpertKeys = FusedExpertKeys {
    gate_up: "gate_up_proj",
    gate_up_bias: Some("gate_up_proj_bias"),
    down: "down_proj",
    down_bias: Some("down_proj_bias"),
    interleaved: true,
};

/// gpt-oss's MoE tensor names. The per-expert names are unused (the experts are fused).
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    dense_block: "mlp",
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

/// gpt-oss's config rules.
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
        Defaults { rms_norm_eps: 1e-5, rope_theta: 150_000.0, max_position_embeddings: 131_072 }
    }

    fn rope_allowed(&self) -> RopeAllowed {
        RopeAllowed::Yarn
    }

    /// transformers' `GptOssConfig` default: yarn, factor 32 over 4096 positions.
    fn default_rope_scaling(&self) -> RopeScaling {
        RopeScaling::Yarn(YarnConfig {
            factor: 32.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            attention_factor: None,
            truncate: false,
        })
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let bias = f.opt_bool("attention_bias")?.unwrap_or(true);
        let sliding_window = f.opt_usize("sliding_window")?;
        Ok(AttentionParts { qkv_bias: bias, o_bias: bias, sliding_window, sinks: true, ..AttentionParts::PLAIN })
    }

    fn sliding_layers(&self, f: &Fields<'_>, num_layers: usize, window: Option<usize>) -> Result<Option<Vec<bool>>> {
        layer_types(f, num_layers, window).map(Some)
    }

    /// Mixtral-style: gpt-oss's softmax over the k selected logits is a renormalised top-k.
    fn norm_topk_prob(&self, _f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(true)
    }

    fn experts(&self, f: &Fields<'_>) -> Result<ExpertParts> {
        let alpha = f.opt_f64("swiglu_alpha")?.unwrap_or(1.702);
        let limit = f.opt_f64("swiglu_limit")?.unwrap_or(7.0);
        if !alpha.is_finite() {
            return Err(f.invalid("swiglu_alpha", format!("{alpha} is not finite")));
        }
        if !(limit.is_finite() && limit > 0.0) {
            return Err(f.invalid("swiglu_limit", format!("{limit} must be positive")));
        }
        Ok(ExpertParts {
            activation: ExpertActivation::ClampedSwiglu { alpha, limit },
            router_bias: true,
            expert_bias: true,
            mlp_bias: false,
        })
    }
}

/// `layer_types`: per layer, whether it uses the sliding window. transformers' default
/// alternates, starting with a sliding layer; without a `sliding_window` every layer attends
/// fully.
fn layer_types(f: &Fields<'_>, num_layers: usize, window: Option<usize>) -> Result<Vec<bool>> {
    let sliding = match f.opt_layer_types(num_layers, "sliding_attention")? {
        Some(sliding) => sliding,
        None => (0..num_layers).map(|i| i % 2 == 0).collect(),
    };
    Ok(if window.is_some() { sliding } else { vec![false; num_layers] })
}
