//! `ernie4_5_moe` (ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B, the `-PT` transformers releases).
//!
//! - Layer `i` is MoE iff `(i + 1) % moe_layer_interval == 0` and `moe_layer_start_index ≤ i ≤
//!   moe_layer_end_index` (defaults 1, 1, −1 = the last layer); other layers are dense
//!   `mlp.{gate,up,down}_proj` of `intermediate_size`.
//! - Router `mlp.gate.weight [E, H]`; the selection bias `mlp.moe_statics.e_score_correction_bias
//!   [1, E]` (f32); experts `mlp.experts.{e}.{gate,up,down}_proj.weight` of
//!   `moe_intermediate_size`; shared experts `mlp.shared_experts.*` of `moe_num_shared_experts ·
//!   moe_intermediate_size` (default 2), added without a gate.
//! - Routing: `p = softmax(x·Wᵀ)` in f32; top-`moe_k` of `p + bias`; weights `p[idx]` divided by
//!   `max(Σ, moe_norm_min)` (default 1e-12).
//! - Attention: GQA; RoPE on interleaved pairs `(x[2i], x[2i+1])`. Embeddings are tied unless
//!   `tie_word_embeddings: false`.
//! - `use_bias` (false in the releases) puts biases on `q/k/v/o_proj`, on every projection of
//!   the dense MLPs and the shared experts, and on `lm_head` (`lm_head.bias`, even when the
//!   weight is tied); not on the routed experts nor the router.

use super::MoeKeys;
use super::spec::{ArchSpec, AttentionParts, Defaults, ExpertParts};
use crate::config::{ExpertActivation, Renorm, RoutingConfig, Scoring};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "ernie4_5_moe";

/// The routed-expert count key (transformers' `num_experts` is an alias of it).
pub const EXPERT_COUNT_KEYS: &[&str] = &["moe_num_experts"];

/// ERNIE-4.5's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    dense_block: "mlp",
    router: "gate",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: None,
    shared_experts: Some("shared_experts"),
    router_correction_bias: Some("moe_statics.e_score_correction_bias"),
    router_bias: None,
    fused_experts: None,
};

/// ERNIE-4.5's config rules.
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
        Defaults { rms_norm_eps: 1e-5, rope_theta: 500_000.0, max_position_embeddings: 131_072 }
    }

    fn tie_word_embeddings_default(&self) -> bool {
        true
    }

    fn top_k_key(&self) -> &'static str {
        "moe_k"
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let bias = f.opt_bool("use_bias")?.unwrap_or(false);
        Ok(AttentionParts { qkv_bias: bias, o_bias: bias, rope_interleave: true, ..AttentionParts::PLAIN })
    }

    fn experts(&self, f: &Fields<'_>) -> Result<ExpertParts> {
        let bias = f.opt_bool("use_bias")?.unwrap_or(false);
        Ok(ExpertParts { activation: ExpertActivation::Silu, router_bias: false, expert_bias: false, mlp_bias: bias })
    }

    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        Some("moe_intermediate_size")
    }

    /// transformers always renormalises (with the `moe_norm_min` floor).
    fn norm_topk_prob(&self, _f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(true)
    }

    fn shared_expert_intermediate_size(
        &self,
        f: &Fields<'_>,
        expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        Ok(match f.opt_usize("moe_num_shared_experts")?.unwrap_or(2) {
            0 => None,
            n => Some(n * expert_intermediate_size),
        })
    }

    fn routing(&self, f: &Fields<'_>, _num_experts: usize, _top_k: usize) -> Result<RoutingConfig> {
        let floor = f.opt_f64("moe_norm_min")?.unwrap_or(1e-12);
        if !(floor.is_finite() && floor >= 0.0) {
            return Err(f.invalid("moe_norm_min", format!("{floor} is not a finite non-negative number")));
        }
        Ok(RoutingConfig {
            scoring: Scoring::Softmax,
            group_limit: None,
            routed_scaling_factor: 1.0,
            correction_bias: true,
            renorm: Renorm::AtLeast(floor),
            weight_on_input: false,
        })
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, _num_experts: usize) -> Result<Vec<bool>> {
        let int = |key: &str, default: i64| -> Result<i64> {
            match f.get(key).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(v) => v.as_i64().ok_or_else(|| f.invalid(key, format!("expected an integer, found {v}"))),
            }
        };
        let start = int("moe_layer_start_index", 1)?;
        let end = match int("moe_layer_end_index", -1)? {
            -1 => num_layers as i64 - 1,
            e => e,
        };
        let interval = int("moe_layer_interval", 1)?;
        if interval < 1 {
            return Err(f.invalid("moe_layer_interval", format!("{interval} must be positive")));
        }
        if start < 0 {
            return Err(f.invalid("moe_layer_start_index", format!("{start} must not be negative")));
        }
        Ok((0..num_layers as i64).map(|i| (i + 1) % interval == 0 && start <= i && i <= end).collect())
    }
}
