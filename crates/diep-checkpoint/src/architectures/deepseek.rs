//! `deepseek` (DeepSeek-MoE 16B: `deepseek-ai/deepseek-moe-16b-base` / `-chat`).
//!
//! transformers has no class for this model type; checkpoints ship remote code
//! (`configuration_deepseek.py` / `modeling_deepseek.py`, `auto_map` in `config.json`). The
//! semantics below follow that remote code (read from a vendored copy,
//! `BZX667/CMoE: modeling_deepseek.py`: `MoEGate`, `DeepseekMoE`, `DeepseekAttention`,
//! `DeepseekDecoderLayer`).
//!
//! - Layer `i` is MoE iff `n_routed_experts` is set, `i ≥ first_k_dense_replace` and
//!   `i % moe_layer_freq == 0`; other layers are dense `mlp.{gate,up,down}_proj` of
//!   `intermediate_size`.
//! - Router `mlp.gate.weight [E, H]` (no bias): `softmax(x·Wᵀ)` (`scoring_func: softmax`, the
//!   only one), plain top-k (`torch.topk`), renormalised (`/ (sum + 1e-20)`) only when
//!   `top_k > 1 and norm_topk_prob` (false in the released 16B). No `routed_scaling_factor`.
//! - Experts `mlp.experts.{e}.{gate,up,down}_proj.weight` (SiLU-gated, width
//!   `moe_intermediate_size`); shared experts `mlp.shared_experts.{gate,up,down}_proj.weight`
//!   (one MLP of width `n_shared_experts · moe_intermediate_size`), added without a gate.
//! - Attention: Llama's multi-head attention (`self_attn.{q,k,v,o}_proj`, GQA through
//!   `num_key_value_heads`, biases only with `attention_bias`), rotate-half RoPE (not
//!   interleaved), `rope_scaling` `linear` (positions / factor); `dynamic` is refused.
//! - Defaults: `rms_norm_eps` 1e-6, `rope_theta` 10000, `max_position_embeddings` 2048.
//!
//! The tensor names are those of DeepSeek-V2 ([`super::deepseek_v2::MOE_KEYS`]).

use super::MoeKeys;
use super::deepseek_family as family;
use super::spec::{ArchSpec, AttentionParts, Defaults, RopeAllowed};
use crate::config::RoutingConfig;
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "deepseek";

/// The routed-expert count key. DeepSeek-MoE's remote code builds no MoE layer at all when
/// `n_routed_experts` is null (a dense model, nothing to prune): it is required.
pub const EXPERT_COUNT_KEYS: &[&str] = family::EXPERT_COUNT_KEYS;

/// DeepSeek-MoE's MoE tensor names: the same as DeepSeek-V2's.
pub const MOE_KEYS: MoeKeys = super::deepseek_v2::MOE_KEYS;

/// DeepSeek-MoE's config rules.
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

    fn defaults(&self) -> Defaults {
        Defaults { rms_norm_eps: 1e-6, rope_theta: 10_000.0, max_position_embeddings: 2048 }
    }

    /// The remote code knows `linear` and `dynamic` (NTK); only `linear` is implemented here.
    fn rope_allowed(&self) -> RopeAllowed {
        RopeAllowed::Linear
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        Ok(AttentionParts { qkv_bias: bias, o_bias: bias, ..AttentionParts::PLAIN })
    }

    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        Some(family::EXPERT_INTERMEDIATE_SIZE_KEY)
    }

    /// `MoEGate` renormalises only `if top_k > 1 and norm_topk_prob` (dividing by the sum +
    /// 1e-20, which is the sum itself in f32).
    fn norm_topk_prob(&self, f: &Fields<'_>, top_k: usize) -> Result<bool> {
        Ok(f.opt_bool("norm_topk_prob")?.unwrap_or(false) && top_k > 1)
    }

    /// `DeepseekConfig`'s default `n_shared_experts` is null.
    fn shared_expert_intermediate_size(
        &self,
        f: &Fields<'_>,
        expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        family::shared_experts(f, 0, expert_intermediate_size)
    }

    /// `MoEGate` implements only softmax scoring and plain (greedy) top-k; it has no
    /// `routed_scaling_factor`.
    fn routing(&self, f: &Fields<'_>, _num_experts: usize, _top_k: usize) -> Result<RoutingConfig> {
        family::check_scoring_func(f, MODEL_TYPE, "softmax")?;
        Ok(RoutingConfig::softmax())
    }

    /// Layer `i` is MoE iff `i >= first_k_dense_replace and i % moe_layer_freq == 0`.
    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, _num_experts: usize) -> Result<Vec<bool>> {
        let first_k_dense = family::first_k_dense(f)?;
        let freq = match f.opt_usize("moe_layer_freq")?.unwrap_or(1) {
            0 => return Err(f.invalid("moe_layer_freq", "must be positive".into())),
            n => n,
        };
        Ok((0..num_layers).map(|i| i >= first_k_dense && i % freq == 0).collect())
    }
}
