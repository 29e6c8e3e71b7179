//! Named access to a model's weights: every trainable tensor by name, mutably (for training),
//! and the weights back in the HuggingFace on-disk layout (for saving). With
//! [`MoeModel::from_fn`], which builds a model from HF-named tensors, this is the whole
//! interface a trainer needs.

use burn::tensor::Tensor;
use diep_checkpoint::architectures::{DENSE_MLP, MoeKeys};

use crate::attention::{MlaQuery, SelfAttention};
use crate::loader::transpose;
use crate::model::{DecoderLayer, FeedForward, MoeModel};
use crate::nn::{Linear, RmsNorm, SwiGlu};

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
    for (name, offset) in [(g.clone(), 0), (u.clone(), inter)] {
        let mut part = vec![0f32; inter * hidden];
        for o in 0..inter {
            for x in 0..hidden {
                part[o * hidden + x] = w[x * two_i + offset + o];
            }
        }
        out.push(HfTensor { name, shape: vec![inter, hidden], data: part });
    }
    if let Some(b) = &s.gate_up.bias {
        let b = host(b);
        for (name, offset) in [(&g, 0), (&u, inter)] {
            out.push(HfTensor {
                name: crate::loader::bias_name(name),
                shape: vec![inter],
                data: b[offset..offset + inter].to_vec(),
            });
        }
    }
    if let Some(b) = &s.down.bias {
        out.push(HfTensor { name: crate::loader::bias_name(&d), shape: vec![hidden], data: host(b) });
    }
    out.push(HfTensor { name: d, shape: vec![hidden, inter], data: transpose(&host(&s.down.weight), inter, hidden) });
}

fn export_norm(out: &mut Vec<HfTensor>, name: String, n: &RmsNorm) {
    out.push(HfTensor { name, shape: n.weight.dims().to_vec(), data: host(&n.weight) });
}

impl MoeModel {
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
                // The DeltaNet's projections train; its filters, decays and gated norm stay fixed.
                SelfAttention::Linear(a) => {
                    push_linear(&mut out, &format!("{p}.linear_attn.in_proj_qkvz"), &mut a.in_proj_qkvz);
                    push_linear(&mut out, &format!("{p}.linear_attn.in_proj_ba"), &mut a.in_proj_ba);
                    push_linear(&mut out, &format!("{p}.linear_attn.out_proj"), &mut a.out_proj);
                }
            }
            push_norm(&mut out, &format!("{p}.post_attention_layernorm.weight"), &mut layer.post_attention_norm);
            match &mut layer.ffn {
                FeedForward::Dense(mlp) => push_swiglu(&mut out, &format!("{p}.{}", keys.dense_block), mlp),
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
                SelfAttention::Linear(a) => {
                    let n = |name: &str| format!("{p}.linear_attn.{name}");
                    export_linear(&mut out, &n("in_proj_qkvz"), &a.in_proj_qkvz);
                    export_linear(&mut out, &n("in_proj_ba"), &a.in_proj_ba);
                    let [c, k] = a.conv.dims();
                    out.push(HfTensor { name: n("conv1d.weight"), shape: vec![c, 1, k], data: host(&a.conv) });
                    out.push(HfTensor { name: n("A_log"), shape: a.a_log.dims().to_vec(), data: host(&a.a_log) });
                    out.push(HfTensor { name: n("dt_bias"), shape: a.dt_bias.dims().to_vec(), data: host(&a.dt_bias) });
                    out.push(HfTensor { name: n("norm.weight"), shape: a.norm.dims().to_vec(), data: host(&a.norm) });
                    export_linear(&mut out, &n("out_proj"), &a.out_proj);
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
            export_swiglu(out, DENSE_MLP.map(|n| format!("{p}.{}.{n}.weight", keys.dense_block)), mlp);
        }
        FeedForward::Moe(m) => {
            let block = keys.block_prefix(i);
            export_linear(out, &format!("{block}.{}", keys.router), &m.router);
            if let (Some(b), Some(name)) = (&m.correction_bias, keys.router_correction_bias(i)) {
                // ERNIE-4.5 stores its `moe_statics` bias as `[1, E]`.
                let shape = if name.contains("moe_statics.") { vec![1, b.dims()[0]] } else { b.dims().to_vec() };
                out.push(HfTensor { name, shape, data: host(b) });
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
