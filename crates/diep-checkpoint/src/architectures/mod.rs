//! Per-architecture facts, one file per `model_type`: config keys and their defaults, which
//! layers are MoE, attention options, routing, the expert-count keys that checkpoint surgery
//! rewrites, and tensor names exactly as on disk.
//!
//! They live in this framework-free crate so that the config parser, the model crate and
//! checkpoint surgery read the same facts.
//!
//! All architectures share the decoder skeleton (`model.embed_tokens`, `model.layers.{i}` with
//! `input_layernorm`, `post_attention_layernorm`, `model.norm`, `lm_head`); Mixtral, Qwen and
//! OLMoE, gpt-oss and DeepSeek-MoE use `self_attn.{q,k,v,o}_proj`, DeepSeek-V2/V3 multi-head latent attention
//! ([`MlaKeys`]). They differ in where the MoE block lives, what its expert projections are
//! called, and what sits beside the experts (shared experts, a router correction bias), which
//! is what [`MoeKeys`] records.
//!
//! Each file exports `MODEL_TYPE`, `EXPERT_COUNT_KEYS` and `MOE_KEYS`, and implements the
//! crate-internal `ArchSpec` trait (the config hooks) on a unit `Spec`. The `registry!` list
//! below is the only place that names every architecture: it defines [`Architecture`],
//! [`SUPPORTED_MODEL_TYPES`] and the dispatch to each `Spec`.

pub mod deepseek;
mod deepseek_family;
pub mod deepseek_v2;
pub mod deepseek_v3;
pub mod ernie4_5_moe;
pub mod glm4_moe;
pub mod gpt_oss;
pub mod llama4_text;
pub mod minimax_m2;
pub mod mixtral;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod qwen3_next;
mod spec;

pub(crate) use spec::{ArchSpec, RopeAllowed};

/// Defines [`Architecture`] (one variant per entry, in this order), `SUPPORTED_MODEL_TYPES`
/// and the variant → `Spec` dispatch from one list of `Variant => module` entries.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident => $module:ident,)+) => {
        /// A supported decoder architecture, named as in `config.json`'s `model_type`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Architecture {
            $($(#[$doc])* $variant,)+
        }

        /// The `model_type` values this toolkit implements.
        pub const SUPPORTED_MODEL_TYPES: &[&str] = &[$($module::MODEL_TYPE,)+];

        /// Every architecture, in the order of [`SUPPORTED_MODEL_TYPES`].
        const ALL: &[Architecture] = &[$(Architecture::$variant,)+];

        impl Architecture {
            /// The architecture's config rules and tensor names.
            pub(crate) fn spec(self) -> &'static dyn ArchSpec {
                match self {
                    $(Architecture::$variant => &$module::Spec,)+
                }
            }
        }
    };
}

registry! {
    /// `mixtral`: Mixtral / Mistral-MoE.
    Mixtral => mixtral,
    /// `qwen2_moe`: Qwen1.5-MoE and Qwen2-MoE (shared expert with a sigmoid gate).
    Qwen2Moe => qwen2_moe,
    /// `qwen3_moe`: Qwen3-MoE (per-head qk-norm).
    Qwen3Moe => qwen3_moe,
    /// `olmoe`: OLMoE (qk-norm over the whole projection, `clip_qkv`).
    Olmoe => olmoe,
    /// `deepseek_v3`: DeepSeek-V3 / R1 (MLA, sigmoid routing with a correction bias and
    /// group-limited selection, shared experts, leading dense layers).
    DeepseekV3 => deepseek_v3,
    /// `deepseek_v2`: DeepSeek-V2 / V2-Lite (MLA, softmax routing, greedy or group-limited,
    /// shared experts, leading dense layers).
    DeepseekV2 => deepseek_v2,
    /// `deepseek`: DeepSeek-MoE 16B (remote code `modeling_deepseek.py`: standard multi-head
    /// attention with rotate-half RoPE, softmax greedy routing, shared experts, dense layers
    /// from `first_k_dense_replace` and `moe_layer_freq`).
    Deepseek => deepseek,
    /// `gpt_oss`: gpt-oss (router bias, fused experts with biases and a clamped SwiGLU,
    /// attention sinks, alternating sliding/full attention, yarn RoPE).
    GptOss => gpt_oss,
    /// `glm4_moe`: GLM-4.5 / 4.6 (DeepSeek-V3 routing, GQA with q/k/v biases, per-head qk-norm,
    /// partial RoPE, shared experts, leading dense layers).
    Glm4Moe => glm4_moe,
    /// `minimax_m2`: MiniMax-M2 (sigmoid routing with a block-level selection bias, qk-norm
    /// over the whole projection, partial RoPE).
    MinimaxM2 => minimax_m2,
    /// `ernie4_5_moe`: ERNIE-4.5 MoE (softmax routing with a `moe_statics` selection bias and a
    /// floored renormalisation, shared experts, interleaved RoPE, interval MoE layers).
    Ernie45Moe => ernie4_5_moe,
    /// `llama4_text`: Llama 4's text model (fused experts weighted on their input, a shared
    /// expert, NoPE and chunked-attention layers, L2 qk-norm, temperature tuning, llama3 RoPE).
    Llama4Text => llama4_text,
    /// `qwen3_next`: Qwen3-Next (hybrid Gated DeltaNet / gated full attention layers, partial
    /// RoPE, zero-centred norms, Qwen2-MoE routing with a gated shared expert).
    Qwen3Next => qwen3_next,
}

impl Architecture {
    /// The `model_type` string of this architecture.
    pub fn model_type(self) -> &'static str {
        self.spec().model_type()
    }

    /// Parses a `model_type` string.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        ALL.iter().copied().find(|a| a.model_type() == model_type)
    }

    /// The DeepSeek family (DeepSeek-MoE, V2, V3): ungated shared experts, `n_routed_experts`,
    /// dense layers before `first_k_dense_replace`, and no stock loader for per-layer expert
    /// counts. Only V2/V3 use multi-head latent attention ([`Architecture::has_mla`]).
    pub fn is_deepseek(self) -> bool {
        self.spec().is_deepseek()
    }

    /// DeepSeek-V2/V3: multi-head latent attention (DeepSeek-MoE has standard attention).
    pub fn has_mla(self) -> bool {
        self.spec().has_mla()
    }

    /// The `config.json` key(s) holding the routed-expert count, canonical first. Qwen3-MoE
    /// has two: transformers 4.x reads `num_experts`, 5.x writes `num_local_experts`;
    /// checkpoint surgery writes all of them.
    pub fn expert_count_keys(self) -> &'static [&'static str] {
        self.spec().expert_count_keys()
    }
}

/// On-disk names of an architecture's MoE block, relative to `model.layers.{i}.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeKeys {
    /// The block's module name (`block_sparse_moe` for Mixtral, `mlp` elsewhere).
    pub block: &'static str,
    /// The module name of the dense MLP of non-MoE layers (`mlp`; Llama 4: `feed_forward`).
    pub dense_block: &'static str,
    /// The router's module name inside the block (`gate`).
    pub router: &'static str,
    /// Expert gate projection (`w1` / `gate_proj`), `[intermediate, hidden]`.
    pub expert_gate: &'static str,
    /// Expert up projection (`w3` / `up_proj`), `[intermediate, hidden]`.
    pub expert_up: &'static str,
    /// Expert down projection (`w2` / `down_proj`), `[hidden, intermediate]`.
    pub expert_down: &'static str,
    /// Shared expert module and its sigmoid gate (Qwen2-MoE), if the architecture has one.
    pub shared_expert: Option<(&'static str, &'static str)>,
    /// Ungated shared experts module (DeepSeek's `shared_experts`, `n_shared_experts` experts
    /// fused into one MLP), if the architecture has one.
    pub shared_experts: Option<&'static str>,
    /// A per-expert f32 vector added to the scores for selection only, named relative to the
    /// block: `gate.e_score_correction_bias [E]` (DeepSeek-V3, GLM-4.5),
    /// `e_score_correction_bias [E]` (MiniMax-M2), `moe_statics.e_score_correction_bias
    /// [1, E]` (ERNIE-4.5).
    pub router_correction_bias: Option<&'static str>,
    /// The router's additive bias `[E]` (gpt-oss's `router.bias`), part of the logits.
    pub router_bias: Option<&'static str>,
    /// Experts stored fused, one `[E, ...]` tensor per kind (gpt-oss), instead of
    /// `experts.{e}.*` per expert.
    pub fused_experts: Option<FusedExpertKeys>,
}

/// Names of fused expert tensors (`[E, ...]`, one per kind), relative to `{block}.experts.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedExpertKeys {
    /// Gate and up projections, `[E, H, 2I]`.
    pub gate_up: &'static str,
    /// Their biases `[E, 2I]`, laid out as the weight's columns (gpt-oss).
    pub gate_up_bias: Option<&'static str>,
    /// Down projection `[E, I, H]`.
    pub down: &'static str,
    /// Its bias `[E, H]` (gpt-oss).
    pub down_bias: Option<&'static str>,
    /// Gate and up columns interleaved (gate = even, up = odd: gpt-oss); otherwise the gate
    /// columns come first, then the up columns (Llama 4).
    pub interleaved: bool,
}

impl FusedExpertKeys {
    /// The tensor kinds present, weights first: `(name, is_weight)`.
    pub fn kinds(&self) -> Vec<(&'static str, bool)> {
        let mut out = vec![(self.gate_up, true), (self.down, true)];
        out.extend(self.gate_up_bias.map(|b| (b, false)));
        out.extend(self.down_bias.map(|b| (b, false)));
        out
    }
}

impl MoeKeys {
    /// The keys of an architecture.
    pub fn of(arch: Architecture) -> MoeKeys {
        arch.spec().moe_keys()
    }

    /// `model.layers.{layer}.{block}`.
    pub fn block_prefix(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.block)
    }

    /// The router weight's name, `[experts, hidden]`.
    pub fn router_weight(&self, layer: usize) -> String {
        format!("{}.{}.weight", self.block_prefix(layer), self.router)
    }

    /// The router's correction-bias name (`[experts]`), if the architecture has one.
    pub fn router_correction_bias(&self, layer: usize) -> Option<String> {
        self.router_correction_bias.map(|b| format!("{}.{b}", self.block_prefix(layer)))
    }

    /// The router's additive bias name (`[experts]`), if the architecture has one.
    pub fn router_bias(&self, layer: usize) -> Option<String> {
        self.router_bias.map(|b| format!("{}.{}.{b}", self.block_prefix(layer), self.router))
    }

    /// The fused expert tensors' full names (gate_up, down, then the biases the architecture
    /// has), if it stores its experts fused.
    pub fn fused_expert_tensors(&self, layer: usize) -> Option<Vec<String>> {
        let f = self.fused_experts?;
        let p = format!("{}.experts", self.block_prefix(layer));
        Some(f.kinds().into_iter().map(|(n, _)| format!("{p}.{n}")).collect())
    }

    /// The names of expert `e`'s gate, up and down weights.
    pub fn expert_weights(&self, layer: usize, e: usize) -> [String; 3] {
        let p = format!("{}.experts.{e}", self.block_prefix(layer));
        [
            format!("{p}.{}.weight", self.expert_gate),
            format!("{p}.{}.weight", self.expert_up),
            format!("{p}.{}.weight", self.expert_down),
        ]
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3) module names, relative to
/// `model.layers.{i}.self_attn.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaKeys {
    /// Uncompressed query projection `[heads·(nope+rope), H]` (when `q_lora_rank` is null).
    pub q_proj: &'static str,
    /// Query down-projection `[q_lora_rank, H]`.
    pub q_a_proj: &'static str,
    /// RMSNorm over the compressed query `[q_lora_rank]`.
    pub q_a_layernorm: &'static str,
    /// Query up-projection `[heads·(nope+rope), q_lora_rank]`.
    pub q_b_proj: &'static str,
    /// Key/value down-projection plus the shared rotary key `[kv_lora_rank + rope, H]`.
    pub kv_a_proj_with_mqa: &'static str,
    /// RMSNorm over the compressed key/value `[kv_lora_rank]`.
    pub kv_a_layernorm: &'static str,
    /// Key/value up-projection `[heads·(nope+v), kv_lora_rank]`.
    pub kv_b_proj: &'static str,
    /// Output projection `[H, heads·v]`.
    pub o_proj: &'static str,
}

/// Dense-MLP names relative to `model.layers.{i}.mlp.` (Qwen's non-MoE layers, shared experts).
pub const DENSE_MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// Where a tensor name points inside an MoE block, as recognised by [`MoeKeys::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoeTensor<'a> {
    /// A routed expert's tensor: layer, expert id, and the rest of the name after
    /// `experts.{e}.` (e.g. `w1.weight`).
    Expert {
        /// Decoder layer.
        layer: usize,
        /// Expert id as on disk.
        expert: usize,
        /// The name after `experts.{e}.`.
        rest: &'a str,
    },
    /// The router's weight (`[experts, hidden]`, one row per expert), its bias (`[experts]`), or
    /// the selection bias ([`MoeKeys::router_correction_bias`]; `[experts]` or `[1, experts]`).
    Router {
        /// Decoder layer.
        layer: usize,
    },
    /// A fused expert tensor holding every expert of a layer along its first axis
    /// (gpt-oss's `experts.gate_up_proj`, `..._bias`, and the MXFP4 `_blocks` / `_scales`).
    FusedExperts {
        /// Decoder layer.
        layer: usize,
        /// The name after `experts.` (e.g. `down_proj_bias`, `gate_up_proj_blocks`).
        rest: &'a str,
    },
}

impl MoeKeys {
    /// Recognises the per-expert tensors of an MoE block by name; `None` for every other
    /// tensor (attention, norms, shared experts, dense MLPs, embeddings).
    pub fn parse<'a>(&self, name: &'a str) -> Option<MoeTensor<'a>> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let rest = rest.strip_prefix(self.block)?.strip_prefix('.')?;
        if let Some(e) = rest.strip_prefix("experts.") {
            if let Some(f) = self.fused_experts {
                let base = e.strip_suffix(gpt_oss::MXFP4_BLOCKS).or_else(|| e.strip_suffix(gpt_oss::MXFP4_SCALES));
                let base = base.unwrap_or(e);
                if f.kinds().iter().any(|(k, _)| *k == base) {
                    return Some(MoeTensor::FusedExperts { layer, rest: e });
                }
                return None;
            }
            let (expert, rest) = e.split_once('.')?;
            return Some(MoeTensor::Expert { layer, expert: expert.parse().ok()?, rest });
        }
        if self.router_correction_bias == Some(rest) {
            return Some(MoeTensor::Router { layer });
        }
        let attr = rest.strip_prefix(self.router)?.strip_prefix('.')?;
        if attr == "weight" || self.router_bias == Some(attr) {
            return Some(MoeTensor::Router { layer });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_consistent() {
        assert_eq!(ALL.len(), SUPPORTED_MODEL_TYPES.len());
        for (&a, &t) in ALL.iter().zip(SUPPORTED_MODEL_TYPES) {
            assert_eq!(a.model_type(), t);
            assert_eq!(Architecture::from_model_type(t), Some(a));
            assert!(!a.expert_count_keys().is_empty(), "{t}");
        }
        assert_eq!(Architecture::from_model_type("llama"), None);
    }

    #[test]
    fn parses_expert_and_router_names() {
        let k = MoeKeys::of(Architecture::Mixtral);
        assert_eq!(
            k.parse("model.layers.12.block_sparse_moe.experts.7.w2.weight"),
            Some(MoeTensor::Expert { layer: 12, expert: 7, rest: "w2.weight" })
        );
        assert_eq!(k.parse("model.layers.3.block_sparse_moe.gate.weight"), Some(MoeTensor::Router { layer: 3 }));
        assert_eq!(k.parse("model.layers.3.self_attn.q_proj.weight"), None);
        let q = MoeKeys::of(Architecture::Qwen2Moe);
        assert_eq!(q.parse("model.layers.0.mlp.shared_expert.gate_proj.weight"), None);
        assert_eq!(q.parse("model.layers.0.mlp.shared_expert_gate.weight"), None);
        assert_eq!(q.parse("model.layers.0.mlp.gate_proj.weight"), None);
        assert_eq!(q.parse("model.layers.0.mlp.gate.weight"), Some(MoeTensor::Router { layer: 0 }));
        for (e, name) in k.expert_weights(2, 5).iter().enumerate() {
            assert!(matches!(k.parse(name), Some(MoeTensor::Expert { layer: 2, expert: 5, .. })), "{e}");
        }
        assert_eq!(k.parse(&k.router_weight(4)), Some(MoeTensor::Router { layer: 4 }));
        assert_eq!(k.parse("model.layers.3.block_sparse_moe.gate.bias"), None);
    }

    #[test]
    fn parses_gpt_oss_fused_names() {
        let k = MoeKeys::of(Architecture::GptOss);
        assert_eq!(k.parse("model.layers.1.mlp.router.weight"), Some(MoeTensor::Router { layer: 1 }));
        assert_eq!(k.parse("model.layers.1.mlp.router.bias"), Some(MoeTensor::Router { layer: 1 }));
        for n in k.fused_expert_tensors(2).unwrap() {
            let rest = n.rsplit_once("experts.").unwrap().1.to_string();
            assert_eq!(k.parse(&n), Some(MoeTensor::FusedExperts { layer: 2, rest: &rest }));
        }
        assert_eq!(
            k.parse("model.layers.0.mlp.experts.gate_up_proj_blocks"),
            Some(MoeTensor::FusedExperts { layer: 0, rest: "gate_up_proj_blocks" })
        );
        assert_eq!(
            k.parse("model.layers.0.mlp.experts.down_proj_scales"),
            Some(MoeTensor::FusedExperts { layer: 0, rest: "down_proj_scales" })
        );
        assert_eq!(k.parse("model.layers.0.mlp.experts.other"), None);
        assert_eq!(k.parse("model.layers.0.self_attn.sinks"), None);
    }
}
