//! Training support for small models the project builds itself (`cargo xtask fixture train`).
//!
//! Everything here works on the same [`MoeModel`] the rest of the toolkit evaluates, so a model
//! trained with it is exactly the model that is later pruned and scored:
//!
//! - [`MoeModel::random`]: a model with freshly initialised weights (normal `N(0, std²)` for
//!   every projection and the embeddings, ones for RMSNorm weights, zeros for biases), drawn
//!   from a [`SplitMix64`] stream per tensor, so the initialisation depends only on the seed
//!   and the tensor's name;
//! - [`MoeModel::parameters_mut`]: every trainable tensor, by name, mutably;
//! - [`MoeModel::to_hf_tensors`] and [`save_safetensors`]: the weights back in the HuggingFace
//!   on-disk layout (`[out, in]` projections, separate `w1`/`w3` expert projections), which
//!   [`MoeModel::load`] reads back to the identical model;
//! - [`training_loss`]: next-token cross-entropy plus Mixtral's load-balancing auxiliary loss;
//! - [`AdamW`]: decoupled weight decay Adam over those parameters (burn's optimisers need the
//!   `Module` derive, which these structs deliberately do not have).
//!
//! Gradients need the `autodiff` cargo feature and a model on an autodiff device
//! (`device.autodiff()`); see [`MoeModel::require_grad`] and `AdamW::step`.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use diep_checkpoint::architectures::{DENSE_MLP, MoeKeys};
use diep_checkpoint::{LayerKind, ModelConfig, QkNorm};

use crate::attention::{Attention, MlaQuery, SelfAttention};
use crate::error::{ModelError, Result};
use crate::loader::transpose;
use crate::model::{DecoderLayer, FeedForward, MoeModel};
use crate::moe::{MoeBlock, MoeForwardOptions, SharedExpert};
use crate::nn::{Linear, RmsNorm, SwiGlu};

/// A small, fast, deterministic random generator (SplitMix64), identical on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
    spare_normal: Option<f64>,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed, spare_normal: None }
    }

    /// A generator for one named stream of a seed (e.g. one tensor), independent of the order
    /// in which streams are created.
    pub fn for_stream(seed: u64, name: &str) -> Self {
        let mut g = SplitMix64::new(seed ^ fnv1a64(name.as_bytes()));
        g.next_u64();
        g
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "SplitMix64::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (2.0 * std::f64::consts::PI * u2).sin_cos();
        self.spare_normal = Some(r * s);
        r * c
    }
}

/// 64-bit FNV-1a: a stable hash for seeding streams and splitting data deterministically.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How [`MoeModel::random`] initialises weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitOptions {
    /// Seed of every tensor's random stream.
    pub seed: u64,
    /// Standard deviation of projections and embeddings (transformers' `initializer_range`).
    pub std: f64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { seed: 0, std: 0.02 }
    }
}

/// Draws named tensors for [`MoeModel::random`].
struct Init<'a> {
    opts: InitOptions,
    device: &'a Device,
}

impl Init<'_> {
    /// `[rows, cols]` from `N(0, std²)`, from the stream named `name`.
    fn normal(&self, name: &str, rows: usize, cols: usize) -> Tensor<2> {
        let mut g = SplitMix64::for_stream(self.opts.seed, name);
        let data: Vec<f32> = (0..rows * cols).map(|_| (g.normal() * self.opts.std) as f32).collect();
        Tensor::from_data(TensorData::new(data, [rows, cols]), self.device)
    }

    /// A linear layer `[inp, out]` (HF `prefix.weight [out, in]`), bias zero when present.
    fn linear(&self, prefix: &str, inp: usize, out: usize, bias: bool) -> Linear {
        Linear {
            weight: self.normal(&format!("{prefix}.weight"), inp, out),
            bias: bias.then(|| Tensor::zeros([out], self.device)),
        }
    }

    fn norm(&self, dim: usize, eps: f64) -> RmsNorm {
        RmsNorm { weight: Tensor::ones([dim], self.device), eps }
    }

    /// A SwiGLU from the HF names of its gate, up and down projections.
    fn swiglu(&self, [g, u, d]: [&str; 3], hidden: usize, inter: usize) -> SwiGlu {
        let gate = self.normal(g, hidden, inter);
        let up = self.normal(u, hidden, inter);
        SwiGlu {
            gate_up: Linear { weight: Tensor::cat(vec![gate, up], 1), bias: None },
            down: Linear { weight: self.normal(d, inter, hidden), bias: None },
        }
    }
}

/// A model weight in the HuggingFace on-disk layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HfTensor {
    /// The exact on-disk name, e.g. `model.layers.0.block_sparse_moe.experts.3.w1.weight`.
    pub name: String,
    /// The on-disk shape (`[out, in]` for projections).
    pub shape: Vec<usize>,
    /// Row-major f32 values.
    pub data: Vec<f32>,
}

/// A mutable reference to one trainable tensor of a model.
#[derive(Debug)]
pub enum ParamMut<'a> {
    /// A vector (RMSNorm weight, bias).
    Vector(&'a mut Tensor<1>),
    /// A matrix (projection, embeddings, fused expert `gate_up`).
    Matrix(&'a mut Tensor<2>),
}

impl ParamMut<'_> {
    /// Number of values.
    pub fn numel(&self) -> usize {
        match self {
            ParamMut::Vector(t) => t.dims()[0],
            ParamMut::Matrix(t) => t.dims().iter().product(),
        }
    }
}

/// One trainable tensor and its name (the HF module prefix; fused expert projections are
/// called `experts.{e}.gate_up` and `experts.{e}.down`).
#[derive(Debug)]
pub struct Param<'a> {
    /// Name, stable across calls: the order and names of [`MoeModel::parameters_mut`] depend
    /// only on the configuration.
    pub name: String,
    /// The tensor.
    pub tensor: ParamMut<'a>,
}

fn push_linear<'a>(out: &mut Vec<Param<'a>>, prefix: &str, l: &'a mut Linear) {
    out.push(Param { name: format!("{prefix}.weight"), tensor: ParamMut::Matrix(&mut l.weight) });
    if let Some(b) = &mut l.bias {
        out.push(Param { name: format!("{prefix}.bias"), tensor: ParamMut::Vector(b) });
    }
}

fn push_swiglu<'a>(out: &mut Vec<Param<'a>>, prefix: &str, s: &'a mut SwiGlu) {
    push_linear(out, &format!("{prefix}.gate_up"), &mut s.gate_up);
    push_linear(out, &format!("{prefix}.down"), &mut s.down);
}

fn push_norm<'a>(out: &mut Vec<Param<'a>>, name: &str, n: &'a mut RmsNorm) {
    out.push(Param { name: name.to_string(), tensor: ParamMut::Vector(&mut n.weight) });
}

fn host<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.clone().into_data().iter::<f32>().collect()
}

fn export_linear(out: &mut Vec<HfTensor>, prefix: &str, l: &Linear) {
    let [inp, o] = l.weight.dims();
    out.push(HfTensor {
        name: format!("{prefix}.weight"),
        shape: vec![o, inp],
        data: transpose(&host(&l.weight), inp, o),
    });
    if let Some(b) = &l.bias {
        out.push(HfTensor { name: format!("{prefix}.bias"), shape: vec![o], data: host(b) });
    }
}

fn export_swiglu(out: &mut Vec<HfTensor>, [g, u, d]: [String; 3], s: &SwiGlu) {
    let [hidden, two_i] = s.gate_up.weight.dims();
    let inter = two_i / 2;
    let w = host(&s.gate_up.weight);
    for (name, offset) in [(g, 0), (u, inter)] {
        let mut part = vec![0f32; inter * hidden];
        for o in 0..inter {
            for x in 0..hidden {
                part[o * hidden + x] = w[x * two_i + offset + o];
            }
        }
        out.push(HfTensor { name, shape: vec![inter, hidden], data: part });
    }
    out.push(HfTensor { name: d, shape: vec![hidden, inter], data: transpose(&host(&s.down.weight), inter, hidden) });
}

fn export_norm(out: &mut Vec<HfTensor>, name: String, n: &RmsNorm) {
    out.push(HfTensor { name, shape: n.weight.dims().to_vec(), data: host(&n.weight) });
}

impl MoeModel {
    /// A model with randomly initialised weights for `config` (see [`InitOptions`]); the
    /// device decides whether it can be trained (`device.autodiff()`).
    ///
    /// With `tie_word_embeddings` the head starts as the transposed embeddings, but the two
    /// are separate tensors afterwards: training keeps them tied only if the caller does.
    pub fn random(config: ModelConfig, opts: InitOptions, device: &Device) -> Result<Self> {
        let c = &config;
        if c.layers.len() != c.num_layers {
            return Err(ModelError::InvalidInput(format!(
                "config has {} layer kinds for {} layers",
                c.layers.len(),
                c.num_layers
            )));
        }
        if c.architecture == diep_checkpoint::Architecture::GptOss {
            return Err(ModelError::InvalidInput(
                "random initialisation of `gpt_oss` (fused experts, attention sinks) is not supported".into(),
            ));
        }
        if c.attention.mla.is_some() {
            return Err(ModelError::InvalidInput(format!(
                "random initialisation of `{}` (multi-head latent attention) is not supported",
                c.architecture.model_type()
            )));
        }
        let init = Init { opts, device };
        let (h, v, a) = (c.hidden_size, c.vocab_size, &c.attention);
        let embed_tokens = init.normal("model.embed_tokens.weight", v, h);
        let lm_head = if c.tie_word_embeddings {
            Linear { weight: embed_tokens.clone().transpose(), bias: None }
        } else {
            init.linear("lm_head", h, v, false)
        };
        let keys = MoeKeys::of(c.architecture);
        let (q_out, kv_out) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for (i, kind) in c.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let (q_norm, k_norm) = match a.qk_norm {
                QkNorm::None => (None, None),
                QkNorm::PerHead => {
                    (Some(init.norm(a.head_dim, c.rms_norm_eps)), Some(init.norm(a.head_dim, c.rms_norm_eps)))
                }
                QkNorm::Full => (Some(init.norm(q_out, c.rms_norm_eps)), Some(init.norm(kv_out, c.rms_norm_eps))),
            };
            let attention = SelfAttention::Standard(Attention {
                q_proj: init.linear(&format!("{p}.self_attn.q_proj"), h, q_out, a.qkv_bias),
                k_proj: init.linear(&format!("{p}.self_attn.k_proj"), h, kv_out, a.qkv_bias),
                v_proj: init.linear(&format!("{p}.self_attn.v_proj"), h, kv_out, a.qkv_bias),
                o_proj: init.linear(&format!("{p}.self_attn.o_proj"), q_out, h, a.o_bias),
                q_norm,
                k_norm,
                sinks: None,
                sliding: false,
                cfg: a.clone(),
            });
            let ffn = match *kind {
                LayerKind::Dense => {
                    let names = DENSE_MLP.map(|n| format!("{p}.mlp.{n}.weight"));
                    FeedForward::Dense(init.swiglu([&names[0], &names[1], &names[2]], h, c.dense_intermediate_size))
                }
                LayerKind::Moe { num_experts } => {
                    let router =
                        init.linear(&format!("{}.{}", keys.block_prefix(i), keys.router), h, num_experts, false);
                    let experts = (0..num_experts)
                        .map(|e| {
                            let [g, u, d] = keys.expert_weights(i, e);
                            init.swiglu([&g, &u, &d], h, c.moe.expert_intermediate_size)
                        })
                        .collect();
                    let shared = match (keys.shared_expert, c.moe.shared_expert_intermediate_size) {
                        (Some((mlp, gate)), Some(width)) => {
                            let block = keys.block_prefix(i);
                            let names = DENSE_MLP.map(|n| format!("{block}.{mlp}.{n}.weight"));
                            Some(SharedExpert {
                                mlp: init.swiglu([&names[0], &names[1], &names[2]], h, width),
                                gate: Some(init.linear(&format!("{block}.{gate}"), h, 1, false)),
                            })
                        }
                        _ => None,
                    };
                    FeedForward::Moe(MoeBlock::new(router, experts, shared, c.moe.top_k, c.moe.norm_topk_prob))
                }
            };
            layers.push(DecoderLayer {
                input_norm: init.norm(h, c.rms_norm_eps),
                attention,
                post_attention_norm: init.norm(h, c.rms_norm_eps),
                ffn,
            });
        }
        let norm = init.norm(h, c.rms_norm_eps);
        Ok(MoeModel::from_parts(config, embed_tokens, layers, norm, lm_head, device.clone()))
    }

    /// Every trainable tensor, in an order and with names that depend only on the config.
    /// With tied embeddings the head is listed too (it is a separate tensor in memory).
    pub fn parameters_mut(&mut self) -> Vec<Param<'_>> {
        let keys = MoeKeys::of(self.config.architecture);
        let mut out = Vec::new();
        out.push(Param { name: "model.embed_tokens.weight".into(), tensor: ParamMut::Matrix(&mut self.embed_tokens) });
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            push_norm(&mut out, &format!("{p}.input_layernorm.weight"), &mut layer.input_norm);
            match &mut layer.attention {
                SelfAttention::Standard(a) => {
                    for (n, l) in [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj)] {
                        push_linear(&mut out, &format!("{p}.self_attn.{n}"), l);
                    }
                    push_linear(&mut out, &format!("{p}.self_attn.o_proj"), &mut a.o_proj);
                    if let Some(n) = &mut a.q_norm {
                        push_norm(&mut out, &format!("{p}.self_attn.q_norm.weight"), n);
                    }
                    if let Some(n) = &mut a.k_norm {
                        push_norm(&mut out, &format!("{p}.self_attn.k_norm.weight"), n);
                    }
                }
                SelfAttention::Latent(a) => {
                    let k = diep_checkpoint::architectures::deepseek_v3::MLA;
                    match &mut a.q {
                        MlaQuery::Direct(q) => push_linear(&mut out, &format!("{p}.self_attn.{}", k.q_proj), q),
                        MlaQuery::LowRank { a: qa, norm, b } => {
                            push_linear(&mut out, &format!("{p}.self_attn.{}", k.q_a_proj), qa);
                            push_norm(&mut out, &format!("{p}.self_attn.{}.weight", k.q_a_layernorm), norm);
                            push_linear(&mut out, &format!("{p}.self_attn.{}", k.q_b_proj), b);
                        }
                    }
                    push_linear(&mut out, &format!("{p}.self_attn.{}", k.kv_a_proj_with_mqa), &mut a.kv_a);
                    push_norm(&mut out, &format!("{p}.self_attn.{}.weight", k.kv_a_layernorm), &mut a.kv_norm);
                    push_linear(&mut out, &format!("{p}.self_attn.{}", k.kv_b_proj), &mut a.kv_b);
                    push_linear(&mut out, &format!("{p}.self_attn.{}", k.o_proj), &mut a.o_proj);
                }
            }
            push_norm(&mut out, &format!("{p}.post_attention_layernorm.weight"), &mut layer.post_attention_norm);
            match &mut layer.ffn {
                FeedForward::Dense(mlp) => push_swiglu(&mut out, &format!("{p}.mlp"), mlp),
                FeedForward::Moe(m) => {
                    let block = keys.block_prefix(i);
                    push_linear(&mut out, &format!("{block}.{}", keys.router), &mut m.router);
                    for (e, expert) in m.experts.iter_mut().enumerate() {
                        push_swiglu(&mut out, &format!("{block}.experts.{e}"), expert);
                    }
                    if let Some(s) = &mut m.shared {
                        if let Some((mlp, gate)) = keys.shared_expert {
                            push_swiglu(&mut out, &format!("{block}.{mlp}"), &mut s.mlp);
                            if let Some(g) = &mut s.gate {
                                push_linear(&mut out, &format!("{block}.{gate}"), g);
                            }
                        } else if let Some(mlp) = keys.shared_experts {
                            push_swiglu(&mut out, &format!("{block}.{mlp}"), &mut s.mlp);
                        }
                    }
                }
            }
        }
        push_norm(&mut out, "model.norm.weight", &mut self.norm);
        push_linear(&mut out, "lm_head", &mut self.lm_head);
        out
    }

    /// Number of trainable values (as [`Self::parameters_mut`] lists them).
    pub fn num_parameters(&mut self) -> usize {
        self.parameters_mut().iter().map(|p| p.tensor.numel()).sum()
    }

    /// Marks every parameter as requiring gradients. The model must live on an autodiff
    /// device (`device.autodiff()`, `autodiff` feature); panics otherwise.
    pub fn require_grad(&mut self) {
        for p in self.parameters_mut() {
            match p.tensor {
                ParamMut::Vector(t) => *t = t.clone().require_grad(),
                ParamMut::Matrix(t) => *t = t.clone().require_grad(),
            }
        }
    }

    /// The weights in the HuggingFace on-disk layout, with exactly the names and shapes
    /// [`MoeModel::load`] expects for this config (`lm_head.weight` is left out when the
    /// embeddings are tied). Expert masks are not part of the weights and are ignored.
    pub fn to_hf_tensors(&self) -> Vec<HfTensor> {
        let c = &self.config;
        let keys = MoeKeys::of(c.architecture);
        let mut out = Vec::new();
        out.push(HfTensor {
            name: "model.embed_tokens.weight".into(),
            shape: self.embed_tokens.dims().to_vec(),
            data: host(&self.embed_tokens),
        });
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            export_norm(&mut out, format!("{p}.input_layernorm.weight"), &layer.input_norm);
            let a = match &layer.attention {
                SelfAttention::Standard(a) => a,
                SelfAttention::Latent(a) => {
                    let k = diep_checkpoint::architectures::deepseek_v3::MLA;
                    let n = |name: &str| format!("{p}.self_attn.{name}");
                    match &a.q {
                        MlaQuery::Direct(q) => export_linear(&mut out, &n(k.q_proj), q),
                        MlaQuery::LowRank { a: qa, norm, b } => {
                            export_linear(&mut out, &n(k.q_a_proj), qa);
                            export_norm(&mut out, format!("{}.weight", n(k.q_a_layernorm)), norm);
                            export_linear(&mut out, &n(k.q_b_proj), b);
                        }
                    }
                    export_linear(&mut out, &n(k.kv_a_proj_with_mqa), &a.kv_a);
                    export_norm(&mut out, format!("{}.weight", n(k.kv_a_layernorm)), &a.kv_norm);
                    export_linear(&mut out, &n(k.kv_b_proj), &a.kv_b);
                    export_linear(&mut out, &n(k.o_proj), &a.o_proj);
                    export_layer_rest(&mut out, &keys, i, layer);
                    continue;
                }
            };
            for (n, l) in [("q_proj", &a.q_proj), ("k_proj", &a.k_proj), ("v_proj", &a.v_proj), ("o_proj", &a.o_proj)] {
                export_linear(&mut out, &format!("{p}.self_attn.{n}"), l);
            }
            if let Some(n) = &a.q_norm {
                export_norm(&mut out, format!("{p}.self_attn.q_norm.weight"), n);
            }
            if let Some(n) = &a.k_norm {
                export_norm(&mut out, format!("{p}.self_attn.k_norm.weight"), n);
            }
            export_layer_rest(&mut out, &keys, i, layer);
        }
        export_norm(&mut out, "model.norm.weight".into(), &self.norm);
        if !c.tie_word_embeddings {
            export_linear(&mut out, "lm_head", &self.lm_head);
        }
        out
    }
}

/// Exports a layer's post-attention norm and feed-forward block.
fn export_layer_rest(out: &mut Vec<HfTensor>, keys: &MoeKeys, i: usize, layer: &DecoderLayer) {
    let p = format!("model.layers.{i}");
    export_norm(out, format!("{p}.post_attention_layernorm.weight"), &layer.post_attention_norm);
    match &layer.ffn {
        FeedForward::Dense(mlp) => {
            export_swiglu(out, DENSE_MLP.map(|n| format!("{p}.mlp.{n}.weight")), mlp);
        }
        FeedForward::Moe(m) => {
            let block = keys.block_prefix(i);
            export_linear(out, &format!("{block}.{}", keys.router), &m.router);
            if let (Some(b), Some(name)) = (&m.correction_bias, keys.router_correction_bias(i)) {
                out.push(HfTensor { name, shape: b.dims().to_vec(), data: host(b) });
            }
            for (e, expert) in m.experts.iter().enumerate() {
                export_swiglu(out, keys.expert_weights(i, e), expert);
            }
            if let (Some(s), Some((mlp, gate))) = (&m.shared, keys.shared_expert) {
                export_swiglu(out, DENSE_MLP.map(|n| format!("{block}.{mlp}.{n}.weight")), &s.mlp);
                if let Some(g) = &s.gate {
                    export_linear(out, &format!("{block}.{gate}"), g);
                }
            } else if let (Some(s), Some(mlp)) = (&m.shared, keys.shared_experts) {
                export_swiglu(out, DENSE_MLP.map(|n| format!("{block}.{mlp}.{n}.weight")), &s.mlp);
            }
        }
    }
}

/// Writes tensors to one safetensors file in f32, with transformers' `{"format": "pt"}`
/// metadata. The file is written in place; write to a temporary path and rename for atomicity.
pub fn save_safetensors(tensors: &[HfTensor], path: impl AsRef<Path>) -> std::io::Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| std::io::Error::other(format!("tensor {}: {e}", t.name)))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path.as_ref()).map_err(std::io::Error::other)
}

/// The parts of [`training_loss`].
#[derive(Debug, Clone)]
pub struct TrainingLoss {
    /// `lm + aux_coef · aux`, what is differentiated, `[1]`.
    pub total: Tensor<1>,
    /// Mean next-token cross-entropy (nats), `[1]`.
    pub lm: Tensor<1>,
    /// Load-balancing loss averaged over MoE layers (`top_k` when perfectly balanced), `[1]`.
    pub aux: Tensor<1>,
    /// Per MoE layer (in layer order), how many top-k slots each expert received.
    pub expert_counts: Vec<Vec<usize>>,
}

/// Next-token cross-entropy over a batch of equal-length sequences (every position but the
/// last predicts the next token) plus `aux_coef` times Mixtral's load-balancing loss.
///
/// The auxiliary loss of one MoE layer over its `n` tokens is `E · Σ_e f_e · P_e`, with `f_e`
/// the fraction of tokens whose top-k includes expert `e` (no gradient) and `P_e` the mean
/// router probability of `e`; it is `top_k` when routing is uniform. It is computed per layer
/// and averaged over layers (transformers' `load_balancing_loss_func` pools the tokens of all
/// layers before the product, which only balances the layers' aggregate).
pub fn training_loss(model: &MoeModel, ids: &[Vec<u32>], aux_coef: f64) -> Result<TrainingLoss> {
    let mut aux_terms: Vec<Tensor<1>> = Vec::new();
    let mut expert_counts = Vec::new();
    let logits = model.forward_with(ids, &MoeForwardOptions::default(), |_, _, out| {
        let probs = out.routing.probs;
        let [n, e] = probs.dims();
        let mut counts = vec![0usize; e];
        for s in out.routing.experts.into_data().iter::<i64>() {
            counts[s as usize] += 1;
        }
        let f: Vec<f32> = counts.iter().map(|&c| c as f32 / n as f32).collect();
        let f = Tensor::<1>::from_data(TensorData::new(f, [e]), &probs.device());
        let p_mean = probs.mean_dim(0).reshape([e]);
        aux_terms.push((p_mean * f).sum() * e as f64);
        expert_counts.push(counts);
    })?;
    let [b, t, _] = logits.dims();
    if t < 2 {
        return Err(ModelError::InvalidInput("training sequences need at least two tokens".into()));
    }
    let logp = log_softmax(logits.narrow(1, 0, t - 1), 2);
    let targets: Vec<i64> = ids.iter().flat_map(|s| s[1..].iter().map(|x| *x as i64)).collect();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t - 1, 1]), &logp.device());
    let lm = logp.gather(2, targets).mean().neg().reshape([1]);
    let aux = match aux_terms.len() {
        0 => Tensor::zeros([1], model.device()),
        n => Tensor::cat(aux_terms, 0).sum().reshape([1]) / n as f64,
    };
    let total = if aux_coef == 0.0 { lm.clone() } else { lm.clone() + aux.clone() * aux_coef };
    Ok(TrainingLoss { total, lm, aux, expert_counts })
}

/// Hyper-parameters of [`AdamW`] (the learning rate is given per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to `sqrt(v̂)`.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms and biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// One AdamW update (PyTorch's `torch.optim.AdamW` arithmetic) of a tensor without autodiff:
/// `p ← p·(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + ε)`, with `t ≥ 1` the step number.
/// Returns the new `(p, m, v)`.
pub fn adamw_update<const D: usize>(
    p: Tensor<D>,
    g: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    step: u64,
    lr: f64,
    weight_decay: f64,
    cfg: &AdamWConfig,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let t = step.max(1) as i32;
    let p = if weight_decay != 0.0 { p * (1.0 - lr * weight_decay) } else { p };
    let m = m * cfg.beta1 + g.clone() * (1.0 - cfg.beta1);
    let v = v * cfg.beta2 + g.square() * (1.0 - cfg.beta2);
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let bc2 = 1.0 - cfg.beta2.powi(t);
    let update = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + cfg.eps);
    (p - update * lr, m, v)
}

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
// Updated only by the autodiff-gated `step`.
#[cfg_attr(not(feature = "autodiff"), allow(dead_code))]
enum Moments {
    Vector(Tensor<1>, Tensor<1>),
    Matrix(Tensor<2>, Tensor<2>),
}

/// AdamW over a model's [`MoeModel::parameters_mut`]; the moments live on the inner
/// (non-autodiff) device.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    step: u64,
    #[cfg_attr(not(feature = "autodiff"), allow(dead_code))]
    moments: Vec<Option<Moments>>,
}

impl AdamW {
    /// A fresh optimiser (step 0, zero moments).
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, step: 0, moments: Vec::new() }
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }
}

#[cfg(feature = "autodiff")]
mod autodiff_impl {
    use burn::tensor::{Gradients, Tensor};

    use super::{AdamW, Moments, Param, ParamMut, adamw_update};

    /// The global L2 norm of the gradients of `params` (missing gradients count as zero).
    pub fn grad_norm(params: &[Param<'_>], grads: &Gradients) -> f64 {
        let mut total: Option<Tensor<1>> = None;
        for p in params {
            let sq = match &p.tensor {
                ParamMut::Vector(t) => t.grad(grads).map(|g| g.square().sum()),
                ParamMut::Matrix(t) => t.grad(grads).map(|g| g.square().sum()),
            };
            if let Some(sq) = sq {
                total = Some(match total {
                    Some(acc) => acc + sq,
                    None => sq,
                });
            }
        }
        total.map(|t| t.into_data().iter::<f32>().next().unwrap_or(0.0) as f64).unwrap_or(0.0).sqrt()
    }

    impl AdamW {
        /// One update of every parameter with a gradient in `grads`, each gradient multiplied
        /// by `grad_scale` first (for clipping: `min(1, max_norm / grad_norm)`). Parameters
        /// without a gradient (e.g. an expert no token was routed to) keep their value and
        /// moments. `params` must list the same tensors in the same order at every call; the
        /// updated tensors are fresh autodiff leaves that require gradients.
        pub fn step(&mut self, params: Vec<Param<'_>>, grads: &Gradients, lr: f64, grad_scale: f64) {
            self.step += 1;
            if self.moments.len() < params.len() {
                self.moments.resize(params.len(), None);
            }
            let cfg = self.config;
            for (i, p) in params.into_iter().enumerate() {
                match p.tensor {
                    ParamMut::Vector(t) => {
                        let Some(g) = t.grad(grads) else { continue };
                        let g = if grad_scale != 1.0 { g * grad_scale } else { g };
                        let (m, v) = match self.moments[i].take() {
                            Some(Moments::Vector(m, v)) => (m, v),
                            _ => (g.zeros_like(), g.zeros_like()),
                        };
                        let (np, m, v) = adamw_update(t.clone().inner(), g, m, v, self.step, lr, 0.0, &cfg);
                        *t = np.autodiff().require_grad();
                        self.moments[i] = Some(Moments::Vector(m, v));
                    }
                    ParamMut::Matrix(t) => {
                        let Some(g) = t.grad(grads) else { continue };
                        let g = if grad_scale != 1.0 { g * grad_scale } else { g };
                        let (m, v) = match self.moments[i].take() {
                            Some(Moments::Matrix(m, v)) => (m, v),
                            _ => (g.zeros_like(), g.zeros_like()),
                        };
                        let wd = cfg.weight_decay;
                        let (np, m, v) = adamw_update(t.clone().inner(), g, m, v, self.step, lr, wd, &cfg);
                        *t = np.autodiff().require_grad();
                        self.moments[i] = Some(Moments::Matrix(m, v));
                    }
                }
            }
        }
    }
}

#[cfg(feature = "autodiff")]
pub use autodiff_impl::grad_norm;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_stable_and_normal_has_unit_variance() {
        let mut g = SplitMix64::new(0);
        // Reference values of SplitMix64 seeded with 0.
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut g = SplitMix64::new(7);
        let xs: Vec<f64> = (0..20000).map(|_| g.normal()).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.03, "{mean} {var}");
        assert!((0..1000).all(|_| g.below(3) < 3));
    }
}
