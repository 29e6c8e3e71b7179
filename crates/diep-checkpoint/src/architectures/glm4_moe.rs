//! `glm4_moe` (GLM-4.5, GLM-4.5-Air, GLM-4.6).
//!
//! - Layer `i` is MoE iff `i ≥ first_k_dense_replace` (default 1); earlier layers are dense
//!   `mlp.{gate,up,down}_proj` of `intermediate_size`.
//! - Router `mlp.gate.weight [E, H]` plus `mlp.gate.e_score_correction_bias [E]` (f32);
//!   experts `mlp.experts.{e}.{gate,up,down}_proj.weight` of `moe_intermediate_size`; shared
//!   experts `mlp.shared_experts.*` of `n_shared_experts · moe_intermediate_size` (default 1),
//!   added without a gate.
//! - Routing as DeepSeek-V3: `s = sigmoid(x·Wᵀ)` in f32; selection on `s + bias` within the
//!   `topk_group` best of `n_group` groups (scored by their two best); weights `s[idx]`,
//!   divided by their sum + 1e-20 if `norm_topk_prob` (default true), times
//!   `routed_scaling_factor` (default 1).
//! - Attention: standard GQA, `q/k/v_proj` biases when `attention_bias` (never on `o_proj`),
//!   per-head RMSNorm of q and k when `use_qk_norm`, before RoPE; RoPE (rotate-half) on the
//!   first `head_dim · partial_rotary_factor` elements of each head (default factor 0.5, as
//!   transformers' `Glm4MoeConfig`), the rest unrotated.
//! - MTP: `num_nextn_predict_layers` (transformers writes 1 by default) extra layers after the
//!   trunk, named as DeepSeek-V3's; a config that declares them while the checkpoint stores
//!   none is read as a model without them.

use super::MoeKeys;
use super::deepseek_family as family;
use super::spec::{ArchSpec, AttentionParts, Defaults};
use crate::config::{GroupScore, QkNorm, Renorm, RoutingConfig, Scoring};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "glm4_moe";

/// The routed-expert count key (transformers' `num_local_experts` is an alias of it).
pub const EXPERT_COUNT_KEYS: &[&str] = &["n_routed_experts"];

/// GLM-4.5's MoE tensor names (DeepSeek-V3's).
pub const MOE_KEYS: MoeKeys = super::deepseek_v3::MOE_KEYS;

/// GLM-4.5's config rules.
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
        Defaults { rms_norm_eps: 1e-5, rope_theta: 10_000.0, max_position_embeddings: 131_072 }
    }

    fn default_partial_rotary_factor(&self) -> Option<f64> {
        Some(0.5)
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let qkv_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let qk_norm = if f.opt_bool("use_qk_norm")?.unwrap_or(false) { QkNorm::PerHead } else { QkNorm::None };
        Ok(AttentionParts { qkv_bias, qk_norm, ..AttentionParts::PLAIN })
    }

    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        Some(family::EXPERT_INTERMEDIATE_SIZE_KEY)
    }

    fn norm_topk_prob(&self, f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(f.opt_bool("norm_topk_prob")?.unwrap_or(true))
    }

    fn shared_expert_intermediate_size(
        &self,
        f: &Fields<'_>,
        expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        family::shared_experts(f, 1, expert_intermediate_size)
    }

    /// `n_group` and `topk_group` default to 1 (one group: plain top-k on the corrected scores).
    fn routing(&self, f: &Fields<'_>, num_experts: usize, top_k: usize) -> Result<RoutingConfig> {
        family::check_scoring_func(f, MODEL_TYPE, "sigmoid")?;
        let n_group = f.opt_usize("n_group")?.unwrap_or(1);
        let group_limit =
            if n_group > 1 { Some(family::group_limit(f, GroupScore::Top2Sum, num_experts, top_k)?) } else { None };
        Ok(RoutingConfig {
            scoring: Scoring::Sigmoid,
            group_limit,
            routed_scaling_factor: family::routed_scaling_factor(f, 1.0)?,
            correction_bias: true,
            renorm: Renorm::SumPlusTiny,
            weight_on_input: false,
        })
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, _num_experts: usize) -> Result<Vec<bool>> {
        let first_k_dense = f.opt_usize("first_k_dense_replace")?.unwrap_or(1);
        Ok((0..num_layers).map(|i| i >= first_k_dense).collect())
    }

    fn mtp_layers(&self, f: &Fields<'_>) -> Result<usize> {
        Ok(f.opt_usize(super::deepseek_v3::MTP_LAYERS_KEY)?.unwrap_or(0))
    }
}
