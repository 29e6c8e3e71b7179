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
//! - MTP: `num_nextn_predict_layers` extra MoE decoder layers after the trunk, each with its
//!   own embedding, `enorm`/`hnorm`, `eh_proj` and `shared_head`; transformers ignores them.
//! - Attention: multi-head latent attention, see [`MLA`]; yarn RoPE on interleaved pairs
//!   (`rope_interleave`, default true) with the softmax scale multiplied by
//!   `mscale(factor, mscale_all_dim)²`.

use super::deepseek_family as family;
use super::spec::{ArchSpec, AttentionParts, Defaults, RopeAllowed};
use super::{MlaKeys, MoeKeys};
use crate::config::{GroupScore, MlaConfig, Renorm, RoutingConfig, Scoring};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "deepseek_v3";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = family::EXPERT_COUNT_KEYS;

/// The config key of the MTP layer count.
pub const MTP_LAYERS_KEY: &str = "num_nextn_predict_layers";

/// The tensors of an MTP layer beyond its decoder layer, under `model.layers.{i}.`:
/// `embed_tokens.weight [V, H]`, `enorm.weight [H]`, `hnorm.weight [H]`, `eh_proj.weight
/// [H, 2H]`, `shared_head.norm.weight [H]`, `shared_head.head.weight [V, H]`.
pub const MTP_EMBED: &str = "embed_tokens";
/// See [`MTP_EMBED`].
pub const MTP_ENORM: &str = "enorm";
/// See [`MTP_EMBED`].
pub const MTP_HNORM: &str = "hnorm";
/// See [`MTP_EMBED`].
pub const MTP_EH_PROJ: &str = "eh_proj";
/// See [`MTP_EMBED`].
pub const MTP_SHARED_HEAD: &str = "shared_head";

/// DeepSeek-V3's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    dense_block: "mlp",
    router: "gate",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: None,
    shared_experts: Some("shared_experts"),
    router_correction_bias: Some("gate.e_score_correction_bias"),
    router_bias: None,
    fused_experts: None,
};

/// DeepSeek-V3's attention tensor names (shared with V2).
pub const MLA: MlaKeys = super::deepseek_v2::MLA;

/// DeepSeek-V3's config rules.
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

    fn is_deepseek(&self) -> bool {
        true
    }

    fn has_mla(&self) -> bool {
        true
    }

    /// Rotary dims in interleaved pairs unless `rope_interleave` is false.
    fn mla(&self, f: &Fields<'_>) -> Result<Option<MlaConfig>> {
        family::mla_config(f, false).map(Some)
    }

    fn defaults(&self) -> Defaults {
        Defaults { rms_norm_eps: 1e-6, rope_theta: 10_000.0, max_position_embeddings: 4096 }
    }

    fn rope_allowed(&self) -> RopeAllowed {
        RopeAllowed::Yarn
    }

    /// MLA's biases (`attention_bias`) are recorded in `MlaConfig::bias`.
    fn attention(&self, _f: &Fields<'_>) -> Result<AttentionParts> {
        Ok(AttentionParts::PLAIN)
    }

    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        Some(family::EXPERT_INTERMEDIATE_SIZE_KEY)
    }

    fn norm_topk_prob(&self, f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(f.opt_bool("norm_topk_prob")?.unwrap_or(true))
    }

    /// transformers' default `n_shared_experts`: 1.
    fn shared_expert_intermediate_size(
        &self,
        f: &Fields<'_>,
        expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        family::shared_experts(f, 1, expert_intermediate_size)
    }

    /// transformers' V3 router is always sigmoid + correction bias + group-limited
    /// (`topk_method: noaux_tc`, `scoring_func: sigmoid` are kept for vLLM only).
    fn routing(&self, f: &Fields<'_>, num_experts: usize, top_k: usize) -> Result<RoutingConfig> {
        family::check_scoring_func(f, MODEL_TYPE, "sigmoid")?;
        Ok(RoutingConfig {
            scoring: Scoring::Sigmoid,
            group_limit: Some(family::group_limit(f, GroupScore::Top2Sum, num_experts, top_k)?),
            routed_scaling_factor: family::routed_scaling_factor(f, 2.5)?,
            correction_bias: true,
            renorm: Renorm::SumPlusTiny,
            weight_on_input: false,
        })
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, _num_experts: usize) -> Result<Vec<bool>> {
        family::mla_moe_layers(f, num_layers)
    }

    /// `num_nextn_predict_layers` (1 in the DeepSeek-V3/R1 releases): MTP layers at
    /// `model.layers.{num_hidden_layers + j}`.
    fn mtp_layers(&self, f: &Fields<'_>) -> Result<usize> {
        Ok(f.opt_usize(MTP_LAYERS_KEY)?.unwrap_or(0))
    }
}
