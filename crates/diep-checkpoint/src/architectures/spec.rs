//! [`ArchSpec`]: what one architecture contributes to parsing its `config.json`.
//!
//! [`ModelConfig::from_map`](crate::ModelConfig::from_map) reads the fields every architecture
//! shares and asks the architecture's [`ArchSpec`] for the rest, one hook per concern, in a
//! fixed order (so that the first error reported for a bad config does not depend on how the
//! hooks are split). Hooks with a default cover the common case; an architecture overrides
//! only what differs.

use super::MoeKeys;
use crate::config::{
    ExpertActivation, LinearAttention, Llama4Attention, MlaConfig, QkNorm, RopeScaling, RoutingConfig,
};
use crate::error::Result;
use crate::fields::Fields;

/// transformers' per-architecture defaults, used only when a key is absent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Defaults {
    /// `rms_norm_eps`.
    pub(crate) rms_norm_eps: f64,
    /// `rope_theta`.
    pub(crate) rope_theta: f64,
    /// `max_position_embeddings`.
    pub(crate) max_position_embeddings: usize,
}

/// Which RoPE scalings an architecture implements besides plain RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeAllowed {
    /// Plain RoPE only.
    Default,
    /// Plain or yarn (DeepSeek-V2/V3, gpt-oss).
    Yarn,
    /// Plain or linear (DeepSeek-MoE).
    Linear,
    /// Plain or llama3 (Llama 4).
    Llama3,
}

/// The architecture-specific attention options.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AttentionParts {
    /// `q_proj`, `k_proj`, `v_proj` carry biases.
    pub(crate) qkv_bias: bool,
    /// `o_proj` carries a bias.
    pub(crate) o_bias: bool,
    /// Query/key normalisation.
    pub(crate) qk_norm: QkNorm,
    /// OLMoE's `clip_qkv`.
    pub(crate) clip_qkv: Option<f64>,
    /// Sliding-window width (checked to be positive by the caller).
    pub(crate) sliding_window: Option<usize>,
    /// Per-head attention sinks (gpt-oss).
    pub(crate) sinks: bool,
    /// Standard attention's RoPE pairs `(x[2i], x[2i+1])` (ERNIE-4.5).
    pub(crate) rope_interleave: bool,
}

impl AttentionParts {
    /// No biases, no qk-norm, no clipping, no sliding window, no sinks.
    pub(crate) const PLAIN: AttentionParts = AttentionParts {
        qkv_bias: false,
        o_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        sliding_window: None,
        sinks: false,
        rope_interleave: false,
    };
}

/// The architecture-specific expert options.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExpertParts {
    /// The expert activation.
    pub(crate) activation: ExpertActivation,
    /// The router carries an additive bias.
    pub(crate) router_bias: bool,
    /// Expert projections carry biases.
    pub(crate) expert_bias: bool,
    /// Dense MLPs, shared experts and the LM head carry biases (ERNIE-4.5's `use_bias`).
    pub(crate) mlp_bias: bool,
}

/// Everything about one architecture that `config.json` parsing, tensor naming and checkpoint
/// surgery need. Each `architectures/<model_type>.rs` implements it on a unit `Spec`; the
/// `registry!` list in `architectures/mod.rs` ties it to its [`Architecture`](super::Architecture) variant.
///
/// [`ModelConfig::from_map`](crate::ModelConfig::from_map) calls the hooks in this order:
/// [`has_mla`](Self::has_mla) (a check on the head counts), [`mla`](Self::mla),
/// [`defaults`](Self::defaults), [`rope_allowed`](Self::rope_allowed) /
/// [`default_rope_scaling`](Self::default_rope_scaling), [`attention`](Self::attention),
/// [`sliding_layers`](Self::sliding_layers), [`num_experts`](Self::num_experts),
/// [`expert_intermediate_size_key`](Self::expert_intermediate_size_key),
/// [`norm_topk_prob`](Self::norm_topk_prob),
/// [`shared_expert_intermediate_size`](Self::shared_expert_intermediate_size),
/// [`routing`](Self::routing), [`moe_layers`](Self::moe_layers), [`experts`](Self::experts),
/// [`mtp_layers`](Self::mtp_layers).
pub(crate) trait ArchSpec: Sync {
    /// The `model_type` string (the module's `MODEL_TYPE`).
    fn model_type(&self) -> &'static str;

    /// On-disk names of the MoE block (the module's `MOE_KEYS`).
    fn moe_keys(&self) -> MoeKeys;

    /// The key(s) holding the routed-expert count, the first being the canonical one (named
    /// when all are absent). Checkpoint surgery rewrites all of them.
    fn expert_count_keys(&self) -> &'static [&'static str];

    /// The DeepSeek family: ungated shared experts, `n_routed_experts`, leading dense layers.
    fn is_deepseek(&self) -> bool {
        false
    }

    /// Multi-head latent attention: `num_key_value_heads` must equal `num_attention_heads`, and
    /// [`mla`](Self::mla) must return `Some`.
    fn has_mla(&self) -> bool {
        false
    }

    /// MLA dimensions, for architectures with [`has_mla`](Self::has_mla).
    fn mla(&self, _f: &Fields<'_>) -> Result<Option<MlaConfig>> {
        Ok(None)
    }

    /// Defaults of `rms_norm_eps`, `rope_theta` and `max_position_embeddings`.
    fn defaults(&self) -> Defaults;

    /// `tie_word_embeddings` when absent (transformers' `PreTrainedConfig` default: false).
    fn tie_word_embeddings_default(&self) -> bool {
        false
    }

    /// The key of the experts-per-token count (`num_experts_per_tok`; ERNIE-4.5: `moe_k`).
    fn top_k_key(&self) -> &'static str {
        "num_experts_per_tok"
    }

    /// RoPE scalings implemented besides plain RoPE.
    fn rope_allowed(&self) -> RopeAllowed {
        RopeAllowed::Default
    }

    /// The RoPE scaling when the config has neither `rope_parameters` nor `rope_scaling`.
    fn default_rope_scaling(&self) -> RopeScaling {
        RopeScaling::None
    }

    /// Attention biases, qk-norm, `clip_qkv`, sliding window and sinks.
    fn attention(&self, f: &Fields<'_>) -> Result<AttentionParts>;

    /// Partial RoPE: the factor used when the config states neither `partial_rotary_factor`
    /// nor the architecture's own key; `None` (the default): the architecture has no partial
    /// RoPE, and a factor other than 1 is refused.
    fn default_partial_rotary_factor(&self) -> Option<f64> {
        None
    }

    /// The rotated width from an architecture-specific key (MiniMax-M2's `rotary_dim`), when
    /// `partial_rotary_factor` is absent.
    fn rotary_dim(&self, _f: &Fields<'_>) -> Result<Option<usize>> {
        Ok(None)
    }

    /// Which layers use the sliding window; `None`: all of them when a window is set.
    fn sliding_layers(&self, _f: &Fields<'_>, _num_layers: usize, _window: Option<usize>) -> Result<Option<Vec<bool>>> {
        Ok(None)
    }

    /// Routed experts per MoE layer: the first present of
    /// [`expert_count_keys`](Self::expert_count_keys), required.
    fn num_experts(&self, f: &Fields<'_>) -> Result<usize> {
        let keys = self.expert_count_keys();
        for key in keys {
            if let Some(n) = f.opt_usize(key)? {
                return Ok(n);
            }
        }
        Err(f.missing(keys[0]))
    }

    /// The key of a routed expert's hidden width (`moe_intermediate_size`), required; `None`:
    /// experts are `intermediate_size` wide.
    fn expert_intermediate_size_key(&self) -> Option<&'static str> {
        None
    }

    /// Whether the top-k routing weights are renormalised (default: `norm_topk_prob`, false).
    fn norm_topk_prob(&self, f: &Fields<'_>, _top_k: usize) -> Result<bool> {
        Ok(f.opt_bool("norm_topk_prob")?.unwrap_or(false))
    }

    /// Hidden width of the shared expert(s), if any.
    fn shared_expert_intermediate_size(
        &self,
        _f: &Fields<'_>,
        _expert_intermediate_size: usize,
    ) -> Result<Option<usize>> {
        Ok(None)
    }

    /// The routing rule (default: softmax, plain top-k).
    fn routing(&self, _f: &Fields<'_>, _num_experts: usize, _top_k: usize) -> Result<RoutingConfig> {
        Ok(RoutingConfig::softmax())
    }

    /// Per layer, whether it is an MoE layer (default: all of them).
    fn moe_layers(&self, _f: &Fields<'_>, num_layers: usize, _num_experts: usize) -> Result<Vec<bool>> {
        Ok(vec![true; num_layers])
    }

    /// Llama 4's per-layer attention options (default: none).
    fn llama4_attention(&self, _f: &Fields<'_>, _num_layers: usize, _eps: f64) -> Result<Option<Llama4Attention>> {
        Ok(None)
    }

    /// The attention output is gated by the second half of each head's `q_proj` (Qwen3-Next).
    fn gated_attention_output(&self) -> bool {
        false
    }

    /// Gated DeltaNet layers (Qwen3-Next; default: none).
    fn linear_attention(&self, _f: &Fields<'_>, _num_layers: usize) -> Result<Option<LinearAttention>> {
        Ok(None)
    }

    /// RMSNorms scale by `1 + weight` (Qwen3-Next).
    fn zero_centered_norms(&self) -> bool {
        false
    }

    /// The config key of the dense layers' MLP width (`intermediate_size`; Llama 4:
    /// `intermediate_size_mlp`).
    fn dense_intermediate_size_key(&self) -> &'static str {
        "intermediate_size"
    }

    /// Multi-token-prediction layers stored after the trunk (default: none).
    fn mtp_layers(&self, _f: &Fields<'_>) -> Result<usize> {
        Ok(0)
    }

    /// The expert activation and router/expert biases (default: SiLU, no biases).
    fn experts(&self, _f: &Fields<'_>) -> Result<ExpertParts> {
        Ok(ExpertParts { activation: ExpertActivation::Silu, router_bias: false, expert_bias: false, mlp_bias: false })
    }
}
