//! `config.json` as written by transformers 4.x and 5.x, normalised.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{CheckpointError, Result};

/// The `model_type` values this toolkit implements.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"];

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
}

impl Architecture {
    /// The `model_type` string of this architecture.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Mixtral => "mixtral",
            Architecture::Qwen2Moe => "qwen2_moe",
            Architecture::Qwen3Moe => "qwen3_moe",
            Architecture::Olmoe => "olmoe",
        }
    }

    /// Parses a `model_type` string.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "mixtral" => Some(Architecture::Mixtral),
            "qwen2_moe" => Some(Architecture::Qwen2Moe),
            "qwen3_moe" => Some(Architecture::Qwen3Moe),
            "olmoe" => Some(Architecture::Olmoe),
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
    /// Hidden width of the shared expert (Qwen2-MoE), if any.
    pub shared_expert_intermediate_size: Option<usize>,
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
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(f.invalid(
                        "num_attention_heads",
                        format!("{num_heads} does not divide hidden_size = {hidden_size} and no head_dim is given"),
                    ));
                }
                hidden_size / num_heads
            }
        };

        // transformers' per-architecture defaults, used only when a key is absent.
        let (default_eps, default_theta) = match architecture {
            Architecture::Mixtral => (1e-5, 1e6),
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => (1e-6, 10_000.0),
            Architecture::Olmoe => (1e-5, 10_000.0),
        };
        let rms_norm_eps = f.opt_f64("rms_norm_eps")?.unwrap_or(default_eps);
        let rope_theta = rope_theta(&f, default_theta)?;
        let tie_word_embeddings = f.opt_bool("tie_word_embeddings")?.unwrap_or(false);
        let max_position_embeddings = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);

        let (qkv_bias, o_bias) = match architecture {
            Architecture::Mixtral => (false, false),
            // 4.x hard-codes q/k/v biases; 5.x exposes them as `qkv_bias` (default true).
            Architecture::Qwen2Moe => (f.opt_bool("qkv_bias")?.unwrap_or(true), false),
            Architecture::Qwen3Moe | Architecture::Olmoe => {
                let b = f.opt_bool("attention_bias")?.unwrap_or(false);
                (b, b)
            }
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
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
                if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    return Err(f.invalid(
                        "use_sliding_window",
                        "sliding-window attention is not supported for Qwen MoE models".into(),
                    ));
                }
                None
            }
            Architecture::Olmoe => None,
        };
        if sliding_window == Some(0) {
            return Err(f.invalid("sliding_window", "must be positive".into()));
        }

        let num_experts = match architecture {
            Architecture::Mixtral => f.req_usize("num_local_experts")?,
            Architecture::Qwen2Moe | Architecture::Olmoe => f.req_usize("num_experts")?,
            // 4.x writes `num_experts`, 5.x `num_local_experts`.
            Architecture::Qwen3Moe => match f.opt_usize("num_experts")? {
                Some(n) => n,
                None => f.opt_usize("num_local_experts")?.ok_or_else(|| f.missing("num_experts"))?,
            },
        };
        let top_k = f.req_usize("num_experts_per_tok")?;
        let intermediate_size = f.req_usize("intermediate_size")?;
        let expert_intermediate_size = match architecture {
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => f.req_usize("moe_intermediate_size")?,
            _ => intermediate_size,
        };
        let norm_topk_prob = match architecture {
            // Mixtral always renormalises the top-k weights.
            Architecture::Mixtral => true,
            _ => f.opt_bool("norm_topk_prob")?.unwrap_or(false),
        };
        let shared_expert_intermediate_size = match architecture {
            Architecture::Qwen2Moe => match f.opt_usize("shared_expert_intermediate_size")? {
                Some(0) | None => None,
                Some(n) => Some(n),
            },
            _ => None,
        };

        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let is_moe = match architecture {
                Architecture::Mixtral | Architecture::Olmoe => true,
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
            },
            moe: MoeConfig {
                num_experts,
                top_k,
                expert_intermediate_size,
                norm_topk_prob,
                shared_expert_intermediate_size,
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

fn rope_theta(f: &Fields<'_>, default: f64) -> Result<f64> {
    // transformers 5.x: `rope_parameters: {"rope_type": "default", "rope_theta": θ}`.
    if let Some(params) = f.map.get("rope_parameters").filter(|v| !v.is_null()) {
        let Value::Object(params) = params else {
            return Err(f.invalid("rope_parameters", "must be an object".into()));
        };
        check_rope_type(f, "rope_parameters.rope_type", params)?;
        if let Some(theta) = params.get("rope_theta") {
            return theta.as_f64().ok_or_else(|| f.invalid("rope_parameters.rope_theta", "must be a number".into()));
        }
    }
    // transformers 4.x: `rope_theta` and an optional `rope_scaling`.
    if let Some(Value::Object(scaling)) = f.map.get("rope_scaling") {
        check_rope_type(f, "rope_scaling.rope_type", scaling)?;
    }
    Ok(f.opt_f64("rope_theta")?.unwrap_or(default))
}

fn check_rope_type(f: &Fields<'_>, field: &str, params: &Map<String, Value>) -> Result<()> {
    let ty = params.get("rope_type").or_else(|| params.get("type")).and_then(Value::as_str).unwrap_or("default");
    if ty != "default" {
        return Err(f.invalid(field, format!("RoPE type `{ty}` is not supported (only `default`)")));
    }
    Ok(())
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
}
