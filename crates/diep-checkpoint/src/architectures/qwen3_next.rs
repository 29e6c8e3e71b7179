//! `qwen3_next` (Qwen3-Next-80B-A3B).
//!
//! - Hybrid layers (`layer_types`, else every `full_attention_interval`-th (4) layer full):
//!   - `linear_attention`: Gated DeltaNet (`linear_attn.in_proj_qkvz`, `in_proj_ba`, a causal
//!     depthwise `conv1d` of `linear_conv_kernel_dim`, `A_log`, `dt_bias`, a gated RMSNorm
//!     `norm`, `out_proj`), see `diep_models::deltanet`;
//!   - `full_attention`: GQA whose `q_proj` is twice as wide, each head `[q | gate]`, per-head
//!     qk-norm, partial RoPE (`partial_rotary_factor`, default 0.25), and the output multiplied
//!     by `sigmoid(gate)` before `o_proj`.
//! - Every RMSNorm but the DeltaNet's gated one scales by `1 + weight`.
//! - MoE as Qwen2-MoE: softmax, top-k, `norm_topk_prob` (default true), a shared expert gated by
//!   `sigmoid(shared_expert_gate(x))`; `decoder_sparse_step` / `mlp_only_layers`.

use super::MoeKeys;
use super::spec::{ArchSpec, AttentionParts, Defaults};
use crate::config::{LinearAttention, QkNorm};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "qwen3_next";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_experts"];

/// Qwen3-Next's MoE tensor names (Qwen2-MoE's).
pub const MOE_KEYS: MoeKeys = super::qwen2_moe::MOE_KEYS;

/// The DeltaNet module of a linear-attention layer.
pub const LINEAR_ATTN: &str = "linear_attn";

/// Qwen3-Next's config rules.
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
        Defaults { rms_norm_eps: 1e-6, rope_theta: 10_000.0, max_position_embeddings: 32_768 }
    }

    fn default_partial_rotary_factor(&self) -> Option<f64> {
        Some(0.25)
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        Ok(AttentionParts { qkv_bias: bias, o_bias: bias, qk_norm: QkNorm::PerHead, ..AttentionParts::PLAIN })
    }

    fn gated_attention_output(&self) -> bool {
        true
    }

    fn zero_centered_norms(&self) -> bool {
        true
    }

    fn linear_attention(&self, f: &Fields<'_>, num_layers: usize) -> Result<Option<LinearAttention>> {
        let layers = match f.opt_layer_types(num_layers, "linear_attention")? {
            Some(linear) => linear,
            None => {
                let interval = f.opt_usize("full_attention_interval")?.unwrap_or(4);
                if interval == 0 {
                    return Err(f.invalid("full_attention_interval", "must be positive".into()));
                }
                (0..num_layers).map(|i| (i + 1) % interval != 0).collect()
            }
        };
        let positive = |key: &str, default: usize| -> Result<usize> {
            let v = f.opt_usize(key)?.unwrap_or(default);
            if v == 0 {
                return Err(f.invalid(key, "must be positive".into()));
            }
            Ok(v)
        };
        let key_heads = positive("linear_num_key_heads", 16)?;
        let value_heads = positive("linear_num_value_heads", 32)?;
        if !value_heads.is_multiple_of(key_heads) {
            return Err(f.invalid(
                "linear_num_value_heads",
                format!("{value_heads} is not a multiple of linear_num_key_heads = {key_heads}"),
            ));
        }
        Ok(Some(LinearAttention {
            layers,
            key_heads,
            value_heads,
            key_dim: positive("linear_key_head_dim", 128)?,
            value_dim: positive("linear_value_head_dim", 128)?,
            conv_kernel: positive("linear_conv_kernel_dim", 4)?,
        }))
    }

    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        Some("moe_intermediate_size")
    }

    fn norm_topk_prob(&self, f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(f.opt_bool("norm_topk_prob")?.unwrap_or(true))
    }

    fn shared_expert_intermediate_size(
        &self,
        f: &Fields<'_>,
        _expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        Ok(match f.opt_usize("shared_expert_intermediate_size")?.unwrap_or(512) {
            0 => None,
            n => Some(n),
        })
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, num_experts: usize) -> Result<Vec<bool>> {
        super::qwen2_moe::moe_layers(f, num_layers, num_experts)
    }
}
