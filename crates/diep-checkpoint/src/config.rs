//! `config.json` as written by transformers 4.x and 5.x, normalised.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{CheckpointError, Result};

/// The `model_type` values this toolkit implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] =
    &["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "deepseek", "gpt_oss"];

/// A supported decoder architecture, named as in `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `mixtral`: Mixtral / Mistral-MoE.
    Mixtral,
    /// `qwen2_moe`: Qwen1.5-MoE and Qwen2-MoE (shared expert with a sigmoid gate).
    Qwen2Moe,
    /// `qwen3_moe`: Qwen3-MoE (per-head qk-norm).
    Qwen3Moe,
    /// `olmoe`: OLMoE (qk-norm over the whole projection, `clip_qkv`).
    Olmoe,
    /// `deepseek_v3`: DeepSeek-V3 / R1 (MLA, sigmoid routing with a correction bias and
    /// group-limited selection, shared experts, leading dense layers).
    DeepseekV3,
    /// `deepseek_v2`: DeepSeek-V2 / V2-Lite (MLA, softmax routing, greedy or group-limited,
    /// shared experts, leading dense layers).
    DeepseekV2,
    /// `deepseek`: DeepSeek-MoE 16B (remote code `modeling_deepseek.py`: standard multi-head
    /// attention with rotate-half RoPE, softmax greedy routing, shared experts, dense layers
    /// from `first_k_dense_replace` and `moe_layer_freq`).
    Deepseek,
    /// `gpt_oss`: gpt-oss (router bias, fused experts with biases and a clamped SwiGLU,
    /// attention sinks, alternating sliding/full attention, yarn RoPE).
    GptOss,
}

impl Architecture {
    /// The `model_type` string of this architecture.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Mixtral => "mixtral",
            Architecture::Qwen2Moe => "qwen2_moe",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Olmoe => "olmoe",
            Architecture::DeepseekV3 => "deepseek_v3",
            Architecture::DeepseekV2 => "deepseek_v2",
            Architecture::Deepseek => "deepseek",
            Architecture::GptOss => "gpt_oss",
        }
    }

    /// The DeepSeek family (DeepSeek-MoE, V2, V3): ungated shared experts, `n_routed_experts`,
    /// dense layers before `first_k_dense_replace`, and no stock loader for per-layer expert
    /// counts. Only V2/V3 use multi-head latent attention ([`Architecture::has_mla`]).
    pub fn is_deepseek(self) -> bool {
        matches!(self, Architecture::DeepseekV3 | Architecture::DeepseekV2 | Architecture::Deepseek)
    }

    /// DeepSeek-V2/V3: multi-head latent attention (DeepSeek-MoE has standard attention).
    pub fn has_mla(self) -> bool {
        matches!(self, Architecture::DeepseekV3 | Architecture::DeepseekV2)
    }

    /// Parses a `model_type` string.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "mixtral" => Some(Architecture::Mixtral),
            "qwen2_moe" => Some(Architecture::Qwen2Moe),
            "qwen3_moe" => Some(Architecture::Qwen3Moe),
            "olmoe" => Some(Architecture::Olmoe),
            "deepseek_v3" => Some(Architecture::DeepseekV3),
            "deepseek_v2" => Some(Architecture::DeepseekV2),
            "deepseek" => Some(Architecture::Deepseek),
            "gpt_oss" => Some(Architecture::GptOss),
            _ => None,
        }
    }
}

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
    /// Expert projections carry biases (gpt-oss).
    pub expert_bias: bool,
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
    /// (DeepSeek-V3).
    pub correction_bias: bool,
}

impl RoutingConfig {
    /// Softmax, plain top-k, no scaling: Mixtral, Qwen, OLMoE and DeepSeek-MoE.
    pub fn softmax() -> Self {
        RoutingConfig {
            scoring: Scoring::Softmax,
            group_limit: None,
            routed_scaling_factor: 1.0,
            correction_bias: false,
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
    /// The file this was read from (for error messages).
    pub path: PathBuf,
    /// The config JSON as on disk, unknown keys included.
    pub raw: Map<String, Value>,
}

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
    pub fn from_map(raw: Map<String, Value>, path: PathBuf) -> Result<Self> {
        let f = Fields { map: &raw, path: &path };
        let model_type = f.req_str("model_type")?;
        let architecture =
            Architecture::from_model_type(&model_type).ok_or_else(|| CheckpointError::UnsupportedModelType {
                path: path.clone(),
                model_type: model_type.clone(),
                supported: SUPPORTED_MODEL_TYPES.to_vec(),
            })?;

        let hidden_act = f.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into());
        if hidden_act != "silu" {
            return Err(f.invalid("hidden_act", format!("`{hidden_act}` is not supported (only `silu`)")));
        }

        let vocab_size = f.req_usize("vocab_size")?;
        let hidden_size = f.req_usize("hidden_size")?;
        let num_layers = f.req_usize("num_hidden_layers")?;
        let num_heads = f.req_usize("num_attention_heads")?;
        let deepseek = architecture.is_deepseek();
        let mla_arch = architecture.has_mla();
        let gpt_oss = architecture == Architecture::GptOss;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if mla_arch && num_kv_heads != num_heads {
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
        let mla = if mla_arch { Some(mla_config(&f, architecture)?) } else { None };
        let head_dim = match (&mla, f.opt_usize("head_dim")?) {
            // transformers sets `head_dim = qk_rope_head_dim` for these models: the RoPE width.
            (Some(m), _) => m.qk_rope_head_dim,
            (None, Some(d)) => d,
            (None, None) => {
                if hidden_size % num_heads != 0 {
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
                if mla_arch { "qk_rope_head_dim" } else { "head_dim" },
                format!("{head_dim} must be even for RoPE"),
            ));
        }

        // transformers' per-architecture defaults, used only when a key is absent.
        let (default_eps, default_theta) = match architecture {
            Architecture::Mixtral => (1e-5, 1e6),
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => (1e-6, 10_000.0),
            Architecture::Olmoe => (1e-5, 10_000.0),
            Architecture::DeepseekV3 | Architecture::DeepseekV2 | Architecture::Deepseek => (1e-6, 10_000.0),
            Architecture::GptOss => (1e-5, 150_000.0),
        };
        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(default_eps);
        let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(match architecture {
            Architecture::DeepseekV2 | Architecture::Deepseek => 2048,
            Architecture::GptOss => 131_072,
            _ => 4096,
        });
        let (rope_theta, rope_scaling) = if gpt_oss && !f.has("rope_parameters") && !f.has("rope_scaling") {
            // transformers' GptOssConfig default: yarn, factor 32 over 4096 positions.
            let theta = f.opt_f64("rope_theta")?.unwrap_or(default_theta);
            let yarn = YarnConfig {
                factor: 32.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: false,
            };
            (theta, RopeScaling::Yarn(yarn))
        } else {
            let allowed = match architecture {
                Architecture::DeepseekV3 | Architecture::DeepseekV2 | Architecture::GptOss => RopeAllowed::Yarn,
                // DeepSeek-MoE's remote code knows `linear` and `dynamic` (NTK); only `linear` is
                // implemented here.
                Architecture::Deepseek => RopeAllowed::Linear,
                _ => RopeAllowed::Default,
            };
            rope_settings(&f, default_theta, allowed, max_position_embeddings)?
        };

        let (qkv_bias, o_bias) = match architecture {
            Architecture::Mixtral => (false, false),
            // 4.x hard-codes q/k/v biases; 5.x exposes them as `qkv_bias` (default true).
            Architecture::Qwen2Moe => (f.opt_bool("qkv_bias")?.unwrap_or(true), false),
            Architecture::Qwen3Moe | Architecture::Olmoe | Architecture::Deepseek => {
                let b = f.opt_bool("attention_bias")?.unwrap_or(false);
                (b, b)
            }
            Architecture::GptOss => {
                let b = f.opt_bool("attention_bias")?.unwrap_or(true);
                (b, b)
            }
            // MLA's biases (`attention_bias`) are recorded in `MlaConfig::bias`.
            Architecture::DeepseekV3 | Architecture::DeepseekV2 => (false, false),
        };
        let qk_norm = match architecture {
            Architecture::Qwen3Moe => QkNorm::PerHead,
            Architecture::Olmoe => QkNorm::Full,
            _ => QkNorm::None,
        };
        let clip_qkv = match architecture {
            Architecture::Olmoe => f.opt_f64("clip_qkv")?,
            _ => None,
        };
        let sliding_window = match architecture {
            Architecture::Mixtral => f.opt_usize("sliding_window")?,
            Architecture::GptOss => f.opt_usize("sliding_window")?,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    return Err(f.invalid(
                        "use_sliding_window",
                        "sliding-window attention is not supported for Qwen MoE models".into(),
                    ));
                }
                None
            }
            Architecture::Olmoe | Architecture::DeepseekV3 | Architecture::DeepseekV2 | Architecture::Deepseek => None,
        };
        if sliding_window == Some(0) {
            return Err(f.invalid("sliding_window", "must be positive".into()));
        }
        let sliding_layers = if gpt_oss { Some(gpt_oss_layer_types(&f, num_layers, sliding_window)?) } else { None };

        let num_experts = match architecture {
            Architecture::Mixtral | Architecture::GptOss => f.req_usize("num_local_experts")?,
            Architecture::Qwen2Moe | Architecture::Olmoe => f.req_usize("num_experts")?,
            // 4.x writes `num_experts`, 5.x `num_local_experts`.
            Architecture::Qwen3Moe => match f.opt_usize("num_experts")? {
                Some(n) => n,
                None => f.opt_usize("num_local_experts")?.ok_or_else(|| f.missing("num_experts"))?,
            },
            // DeepSeek-MoE's remote code builds no MoE layer at all when `n_routed_experts` is
            // null (a dense model, nothing to prune): required here.
            Architecture::DeepseekV3 | Architecture::DeepseekV2 | Architecture::Deepseek => {
                f.req_usize("n_routed_experts")?
            }
        };
        let top_k = f.req_usize("num_experts_per_tok")?;
        let intermediate_size = f.req_usize("intermediate_size")?;
        let expert_intermediate_size = match architecture {
            Architecture::Qwen2Moe
            | Architecture::Qwen3Moe
            | Architecture::DeepseekV3
            | Architecture::DeepseekV2
            | Architecture::Deepseek => f.req_usize("moe_intermediate_size")?,
            _ => intermediate_size,
        };
        let norm_topk_prob = match architecture {
            // Mixtral always renormalises the top-k weights; gpt-oss's softmax over the k
            // selected logits is the same thing.
            Architecture::Mixtral | Architecture::GptOss => true,
            Architecture::DeepseekV3 => f.opt_bool("norm_topk_prob")?.unwrap_or(true),
            // transformers 5.x's DeepSeek-V2 router never renormalises, whatever the config says
            // (vLLM honours the flag; the released models have it false).
            Architecture::DeepseekV2 => false,
            // DeepSeek-MoE's `MoEGate` renormalises only `if top_k > 1 and norm_topk_prob`
            // (dividing by the sum + 1e-20, which is the sum itself in f32).
            Architecture::Deepseek => f.opt_bool("norm_topk_prob")?.unwrap_or(false) && top_k > 1,
            _ => f.opt_bool("norm_topk_prob")?.unwrap_or(false),
        };
        let shared_expert_intermediate_size = match architecture {
            Architecture::Qwen2Moe => match f.opt_usize("shared_expert_intermediate_size")? {
                Some(0) | None => None,
                Some(n) => Some(n),
            },
            Architecture::DeepseekV3 | Architecture::DeepseekV2 | Architecture::Deepseek => {
                // transformers' defaults (V3: 1, V2: 2); DeepSeek-MoE's `DeepseekConfig`: null.
                let default = match architecture {
                    Architecture::DeepseekV3 => 1,
                    Architecture::DeepseekV2 => 2,
                    _ => 0,
                };
                match f.opt_usize("n_shared_experts")?.unwrap_or(default) {
                    0 => None,
                    n => Some(n * expert_intermediate_size),
                }
            }
            _ => None,
        };
        let routing = routing_config(&f, architecture, num_experts, top_k)?;
        if architecture == Architecture::DeepseekV2 && f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(f.invalid("mlp_bias", "MLP biases are not supported".into()));
        }
        let first_k_dense = if deepseek { f.opt_usize("first_k_dense_replace")?.unwrap_or(0) } else { 0 };
        // DeepSeek-MoE's remote code: layer `i` is MoE iff `i >= first_k_dense_replace and
        // i % moe_layer_freq == 0`.
        let moe_layer_freq = if architecture == Architecture::Deepseek {
            match f.opt_usize("moe_layer_freq")?.unwrap_or(1) {
                0 => return Err(f.invalid("moe_layer_freq", "must be positive".into())),
                n => n,
            }
        } else {
            1
        };
        if mla_arch
            && let Some(freq) = f.opt_usize("moe_layer_freq")?
            && freq != 1
        {
            // transformers 5.x ignores `moe_layer_freq` (every layer from `first_k_dense_replace`
            // on is MoE) while DeepSeek's remote code honours it: refuse rather than guess.
            return Err(f.invalid(
                "moe_layer_freq",
                format!("{freq} is not supported (transformers ignores it; only 1 is unambiguous)"),
            ));
        }

        let activation = if gpt_oss {
            let alpha = f.opt_f64("swiglu_alpha")?.unwrap_or(1.702);
            let limit = f.opt_f64("swiglu_limit")?.unwrap_or(7.0);
            if !alpha.is_finite() {
                return Err(f.invalid("swiglu_alpha", format!("{alpha} is not finite")));
            }
            if !(limit.is_finite() && limit > 0.0) {
                return Err(f.invalid("swiglu_limit", format!("{limit} must be positive")));
            }
            ExpertActivation::ClampedSwiglu { alpha, limit }
        } else {
            ExpertActivation::Silu
        };

        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let is_moe = match architecture {
                Architecture::Mixtral | Architecture::Olmoe | Architecture::GptOss => true,
                Architecture::DeepseekV3 | Architecture::DeepseekV2 => i >= first_k_dense,
                Architecture::Deepseek => i >= first_k_dense && i % moe_layer_freq == 0,
                Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                    let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                    if step == 0 {
                        return Err(f.invalid("decoder_sparse_step", "must be positive".into()));
                    }
                    let mlp_only = f.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
                    !mlp_only.contains(&i) && num_experts > 0 && (i + 1) % step == 0
                }
            };
            layers.push(if is_moe { LayerKind::Moe { num_experts } } else { LayerKind::Dense });
        }

        // Non-uniformly pruned checkpoints carry a per-layer count list.
        if let Some(per_layer) = f.opt_usize_list(PER_LAYER_EXPERTS_KEY)? {
            if per_layer.len() != num_layers {
                return Err(f.invalid(
                    PER_LAYER_EXPERTS_KEY,
                    format!("has {} entries for {num_layers} layers", per_layer.len()),
                ));
            }
            for (i, (kind, &n)) in layers.iter_mut().zip(&per_layer).enumerate() {
                match kind {
                    LayerKind::Moe { num_experts } => {
                        if n < top_k {
                            return Err(f.invalid(
                                PER_LAYER_EXPERTS_KEY,
                                format!("layer {i} keeps {n} experts, fewer than num_experts_per_tok = {top_k}"),
                            ));
                        }
                        *num_experts = n;
                    }
                    LayerKind::Dense if n != 0 => {
                        return Err(f.invalid(
                            PER_LAYER_EXPERTS_KEY,
                            format!("layer {i} is a dense layer but lists {n} experts"),
                        ));
                    }
                    LayerKind::Dense => {}
                }
            }
        }
        for (i, kind) in layers.iter().enumerate() {
            if let LayerKind::Moe { num_experts } = kind
                && (top_k == 0 || top_k > *num_experts)
            {
                return Err(f.invalid(
                    "num_experts_per_tok",
                    format!("{top_k} is not in 1..={num_experts} (experts of layer {i})"),
                ));
            }
            if let (LayerKind::Moe { num_experts }, Some(g)) = (kind, routing.group_limit) {
                check_groups(&f, g, *num_experts, top_k, i)?;
            }
        }

        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            num_layers,
            dense_intermediate_size: intermediate_size,
            rms_norm_eps,
            tie_word_embeddings,
            max_position_embeddings,
            attention: AttentionConfig {
                num_heads,
                num_kv_heads,
                head_dim,
                qkv_bias,
                o_bias,
                qk_norm,
                clip_qkv,
                rope_theta,
                sliding_window,
                sliding_layers,
                sinks: gpt_oss,
                rope_scaling,
                mla,
            },
            moe: MoeConfig {
                num_experts,
                top_k,
                expert_intermediate_size,
                norm_topk_prob,
                shared_expert_intermediate_size,
                routing,
                router_bias: gpt_oss,
                expert_bias: gpt_oss,
                activation,
            },
            layers,
            path,
            raw,
        })
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        self.layers.iter().enumerate().filter_map(|(i, k)| matches!(k, LayerKind::Moe { .. }).then_some(i)).collect()
    }

    /// Routed experts in layer `layer` (0 for a dense layer).
    pub fn experts_in_layer(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(LayerKind::Moe { num_experts }) => *num_experts,
            _ => 0,
        }
    }
}

/// The `config.json` key holding per-layer routed-expert counts of a non-uniformly pruned
/// checkpoint (0 for dense layers).
pub const PER_LAYER_EXPERTS_KEY: &str = "num_experts_per_layer";

/// Which RoPE scalings an architecture implements besides plain RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeAllowed {
    /// Plain RoPE only.
    Default,
    /// Plain or yarn (DeepSeek-V2/V3, gpt-oss).
    Yarn,
    /// Plain or linear (DeepSeek-MoE).
    Linear,
}

/// RoPE θ and scaling from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x).
/// DeepSeek-V2/V3 and gpt-oss accept yarn, DeepSeek-MoE linear; everything else must be
/// plain RoPE.
fn rope_settings(
    f: &Fields<'_>,
    default_theta: f64,
    allowed: RopeAllowed,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling)> {
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
        return Ok((top_theta.unwrap_or(default_theta), RopeScaling::None));
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
            };
            Err(f.invalid(&format!("{field}.rope_type"), format!("RoPE type `{ty}` is not supported ({supported})")))
        }
    }
}

/// DeepSeek's MLA dimensions.
fn mla_config(f: &Fields<'_>, arch: Architecture) -> Result<MlaConfig> {
    let q_lora_rank = f.opt_usize("q_lora_rank")?;
    if q_lora_rank == Some(0) {
        return Err(f.invalid("q_lora_rank", "must be positive or null".into()));
    }
    let positive = |field: &str| -> Result<usize> {
        let v = f.req_usize(field)?;
        if v == 0 {
            return Err(f.invalid(field, "must be positive".into()));
        }
        Ok(v)
    };
    Ok(MlaConfig {
        q_lora_rank,
        kv_lora_rank: positive("kv_lora_rank")?,
        qk_nope_head_dim: f.req_usize("qk_nope_head_dim")?,
        qk_rope_head_dim: positive("qk_rope_head_dim")?,
        v_head_dim: positive("v_head_dim")?,
        bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        // DeepSeek-V3 lays rotary dims out in interleaved pairs unless `rope_interleave` is
        // false; V2's complex-number RoPE is always interleaved.
        rope_interleave: arch == Architecture::DeepseekV2 || f.opt_bool("rope_interleave")?.unwrap_or(true),
    })
}

/// The routing rule of an architecture.
fn routing_config(f: &Fields<'_>, arch: Architecture, num_experts: usize, top_k: usize) -> Result<RoutingConfig> {
    let scaling = |default: f64| -> Result<f64> {
        let s = f.opt_f64("routed_scaling_factor")?.unwrap_or(default);
        if !s.is_finite() {
            return Err(f.invalid("routed_scaling_factor", format!("{s} is not finite")));
        }
        Ok(s)
    };
    let groups = |score: GroupScore| -> Result<GroupLimit> {
        let n_group = f.opt_usize("n_group")?.ok_or_else(|| f.missing("n_group"))?;
        let topk_group = f.opt_usize("topk_group")?.ok_or_else(|| f.missing("topk_group"))?;
        if n_group == 0 {
            return Err(f.invalid("n_group", "must be positive".into()));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(f.invalid("topk_group", format!("{topk_group} is not in 1..={n_group} (n_group)")));
        }
        let g = GroupLimit { n_group, topk_group, score };
        check_groups(f, g, num_experts, top_k, usize::MAX)?;
        Ok(g)
    };
    match arch {
        Architecture::DeepseekV3 => {
            // transformers' V3 router is always sigmoid + correction bias + group-limited
            // (`topk_method: noaux_tc`, `scoring_func: sigmoid` are kept for vLLM only).
            if let Some(s) = f.opt_str("scoring_func")?
                && s != "sigmoid"
            {
                return Err(
                    f.invalid("scoring_func", format!("`{s}` is not supported for deepseek_v3 (only `sigmoid`)"))
                );
            }
            Ok(RoutingConfig {
                scoring: Scoring::Sigmoid,
                group_limit: Some(groups(GroupScore::Top2Sum)?),
                routed_scaling_factor: scaling(2.5)?,
                correction_bias: true,
            })
        }
        Architecture::DeepseekV2 => {
            let method = f.opt_str("topk_method")?.unwrap_or_else(|| "greedy".into());
            let group_limit = match method.as_str() {
                "greedy" => None,
                "group_limited_greedy" => Some(groups(GroupScore::Max)?),
                other => {
                    return Err(f.invalid(
                        "topk_method",
                        format!("`{other}` is not supported for deepseek_v2 (`greedy` or `group_limited_greedy`)"),
                    ));
                }
            };
            if let Some(s) = f.opt_str("scoring_func")?
                && s != "softmax"
            {
                return Err(
                    f.invalid("scoring_func", format!("`{s}` is not supported for deepseek_v2 (only `softmax`)"))
                );
            }
            Ok(RoutingConfig {
                scoring: Scoring::Softmax,
                group_limit,
                routed_scaling_factor: scaling(1.0)?,
                correction_bias: false,
            })
        }
        Architecture::Deepseek => {
            // DeepSeek-MoE's `MoEGate` implements only softmax scoring and plain (greedy) top-k;
            // it has no `routed_scaling_factor`.
            if let Some(s) = f.opt_str("scoring_func")?
                && s != "softmax"
            {
                return Err(f.invalid("scoring_func", format!("`{s}` is not supported for deepseek (only `softmax`)")));
            }
            Ok(RoutingConfig::softmax())
        }
        _ => Ok(RoutingConfig::softmax()),
    }
}

/// Group-limited routing needs `n_group` equal contiguous groups of at least two experts (V3
/// scores a group by its top two) and enough experts in the `topk_group` best groups.
/// `layer == usize::MAX` means the architecture's unpruned count.
fn check_groups(f: &Fields<'_>, g: GroupLimit, num_experts: usize, top_k: usize, layer: usize) -> Result<()> {
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

/// gpt-oss's `layer_types`: per layer, whether it uses the sliding window. transformers'
/// default alternates, starting with a sliding layer; without a `sliding_window` every layer
/// attends fully.
fn gpt_oss_layer_types(f: &Fields<'_>, num_layers: usize, window: Option<usize>) -> Result<Vec<bool>> {
    let sliding = match f.get("layer_types") {
        None => (0..num_layers).map(|i| i % 2 == 0).collect::<Vec<_>>(),
        Some(Value::Array(items)) => {
            if items.len() != num_layers {
                return Err(f.invalid("layer_types", format!("has {} entries for {num_layers} layers", items.len())));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(f.invalid(
                        "layer_types",
                        format!("entry {i} is {v}; expected \"sliding_attention\" or \"full_attention\""),
                    )),
                })
                .collect::<Result<Vec<_>>>()?
        }
        Some(v) => return Err(f.invalid("layer_types", format!("expected a list, found {v}"))),
    };
    Ok(if window.is_some() { sliding } else { vec![false; num_layers] })
}

/// Typed access to config fields with errors that name the file and the field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
}

impl Fields<'_> {
    fn missing(&self, field: &str) -> CheckpointError {
        CheckpointError::MissingField { path: self.path.to_path_buf(), field: field.into() }
    }

    fn invalid(&self, field: &str, reason: String) -> CheckpointError {
        CheckpointError::InvalidField { path: self.path.to_path_buf(), field: field.into(), reason }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn has(&self, field: &str) -> bool {
        self.get(field).is_some()
    }

    fn req_str(&self, field: &str) -> Result<String> {
        self.opt_str(field)?.ok_or_else(|| self.missing(field))
    }

    fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.invalid(field, format!("expected a string, found {v}"))),
        }
    }

    fn req_usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.missing(field))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => as_usize(v)
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn opt_usize_list(&self, field: &str) -> Result<Option<Vec<usize>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(as_usize)
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.invalid(field, "expected a list of non-negative integers".into())),
            Some(v) => Err(self.invalid(field, format!("expected a list, found {v}"))),
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.invalid(field, format!("expected a number, found {v}"))),
        }
    }

    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(field, format!("expected true or false, found {v}"))),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    if let Some(u) = v.as_u64() {
        return usize::try_from(u).ok();
    }
    // Some writers store integers as floats (e.g. 8.0).
    v.as_f64().filter(|x| *x >= 0.0 && x.fract() == 0.0 && *x < 2f64.powi(53)).map(|x| x as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, "test/config.json")
    }

    const MIXTRAL_4X: &str = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,
        "num_hidden_layers":2,"num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,
        "num_local_experts":8,"num_experts_per_tok":2,"rope_theta":1000000.0,"rms_norm_eps":1e-5,
        "sliding_window":null,"tie_word_embeddings":false,"hidden_act":"silu"}"#;

    #[test]
    fn mixtral_4x() {
        let c = parse(MIXTRAL_4X).unwrap();
        assert_eq!(c.architecture, Architecture::Mixtral);
        assert_eq!(c.attention.head_dim, 128);
        assert_eq!(c.attention.rope_theta, 1e6);
        assert_eq!(c.moe.num_experts, 8);
        assert!(c.moe.norm_topk_prob);
        assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 8 }; 2]);
    }

    #[test]
    fn rope_parameters_5x() {
        let json = MIXTRAL_4X
            .replace(r#""rope_theta":1000000.0"#, r#""rope_parameters":{"rope_type":"default","rope_theta":12345.0}"#);
        assert_eq!(parse(&json).unwrap().attention.rope_theta, 12345.0);
    }

    #[test]
    fn unsupported_rope_type_names_field() {
        let json = MIXTRAL_4X.replace(
            r#""rope_theta":1000000.0"#,
            r#""rope_parameters":{"rope_type":"yarn","rope_theta":1.0,"factor":4.0}"#,
        );
        let err = parse(&json).unwrap_err().to_string();
        assert!(err.contains("rope_parameters.rope_type") && err.contains("yarn"), "{err}");
    }

    const QWEN3: &str = r#"{"model_type":"qwen3_moe","vocab_size":100,"hidden_size":64,
        "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":24,
        "intermediate_size":96,"moe_intermediate_size":32,"NUM_KEY":8,"num_experts_per_tok":2,
        "decoder_sparse_step":2,"mlp_only_layers":[],"norm_topk_prob":true,"rope_theta":10000}"#;

    #[test]
    fn qwen3_expert_count_key_from_4x_and_5x() {
        for key in ["num_experts", "num_local_experts"] {
            let c = parse(&QWEN3.replace("NUM_KEY", key)).unwrap();
            assert_eq!(c.moe.num_experts, 8, "{key}");
            assert_eq!(c.attention.head_dim, 24);
            assert_eq!(c.attention.qk_norm, QkNorm::PerHead);
            // decoder_sparse_step = 2: layers 1 and 3 are MoE.
            assert_eq!(c.moe_layers(), vec![1, 3]);
            assert_eq!(c.layers[0], LayerKind::Dense);
        }
    }

    #[test]
    fn qwen2_layer_placement_follows_mlp_only_layers() {
        let json = r#"{"model_type":"qwen2_moe","vocab_size":100,"hidden_size":64,
        "num_hidden_layers":4,"num_attention_heads":4,"intermediate_size":96,
        "moe_intermediate_size":32,"shared_expert_intermediate_size":48,"num_experts":8,
        "num_experts_per_tok":2,"decoder_sparse_step":1,"mlp_only_layers":[2]}"#;
        let c = parse(json).unwrap();
        assert_eq!(c.moe_layers(), vec![0, 1, 3]);
        assert_eq!(c.moe.shared_expert_intermediate_size, Some(48));
        assert!(c.attention.qkv_bias && !c.attention.o_bias);
        assert!(!c.moe.norm_topk_prob);
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = parse(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
        assert!(err.contains("test/config.json") && err.contains("`llama`"), "{err}");
        for t in SUPPORTED_MODEL_TYPES {
            assert!(err.contains(t), "{err}");
        }
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let err = parse(&MIXTRAL_4X.replace(r#""num_local_experts":8,"#, "")).unwrap_err().to_string();
        assert!(err.contains("missing field `num_local_experts`"), "{err}");
        let err = parse(&MIXTRAL_4X.replace(r#""num_local_experts":8"#, r#""num_local_experts":"x""#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`num_local_experts`"), "{err}");
        let err = parse(&MIXTRAL_4X.replace(r#""num_experts_per_tok":2"#, r#""num_experts_per_tok":9"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_experts_per_tok"), "{err}");
    }

    #[test]
    fn per_layer_counts() {
        let json =
            MIXTRAL_4X.replace("\"num_local_experts\":8", "\"num_local_experts\":8,\"num_experts_per_layer\":[6,3]");
        let c = parse(&json).unwrap();
        assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 6 }, LayerKind::Moe { num_experts: 3 }]);
        let bad =
            MIXTRAL_4X.replace("\"num_local_experts\":8", "\"num_local_experts\":8,\"num_experts_per_layer\":[6,1]");
        assert!(parse(&bad).unwrap_err().to_string().contains("num_experts_per_layer"));
    }

    const DEEPSEEK_V3_4X: &str = r#"{"model_type":"deepseek_v3","vocab_size":320,"hidden_size":64,
        "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":4,"intermediate_size":96,
        "moe_intermediate_size":32,"n_routed_experts":8,"n_shared_experts":1,"num_experts_per_tok":2,
        "n_group":2,"topk_group":1,"norm_topk_prob":true,"routed_scaling_factor":2.5,"first_k_dense_replace":1,
        "q_lora_rank":24,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":8,"v_head_dim":12,
        "topk_method":"noaux_tc","scoring_func":"sigmoid","max_position_embeddings":512,"rope_theta":5000.0,
        "rope_scaling":{"type":"yarn","factor":4.0,"original_max_position_embeddings":128,"beta_fast":32,
        "beta_slow":1,"mscale":1.0,"mscale_all_dim":0.7}}"#;

    #[test]
    fn deepseek_v3_4x_rope_scaling() {
        let c = parse(DEEPSEEK_V3_4X).unwrap();
        assert_eq!(c.architecture, Architecture::DeepseekV3);
        assert_eq!(
            c.layers,
            vec![LayerKind::Dense, LayerKind::Moe { num_experts: 8 }, LayerKind::Moe { num_experts: 8 }]
        );
        assert_eq!(c.attention.head_dim, 8);
        assert_eq!(c.attention.rope_theta, 5000.0);
        let RopeScaling::Yarn(y) = &c.attention.rope_scaling else { panic!("not yarn") };
        assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 128));
        let m = c.attention.mla.as_ref().unwrap();
        assert_eq!((m.q_lora_rank, m.kv_lora_rank, m.v_head_dim), (Some(24), 16, 12));
        assert!(m.rope_interleave);
        assert_eq!(c.moe.shared_expert_intermediate_size, Some(32));
        assert_eq!(c.moe.routing.scoring, Scoring::Sigmoid);
        assert_eq!(
            c.moe.routing.group_limit,
            Some(GroupLimit { n_group: 2, topk_group: 1, score: GroupScore::Top2Sum })
        );
        // softmax scale: 1/sqrt(24) · mscale(4, 0.7)²; cos/sin factor mscale(4, 1)/mscale(4, 0.7).
        let ms = 0.1 * 0.7 * 4f64.ln() + 1.0;
        assert!((c.attention.softmax_scale() - ms * ms / 24f64.sqrt()).abs() < 1e-12);
        assert!((y.attention_factor() - (0.1 * 4f64.ln() + 1.0) / ms).abs() < 1e-12);
    }

    #[test]
    fn deepseek_rope_parameters_5x_and_q_lora_null() {
        let json = DEEPSEEK_V3_4X.replace(r#""q_lora_rank":24"#, r#""q_lora_rank":null"#).replace(
            r#""rope_theta":5000.0,"#,
            r#""rope_parameters":{"rope_type":"yarn","rope_theta":777.0,"factor":2.0,"original_max_position_embeddings":64},"#,
        );
        let c = parse(&json).unwrap();
        assert_eq!(c.attention.mla.as_ref().unwrap().q_lora_rank, None);
        assert_eq!(c.attention.rope_theta, 777.0);
        assert!(matches!(&c.attention.rope_scaling, RopeScaling::Yarn(y) if y.factor == 2.0));
    }

    #[test]
    fn deepseek_v2_routing_and_errors() {
        let v2 = DEEPSEEK_V3_4X
            .replace("deepseek_v3", "deepseek_v2")
            .replace(r#""topk_method":"noaux_tc","scoring_func":"sigmoid""#, r#""topk_method":"group_limited_greedy""#)
            .replace(r#""n_group":2"#, r#""n_group":4"#)
            .replace(r#""topk_group":1"#, r#""topk_group":2"#);
        let c = parse(&v2).unwrap();
        assert_eq!(c.moe.routing.scoring, Scoring::Softmax);
        assert_eq!(c.moe.routing.group_limit.unwrap().score, GroupScore::Max);
        assert!(!c.moe.norm_topk_prob, "transformers' V2 router never renormalises");
        assert_eq!(c.moe.shared_expert_intermediate_size, Some(32));
        let greedy = v2.replace("group_limited_greedy", "greedy");
        assert_eq!(parse(&greedy).unwrap().moe.routing.group_limit, None);
        let err = parse(&v2.replace("group_limited_greedy", "noaux_tc")).unwrap_err().to_string();
        assert!(err.contains("topk_method") && err.contains("config.json"), "{err}");
        let err = parse(&v2.replace(r#""first_k_dense_replace":1"#, r#""first_k_dense_replace":1,"moe_layer_freq":2"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("moe_layer_freq"), "{err}");
        // V3: groups must split the experts and hold top_k experts.
        let err = parse(&DEEPSEEK_V3_4X.replace(r#""n_group":2"#, r#""n_group":3"#)).unwrap_err().to_string();
        assert!(err.contains("n_group"), "{err}");
        let err = parse(
            &DEEPSEEK_V3_4X
                .replace(r#""n_group":2"#, r#""n_group":8"#)
                .replace(r#""topk_group":1"#, r#""topk_group":4"#),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("at least 2"), "{err}");
        let err = parse(&DEEPSEEK_V3_4X.replace(r#""num_key_value_heads":4"#, r#""num_key_value_heads":2"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_key_value_heads") && err.contains("MLA"), "{err}");
        // Yarn stays refused for architectures that do not implement it.
        let err = parse(&MIXTRAL_4X.replace(
            r#""rope_theta":1000000.0"#,
            r#""rope_theta":1000000.0,"rope_scaling":{"type":"yarn","factor":4.0}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("yarn") && err.contains("rope_scaling"), "{err}");
    }

    /// `deepseek-ai/deepseek-moe-16b-base`'s config.json (transformers 4.x style, remote code).
    const DEEPSEEK_MOE_16B: &str = r#"{"architectures":["DeepseekForCausalLM"],"attention_bias":false,
        "attention_dropout":0.0,"auto_map":{"AutoConfig":"configuration_deepseek.DeepseekConfig",
        "AutoModel":"modeling_deepseek.DeepseekModel","AutoModelForCausalLM":"modeling_deepseek.DeepseekForCausalLM"},
        "aux_loss_alpha":0.001,"bos_token_id":100000,"eos_token_id":100001,"first_k_dense_replace":1,
        "hidden_act":"silu","hidden_size":2048,"initializer_range":0.02,"intermediate_size":10944,
        "max_position_embeddings":4096,"model_type":"deepseek","moe_intermediate_size":1408,"moe_layer_freq":1,
        "n_routed_experts":64,"n_shared_experts":2,"norm_topk_prob":false,"num_attention_heads":16,
        "num_experts_per_tok":6,"num_hidden_layers":28,"num_key_value_heads":16,"pretraining_tp":1,
        "rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":10000,"scoring_func":"softmax","seq_aux":true,
        "tie_word_embeddings":false,"torch_dtype":"bfloat16","transformers_version":"4.36.0","use_cache":true,
        "vocab_size":102400}"#;

    #[test]
    fn deepseek_moe_16b() {
        let c = parse(DEEPSEEK_MOE_16B).unwrap();
        assert_eq!(c.architecture, Architecture::Deepseek);
        assert!(c.architecture.is_deepseek() && !c.architecture.has_mla());
        assert_eq!((c.vocab_size, c.hidden_size, c.num_layers), (102_400, 2048, 28));
        assert_eq!(c.dense_intermediate_size, 10944);
        assert_eq!(c.layers.len(), 28);
        assert_eq!(c.layers[0], LayerKind::Dense);
        assert_eq!(c.moe_layers(), (1..28).collect::<Vec<_>>());
        assert_eq!(c.experts_in_layer(5), 64);
        let a = &c.attention;
        assert!(a.mla.is_none(), "DeepSeek-MoE has standard attention");
        assert_eq!((a.num_heads, a.num_kv_heads, a.head_dim), (16, 16, 128));
        assert!(!a.qkv_bias && !a.o_bias && a.qk_norm == QkNorm::None && a.sliding_window.is_none());
        assert_eq!((a.rope_theta, &a.rope_scaling), (10_000.0, &RopeScaling::None));
        assert_eq!(a.softmax_scale(), 1.0 / 128f64.sqrt());
        assert_eq!((c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings), (1e-6, 4096, false));
        let m = &c.moe;
        assert_eq!((m.num_experts, m.top_k, m.expert_intermediate_size), (64, 6, 1408));
        assert_eq!(m.shared_expert_intermediate_size, Some(2 * 1408));
        assert!(!m.norm_topk_prob && !m.router_bias && !m.expert_bias);
        assert_eq!(m.routing, RoutingConfig::softmax());
        assert_eq!(m.activation, ExpertActivation::Silu);
        // Absent keys take DeepSeek-MoE's `DeepseekConfig` defaults.
        let bare = DEEPSEEK_MOE_16B
            .replace(r#""rms_norm_eps":1e-06,"#, "")
            .replace(r#""rope_theta":10000,"#, "")
            .replace(r#""max_position_embeddings":4096,"#, "")
            .replace(r#""n_shared_experts":2,"#, "");
        let c = parse(&bare).unwrap();
        assert_eq!((c.rms_norm_eps, c.attention.rope_theta, c.max_position_embeddings), (1e-6, 10_000.0, 2048));
        assert_eq!(c.moe.shared_expert_intermediate_size, None);
    }

    #[test]
    fn deepseek_moe_layer_freq_gqa_and_renormalisation() {
        let tiny = DEEPSEEK_MOE_16B
            .replace(r#""num_hidden_layers":28"#, r#""num_hidden_layers":4"#)
            .replace(r#""moe_layer_freq":1"#, r#""moe_layer_freq":2"#);
        // Layer 0 dense (first_k_dense_replace), 1 and 3 dense (odd), 2 MoE.
        let c = parse(&tiny).unwrap();
        assert_eq!(
            c.layers,
            vec![LayerKind::Dense, LayerKind::Dense, LayerKind::Moe { num_experts: 64 }, LayerKind::Dense]
        );
        let c = parse(&tiny.replace(r#""first_k_dense_replace":1"#, r#""first_k_dense_replace":0"#)).unwrap();
        assert_eq!(c.moe_layers(), vec![0, 2]);
        let err = parse(&tiny.replace(r#""moe_layer_freq":2"#, r#""moe_layer_freq":0"#)).unwrap_err().to_string();
        assert!(err.contains("moe_layer_freq") && err.contains("positive"), "{err}");
        // GQA is honoured (Llama attention with `repeat_kv`), unlike MLA.
        let c = parse(&DEEPSEEK_MOE_16B.replace(r#""num_key_value_heads":16"#, r#""num_key_value_heads":4"#)).unwrap();
        assert_eq!((c.attention.num_heads, c.attention.num_kv_heads), (16, 4));
        // norm_topk_prob renormalises only when top_k > 1.
        let norm = DEEPSEEK_MOE_16B.replace(r#""norm_topk_prob":false"#, r#""norm_topk_prob":true"#);
        assert!(parse(&norm).unwrap().moe.norm_topk_prob);
        let top1 = norm.replace(r#""num_experts_per_tok":6"#, r#""num_experts_per_tok":1"#);
        assert!(!parse(&top1).unwrap().moe.norm_topk_prob);
        let c = parse(&DEEPSEEK_MOE_16B.replace(r#""attention_bias":false"#, r#""attention_bias":true"#)).unwrap();
        assert!(c.attention.qkv_bias && c.attention.o_bias);
    }

    #[test]
    fn deepseek_moe_errors_and_rope_scaling() {
        let err = parse(&DEEPSEEK_MOE_16B.replace(r#""scoring_func":"softmax""#, r#""scoring_func":"sigmoid""#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("scoring_func") && err.contains("sigmoid") && err.contains("softmax"), "{err}");
        assert!(err.contains("config.json"), "{err}");
        let err = parse(&DEEPSEEK_MOE_16B.replace(r#""n_routed_experts":64,"#, "")).unwrap_err().to_string();
        assert!(err.contains("missing field `n_routed_experts`"), "{err}");
        let linear =
            DEEPSEEK_MOE_16B.replace(r#""rope_scaling":null"#, r#""rope_scaling":{"type":"linear","factor":4.0}"#);
        assert_eq!(parse(&linear).unwrap().attention.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        let err = parse(&linear.replace("linear", "dynamic")).unwrap_err().to_string();
        assert!(err.contains("rope_scaling") && err.contains("dynamic") && err.contains("linear"), "{err}");
        let err = parse(&linear.replace("linear", "yarn")).unwrap_err().to_string();
        assert!(err.contains("rope_scaling") && err.contains("yarn"), "{err}");
        // Linear scaling stays refused where it is not implemented.
        let err = parse(&MIXTRAL_4X.replace(
            r#""rope_theta":1000000.0"#,
            r#""rope_theta":1000000.0,"rope_scaling":{"type":"linear","factor":4.0}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("linear") && err.contains("rope_scaling"), "{err}");
        // `moe_layer_freq` stays refused for DeepSeek-V2 (transformers ignores it).
        let v2 = DEEPSEEK_V3_4X.replace("deepseek_v3", "deepseek_v2").replace(
            r#""topk_method":"noaux_tc","scoring_func":"sigmoid""#,
            r#""topk_method":"greedy","moe_layer_freq":2"#,
        );
        assert!(parse(&v2).unwrap_err().to_string().contains("moe_layer_freq"));
    }

    const GPT_OSS: &str = r#"{"model_type":"gpt_oss","vocab_size":320,"hidden_size":64,"num_hidden_layers":3,
        "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"intermediate_size":16,
        "num_local_experts":8,"num_experts_per_tok":2,"sliding_window":6,"swiglu_limit":2.0,
        "layer_types":["sliding_attention","full_attention","sliding_attention"],
        "rope_parameters":{"rope_type":"yarn","rope_theta":5000.0,"factor":4.0,
        "original_max_position_embeddings":128,"beta_fast":32.0,"beta_slow":1.0,"truncate":false}}"#;

    #[test]
    fn gpt_oss_config() {
        let c = parse(GPT_OSS).unwrap();
        assert_eq!(c.architecture, Architecture::GptOss);
        assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 8 }; 3]);
        assert!(c.attention.qkv_bias && c.attention.o_bias && c.attention.sinks);
        assert_eq!(c.attention.sliding_window, Some(6));
        assert_eq!(c.attention.sliding_layers, Some(vec![true, false, true]));
        assert_eq!(c.moe.activation, ExpertActivation::ClampedSwiglu { alpha: 1.702, limit: 2.0 });
        assert!(c.moe.router_bias && c.moe.expert_bias && c.moe.norm_topk_prob);
        assert_eq!(c.moe.expert_intermediate_size, 16);
        assert_eq!(c.rms_norm_eps, 1e-5);
        let RopeScaling::Yarn(y) = &c.attention.rope_scaling else { panic!("not yarn") };
        assert!(!y.truncate && y.factor == 4.0);
        assert_eq!(c.attention.softmax_scale(), 0.25);
        // transformers' defaults: alternating layer types, yarn factor 32 over 4096, θ 150000.
        let d = GPT_OSS
            .replace(r#""layer_types":["sliding_attention","full_attention","sliding_attention"],"#, "")
            .replace(r#""swiglu_limit":2.0,"#, "");
        let d = &d[..d.find(r#""rope_parameters""#).unwrap()];
        let c = parse(&format!("{}\"rms_norm_eps\":1e-5}}", d)).unwrap();
        assert_eq!(c.attention.sliding_layers, Some(vec![true, false, true]));
        assert_eq!(c.moe.activation, ExpertActivation::ClampedSwiglu { alpha: 1.702, limit: 7.0 });
        assert_eq!(c.attention.rope_theta, 150_000.0);
        let RopeScaling::Yarn(y) = &c.attention.rope_scaling else { panic!("not yarn") };
        assert_eq!((y.factor, y.original_max_position_embeddings, y.truncate), (32.0, 4096, false));
        // Without a window every layer attends fully.
        let c = parse(&GPT_OSS.replace(r#""sliding_window":6"#, r#""sliding_window":null"#)).unwrap();
        assert_eq!(c.attention.sliding_layers, Some(vec![false; 3]));
    }

    #[test]
    fn gpt_oss_bad_fields_are_named() {
        let err = parse(&GPT_OSS.replace("full_attention", "chunked_attention")).unwrap_err().to_string();
        assert!(err.contains("layer_types") && err.contains("entry 1") && err.contains("config.json"), "{err}");
        let err = parse(&GPT_OSS.replace(r#","sliding_attention"]"#, "]")).unwrap_err().to_string();
        assert!(err.contains("layer_types") && err.contains("2 entries for 3 layers"), "{err}");
        let err = parse(&GPT_OSS.replace(r#""swiglu_limit":2.0"#, r#""swiglu_limit":-1"#)).unwrap_err().to_string();
        assert!(err.contains("swiglu_limit"), "{err}");
        let err = parse(&GPT_OSS.replace(r#""num_local_experts":8,"#, "")).unwrap_err().to_string();
        assert!(err.contains("missing field `num_local_experts`"), "{err}");
    }
}
