//! `qwen2_moe` (Qwen1.5-MoE, Qwen2-MoE).
//!
//! - Router `mlp.gate.weight [E, H]`; experts `mlp.experts.{e}.{gate,up,down}_proj.weight`.
//! - Shared expert `mlp.shared_expert.{gate,up,down}_proj.weight`, gated by
//!   `sigmoid(x · mlp.shared_expert_gate.weight [1, H])`.
//! - q/k/v projections carry biases (`qkv_bias`, default true); o_proj has none.
//! - Layer `i` is MoE iff `i ∉ mlp_only_layers` and `(i+1) % decoder_sparse_step == 0`;
//!   other layers are dense `mlp.{gate,up,down}_proj` of `intermediate_size`.
//! - `norm_topk_prob` (false in the released models) decides renormalisation.

use super::MoeKeys;
use super::spec::{ArchSpec, AttentionParts, Defaults};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "qwen2_moe";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_experts"];

/// Qwen2-MoE's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "mlp",
    dense_block: "mlp",
    router: "gate",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: Some(("shared_expert", "shared_expert_gate")),
    shared_experts: None,
    router_correction_bias: None,
    router_bias: None,
    fused_experts: None,
};

/// Qwen2-MoE's config rules.
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
        Defaults { rms_norm_eps: 1e-6, rope_theta: 10_000.0, max_position_embeddings: 4096 }
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        // 4.x hard-codes q/k/v biases; 5.x exposes them as `qkv_bias` (default true).
        let qkv_bias = f.opt_bool("qkv_bias")?.unwrap_or(true);
        refuse_sliding_window(f)?;
        Ok(AttentionParts { qkv_bias, ..AttentionParts::PLAIN })
    }

    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        Some("moe_intermediate_size")
    }

    fn shared_expert_intermediate_size(
        &self,
        f: &Fields<'_>,
        _expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        Ok(f.opt_usize("shared_expert_intermediate_size")?.filter(|n| *n != 0))
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, num_experts: usize) -> Result<Vec<bool>> {
        moe_layers(f, num_layers, num_experts)
    }
}

/// Qwen MoE models (2 and 3): `use_sliding_window: true` is refused.
pub(crate) fn refuse_sliding_window(f: &Fields<'_>) -> Result<()> {
    if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
        return Err(
            f.invalid("use_sliding_window", "sliding-window attention is not supported for Qwen MoE models".into())
        );
    }
    Ok(())
}

/// Qwen MoE models (2 and 3): layer `i` is MoE iff `i ∉ mlp_only_layers` and
/// `(i+1) % decoder_sparse_step == 0` (and there are experts at all).
pub(crate) fn moe_layers(f: &Fields<'_>, num_layers: usize, num_experts: usize) -> Result<Vec<bool>> {
    let mut moe = Vec::with_capacity(num_layers);
    for i in 0..num_layers {
        let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1);
        if step == 0 {
            return Err(f.invalid("decoder_sparse_step", "must be positive".into()));
        }
        let mlp_only = f.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
        moe.push(!mlp_only.contains(&i) && num_experts > 0 && (i + 1) % step == 0);
    }
    Ok(moe)
}
