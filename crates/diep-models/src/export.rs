//! The weights of a loaded model as plain host buffers, per layer and named after the modules
//! they come from: what another inference engine (`diep-infer`'s fused CPU engine) builds
//! from, instead of reaching into the burn model.
//!
//! The enums are exhaustive on purpose: an engine that builds from them must handle every kind
//! of layer the model has, and fails to compile when a new one appears. The structs are
//! `#[non_exhaustive]`: read their fields, do not build them.
//!
//! Buffers are row-major `f32` in the layout the burn model computes with: projections `[in,
//! out]` (`y = x·W + b`), gated MLPs with the gate and up projections fused column-wise (gate
//! columns first), gpt-oss's MXFP4 experts decoded. Per-layer decisions the burn model makes
//! at load time come along (the span of [`crate::kernels::layer_span`], the expert
//! mask, the routing rule), so an engine only adds its own arithmetic, for which
//! [`crate::kernels`] has the row functions.
//!
//! [`MoeModel::into_weights`] converts a loaded model one layer at a time (each layer's burn
//! tensors are dropped as it is converted); [`StreamingModel::head_weights`] and
//! [`StreamingModel::layer_weights`] read one part at a time from disk.

use burn::tensor::Tensor;
use diep_checkpoint::{ExpertActivation, ModelConfig};

use crate::attention::{MlaQuery, SelfAttention};
use crate::error::Result;
use crate::model::{DecoderLayer, FeedForward, MoeModel, StreamingModel};
use crate::moe::{MoeBlock, RoutingRule, SharedExpert};
use crate::nn::{Linear, RmsNorm, SwiGlu};

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 data")
}

/// A linear layer `y = x·W (+ b)`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DenseWeights {
    /// `W`, row-major `[inp, out]`.
    pub weight: Vec<f32>,
    /// `b`, `[out]`.
    pub bias: Option<Vec<f32>>,
    /// Input width.
    pub inp: usize,
    /// Output width.
    pub out: usize,
}

impl DenseWeights {
    /// A dense layer from its row-major `[inp, out]` weight and optional bias.
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, inp: usize, out: usize) -> Self {
        assert_eq!(weight.len(), inp * out, "DenseWeights::new: weight length");
        DenseWeights { weight, bias, inp, out }
    }

    fn from(l: Linear) -> Self {
        let [inp, out] = l.weight.dims();
        DenseWeights { weight: host(l.weight), bias: l.bias.map(host), inp, out }
    }
}

/// An RMSNorm.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NormWeights {
    /// The weight (one head's width for a per-head qk-norm).
    pub weight: Vec<f32>,
    /// Epsilon inside the square root.
    pub eps: f32,
}

impl NormWeights {
    fn from(n: RmsNorm) -> Self {
        NormWeights { weight: host(n.weight), eps: n.eps as f32 }
    }
}

/// A gated MLP `down(act(gate·x, up·x))`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MlpWeights {
    /// Gate and up fused: `[hidden, 2·intermediate]`, gate columns first.
    pub gate_up: DenseWeights,
    /// `[intermediate, hidden]`.
    pub down: DenseWeights,
}

impl MlpWeights {
    fn from(m: SwiGlu) -> Self {
        MlpWeights { gate_up: DenseWeights::from(m.gate_up), down: DenseWeights::from(m.down) }
    }
}

/// Standard attention (`self_attn`): GQA with RoPE, optional qk-norm and sinks. Heads, head
/// width, `qk_norm`, `clip_qkv` and RoPE come from the model's `AttentionConfig`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StandardAttentionWeights {
    /// `q_proj`.
    pub q_proj: DenseWeights,
    /// `k_proj`.
    pub k_proj: DenseWeights,
    /// `v_proj`.
    pub v_proj: DenseWeights,
    /// `o_proj`.
    pub o_proj: DenseWeights,
    /// `q_norm` (per head or over the whole projection).
    pub q_norm: Option<NormWeights>,
    /// `k_norm`.
    pub k_norm: Option<NormWeights>,
    /// Per-head sink logits `[heads]` (gpt-oss).
    pub sinks: Option<Vec<f32>>,
    /// What the layer attends to (plain causal, sliding window, or Llama 4's chunks).
    pub span: crate::kernels::Span,
    /// The layer applies RoPE (false: a Llama 4 NoPE layer).
    pub rope: bool,
}

/// How a latent-attention layer computes its queries.
#[derive(Debug, Clone)]
pub enum MlaQueryWeights {
    /// `q_proj`.
    Direct(DenseWeights),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank {
        /// `q_a_proj`.
        a: DenseWeights,
        /// `q_a_layernorm`.
        norm: NormWeights,
        /// `q_b_proj`.
        b: DenseWeights,
    },
}

/// DeepSeek-V2/V3's multi-head latent attention. Its dimensions and RoPE come from the model's
/// `AttentionConfig` (`mla`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LatentAttentionWeights {
    /// The query projection(s).
    pub q: MlaQueryWeights,
    /// `kv_a_proj_with_mqa`: `[hidden, kv_lora_rank + qk_rope_head_dim]`.
    pub kv_a: DenseWeights,
    /// `kv_a_layernorm` over the latent.
    pub kv_norm: NormWeights,
    /// `kv_b_proj`: `[kv_lora_rank, heads·(qk_nope_head_dim + v_head_dim)]`.
    pub kv_b: DenseWeights,
    /// `o_proj`.
    pub o_proj: DenseWeights,
    /// What the layer attends to (plain causal or sliding window).
    pub span: crate::kernels::Span,
}

/// A decoder layer's attention.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer
pub enum AttentionWeights {
    /// Mixtral, Qwen, OLMoE, DeepSeek-MoE, gpt-oss.
    Standard(StandardAttentionWeights),
    /// DeepSeek-V2/V3.
    Latent(LatentAttentionWeights),
    /// Qwen3-Next's Gated DeltaNet.
    Linear(LinearAttentionWeights),
}

/// Qwen3-Next's Gated DeltaNet layer (see `diep_models`' `deltanet` module for the math).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinearAttentionWeights {
    /// `in_proj_qkvz` `[hidden, nk·(2dk + 2r·dv)]`.
    pub in_proj_qkvz: DenseWeights,
    /// `in_proj_ba` `[hidden, 2nv]`.
    pub in_proj_ba: DenseWeights,
    /// The causal depthwise filters, row-major `[channels, kernel]`.
    pub conv: Vec<f32>,
    /// `A_log [nv]`.
    pub a_log: Vec<f32>,
    /// `dt_bias [nv]`.
    pub dt_bias: Vec<f32>,
    /// The gated norm's weight `[dv]` (not zero-centred).
    pub norm: Vec<f32>,
    /// Its epsilon.
    pub norm_eps: f32,
    /// `out_proj` `[nv·dv, hidden]`.
    pub out_proj: DenseWeights,
    /// Heads and widths.
    pub cfg: diep_checkpoint::LinearAttention,
}

/// A mixture-of-experts block with its routing state.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MoeWeights {
    /// The router `[hidden, experts]` (gpt-oss's has a bias).
    pub router: DenseWeights,
    /// Scoring, groups, top-k, renormalisation and scaling; route one token with
    /// [`RoutingRule::route_row`].
    pub rule: RoutingRule,
    /// `false` for experts the block's mask removes.
    pub allowed: Vec<bool>,
    /// DeepSeek-V3's `e_score_correction_bias`, added to the scores for selection.
    pub correction_bias: Option<Vec<f32>>,
    /// The routed experts' activation.
    pub activation: ExpertActivation,
    /// The routed experts, in on-disk order.
    pub experts: Vec<MlpWeights>,
    /// The shared expert (SiLU), if any.
    pub shared: Option<MlpWeights>,
    /// The shared expert's gate `[hidden, 1]` (Qwen2-MoE): its output is scaled by
    /// `sigmoid(x·gate)`.
    pub shared_gate: Option<DenseWeights>,
    /// Whether the block skips experts dynamically (a rule only the burn model computes).
    pub dynamic_skip: bool,
}

impl MoeWeights {
    fn from(m: MoeBlock) -> Self {
        let allowed = m.mask().map(<[bool]>::to_vec).unwrap_or_else(|| vec![true; m.num_experts()]);
        let rule = m.rule();
        let dynamic_skip = m.dynamic_skip().is_some();
        let MoeBlock { router, experts, shared, correction_bias, activation, .. } = m;
        let (shared, shared_gate) = match shared {
            Some(SharedExpert { mlp, gate }) => (Some(MlpWeights::from(mlp)), gate.map(DenseWeights::from)),
            None => (None, None),
        };
        MoeWeights {
            router: DenseWeights::from(router),
            rule,
            allowed,
            correction_bias: correction_bias.map(host),
            activation,
            experts: experts.into_iter().map(MlpWeights::from).collect(),
            shared,
            shared_gate,
            dynamic_skip,
        }
    }
}

/// A decoder layer's feed-forward half.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer
pub enum FeedForwardWeights {
    /// A dense SwiGLU MLP.
    Dense(MlpWeights),
    /// A mixture-of-experts block.
    Moe(MoeWeights),
}

/// One decoder layer: `h += attn(input_norm(h)); h += ffn(post_attention_norm(h))`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LayerWeights {
    /// `input_layernorm`.
    pub input_norm: NormWeights,
    /// `self_attn`.
    pub attention: AttentionWeights,
    /// `post_attention_layernorm`.
    pub post_attention_norm: NormWeights,
    /// `mlp` / `block_sparse_moe`.
    pub ffn: FeedForwardWeights,
}

impl DecoderLayer {
    /// The layer's weights, consuming it.
    fn into_weights(self) -> LayerWeights {
        let attention = match self.attention {
            SelfAttention::Standard(a) => AttentionWeights::Standard(StandardAttentionWeights {
                q_proj: DenseWeights::from(a.q_proj),
                k_proj: DenseWeights::from(a.k_proj),
                v_proj: DenseWeights::from(a.v_proj),
                o_proj: DenseWeights::from(a.o_proj),
                q_norm: a.q_norm.map(NormWeights::from),
                k_norm: a.k_norm.map(NormWeights::from),
                sinks: a.sinks.map(host),
                span: a.span,
                rope: a.rope,
            }),
            SelfAttention::Linear(a) => AttentionWeights::Linear(LinearAttentionWeights {
                in_proj_qkvz: DenseWeights::from(a.in_proj_qkvz),
                in_proj_ba: DenseWeights::from(a.in_proj_ba),
                conv: host(a.conv),
                a_log: host(a.a_log),
                dt_bias: host(a.dt_bias),
                norm: host(a.norm),
                norm_eps: a.norm_eps as f32,
                out_proj: DenseWeights::from(a.out_proj),
                cfg: a.cfg,
            }),
            SelfAttention::Latent(a) => AttentionWeights::Latent(LatentAttentionWeights {
                q: match a.q {
                    MlaQuery::Direct(p) => MlaQueryWeights::Direct(DenseWeights::from(p)),
                    MlaQuery::LowRank { a, norm, b } => MlaQueryWeights::LowRank {
                        a: DenseWeights::from(a),
                        norm: NormWeights::from(norm),
                        b: DenseWeights::from(b),
                    },
                },
                kv_a: DenseWeights::from(a.kv_a),
                kv_norm: NormWeights::from(a.kv_norm),
                kv_b: DenseWeights::from(a.kv_b),
                o_proj: DenseWeights::from(a.o_proj),
                span: a.span,
            }),
        };
        LayerWeights {
            input_norm: NormWeights::from(self.input_norm),
            attention,
            post_attention_norm: NormWeights::from(self.post_attention_norm),
            ffn: match self.ffn {
                FeedForward::Dense(m) => FeedForwardWeights::Dense(MlpWeights::from(m)),
                FeedForward::Moe(m) => FeedForwardWeights::Moe(MoeWeights::from(m)),
            },
        }
    }
}

/// The embeddings, final norm and LM head.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HeadWeights {
    /// `model.embed_tokens.weight`, row-major `[vocab, hidden]`.
    pub embed_tokens: Vec<f32>,
    /// `model.norm`.
    pub norm: NormWeights,
    /// `lm_head` `[hidden, vocab]` (the transposed embeddings when they are tied).
    pub lm_head: DenseWeights,
}

/// A whole model's weights; the decoder layers are converted one by one as `layers` is
/// iterated.
#[derive(Debug)]
#[non_exhaustive]
pub struct ModelWeights {
    /// The normalised configuration.
    pub config: ModelConfig,
    /// Embeddings, final norm and LM head.
    pub head: HeadWeights,
    /// The decoder layers, in order.
    pub layers: LayerWeightsIter,
}

/// The decoder layers of [`ModelWeights`], converted as they are taken.
#[derive(Debug)]
pub struct LayerWeightsIter(std::vec::IntoIter<DecoderLayer>);

impl Iterator for LayerWeightsIter {
    type Item = LayerWeights;

    fn next(&mut self) -> Option<LayerWeights> {
        self.0.next().map(DecoderLayer::into_weights)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for LayerWeightsIter {}

impl MoeModel {
    /// The model's weights, consuming it (see the [module documentation](crate::export)).
    pub fn into_weights(self) -> ModelWeights {
        let MoeModel { config, embed_tokens, layers, norm, lm_head, .. } = self;
        let head = HeadWeights {
            embed_tokens: host(embed_tokens),
            norm: NormWeights::from(norm),
            lm_head: DenseWeights::from(lm_head),
        };
        ModelWeights { config, head, layers: LayerWeightsIter(layers.into_iter()) }
    }
}

impl StreamingModel {
    /// The embeddings, final norm and LM head, read from disk.
    pub fn head_weights(&self) -> Result<HeadWeights> {
        let (norm, lm_head) = self.load_head()?;
        Ok(HeadWeights {
            embed_tokens: host(self.embed_tokens().clone()),
            norm: NormWeights::from(norm),
            lm_head: DenseWeights::from(lm_head),
        })
    }

    /// Decoder layer `i`'s weights, read from disk.
    pub fn layer_weights(&self, i: usize) -> Result<LayerWeights> {
        Ok(self.load_layer(i)?.into_weights())
    }
}
