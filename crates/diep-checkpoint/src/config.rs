//! `config.json` as written by transformers 4.x and 5.x, normalised.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::architectures::{ArchSpec, Architecture, RopeAllowed, SUPPORTED_MODEL_TYPES};
use crate::error::{CheckpointError, Result};
use crate::fields::Fields;
use crate::quant::{Fp8Scheme, Quantization};

/// How queries and keys are normalised before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// No normalisation.
    None,
    /// RMSNorm over each head's `head_dim` values (Qwen3-MoE: `q_norm.weight [head_dim]`).
    PerHead,
    /// RMSNorm over the whole projection before the head split (OLMoE:
    /// `q_norm.weight [heads·head_dim]`).
    Full,
}

/// Attention settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the rotated part of each query/key head: its first `rotary_dim` elements get
    /// RoPE, the rest pass unchanged (`partial_rotary_factor`: GLM-4.5, MiniMax-M2's
    /// `rotary_dim`); `head_dim` otherwise. MLA: `qk_rope_head_dim` (= `head_dim`).
    pub rotary_dim: usize,
    /// Standard attention rotates pairs `(x[2i], x[2i+1])` instead of `(x[j], x[j + d/2])`
    /// (ERNIE-4.5). MLA records its own pairing in [`MlaConfig::rope_interleave`].
    pub rope_interleave: bool,
    /// `q_proj`, `k_proj`, `v_proj` carry biases.
    pub qkv_bias: bool,
    /// `o_proj` carries a bias.
    pub o_bias: bool,
    /// Query/key normalisation.
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to ±this after projection (and qk-norm), OLMoE's `clip_qkv`.
    pub clip_qkv: Option<f64>,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Sliding-window attention: a query attends to keys at most `window - 1` positions back.
    pub sliding_window: Option<usize>,
    /// Which layers use the sliding window (gpt-oss's `layer_types`: `sliding_attention` /
    /// `full_attention`); `None`: every layer, when `sliding_window` is set.
    pub sliding_layers: Option<Vec<bool>>,
    /// A per-head learned sink logit (`self_attn.sinks [heads]`) joins each softmax and is
    /// dropped after it (gpt-oss).
    pub sinks: bool,
    /// RoPE frequency scaling (`rope_parameters` / `rope_scaling`).
    pub rope_scaling: RopeScaling,
    /// Multi-head latent attention (DeepSeek-V2/V3); `head_dim` is then the rotary width
    /// `qk_rope_head_dim`.
    pub mla: Option<MlaConfig>,
    /// Llama 4's per-layer attention: NoPE layers, chunked attention, L2 qk-norm, temperature
    /// tuning. `None` for every other architecture.
    pub llama4: Option<Llama4Attention>,
    /// The attention output is gated per element by `sigmoid(gate)`, the gate being the second
    /// half of each head's `q_proj` output (`q_proj` is `2·heads·head_dim` wide; Qwen3-Next).
    pub gated_output: bool,
    /// Qwen3-Next's Gated DeltaNet layers (`linear_attention` in `layer_types`), if any.
    pub linear: Option<LinearAttention>,
}

/// Qwen3-Next's Gated DeltaNet ("linear attention") dimensions and the layers that use it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearAttention {
    /// Per layer: a Gated DeltaNet layer (`linear_attention`) rather than full attention.
    pub layers: Vec<bool>,
    /// `linear_num_key_heads`.
    pub key_heads: usize,
    /// `linear_num_value_heads` (a multiple of the key heads; value head `h` reads key head
    /// `h / (value_heads / key_heads)`).
    pub value_heads: usize,
    /// `linear_key_head_dim`.
    pub key_dim: usize,
    /// `linear_value_head_dim`.
    pub value_dim: usize,
    /// `linear_conv_kernel_dim`: the causal depthwise convolution's width.
    pub conv_kernel: usize,
}

/// Llama 4's per-layer attention options (`no_rope_layers`, `layer_types`,
/// `attention_chunk_size`, `use_qk_norm`, `attn_temperature_tuning`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama4Attention {
    /// Per layer: whether it applies RoPE (`no_rope_layers[i] == 1`); the others are NoPE.
    pub rope_layers: Vec<bool>,
    /// Per layer: whether it attends in chunks of `chunk_size` (`layer_types: chunked_attention`):
    /// query `i` sees key `j` iff `j ≤ i` and `j / chunk_size == i / chunk_size`.
    pub chunked_layers: Vec<bool>,
    /// `attention_chunk_size`.
    pub chunk_size: usize,
    /// Weightless RMS norm `x / sqrt(mean(x²) + eps)` of every q and k head after RoPE, on RoPE
    /// layers (`use_qk_norm`), with `eps = rms_norm_eps`.
    pub l2_qk_norm: Option<f64>,
    /// On NoPE layers, queries at position `p` are multiplied by
    /// `1 + attn_scale · ln(1 + floor((p + 1) / floor_scale))` (`attn_temperature_tuning`):
    /// `(floor_scale, attn_scale)`.
    pub temperature_tuning: Option<(f64, f64)>,
}

impl AttentionConfig {
    /// The factor the attention scores `q·k` are multiplied by before the softmax:
    /// `1/sqrt(d_qk)`, times `mscale(factor, mscale_all_dim)²` for yarn-scaled MLA models
    /// (transformers' `yarn_apply_mscale`).
    pub fn softmax_scale(&self) -> f64 {
        let d = match &self.mla {
            Some(m) => m.qk_nope_head_dim + m.qk_rope_head_dim,
            None => self.head_dim,
        };
        let base = 1.0 / (d as f64).sqrt();
        match (&self.mla, &self.rope_scaling) {
            (Some(_), RopeScaling::Yarn(y)) if y.mscale_all_dim.is_some_and(|m| m != 0.0) => {
                let m = yarn_get_mscale(y.factor, y.mscale_all_dim.unwrap_or(0.0));
                base * m * m
            }
            _ => base,
        }
    }
}

/// transformers' `yarn_get_mscale`: `0.1·m·ln(f) + 1` for `f > 1`, else 1.
pub fn yarn_get_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 { 1.0 } else { 0.1 * mscale * factor.ln() + 1.0 }
}

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type: default`).
    None,
    /// YaRN (`rope_type: yarn`), as transformers' `_compute_yarn_parameters`.
    Yarn(YarnConfig),
    /// Llama 3's frequency scaling (`rope_type: llama3`; Llama 4): low frequencies divided by
    /// `factor`, high ones kept, a smooth blend between (transformers'
    /// `_compute_llama3_parameters`).
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
    /// Linear position interpolation (`rope_scaling: {"type": "linear", "factor": f}`):
    /// positions are divided by `factor` (DeepSeek-MoE's `DeepseekLinearScalingRotaryEmbedding`).
    Linear {
        /// `factor`.
        factor: f64,
    },
}

/// YaRN parameters, resolved with transformers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnConfig {
    /// `factor`.
    pub factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
    /// `beta_fast` (default 32).
    pub beta_fast: f64,
    /// `beta_slow` (default 1).
    pub beta_slow: f64,
    /// `mscale`, if set.
    pub mscale: Option<f64>,
    /// `mscale_all_dim`, if set.
    pub mscale_all_dim: Option<f64>,
    /// `attention_factor` (the cos/sin multiplier), if set explicitly.
    pub attention_factor: Option<f64>,
    /// `truncate` (default true): round the correction range outwards.
    pub truncate: bool,
}

impl YarnConfig {
    /// The factor cos and sin are multiplied by: `attention_factor`, else
    /// `mscale(f, mscale)/mscale(f, mscale_all_dim)` when both are set, else `mscale(f, 1)`.
    pub fn attention_factor(&self) -> f64 {
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale.filter(|m| *m != 0.0), self.mscale_all_dim.filter(|m| *m != 0.0)) {
            (Some(m), Some(all)) => yarn_get_mscale(self.factor, m) / yarn_get_mscale(self.factor, all),
            _ => yarn_get_mscale(self.factor, 1.0),
        }
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3) dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// Rank of the query compression (`q_a_proj`); `None`: a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value compression (`kv_a_proj_with_mqa`).
    pub kv_lora_rank: usize,
    /// Per-head query/key width without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key width with RoPE (one rotary key shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` carry biases (`attention_bias`).
    pub bias: bool,
    /// Rotary dimensions come in interleaved pairs `(x0, x1), (x2, x3), ...` (DeepSeek's
    /// layout); otherwise the two halves are rotated (`rotate_half`).
    pub rope_interleave: bool,
}

/// The activation between an expert's gate/up and down projections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertActivation {
    /// `silu(gate) · up` (every architecture but gpt-oss).
    Silu,
    /// gpt-oss's clamped SwiGLU: `g = min(gate, limit)`, `u = clamp(up, ±limit)`,
    /// `(u + 1) · g · sigmoid(alpha · g)`.
    ClampedSwiglu {
        /// `swiglu_alpha` (1.702).
        alpha: f64,
        /// `swiglu_limit` (7).
        limit: f64,
    },
}

/// Mixture-of-experts settings shared by all MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per MoE layer in the original (unpruned) architecture.
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Hidden width of one routed expert.
    pub expert_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
    /// Hidden width of the shared expert (Qwen2-MoE; DeepSeek: `n_shared_experts ·
    /// moe_intermediate_size`), if any.
    pub shared_expert_intermediate_size: Option<usize>,
    /// How routing scores are computed and experts selected.
    pub routing: RoutingConfig,
    /// The router carries an additive bias `[experts]` that is part of the logits (gpt-oss).
    pub router_bias: bool,
    /// Expert projections carry biases (gpt-oss; ERNIE-4.5 with `use_bias`).
    pub expert_bias: bool,
    /// Dense MLPs and shared experts carry biases (ERNIE-4.5 with `use_bias`).
    pub mlp_bias: bool,
    /// `lm_head` carries a bias `[vocab]`, also when its weight is tied to the embeddings
    /// (ERNIE-4.5 with `use_bias`).
    pub lm_head_bias: bool,
    /// The expert activation.
    pub activation: ExpertActivation,
}

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// `softmax(logits)` in f32 (Mixtral, Qwen, OLMoE, DeepSeek-MoE, DeepSeek-V2).
    Softmax,
    /// `sigmoid(logits)` in f32 (DeepSeek-V3).
    Sigmoid,
}

/// How a group's score is computed in group-limited selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// The largest score in the group (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of the two largest bias-corrected scores (DeepSeek-V3).
    Top2Sum,
}

/// Group-limited expert selection: experts are split into `n_group` contiguous groups, and
/// a token may only pick experts of its `topk_group` best groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Groups (`n_group`).
    pub n_group: usize,
    /// Groups a token may pick from (`topk_group`).
    pub topk_group: usize,
    /// How a group is scored.
    pub score: GroupScore,
}

/// The routing rule of an architecture, beyond `top_k` and `norm_topk_prob`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// Score function.
    pub scoring: Scoring,
    /// Group-limited selection, if enabled.
    pub group_limit: Option<GroupLimit>,
    /// The routing weights are multiplied by this (`routed_scaling_factor`, default 1).
    pub routed_scaling_factor: f64,
    /// A per-expert `e_score_correction_bias` is added to the scores for selection only
    /// (DeepSeek-V3, GLM-4.5, MiniMax-M2, ERNIE-4.5's `moe_statics`).
    pub correction_bias: bool,
    /// How the top-k weights are renormalised when `norm_topk_prob` holds.
    pub renorm: Renorm,
    /// The routing weight multiplies the expert's input, `E(w·x)`, instead of its output
    /// (Llama 4).
    pub weight_on_input: bool,
}

/// The denominator of the top-k renormalisation `w_i / Σ w`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Renorm {
    /// `Σ w` (Mixtral, Qwen, OLMoE, DeepSeek-V2, MiniMax-M2).
    Sum,
    /// `Σ w + 1e-20` (DeepSeek-V3, GLM-4.5).
    SumPlusTiny,
    /// `max(Σ w, floor)` (ERNIE-4.5's `moe_norm_min`).
    AtLeast(f64),
}

impl Renorm {
    /// The denominator for a sum of top-k weights.
    pub fn denominator(self, sum: f32) -> f32 {
        match self {
            Renorm::Sum => sum,
            Renorm::SumPlusTiny => sum + 1e-20,
            Renorm::AtLeast(floor) => sum.max(floor as f32),
        }
    }
}

impl RoutingConfig {
    /// Softmax, plain top-k, no scaling: Mixtral, Qwen, OLMoE and DeepSeek-MoE.
    pub fn softmax() -> Self {
        RoutingConfig {
            scoring: Scoring::Softmax,
            group_limit: None,
            routed_scaling_factor: 1.0,
            correction_bias: false,
            renorm: Renorm::Sum,
            weight_on_input: false,
        }
    }
}

/// What kind of feed-forward block a decoder layer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A mixture-of-experts block with this many routed experts.
    Moe {
        /// Routed experts in this layer (differs per layer in non-uniformly pruned checkpoints).
        num_experts: usize,
    },
    /// A dense SwiGLU MLP.
    Dense,
}

/// A normalised model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The architecture.
    pub architecture: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Width of dense MLP layers (Qwen's `intermediate_size`); for architectures without dense
    /// layers this equals the expert width.
    pub dense_intermediate_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Every RMSNorm scales by `1 + weight` (zero-centred weights, Qwen3-Next); the DeltaNet's
    /// gated norm excepted.
    pub zero_centered_norms: bool,
    /// Input embeddings double as the output projection (no `lm_head.weight` on disk).
    pub tie_word_embeddings: bool,
    /// Maximum positions the model was trained for.
    pub max_position_embeddings: usize,
    /// Attention settings.
    pub attention: AttentionConfig,
    /// Mixture-of-experts settings.
    pub moe: MoeConfig,
    /// The kind of each layer, in order.
    pub layers: Vec<LayerKind>,
    /// Multi-token-prediction layers (`num_nextn_predict_layers`; DeepSeek-V3): MoE decoder
    /// layers stored at indices `num_layers..num_layers + mtp_layers` after the trunk, each with
    /// the config's routed-expert count ([`MoeConfig::num_experts`]). The forward pass ignores
    /// them, as transformers does; surgery prunes them with the trunk.
    pub mtp_layers: usize,
    /// How the weights are quantised (`quantization_config`), if they are.
    pub quantization: Option<Quantization>,
    /// The file this was read from (for error messages).
    pub path: PathBuf,
    /// The config JSON as on disk, unknown keys included (for a multimodal wrapper: its text
    /// config, `text_config`; the whole file is in [`ModelConfig::wrapper`]).
    pub raw: Map<String, Value>,
    /// A multimodal checkpoint whose text model this is (Llama 4's `llama4`), if any.
    pub wrapper: Option<Wrapper>,
}

/// A multimodal wrapper around a supported text model: the text config sits under
/// `text_key`, the text weights under `prefix` (`language_model.model.*`,
/// `language_model.lm_head.weight`); every other tensor and key belongs to the other
/// modalities and is copied unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Wrapper {
    /// The wrapper's `model_type` (`llama4`).
    pub model_type: &'static str,
    /// The key of the text config (`text_config`).
    pub text_key: &'static str,
    /// The text weights' name prefix (`language_model.`).
    pub prefix: &'static str,
    /// The whole `config.json`, as on disk.
    pub raw: Map<String, Value>,
}

/// Multimodal wrappers read as their text model: `(model_type, text model_type, text config
/// key, text weight prefix)`.
pub const WRAPPERS: &[(&str, &str, &str, &str)] = &[("llama4", "llama4_text", "text_config", "language_model.")];

impl ModelConfig {
    /// Reads `config.json` from a model directory (or a path to the file itself).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = if dir.is_dir() { dir.join("config.json") } else { dir.to_path_buf() };
        let text =
            std::fs::read_to_string(&path).map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
        Self::from_json_str(&text, &path)
    }

    /// Parses a config from JSON text; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let value: Value =
            serde_json::from_str(text).map_err(|source| CheckpointError::Json { path: path.clone(), source })?;
        let Value::Object(raw) = value else {
            return Err(CheckpointError::InvalidField {
                path,
                field: "<root>".into(),
                reason: "config.json must hold a JSON object".into(),
            });
        };
        Self::from_map(raw, path)
    }

    /// Parses a config from an already-decoded JSON object.
    ///
    /// Reads the fields every architecture shares and asks the architecture's file in
    /// `architectures/` for the rest (defaults, attention options, expert keys, routing,
    /// which layers are MoE).
    pub fn from_map(raw: Map<String, Value>, path: PathBuf) -> Result<Self> {
        let f = Fields { map: &raw, path: &path };
        let model_type = f.req_str("model_type")?;
        if let Some(&(wrapper, text_type, text_key, prefix)) = WRAPPERS.iter().find(|w| w.0 == model_type) {
            let mut text = match raw.get(text_key) {
                Some(Value::Object(t)) => t.clone(),
                Some(_) => return Err(f.invalid(text_key, "must be an object".into())),
                None => return Err(f.missing(text_key)),
            };
            match text.get("model_type").and_then(Value::as_str) {
                None => {
                    text.insert("model_type".into(), Value::from(text_type));
                }
                Some(t) if t == text_type => {}
                Some(t) => {
                    return Err(f.invalid(
                        &format!("{text_key}.model_type"),
                        format!("`{t}` inside a `{wrapper}` checkpoint; expected `{text_type}`"),
                    ));
                }
            }
            let mut config = Self::from_map(text, path.clone())?;
            config.wrapper = Some(Wrapper { model_type: wrapper, text_key, prefix, raw });
            return Ok(config);
        }
        let architecture =
            Architecture::from_model_type(&model_type).ok_or_else(|| CheckpointError::UnsupportedModelType {
                path: path.clone(),
                model_type: model_type.clone(),
                supported: SUPPORTED_MODEL_TYPES.to_vec(),
            })?;
        let spec = architecture.spec();

        let hidden_act = f.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into());
        if hidden_act != "silu" {
            return Err(f.invalid("hidden_act", format!("`{hidden_act}` is not supported (only `silu`)")));
        }

        let vocab_size = f.req_usize("vocab_size")?;
        let hidden_size = f.req_usize("hidden_size")?;
        let num_layers = f.req_usize("num_hidden_layers")?;
        let (num_heads, num_kv_heads, head_dim, mla) = attention_shape(&f, spec, hidden_size)?;

        let defaults = spec.defaults();
        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps);
        let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(spec.tie_word_embeddings_default());
        let max_position_embeddings =
            f.opt_usize("max_position_embeddings")?.unwrap_or(defaults.max_position_embeddings);
        let (rope_theta, rope_scaling) = rope_settings(&f, defaults.rope_theta, spec, max_position_embeddings)?;
        let rotary_dim = if mla.is_some() { head_dim } else { rotary_dim(&f, spec, head_dim)? };

        let attention = spec.attention(&f)?;
        if attention.sliding_window == Some(0) {
            return Err(f.invalid("sliding_window", "must be positive".into()));
        }
        let sliding_layers = spec.sliding_layers(&f, num_layers, attention.sliding_window)?;

        let num_experts = spec.num_experts(&f)?;
        let top_k = f.req_usize(spec.top_k_key())?;
        let intermediate_size = f.req_usize("intermediate_size")?;
        let expert_intermediate_size = match spec.expert_intermediate_size_key() {
            Some(key) => f.req_usize(key)?,
            None => intermediate_size,
        };
        let dense_intermediate_size = match spec.dense_intermediate_size_key() {
            "intermediate_size" => intermediate_size,
            key => f.req_usize(key)?,
        };
        let norm_topk_prob = spec.norm_topk_prob(&f, top_k)?;
        let shared_expert_intermediate_size = spec.shared_expert_intermediate_size(&f, expert_intermediate_size)?;
        let routing = spec.routing(&f, num_experts, top_k)?;
        let moe_layers = spec.moe_layers(&f, num_layers, num_experts)?;
        let experts = spec.experts(&f)?;

        let layers = layer_kinds(&f, moe_layers, num_experts, (spec.top_k_key(), top_k), &routing)?;
        let mtp_layers = spec.mtp_layers(&f)?;
        let quantization = crate::quant::parse(&f)?;

        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            num_layers,
            dense_intermediate_size,
            rms_norm_eps,
            zero_centered_norms: spec.zero_centered_norms(),
            tie_word_embeddings,
            max_position_embeddings,
            attention: AttentionConfig {
                num_heads,
                num_kv_heads,
                head_dim,
                rotary_dim,
                rope_interleave: attention.rope_interleave,
                qkv_bias: attention.qkv_bias,
                o_bias: attention.o_bias,
                qk_norm: attention.qk_norm,
                clip_qkv: attention.clip_qkv,
                rope_theta,
                sliding_window: attention.sliding_window,
                sliding_layers,
                sinks: attention.sinks,
                rope_scaling,
                mla,
                llama4: spec.llama4_attention(&f, num_layers, rms_norm_eps)?,
                gated_output: spec.gated_attention_output(),
                linear: spec.linear_attention(&f, num_layers)?,
            },
            moe: MoeConfig {
                num_experts,
                top_k,
                expert_intermediate_size,
                norm_topk_prob,
                shared_expert_intermediate_size,
                routing,
                router_bias: experts.router_bias,
                expert_bias: experts.expert_bias,
                mlp_bias: experts.mlp_bias,
                lm_head_bias: experts.mlp_bias,
                activation: experts.activation,
            },
            layers,
            mtp_layers,
            quantization,
            path,
            raw,
            wrapper: None,
        })
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        self.layers.iter().enumerate().filter_map(|(i, k)| matches!(k, LayerKind::Moe { .. }).then_some(i)).collect()
    }

    /// The prefix of the text model's tensor names in the checkpoint (`language_model.` inside a
    /// multimodal wrapper, empty otherwise).
    pub fn tensor_prefix(&self) -> &'static str {
        self.wrapper.as_ref().map_or("", |w| w.prefix)
    }

    /// Keeps only the MTP layers `ckpt` stores (any tensor under
    /// `model.layers.{num_hidden_layers + j}.`): conversions that strip the MTP weights often
    /// keep `num_nextn_predict_layers` in the config.
    pub fn drop_absent_mtp_layers(&mut self, ckpt: &crate::Checkpoint) {
        self.mtp_layers = (0..self.mtp_layers)
            .take_while(|j| {
                let prefix = format!("{}model.layers.{}.", self.tensor_prefix(), self.num_layers + j);
                ckpt.names().any(|n| n.starts_with(&prefix))
            })
            .count();
    }

    /// Indices of the multi-token-prediction layers ([`ModelConfig::mtp_layers`]), after the
    /// trunk's.
    pub fn mtp_layer_indices(&self) -> std::ops::Range<usize> {
        self.num_layers..self.num_layers + self.mtp_layers
    }

    /// The kind of layer `layer`: a trunk layer, or an MTP layer (MoE with the config's
    /// routed-expert count); `None` beyond them.
    pub fn layer_kind(&self, layer: usize) -> Option<LayerKind> {
        match self.layers.get(layer) {
            Some(kind) => Some(*kind),
            None if self.mtp_layer_indices().contains(&layer) => {
                Some(LayerKind::Moe { num_experts: self.moe.num_experts })
            }
            None => None,
        }
    }

    /// Routed experts in layer `layer` (0 for a dense layer). MTP layers count
    /// ([`ModelConfig::mtp_layers`]).
    pub fn experts_in_layer(&self, layer: usize) -> usize {
        match self.layer_kind(layer) {
            Some(LayerKind::Moe { num_experts }) => num_experts,
            _ => 0,
        }
    }

    /// The FP8 scheme, when the weights are FP8-quantised.
    pub fn fp8(&self) -> Option<&Fp8Scheme> {
        match &self.quantization {
            Some(Quantization::Fp8(s)) => Some(s),
            _ => None,
        }
    }
}

/// The `config.json` key holding per-layer routed-expert counts of a non-uniformly pruned
/// checkpoint (0 for dense layers).
pub const PER_LAYER_EXPERTS_KEY: &str = "num_experts_per_layer";

/// Head counts, head width and MLA dimensions: `num_attention_heads`, `num_key_value_heads`
/// (dividing it; equal to it under MLA), `head_dim` (MLA: `qk_rope_head_dim`; absent:
/// `hidden_size / num_attention_heads`), even for RoPE.
fn attention_shape(
    f: &Fields<'_>,
    spec: &dyn ArchSpec,
    hidden_size: usize,
) -> Result<(usize, usize, usize, Option<MlaConfig>)> {
    let num_heads = f.req_usize("num_attention_heads")?;
    let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    if spec.has_mla() && num_kv_heads != num_heads {
        // MLA expands one latent into every head; transformers' `repeat_kv` would then
        // fail, so such a config has no meaning.
        return Err(f.invalid(
            "num_key_value_heads",
            format!("{num_kv_heads} differs from num_attention_heads = {num_heads}, which MLA does not support"),
        ));
    }
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(f.invalid(
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
        ));
    }
    let mla = spec.mla(f)?;
    let head_dim = match (&mla, f.opt_usize("head_dim")?) {
        // transformers sets `head_dim = qk_rope_head_dim` for these models: the RoPE width.
        (Some(m), _) => m.qk_rope_head_dim,
        (None, Some(d)) => d,
        (None, None) => {
            if !hidden_size.is_multiple_of(num_heads) {
                return Err(f.invalid(
                    "num_attention_heads",
                    format!("{num_heads} does not divide hidden_size = {hidden_size} and no head_dim is given"),
                ));
            }
            hidden_size / num_heads
        }
    };
    if head_dim % 2 != 0 {
        return Err(f.invalid(
            if mla.is_some() { "qk_rope_head_dim" } else { "head_dim" },
            format!("{head_dim} must be even for RoPE"),
        ));
    }
    Ok((num_heads, num_kv_heads, head_dim, mla))
}

/// The kind of each layer: MoE layers get `num_experts`, or their entry of the per-layer count
/// list ([`PER_LAYER_EXPERTS_KEY`]) that non-uniformly pruned checkpoints carry (0 for dense
/// layers); then every MoE layer must hold `top_k` experts and fit the routing groups.
fn layer_kinds(
    f: &Fields<'_>,
    moe_layers: Vec<bool>,
    num_experts: usize,
    (top_k_key, top_k): (&str, usize),
    routing: &RoutingConfig,
) -> Result<Vec<LayerKind>> {
    let mut layers: Vec<LayerKind> =
        moe_layers.into_iter().map(|moe| if moe { LayerKind::Moe { num_experts } } else { LayerKind::Dense }).collect();
    if let Some(per_layer) = f.opt_usize_list(PER_LAYER_EXPERTS_KEY)? {
        if per_layer.len() != layers.len() {
            return Err(f.invalid(
                PER_LAYER_EXPERTS_KEY,
                format!("has {} entries for {} layers", per_layer.len(), layers.len()),
            ));
        }
        for (i, (kind, &n)) in layers.iter_mut().zip(&per_layer).enumerate() {
            match kind {
                LayerKind::Moe { num_experts } => {
                    if n < top_k {
                        return Err(f.invalid(
                            PER_LAYER_EXPERTS_KEY,
                            format!("layer {i} keeps {n} experts, fewer than {top_k_key} = {top_k}"),
                        ));
                    }
                    *num_experts = n;
                }
                LayerKind::Dense if n != 0 => {
                    return Err(
                        f.invalid(PER_LAYER_EXPERTS_KEY, format!("layer {i} is a dense layer but lists {n} experts"))
                    );
                }
                LayerKind::Dense => {}
            }
        }
    }
    for (i, kind) in layers.iter().enumerate() {
        if let LayerKind::Moe { num_experts } = kind
            && (top_k == 0 || top_k > *num_experts)
        {
            return Err(f.invalid(top_k_key, format!("{top_k} is not in 1..={num_experts} (experts of layer {i})")));
        }
        if let (LayerKind::Moe { num_experts }, Some(g)) = (kind, routing.group_limit) {
            check_groups(f, g, *num_experts, top_k, i)?;
        }
    }
    Ok(layers)
}

/// RoPE θ and scaling from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x).
/// The architecture decides which scalings are accepted ([`ArchSpec::rope_allowed`]) and the
/// scaling when neither key is present ([`ArchSpec::default_rope_scaling`]).
fn rope_settings(
    f: &Fields<'_>,
    default_theta: f64,
    spec: &dyn ArchSpec,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling)> {
    let allowed = spec.rope_allowed();
    let top_theta = f.opt_f64("rope_theta")?;
    // transformers 5.x: `rope_parameters: {"rope_type": ..., "rope_theta": θ, ...}`.
    let (field, params) = match f.map.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(Value::Object(p)) => ("rope_parameters", Some(p)),
        Some(_) => return Err(f.invalid("rope_parameters", "must be an object".into())),
        // transformers 4.x: `rope_theta` and an optional `rope_scaling`.
        None => match f.map.get("rope_scaling").filter(|v| !v.is_null()) {
            Some(Value::Object(p)) => ("rope_scaling", Some(p)),
            Some(_) => return Err(f.invalid("rope_scaling", "must be an object".into())),
            None => ("rope_scaling", None),
        },
    };
    let Some(params) = params else {
        return Ok((top_theta.unwrap_or(default_theta), spec.default_rope_scaling()));
    };
    let theta = match params.get("rope_theta").filter(|v| !v.is_null()) {
        Some(t) => t.as_f64().ok_or_else(|| f.invalid(&format!("{field}.rope_theta"), "must be a number".into()))?,
        None => top_theta.unwrap_or(default_theta),
    };
    let ty = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<Option<f64>> {
        match params.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| f.invalid(&format!("{field}.{key}"), format!("expected a number, found {v}"))),
        }
    };
    match ty {
        "default" => Ok((theta, RopeScaling::None)),
        "linear" if allowed == RopeAllowed::Linear => {
            let factor = num("factor")?.ok_or_else(|| f.missing(&format!("{field}.factor")))?;
            if !(factor.is_finite() && factor > 0.0) {
                return Err(f.invalid(&format!("{field}.factor"), format!("{factor} must be positive")));
            }
            Ok((theta, RopeScaling::Linear { factor }))
        }
        "llama3" if allowed == RopeAllowed::Llama3 => {
            let req = |key: &str| -> Result<f64> {
                let v = num(key)?.ok_or_else(|| f.missing(&format!("{field}.{key}")))?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(f.invalid(&format!("{field}.{key}"), format!("{v} must be positive")));
                }
                Ok(v)
            };
            let (factor, low, high) = (req("factor")?, req("low_freq_factor")?, req("high_freq_factor")?);
            if high < low {
                return Err(f.invalid(
                    &format!("{field}.high_freq_factor"),
                    format!("{high} is below low_freq_factor = {low}"),
                ));
            }
            let original = req("original_max_position_embeddings")?;
            if original.fract() != 0.0 {
                return Err(f.invalid(
                    &format!("{field}.original_max_position_embeddings"),
                    format!("{original} is not a positive integer"),
                ));
            }
            Ok((
                theta,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: original as usize,
                },
            ))
        }
        "yarn" if allowed == RopeAllowed::Yarn => {
            // As `standardize_rope_params`: a top-level `original_max_position_embeddings` wins,
            // then the one in the parameters, then `max_position_embeddings`.
            let original = match f.opt_usize("original_max_position_embeddings")? {
                Some(o) => o,
                None => match num("original_max_position_embeddings")? {
                    Some(o) if o >= 1.0 && o.fract() == 0.0 => o as usize,
                    Some(o) => {
                        return Err(f.invalid(
                            &format!("{field}.original_max_position_embeddings"),
                            format!("{o} is not a positive integer"),
                        ));
                    }
                    None => max_position_embeddings,
                },
            };
            let factor = num("factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
            if !(factor.is_finite() && factor > 0.0) {
                return Err(f.invalid(&format!("{field}.factor"), format!("{factor} must be positive")));
            }
            let truncate = match params.get("truncate").filter(|v| !v.is_null()) {
                None => true,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(f.invalid(&format!("{field}.truncate"), format!("expected true or false, found {v}")));
                }
            };
            if num("partial_rotary_factor")?.is_some_and(|p| p != 1.0) {
                return Err(f.invalid(&format!("{field}.partial_rotary_factor"), "only 1.0 is supported".into()));
            }
            Ok((
                theta,
                RopeScaling::Yarn(YarnConfig {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: num("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                    mscale: num("mscale")?,
                    mscale_all_dim: num("mscale_all_dim")?,
                    attention_factor: num("attention_factor")?,
                    truncate,
                }),
            ))
        }
        _ => {
            let supported = match allowed {
                RopeAllowed::Default => "only `default`",
                RopeAllowed::Yarn => "only `default` and `yarn`",
                RopeAllowed::Linear => "only `default` and `linear`",
                RopeAllowed::Llama3 => "only `default` and `llama3`",
            };
            Err(f.invalid(&format!("{field}.rope_type"), format!("RoPE type `{ty}` is not supported ({supported})")))
        }
    }
}

/// The rotated width of a head: `head_dim · partial_rotary_factor` (truncated, as
/// transformers' `int(head_dim * partial_rotary_factor)`), read from `rope_parameters` (5.x) or
/// the top level (4.x), else from the architecture's own key ([`ArchSpec::rotary_dim`]: MiniMax's
/// `rotary_dim`), else the architecture's default factor. Architectures without partial
/// rotary accept only a factor of 1.
fn rotary_dim(f: &Fields<'_>, spec: &dyn ArchSpec, head_dim: usize) -> Result<usize> {
    let nested = match f.map.get("rope_parameters") {
        Some(Value::Object(p)) => p.get("partial_rotary_factor").filter(|v| !v.is_null()).map(|v| {
            v.as_f64().ok_or_else(|| {
                f.invalid("rope_parameters.partial_rotary_factor", format!("expected a number, found {v}"))
            })
        }),
        _ => None,
    };
    let (field, factor) = match nested {
        Some(v) => ("rope_parameters.partial_rotary_factor", Some(v?)),
        None => ("partial_rotary_factor", f.opt_f64("partial_rotary_factor")?),
    };
    let dim = match (factor, spec.rotary_dim(f)?) {
        (Some(p), _) => {
            if !(p > 0.0 && p <= 1.0) {
                return Err(f.invalid(field, format!("{p} is not in (0, 1]")));
            }
            if p != 1.0 && spec.default_partial_rotary_factor().is_none() {
                return Err(f.invalid(field, format!("{p}: partial RoPE is not part of `{}`", spec.model_type())));
            }
            ((head_dim as f64) * p) as usize
        }
        (None, Some(d)) => {
            if d == 0 || d > head_dim {
                return Err(f.invalid("rotary_dim", format!("{d} is not in 1..={head_dim} (head_dim)")));
            }
            d
        }
        (None, None) => ((head_dim as f64) * spec.default_partial_rotary_factor().unwrap_or(1.0)) as usize,
    };
    if dim == 0 || dim % 2 != 0 {
        return Err(f.invalid(
            field,
            format!("gives a rotary width of {dim} for head_dim {head_dim}; it must be even and positive"),
        ));
    }
    Ok(dim)
}

/// Group-limited routing needs `n_group` equal contiguous groups of at least two experts (V3
/// scores a group by its top two) and enough experts in the `topk_group` best groups.
/// `layer == usize::MAX` means the architecture's unpruned count.
pub(crate) fn check_groups(
    f: &Fields<'_>,
    g: GroupLimit,
    num_experts: usize,
    top_k: usize,
    layer: usize,
) -> Result<()> {
    let at = if layer == usize::MAX { String::new() } else { format!(" (layer {layer})") };
    if !num_experts.is_multiple_of(g.n_group) {
        return Err(
            f.invalid("n_group", format!("{} groups do not split {num_experts} routed experts evenly{at}", g.n_group))
        );
    }
    let size = num_experts / g.n_group;
    if g.score == GroupScore::Top2Sum && size < 2 {
        return Err(f.invalid(
            "n_group",
            format!(
                "{} groups of {num_experts} experts leave {size} per group; DeepSeek-V3 needs at least 2{at}",
                g.n_group
            ),
        ));
    }
    if top_k > g.topk_group * size {
        return Err(f.invalid(
            "num_experts_per_tok",
            format!("{top_k} exceeds topk_group ({}) × experts per group ({size}){at}", g.topk_group),
        ));
    }
    Ok(())
}
