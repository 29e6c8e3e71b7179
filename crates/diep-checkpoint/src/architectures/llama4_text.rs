//! `llama4_text` (the text model of Llama 4 Scout / Maverick).
//!
//! - MoE layers: `moe_layers`, else every `interleave_moe_layer_step`-th layer (`step − 1, 2·step −
//!   1, ...`); the others are dense `feed_forward.{gate,up,down}_proj` of `intermediate_size_mlp`.
//! - MoE block `feed_forward`: router `router.weight [E, H]`, fused experts
//!   `experts.gate_up_proj [E, H, 2I]` (gate columns first, then up) and `experts.down_proj [E,
//!   I, H]` of `intermediate_size`, and an always-on `shared_expert.{gate,up,down}_proj`.
//! - Routing: top-k of the router logits; the chosen experts' `sigmoid(logit)` multiplies the
//!   expert's *input* (not its output); no renormalisation.
//! - Attention: GQA, `head_dim` (default 128); on the layers with `no_rope_layers[i] == 1`
//!   (default: all but every `no_rope_layer_interval`-th) RoPE on interleaved pairs (optionally
//!   `llama3`-scaled), then a weightless RMS norm of q and k (`use_qk_norm`), and chunked
//!   attention (`layer_types: chunked_attention`, blocks of `attention_chunk_size`); on the
//!   others (NoPE), full causal attention with queries scaled by the temperature
//!   `1 + attn_scale · ln(1 + floor((p + 1) / floor_scale))` (`attn_temperature_tuning`).

use super::spec::{ArchSpec, AttentionParts, Defaults, RopeAllowed};
use super::{FusedExpertKeys, MoeKeys};
use crate::config::{Llama4Attention, Renorm, RoutingConfig, Scoring};
use crate::error::Result;
use crate::fields::Fields;

/// The `model_type`.
pub const MODEL_TYPE: &str = "llama4_text";

/// The routed-expert count key.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_local_experts"];

/// Llama 4's fused expert tensors.
pub const FUSED: FusedExpertKeys = FusedExpertKeys {
    gate_up: "gate_up_proj",
    gate_up_bias: None,
    down: "down_proj",
    down_bias: None,
    interleaved: false,
};

/// Llama 4's MoE tensor names.
pub const MOE_KEYS: MoeKeys = MoeKeys {
    block: "feed_forward",
    dense_block: "feed_forward",
    router: "router",
    expert_gate: "gate_proj",
    expert_up: "up_proj",
    expert_down: "down_proj",
    shared_expert: None,
    shared_experts: Some("shared_expert"),
    router_correction_bias: None,
    router_bias: None,
    fused_experts: Some(FUSED),
};

/// Llama 4's config rules.
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

    fn rope_allowed(&self) -> RopeAllowed {
        RopeAllowed::Llama3
    }

    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts> {
        let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        Ok(AttentionParts { qkv_bias: bias, o_bias: bias, rope_interleave: true, ..AttentionParts::PLAIN })
    }

    fn dense_intermediate_size_key(&self) -> &'static str {
        "intermediate_size_mlp"
    }

    /// One shared expert of the expert width.
    fn shared_expert_intermediate_size(
        &self,
        _f: &Fields<'_>,
        expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        Ok(Some(expert_intermediate_size))
    }

    /// Top-k of the logits, `sigmoid` of the chosen, on the expert input.
    fn routing(&self, _f: &Fields<'_>, _num_experts: usize, _top_k: usize) -> Result<RoutingConfig> {
        Ok(RoutingConfig {
            scoring: Scoring::Sigmoid,
            group_limit: None,
            routed_scaling_factor: 1.0,
            correction_bias: false,
            renorm: Renorm::Sum,
            weight_on_input: true,
        })
    }

    fn norm_topk_prob(&self, _f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(false)
    }

    fn moe_layers(&self, f: &Fields<'_>, num_layers: usize, _num_experts: usize) -> Result<Vec<bool>> {
        let list = match f.opt_usize_list("moe_layers")? {
            Some(l) => l,
            None => {
                let step = f.opt_usize("interleave_moe_layer_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(f.invalid("interleave_moe_layer_step", "must be positive".into()));
                }
                (step - 1..num_layers).step_by(step).collect()
            }
        };
        if let Some(bad) = list.iter().find(|&&l| l >= num_layers) {
            return Err(f.invalid("moe_layers", format!("layer {bad} is beyond num_hidden_layers = {num_layers}")));
        }
        Ok((0..num_layers).map(|i| list.contains(&i)).collect())
    }

    fn llama4_attention(&self, f: &Fields<'_>, num_layers: usize, eps: f64) -> Result<Option<Llama4Attention>> {
        let rope_layers: Vec<bool> = match f.opt_usize_list("no_rope_layers")? {
            Some(l) if !l.is_empty() => {
                if l.len() != num_layers {
                    return Err(f.invalid("no_rope_layers", format!("has {} entries for {num_layers} layers", l.len())));
                }
                l.iter().map(|&v| v != 0).collect()
            }
            _ => {
                let interval = f.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
                if interval == 0 {
                    return Err(f.invalid("no_rope_layer_interval", "must be positive".into()));
                }
                (0..num_layers).map(|i| (i + 1) % interval != 0).collect()
            }
        };
        // transformers' default is 8192; only an explicit null turns chunking off.
        let chunk_size = match f.map.get("attention_chunk_size") {
            None => Some(8192),
            Some(serde_json::Value::Null) => None,
            Some(_) => f.opt_usize("attention_chunk_size")?,
        };
        if chunk_size == Some(0) {
            return Err(f.invalid("attention_chunk_size", "must be positive".into()));
        }
        let chunked_layers = match f.opt_layer_types(num_layers, "chunked_attention")? {
            Some(chunked) => chunked,
            None => rope_layers.iter().map(|&r| r && chunk_size.is_some()).collect(),
        };
        if chunked_layers.iter().any(|&c| c) && chunk_size.is_none() {
            return Err(f.missing("attention_chunk_size"));
        }
        // Released configs (transformers 4.51) write `attn_temperature_tuning: 4`: any non-zero
        // number turns it on, as Python's truthiness does.
        let tuning = match f.get("attn_temperature_tuning") {
            None => true,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(v) if v.is_number() => v.as_f64() != Some(0.0),
            Some(v) => {
                return Err(
                    f.invalid("attn_temperature_tuning", format!("expected true, false or a number, found {v}"))
                );
            }
        };
        let temperature_tuning = if tuning {
            let floor_scale = f.opt_f64("floor_scale")?.unwrap_or(8192.0);
            if floor_scale.is_nan() || floor_scale <= 0.0 {
                return Err(f.invalid("floor_scale", format!("{floor_scale} must be positive")));
            }
            Some((floor_scale, f.opt_f64("attn_scale")?.unwrap_or(0.1)))
        } else {
            None
        };
        Ok(Some(Llama4Attention {
            rope_layers,
            chunked_layers,
            chunk_size: chunk_size.unwrap_or(usize::MAX),
            l2_qk_norm: f.opt_bool("use_qk_norm")?.unwrap_or(true).then_some(eps),
            temperature_tuning,
        }))
    }
}
