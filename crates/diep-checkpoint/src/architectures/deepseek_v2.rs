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

use super::deepseek_family as family;
use super::spec::{ArchSpec, AttentionParts, Defaults, RopeAllowed};
use super::{MlaKeys, MoeKeys};
use crate::config::{GroupScore, MlaConfig, Renorm, RoutingConfig, Scoring};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "deepseek_v2";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = family::EXPERT_COUNT_KEYS;

/// DeepSeek-V2's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    dense_block: "mlp",
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

/// DeepSeek-V2's config rules.
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

    /// V2's complex-number RoPE is always interleaved.
    fn mla(&self, f: &Fields<'_>) -> Result<Option<MlaConfig>> {
        family::mla_config(f, true).map(Some)
    }

    fn defaults(&self) -> Defaults {
        Defaults { rms_norm_eps: 1e-6, rope_theta: 10_000.0, max_position_embeddings: 2048 }
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

    /// transformers 5.x's DeepSeek-V2 router never renormalises, whatever the config says
    /// (vLLM honours the flag; the released models have it false).
    fn norm_topk_prob(&self, _f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(false)
    }

    /// transformers' default `n_shared_experts`: 2.
    fn shared_expert_intermediate_size(
        &self,
        f: &Fields<'_>,
        expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        family::shared_experts(f, 2, expert_intermediate_size)
    }

    fn routing(&self, f: &Fields<'_>, num_experts: usize, top_k: usize) -> Result<RoutingConfig> {
        let method = f.opt_str("topk_method")?.unwrap_or_else(|| "greedy".into());
        let group_limit = match method.as_str() {
            "greedy" => None,
            "group_limited_greedy" => Some(family::group_limit(f, GroupScore::Max, num_experts, top_k)?),
            other => {
                return Err(f.invalid(
                    "topk_method",
                    format!("`{other}` is not supported for deepseek_v2 (`greedy` or `group_limited_greedy`)"),
                ));
            }
        };
        family::check_scoring_func(f, MODEL_TYPE, "softmax")?;
        Ok(RoutingConfig {
            scoring: Scoring::Softmax,
            group_limit,
            routed_scaling_factor: family::routed_scaling_factor(f, 1.0)?,
            correction_bias: false,
            renorm: Renorm::Sum,
            weight_on_input: false,
        })
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, _num_experts: usize) -> Result<Vec<bool>> {
        if f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(f.invalid("mlp_bias", "MLP biases are not supported".into()));
        }
        family::mla_moe_layers(f, num_layers)
    }
}
