//! `minimax_m2` (MiniMax-M2, M2.1).
//!
//! - Every layer is MoE. Router `block_sparse_moe.gate.weight [E, H]`; the selection bias
//!   `block_sparse_moe.e_score_correction_bias [E]` sits on the block, not on the router;
//!   experts `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight` (gate, up, down), as Mixtral.
//! - Routing: `s = sigmoid(x·Wᵀ)` in f32; top-k of `s + bias`; weights `s[idx]` always divided
//!   by their sum. transformers applies no `routed_scaling_factor` and no groups, and neither
//!   does this toolkit.
//! - Attention: GQA without biases; RMSNorm of the whole q and k projections
//!   (`q_norm [heads·head_dim]`, `k_norm [kv_heads·head_dim]`, the released config's
//!   `qk_norm_type: per_layer`) before the head split; RoPE (rotate-half) on the first
//!   `rotary_dim` elements of each head (`partial_rotary_factor` in transformers 5.x configs).

use super::MoeKeys;
use super::spec::{ArchSpec, AttentionParts, Defaults};
use crate::config::{QkNorm, Renorm, RoutingConfig, Scoring};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "minimax_m2";

/// The routed-expert count key (transformers' `num_experts` is an alias of it).
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_local_experts"];

/// MiniMax-M2's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "block_sparse_moe",
    dense_block: "mlp",
    router: "gate",
    expert_gate: "w1",
    expert_up: "w3",
    expert_down: "w2",
    shared_expert: None,
    shared_experts: None,
    router_correction_bias: Some("e_score_correction_bias"),
    router_bias: None,
    fused_experts: None,
};

/// MiniMax-M2's config rules.
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
        Defaults { rms_norm_eps: 1e-6, rope_theta: 5_000_000.0, max_position_embeddings: 196_608 }
    }

    fn default_partial_rotary_factor(&self) -> Option<f64> {
        Some(1.0)
    }

    /// The released config's `rotary_dim` (64 of `head_dim` 128).
    fn rotary_dim(&self, f: &Fields<'_>) -> Result<Option<usize>> {
        f.opt_usize("rotary_dim")
    }

    /// The qk-norm is always there in transformers' class; a config that turns it off or asks
    /// for per-head norms describes weights this layout does not have.
    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        if f.opt_bool("use_qk_norm")? == Some(false) {
            return Err(
                f.invalid("use_qk_norm", "false is not supported (transformers always applies q_norm/k_norm)".into())
            );
        }
        if let Some(t) = f.opt_str("qk_norm_type")?
            && t != "per_layer"
        {
            return Err(f.invalid("qk_norm_type", format!("`{t}` is not supported (only `per_layer`)")));
        }
        if f.opt_bool("attention_bias")? == Some(true) {
            return Err(
                f.invalid("attention_bias", "true is not supported (MiniMax-M2 projections have no bias)".into())
            );
        }
        Ok(AttentionParts { qk_norm: QkNorm::Full, ..AttentionParts::PLAIN })
    }

    /// transformers always renormalises.
    fn norm_topk_prob(&self, _f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(true)
    }

    /// `use_routing_bias` (default true) adds the block's `e_score_correction_bias`.
    fn routing(&self, f: &Fields<'_>, _num_experts: usize, _top_k: usize) -> Result<RoutingConfig> {
        super::deepseek_family::check_scoring_func(f, MODEL_TYPE, "sigmoid")?;
        Ok(RoutingConfig {
            scoring: Scoring::Sigmoid,
            group_limit: None,
            routed_scaling_factor: 1.0,
            correction_bias: f.opt_bool("use_routing_bias")?.unwrap_or(true),
            renorm: Renorm::Sum,
            weight_on_input: false,
        })
    }
}
