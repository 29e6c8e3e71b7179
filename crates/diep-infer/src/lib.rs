//! A fused CPU inference engine for evaluating MoE checkpoints.
//!
//! `diep-models` runs every forward pass as burn ops, which is what pruning needs (autodiff,
//! GPUs, per-layer hooks). On a CPU, for evaluation only, that pays for one allocation and one
//! pass over memory per op, and at small hidden sizes those dominate the GEMMs. [`CpuModel`]
//! computes the same function from the plain weight buffers of [`diep_models::export`], with
//! GEMMs from the `gemm` crate (the kernels burn's `flex` backend calls) and, for every
//! per-row operation, the row functions of [`diep_models::kernels`] that the burn model's CPU
//! path calls too:
//!
//! - one GEMM for q, k and v; RoPE while splitting heads;
//! - causal attention per (sequence, head), computing only the blocks on or below the diagonal,
//!   with the softmax fused (scale, mask, exp, normalisation in one pass);
//! - grouped expert dispatch: the tokens of each expert gathered, one fused gate/up GEMM,
//!   fused SiLU·up, one down GEMM, weighted scatter-add; experts run in parallel;
//! - the next-token NLL as `logsumexp − logit` straight from the logits buffer.
//!
//! It covers every architecture the burn model loads — `mixtral`, `qwen2_moe`, `qwen3_moe`,
//! `olmoe`, `deepseek`, `gpt_oss` (sinks, biases, clamped SwiGLU, sliding layers) and
//! DeepSeek-V2/V3 (multi-head latent attention with interleaved RoPE; sigmoid, group-limited
//! routing through the burn model's own [`RoutingRule::route_row`]) — with expert masks;
//! [`CpuModel::from_model`] refuses, saying why, a model with dynamic expert skipping, which
//! only the burn model computes. Weights of bf16/f16 checkpoints stay 16-bit. The burn model is
//! the reference: `tests/engine.rs` checks the engine against the transformers goldens of every
//! fixture and against the burn model.
#![warn(missing_docs)]

pub mod gemm;

use burn::tensor::{Device, Tensor, TensorData};
use diep_models::checkpoint::{AttentionConfig, ExpertActivation, ModelConfig};
use diep_models::export::{
    AttentionWeights, DenseWeights, FeedForwardWeights, HeadWeights, LatentAttentionWeights, LayerWeights,
    LinearAttentionWeights, MlaQueryWeights, MlpWeights, MoeWeights, NormWeights, StandardAttentionWeights,
};
use diep_models::kernels::{
    QkvStep, RopeStyle, Span, causal_softmax_rows, clamped_swiglu_rows, clip_rows, head_row, nll_rows, qkv_steps,
    rms_norm_rows, rope_tables, sigmoid_gate_rows, silu_mul_rows, temperature_scales, unit_rms_row,
};
use diep_models::{CausalLm, ModelError, MoeModel, Result, RoutingRule, StreamingModel, check_batch};
use rayon::prelude::*;

use crate::gemm::{MatRef, matmul};

pub use diep_models::burn;

/// Query rows per attention block: keys beyond a block's last row are never computed.
const ATTENTION_BLOCK: usize = 64;

/// A weight matrix as it stays in memory: f32, or — when every value of it is exactly a
/// bf16 (or f16) number, as for weights read from a bf16 (f16) checkpoint — those 2-byte
/// values, widened to f32 when a GEMM uses them. Arithmetic is f32 either way, so results are
/// bit-identical; only the resident size halves.
#[derive(Debug, Clone)]
enum Weights {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl Weights {
    /// The narrowest exact representation of `v`.
    fn compact(v: Vec<f32>) -> Self {
        let exact_bf16 = v.par_iter().all(|x| half::bf16::from_f32(*x).to_f32().to_bits() == x.to_bits());
        if exact_bf16 {
            return Weights::Bf16(v.par_iter().map(|x| half::bf16::from_f32(*x)).collect());
        }
        let exact_f16 = v.par_iter().all(|x| half::f16::from_f32(*x).to_f32().to_bits() == x.to_bits());
        if exact_f16 {
            return Weights::F16(v.par_iter().map(|x| half::f16::from_f32(*x)).collect());
        }
        Weights::F32(v)
    }

    /// The values as f32: borrowed, or widened into a new buffer.
    fn f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Weights::F32(v) => std::borrow::Cow::Borrowed(v),
            Weights::Bf16(v) => std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Weights::F16(v) => std::borrow::Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }

    fn as_f32_vec(&self) -> Vec<f32> {
        self.f32().into_owned()
    }

    fn bytes(&self) -> usize {
        match self {
            Weights::F32(v) => v.len() * 4,
            Weights::Bf16(v) => v.len() * 2,
            Weights::F16(v) => v.len() * 2,
        }
    }

    fn dtype(&self) -> &'static str {
        match self {
            Weights::F32(_) => "f32",
            Weights::Bf16(_) => "bf16",
            Weights::F16(_) => "f16",
        }
    }
}

/// A dense layer `y = x·W (+ b)` with `W` row-major `[in, out]`.
#[derive(Debug, Clone)]
struct Dense {
    w: Weights,
    bias: Option<Vec<f32>>,
    inp: usize,
    out: usize,
}

impl Dense {
    fn from(d: DenseWeights) -> Self {
        Dense { w: Weights::compact(d.weight), bias: d.bias, inp: d.inp, out: d.out }
    }

    /// Concatenates the output columns of several layers with the same input width.
    fn concat(parts: Vec<Dense>) -> Self {
        let inp = parts[0].inp;
        let out: usize = parts.iter().map(|p| p.out).sum();
        let mut w = vec![0f32; inp * out];
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let mut bias = any_bias.then(|| vec![0f32; out]);
        let mut col = 0;
        for p in &parts {
            let pw = p.w.as_f32_vec();
            for r in 0..inp {
                w[r * out + col..r * out + col + p.out].copy_from_slice(&pw[r * p.out..(r + 1) * p.out]);
            }
            if let (Some(b), Some(pb)) = (bias.as_mut(), p.bias.as_ref()) {
                b[col..col + p.out].copy_from_slice(pb);
            }
            col += p.out;
        }
        Dense { w: Weights::compact(w), bias, inp, out }
    }

    /// `out (+)= x·W + b` for `n` rows of `x` (row-major, `inp` wide).
    fn apply(&self, x: &[f32], n: usize, out: &mut [f32], accumulate: bool, parallel: bool) {
        self.apply_with(&self.w.f32(), x, n, out, accumulate, parallel);
    }

    /// [`Self::apply`] with the weights already widened to f32 (`w`).
    fn apply_with(&self, w: &[f32], x: &[f32], n: usize, out: &mut [f32], accumulate: bool, parallel: bool) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(self.out).take(n) {
                if accumulate {
                    row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                } else {
                    row.copy_from_slice(b);
                }
            }
        }
        let a = MatRef::rows(x, n, self.inp, self.inp);
        let w = MatRef::rows(w, self.inp, self.out, self.out);
        matmul(out, self.out, a, w, accumulate || self.bias.is_some(), parallel);
    }
}

/// A gated MLP's activation.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// `silu(gate) · up`.
    Silu,
    /// gpt-oss: `(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)`, `g = min(gate, limit)`.
    Clamped { alpha: f32, limit: f32 },
}

impl Act {
    fn of(a: ExpertActivation) -> Self {
        match a {
            ExpertActivation::Silu => Act::Silu,
            ExpertActivation::ClampedSwiglu { alpha, limit } => {
                Act::Clamped { alpha: alpha as f32, limit: limit as f32 }
            }
        }
    }

    /// Rows of `[gate | up]` (`2i` wide) to rows of `i`.
    fn rows(self, gu: &[f32], out: &mut [f32], i: usize) {
        match self {
            Act::Silu => silu_mul_rows(gu, out, i),
            Act::Clamped { alpha, limit } => clamped_swiglu_rows(gu, out, i, alpha, limit),
        }
    }
}

/// A gated MLP: `[in, 2i]` gate/up (gate columns first) and `[i, in]` down.
#[derive(Debug, Clone)]
struct Mlp {
    gate_up: Dense,
    down: Dense,
    act: Act,
}

impl Mlp {
    fn from(m: MlpWeights, act: Act) -> Self {
        Mlp { gate_up: Dense::from(m.gate_up), down: Dense::from(m.down), act }
    }

    fn inter(&self) -> usize {
        self.down.inp
    }

    /// `out (+)= down(silu(gate·x) · up·x)` for `n` rows.
    fn apply(&self, x: &[f32], n: usize, out: &mut [f32], accumulate: bool, parallel: bool) {
        let i = self.inter();
        let mut gu = vec![0f32; n * 2 * i];
        self.gate_up.apply(x, n, &mut gu, false, parallel);
        let mut act = vec![0f32; n * i];
        if parallel {
            let rows = (8192 / i).max(1);
            act.par_chunks_mut(rows * i).zip(gu.par_chunks(rows * 2 * i)).for_each(|(a, g)| self.act.rows(g, a, i));
        } else {
            self.act.rows(&gu, &mut act, i);
        }
        self.down.apply(&act, n, out, accumulate, parallel);
    }
}

#[derive(Debug, Clone)]
struct Norm {
    w: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn from(n: NormWeights) -> Self {
        Norm { w: n.weight, eps: n.eps }
    }

    /// Normalises rows of `w.len()` in place.
    fn apply(&self, x: &mut [f32]) {
        let d = self.w.len();
        let rows = (16_384 / d).max(1);
        x.par_chunks_mut(rows * d).for_each(|c| rms_norm_rows(c, &self.w, self.eps));
    }

    /// `dst = norm(src)`, row blocks in parallel.
    fn apply_into(&self, src: &[f32], dst: &mut [f32]) {
        let d = self.w.len();
        let rows = (16_384 / d).max(1);
        dst.par_chunks_mut(rows * d).zip(src.par_chunks(rows * d)).for_each(|(o, i)| {
            o.copy_from_slice(i);
            rms_norm_rows(o, &self.w, self.eps);
        });
    }
}

#[derive(Debug, Clone)]
struct AttentionLayer {
    /// Qwen3-Next's output gate `[hidden, heads·d]`: the attention output is multiplied by
    /// `sigmoid(x·gate)` before `o`.
    gate: Option<Dense>,
    qkv: Dense,
    o: Dense,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    /// qk-norm and `clip_qkv`, in the order the model applies them.
    steps: &'static [QkvStep],
    clip: Option<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The rotated width of each q/k head (partial RoPE: less than `head_dim`).
    rotary_dim: usize,
    /// How RoPE pairs elements.
    style: RopeStyle,
    /// Llama 4: the layer applies RoPE (false: NoPE, with `temperature`).
    rope: bool,
    /// Llama 4: weightless RMS norm of q and k heads after RoPE, with this eps.
    l2_qk_norm: Option<f32>,
    /// Llama 4: `(floor_scale, attn_scale)` of the NoPE layers' query temperature.
    temperature: Option<(f64, f64)>,
    scale: f32,
    span: Span,
    /// Per-head sink logits (gpt-oss): one more term in each softmax denominator.
    sinks: Option<Vec<f32>>,
}

/// How an MLA layer computes its queries.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer
enum MlaQ {
    Direct(Dense),
    LowRank { a: Dense, norm: Norm, b: Dense },
}

/// DeepSeek-V2/V3's multi-head latent attention, as the burn model computes it: keys and
/// values expanded from a normalised latent, one rotary key shared by all heads.
#[derive(Debug, Clone)]
struct MlaLayer {
    q: MlaQ,
    kv_a: Dense,
    kv_norm: Norm,
    kv_b: Dense,
    o: Dense,
    heads: usize,
    nope: usize,
    rope: usize,
    vd: usize,
    kv_lora: usize,
    style: RopeStyle,
    scale: f32,
    span: Span,
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer
enum AttnKind {
    Standard(AttentionLayer),
    Latent(MlaLayer),
    Linear(DeltaNetLayer),
}

impl AttnKind {
    fn apply(
        &self,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &(Vec<f32>, Vec<f32>),
        h: &mut [f32],
        sc: &mut AttentionScratch,
    ) {
        match self {
            AttnKind::Standard(a) => a.apply(x, b, t, rope, h, sc),
            AttnKind::Latent(a) => a.apply(x, b, t, rope, h, sc),
            AttnKind::Linear(a) => a.apply(x, b, t, h),
        }
    }

    fn denses(&self) -> Vec<&Dense> {
        match self {
            AttnKind::Standard(a) => [&a.qkv, &a.o].into_iter().chain(a.gate.as_ref()).collect(),
            AttnKind::Linear(a) => vec![&a.qkvz, &a.ba, &a.out],
            AttnKind::Latent(a) => {
                let mut v = vec![&a.kv_a, &a.kv_b, &a.o];
                match &a.q {
                    MlaQ::Direct(d) => v.push(d),
                    MlaQ::LowRank { a, b, .. } => v.extend([a, b]),
                }
                v
            }
        }
    }
}

impl MlaLayer {
    fn from(a: LatentAttentionWeights, cfg: &AttentionConfig) -> Self {
        let m = cfg.mla.as_ref().expect("latent attention weights come with an MLA config");
        let q = match a.q {
            MlaQueryWeights::Direct(p) => MlaQ::Direct(Dense::from(p)),
            MlaQueryWeights::LowRank { a, norm, b } => {
                MlaQ::LowRank { a: Dense::from(a), norm: Norm::from(norm), b: Dense::from(b) }
            }
        };
        MlaLayer {
            q,
            kv_a: Dense::from(a.kv_a),
            kv_norm: Norm::from(a.kv_norm),
            kv_b: Dense::from(a.kv_b),
            o: Dense::from(a.o_proj),
            heads: cfg.num_heads,
            nope: m.qk_nope_head_dim,
            rope: m.qk_rope_head_dim,
            vd: m.v_head_dim,
            kv_lora: m.kv_lora_rank,
            style: RopeStyle::interleaved_if(m.rope_interleave),
            scale: cfg.softmax_scale() as f32,
            span: a.span,
        }
    }

    /// `h += o_proj(attention(x))` for `b` sequences of `t` tokens.
    fn apply(
        &self,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &(Vec<f32>, Vec<f32>),
        h: &mut [f32],
        sc: &mut AttentionScratch,
    ) {
        let (nh, nope, r, vd, kvl) = (self.heads, self.nope, self.rope, self.vd, self.kv_lora);
        let n = b * t;
        let dq = nope + r;
        let qw = nh * dq;
        let mut qf = vec![0f32; n * qw];
        match &self.q {
            MlaQ::Direct(p) => p.apply(x, n, &mut qf, false, true),
            MlaQ::LowRank { a, norm, b: up } => {
                let mut low = vec![0f32; n * a.out];
                a.apply(x, n, &mut low, false, true);
                norm.apply(&mut low);
                up.apply(&low, n, &mut qf, false, true);
            }
        }
        let cw = kvl + r;
        let mut comp = vec![0f32; n * cw];
        self.kv_a.apply(x, n, &mut comp, false, true);
        let mut latent = vec![0f32; n * kvl];
        latent.par_chunks_mut(kvl).zip(comp.par_chunks(cw)).for_each(|(o, c)| {
            o.copy_from_slice(&c[..kvl]);
            rms_norm_rows(o, &self.kv_norm.w, self.kv_norm.eps);
        });
        let kw = nh * (nope + vd);
        let mut kv = vec![0f32; n * kw];
        self.kv_b.apply(&latent, n, &mut kv, false, true);
        let table = |pos: usize| (&rope.0[pos * r..(pos + 1) * r], &rope.1[pos * r..(pos + 1) * r]);
        let q = prefix(&mut sc.q, b * nh * t * dq);
        q.par_chunks_mut(t * dq).enumerate().for_each(|(bh, block)| {
            let (bi, hd) = (bh / nh, bh % nh);
            for (pos, o) in block.chunks_exact_mut(dq).enumerate() {
                let src = &qf[(bi * t + pos) * qw + hd * dq..][..dq];
                let (c, s) = table(pos);
                head_row(&src[..nope], &src[nope..], c, s, self.style, o);
            }
        });
        let k = prefix(&mut sc.k, b * nh * t * dq);
        k.par_chunks_mut(t * dq).enumerate().for_each(|(bh, block)| {
            let (bi, hd) = (bh / nh, bh % nh);
            for (pos, o) in block.chunks_exact_mut(dq).enumerate() {
                let row = bi * t + pos;
                let (c, s) = table(pos);
                let pass = &kv[row * kw + hd * (nope + vd)..][..nope];
                head_row(pass, &comp[row * cw + kvl..][..r], c, s, self.style, o);
            }
        });
        let v = prefix(&mut sc.v, b * nh * t * vd);
        v.par_chunks_mut(t * vd).enumerate().for_each(|(bh, block)| {
            let (bi, hd) = (bh / nh, bh % nh);
            for (pos, o) in block.chunks_exact_mut(vd).enumerate() {
                o.copy_from_slice(&kv[(bi * t + pos) * kw + hd * (nope + vd) + nope..][..vd]);
            }
        });
        let heads = Heads { q, k, v, b, t, heads: nh, kv_heads: nh, dq, dv: vd };
        let attn = attend(&heads, self.scale, self.span, None, &mut sc.heads, &mut sc.attn);
        self.o.apply(attn, n, h, true, true);
    }
}

#[derive(Debug, Clone)]
struct MoeLayer {
    router: Dense,
    /// The routing rule (scores, groups, renormalisation, scaling), applied per token by
    /// [`RoutingRule::route_row`], the burn model's own host routing arithmetic.
    rule: RoutingRule,
    /// `false` for masked experts.
    allowed: Vec<bool>,
    /// DeepSeek-V3's `e_score_correction_bias`.
    correction: Option<Vec<f32>>,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    shared_gate: Option<Dense>,
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per layer
enum Ffn {
    Dense(Mlp),
    Moe(MoeLayer),
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Norm,
    attention: AttnKind,
    post_norm: Norm,
    ffn: Ffn,
}

/// A model converted for fused CPU inference. See the crate documentation.
#[derive(Debug)]
pub struct CpuModel {
    /// The model's configuration.
    pub config: ModelConfig,
    embed: Weights,
    layers: Vec<Layer>,
    norm: Norm,
    lm_head: Dense,
    device: Device,
}

impl CpuModel {
    /// Why `model` cannot run on this engine, or `None` if it can.
    pub fn unsupported(model: &MoeModel) -> Option<String> {
        model.moe_layers().into_iter().find_map(|i| {
            let skips = model.moe_block(i).is_some_and(|m| m.dynamic_skip().is_some());
            skips.then(|| format!("layer {i}: {DYNAMIC_SKIP}"))
        })
    }

    /// Loads a model directory straight into the engine, one decoder layer at a time: each
    /// layer is decoded to f32, converted and dropped before the next, so memory peaks at the
    /// converted model plus one f32 layer (weights of a bf16/f16 checkpoint stay 16-bit).
    pub fn load(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        let device = Device::flex();
        let streaming = StreamingModel::open(dir, &device)?;
        let config = streaming.config().clone();
        let head = streaming.head_weights()?;
        let layers = (0..config.num_layers)
            .map(|i| convert_layer(streaming.layer_weights(i)?, &config.attention, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuModel::assemble(config, head, layers, device))
    }

    /// Converts a loaded model (consuming it, so that each layer's weights are released as it
    /// is converted). Fails with the reason when [`Self::unsupported`] says so.
    pub fn from_model(model: MoeModel) -> Result<Self> {
        let device = model.device().clone();
        let weights = model.into_weights();
        let config = weights.config;
        let layers = weights
            .layers
            .enumerate()
            .map(|(i, l)| convert_layer(l, &config.attention, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(CpuModel::assemble(config, weights.head, layers, device))
    }

    fn assemble(config: ModelConfig, head: HeadWeights, layers: Vec<Layer>, device: Device) -> Self {
        CpuModel {
            config,
            embed: Weights::compact(head.embed_tokens),
            layers,
            norm: Norm::from(head.norm),
            lm_head: Dense::from(head.lm_head),
            device,
        }
    }

    /// Bytes of weight matrices held in memory, and their storage types (e.g. `["bf16"]`).
    pub fn resident_weights(&self) -> (usize, Vec<&'static str>) {
        let mut mats: Vec<&Dense> = vec![&self.lm_head];
        for l in &self.layers {
            mats.extend(l.attention.denses());
            let mlps: Vec<&Mlp> = match &l.ffn {
                Ffn::Dense(m) => vec![m],
                Ffn::Moe(m) => {
                    mats.push(&m.router);
                    mats.extend(&m.shared_gate);
                    m.experts.iter().chain(&m.shared).collect()
                }
            };
            for m in mlps {
                mats.extend([&m.gate_up, &m.down]);
            }
        }
        let mut types: Vec<&'static str> = mats.iter().map(|m| m.w.dtype()).chain([self.embed.dtype()]).collect();
        types.sort_unstable();
        types.dedup();
        (mats.iter().map(|m| m.w.bytes()).sum::<usize>() + self.embed.bytes(), types)
    }

    /// Logits `[batch·len, vocab]` (row-major) for a batch of equal-length sequences.
    pub fn forward_host(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let h = self.final_hidden(ids)?;
        let n = h.len() / self.config.hidden_size;
        let mut logits = vec![0f32; n * self.config.vocab_size];
        self.lm_head.apply(&h, n, &mut logits, false, true);
        Ok(logits)
    }

    /// The last layer's output after the final norm, `[batch·len, hidden]`.
    fn final_hidden(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let (b, t) = check_batch(ids, self.config.vocab_size)?;
        let hidden = self.config.hidden_size;
        let n = b * t;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let mut h = vec![0f32; n * hidden];
        h.par_chunks_mut(hidden).zip(&flat).for_each(|(row, &id)| {
            let r = id as usize * hidden..(id as usize + 1) * hidden;
            match &self.embed {
                Weights::F32(e) => row.copy_from_slice(&e[r]),
                Weights::Bf16(e) => row.iter_mut().zip(&e[r]).for_each(|(o, v)| *o = v.to_f32()),
                Weights::F16(e) => row.iter_mut().zip(&e[r]).for_each(|(o, v)| *o = v.to_f32()),
            }
        });
        let a = &self.config.attention;
        let rope = rope_tables(a.rope_theta, a.rotary_dim, &a.rope_scaling, t);
        let mut x = vec![0f32; n * hidden];
        // Attention buffers, reused by every layer.
        let mut scratch = AttentionScratch::default();
        for layer in &self.layers {
            layer.input_norm.apply_into(&h, &mut x);
            layer.attention.apply(&x, b, t, &rope, &mut h, &mut scratch);
            layer.post_norm.apply_into(&h, &mut x);
            match &layer.ffn {
                Ffn::Dense(m) => m.apply(&x, n, &mut h, true, true),
                Ffn::Moe(m) => m.apply(&x, n, &mut h),
            }
        }
        self.norm.apply(&mut h);
        Ok(h)
    }
}

/// What [`CpuModel::unsupported`] and conversion say about dynamic skipping.
const DYNAMIC_SKIP: &str = "dynamic expert skipping";

/// Converts decoder layer `i`; fails for what this engine does not compute.
fn convert_layer(l: LayerWeights, cfg: &AttentionConfig, i: usize) -> Result<Layer> {
    let attention = match l.attention {
        AttentionWeights::Standard(a) => AttnKind::Standard(convert_attention(a, cfg)),
        AttentionWeights::Latent(a) => AttnKind::Latent(MlaLayer::from(a, cfg)),
        AttentionWeights::Linear(a) => AttnKind::Linear(DeltaNetLayer::from(a)),
    };
    let ffn = match l.ffn {
        FeedForwardWeights::Dense(m) => Ffn::Dense(Mlp::from(m, Act::Silu)),
        FeedForwardWeights::Moe(m) if m.dynamic_skip => {
            return Err(ModelError::Unsupported {
                operation: "the fused CPU engine".into(),
                feature: format!("layer {i}: {DYNAMIC_SKIP}"),
            });
        }
        FeedForwardWeights::Moe(m) => Ffn::Moe(convert_moe(m)),
    };
    Ok(Layer { input_norm: Norm::from(l.input_norm), attention, post_norm: Norm::from(l.post_attention_norm), ffn })
}

fn convert_attention(a: StandardAttentionWeights, c: &AttentionConfig) -> AttentionLayer {
    // Qwen3-Next: each head's `q_proj` columns are `[q | gate]`; split them apart.
    let (q, gate) = if c.gated_output {
        let (q, g) = split_gated_q(a.q_proj, c.num_heads, c.head_dim);
        (q, Some(Dense::from(g)))
    } else {
        (a.q_proj, None)
    };
    let qkv = Dense::concat(vec![Dense::from(q), Dense::from(a.k_proj), Dense::from(a.v_proj)]);
    AttentionLayer {
        gate,
        qkv,
        o: Dense::from(a.o_proj),
        q_norm: a.q_norm.map(Norm::from),
        k_norm: a.k_norm.map(Norm::from),
        steps: qkv_steps(c.qk_norm),
        clip: c.clip_qkv.map(|v| v as f32),
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        rotary_dim: c.rotary_dim,
        style: RopeStyle::interleaved_if(c.rope_interleave),
        scale: c.softmax_scale() as f32,
        span: a.span,
        rope: a.rope,
        l2_qk_norm: c.llama4.as_ref().and_then(|l| l.l2_qk_norm).map(|e| e as f32),
        temperature: c.llama4.as_ref().and_then(|l| l.temperature_tuning),
        sinks: a.sinks,
    }
}

fn convert_moe(m: MoeWeights) -> MoeLayer {
    let act = Act::of(m.activation);
    MoeLayer {
        router: Dense::from(m.router),
        rule: m.rule,
        allowed: m.allowed,
        correction: m.correction_bias,
        experts: m.experts.into_iter().map(|e| Mlp::from(e, act)).collect(),
        shared: m.shared.map(|s| Mlp::from(s, Act::Silu)),
        shared_gate: m.shared_gate.map(Dense::from),
    }
}

/// Buffers of one attention layer, kept across the layers of a forward pass.
#[derive(Default)]
struct AttentionScratch {
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    heads: Vec<f32>,
    attn: Vec<f32>,
}

/// The first `len` elements of `v`, grown (never shrunk) as needed.
fn prefix(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

impl AttentionLayer {
    /// `h += o_proj(attention(x))` for `b` sequences of `t` tokens.
    fn apply(
        &self,
        x: &[f32],
        b: usize,
        t: usize,
        rope: &(Vec<f32>, Vec<f32>),
        h: &mut [f32],
        sc: &mut AttentionScratch,
    ) {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (r, style) = (self.rotary_dim, self.style);
        let n = b * t;
        let width = (nh + 2 * nkv) * d;
        let qkv = prefix(&mut sc.qkv, n * width);
        self.qkv.apply(x, n, qkv, false, true);
        // Full norms have weights over all heads, per-head norms over one head's `d`:
        // `rms_norm_rows` normalises chunks of the weight's length either way.
        for step in self.steps {
            match step {
                QkvStep::Norm => {
                    let (qn, kn) = (self.q_norm.as_ref().expect("q_norm"), self.k_norm.as_ref().expect("k_norm"));
                    qkv.par_chunks_mut(width).for_each(|row| {
                        let (q, rest) = row.split_at_mut(nh * d);
                        rms_norm_rows(q, &qn.w, qn.eps);
                        rms_norm_rows(&mut rest[..nkv * d], &kn.w, kn.eps);
                    });
                }
                QkvStep::Clip => {
                    if let Some(c) = self.clip {
                        qkv.par_chunks_mut(16_384).for_each(|x| clip_rows(x, c));
                    }
                }
            }
        }
        let qkv: &[f32] = qkv;
        // Heads laid out [b, heads, t, d]; RoPE applied to q and k on the way.
        // Llama 4: RoPE then the L2 norm on RoPE layers; the query temperature on NoPE layers.
        let temperature = match (self.rope, self.temperature) {
            (false, Some((floor_scale, attn_scale))) => Some(temperature_scales(t, floor_scale, attn_scale)),
            _ => None,
        };
        let l2 = if self.rope { self.l2_qk_norm } else { None };
        let split = |out: &mut [f32], col0: usize, heads: usize, rotate: bool, query: bool| {
            out.par_chunks_mut(t * d).enumerate().for_each(|(bh, block)| {
                let (bi, hd) = (bh / heads, bh % heads);
                for (pos, o) in block.chunks_exact_mut(d).enumerate() {
                    let src = &qkv[(bi * t + pos) * width + col0 + hd * d..][..d];
                    if rotate {
                        let (c, s) = (&rope.0[pos * r..(pos + 1) * r], &rope.1[pos * r..(pos + 1) * r]);
                        head_row(&[], src, c, s, style, o);
                        if let Some(eps) = l2 {
                            unit_rms_row(o, eps);
                        }
                    } else {
                        o.copy_from_slice(src);
                        if let (true, Some(temp)) = (query, &temperature) {
                            o.iter_mut().for_each(|x| *x *= temp[pos]);
                        }
                    }
                }
            });
        };
        let (q, k, v) =
            (prefix(&mut sc.q, b * nh * t * d), prefix(&mut sc.k, b * nkv * t * d), prefix(&mut sc.v, b * nkv * t * d));
        split(q, 0, nh, self.rope, true);
        split(k, nh * d, nkv, self.rope, false);
        split(v, (nh + nkv) * d, nkv, false, false);
        let (q, k, v): (&[f32], &[f32], &[f32]) = (q, k, v);
        let heads = Heads { q, k, v, b, t, heads: nh, kv_heads: nkv, dq: d, dv: d };
        let attn = attend(&heads, self.scale, self.span, self.sinks.as_deref(), &mut sc.heads, &mut sc.attn);
        match &self.gate {
            Some(gate) => {
                let mut g = vec![0f32; n * nh * d];
                gate.apply(x, n, &mut g, false, true);
                let gated: Vec<f32> = attn.iter().zip(&g).map(|(a, g)| a / (1.0 + (-g).exp())).collect();
                self.o.apply(&gated, n, h, true, true);
            }
            None => self.o.apply(attn, n, h, true, true),
        }
    }
}

/// Per-head queries, keys and values laid out `[b, heads, t, d]`.
struct Heads<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    /// Query/key width.
    dq: usize,
    /// Value width.
    dv: usize,
}

/// Causal attention per (sequence, head), in blocks of query rows that compute keys only up
/// to the block's last row; query head `h` reads kv head `h / (heads / kv_heads)`. Returns the
/// rows `[b·t, heads·dv]` for the output projection (in `attn_buf`).
fn attend<'a>(
    x: &Heads<'_>,
    scale: f32,
    span: Span,
    sinks: Option<&[f32]>,
    heads_buf: &mut Vec<f32>,
    attn_buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    let Heads { q, k, v, b, t, heads: nh, kv_heads: nkv, dq, dv } = *x;
    let rep = nh / nkv;
    let heads_out = prefix(heads_buf, b * nh * t * dv);
    heads_out.par_chunks_mut(t * dv).enumerate().for_each_init(
        || vec![0f32; ATTENTION_BLOCK * t],
        |scores, (bh, out)| {
            let (bi, hd) = (bh / nh, bh % nh);
            let kvh = bi * nkv + hd / rep;
            let qh = &q[bh * t * dq..(bh + 1) * t * dq];
            let kh = &k[kvh * t * dq..(kvh + 1) * t * dq];
            let vh = &v[kvh * t * dv..(kvh + 1) * t * dv];
            let sink = sinks.map(|s| s[hd]);
            for r0 in (0..t).step_by(ATTENTION_BLOCK) {
                let r1 = (r0 + ATTENTION_BLOCK).min(t);
                let rows = r1 - r0;
                // Keys 0..r1 cover every unmasked key of rows r0..r1.
                let s = &mut scores[..rows * r1];
                matmul(
                    s,
                    r1,
                    MatRef::rows(&qh[r0 * dq..], rows, dq, dq),
                    MatRef::transposed(kh, dq, r1, dq),
                    false,
                    false,
                );
                // Rows r0..r1 of the score matrix, cut to keys 0..r1 (r1 > every row's query).
                causal_softmax_rows(s, r1, r0, scale, span, sink);
                matmul(
                    &mut out[r0 * dv..r1 * dv],
                    dv,
                    MatRef::rows(s, rows, r1, r1),
                    MatRef::rows(vh, r1, dv, dv),
                    false,
                    false,
                );
            }
        },
    );
    // [b, heads, t, dv] → rows [b·t, heads·dv].
    let heads_out: &[f32] = heads_out;
    let attn = prefix(attn_buf, b * t * nh * dv);
    attn.par_chunks_mut(t * nh * dv).enumerate().for_each(|(bi, seq)| {
        for (pos, row) in seq.chunks_exact_mut(nh * dv).enumerate() {
            for hd in 0..nh {
                row[hd * dv..(hd + 1) * dv].copy_from_slice(&heads_out[((bi * nh + hd) * t + pos) * dv..][..dv]);
            }
        }
    });
    attn
}

impl MoeLayer {
    /// `h += moe(x)` for `n` rows.
    fn apply(&self, x: &[f32], n: usize, h: &mut [f32]) {
        let hidden = self.router.inp;
        let e = self.experts.len();
        let k = self.rule.top_k;
        let mut logits = vec![0f32; n * e];
        self.router.apply(x, n, &mut logits, false, true);
        // Routing per token, exactly the burn model's host arithmetic.
        let mut sel = vec![0u32; n * k];
        let mut wts = vec![0f32; n * k];
        sel.par_chunks_mut(k).zip(wts.par_chunks_mut(k)).zip(logits.par_chunks(e)).for_each(|((s, w), l)| {
            let chosen = self.rule.route_row(l, &self.allowed, self.correction.as_deref());
            for (j, (ex, weight)) in chosen.into_iter().enumerate() {
                s[j] = ex as u32;
                w[j] = weight;
            }
        });
        // Each expert's token rows, in token order.
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); e];
        for (slot, &ex) in sel.iter().enumerate() {
            groups[ex as usize].push(slot);
        }
        // Tasks of up to EXPERT_ROWS rows of one expert: balanced across threads, and each
        // task's weights stay in cache while it runs.
        const EXPERT_ROWS: usize = 128;
        let tasks: Vec<(usize, &[usize])> =
            groups.iter().enumerate().flat_map(|(ex, slots)| slots.chunks(EXPERT_ROWS).map(move |c| (ex, c))).collect();
        let outer = tasks.len() >= rayon::current_num_threads();
        // Llama 4 scales each expert's input by the routing weight instead of its output.
        let on_input = self.rule.config.weight_on_input;
        let run = |&(ex, slots): &(usize, &[usize])| {
            let m = slots.len();
            let mut xe = vec![0f32; m * hidden];
            for (row, &slot) in xe.chunks_exact_mut(hidden).zip(slots) {
                let tok = slot / k;
                row.copy_from_slice(&x[tok * hidden..(tok + 1) * hidden]);
                if on_input {
                    row.iter_mut().for_each(|v| *v *= wts[slot]);
                }
            }
            let mut y = vec![0f32; m * hidden];
            self.experts[ex].apply(&xe, m, &mut y, false, !outer);
            y
        };
        let outputs: Vec<Vec<f32>> =
            if outer { tasks.par_iter().map(run).collect() } else { tasks.iter().map(run).collect() };
        // Where each slot's output row is: (task, row).
        let mut source = vec![(0u32, 0u32); n * k];
        for (ti, (_, slots)) in tasks.iter().enumerate() {
            for (r, &slot) in slots.iter().enumerate() {
                source[slot] = (ti as u32, r as u32);
            }
        }
        // Weighted sum per token, its slots in order, rows in parallel.
        h.par_chunks_mut(hidden).enumerate().for_each(|(tok, row)| {
            for j in 0..k {
                let slot = tok * k + j;
                let (ti, r) = source[slot];
                let w = if on_input { 1.0 } else { wts[slot] };
                let y = &outputs[ti as usize][r as usize * hidden..(r as usize + 1) * hidden];
                row.iter_mut().zip(y).for_each(|(o, v)| *o += w * v);
            }
        });
        if let Some(shared) = &self.shared {
            let mut y = vec![0f32; n * hidden];
            shared.apply(x, n, &mut y, false, true);
            if let Some(g) = &self.shared_gate {
                let mut gate = vec![0f32; n];
                g.apply(x, n, &mut gate, false, false);
                sigmoid_gate_rows(&mut y, &gate, hidden);
            }
            h.par_chunks_mut(hidden).zip(y.par_chunks(hidden)).for_each(|(o, y)| {
                o.iter_mut().zip(y).for_each(|(o, v)| *o += v);
            });
        }
    }
}

impl CpuModel {
    /// Next-token NLLs `[batch][len − 1]`. The LM head runs in blocks of rows, each block's
    /// logits scored (`logsumexp − logit`) while still in cache: the `[batch·len, vocab]`
    /// logits are never materialised.
    pub fn nll_host(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let h = self.final_hidden(ids)?;
        let (b, t, v, hidden) = (ids.len(), ids[0].len(), self.config.vocab_size, self.config.hidden_size);
        if t < 2 {
            return Ok(vec![Vec::new(); b]);
        }
        let mut targets = vec![0u32; b * t];
        for (s, seq) in ids.iter().enumerate() {
            targets[s * t..s * t + t - 1].copy_from_slice(&seq[1..]);
        }
        let mut out = vec![0f32; b * t];
        // Widened once for all blocks when the head is stored in 16 bits.
        let head = self.lm_head.w.f32();
        const ROWS: usize = 32;
        out.par_chunks_mut(ROWS).zip(h.par_chunks(ROWS * hidden)).zip(targets.par_chunks(ROWS)).for_each_init(
            || vec![0f32; ROWS * v],
            |logits, ((o, x), tg)| {
                let rows = o.len();
                let l = &mut logits[..rows * v];
                self.lm_head.apply_with(&head, x, rows, l, false, false);
                nll_rows(l, tg, o, v);
            },
        );
        Ok(out.chunks_exact(t).map(|r| r[..t - 1].to_vec()).collect())
    }
}

impl CausalLm for CpuModel {
    fn logits(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        let logits = self.forward_host(ids)?;
        let shape = [ids.len(), ids[0].len(), self.config.vocab_size];
        Ok(Tensor::from_data(TensorData::new(logits, shape), &self.device))
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn next_token_nll(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.nll_host(ids)
    }
}

/// Splits Qwen3-Next's `q_proj` (`[hidden, heads·2d]`, each head `[q | gate]`) into the query
/// and the gate projections, `[hidden, heads·d]` each.
fn split_gated_q(w: DenseWeights, heads: usize, d: usize) -> (DenseWeights, DenseWeights) {
    let (inp, out) = (w.inp, w.out);
    let half = heads * d;
    let mut q = vec![0f32; inp * half];
    let mut g = vec![0f32; inp * half];
    for r in 0..inp {
        for h in 0..heads {
            let src = &w.weight[r * out + h * 2 * d..][..2 * d];
            q[r * half + h * d..][..d].copy_from_slice(&src[..d]);
            g[r * half + h * d..][..d].copy_from_slice(&src[d..]);
        }
    }
    let split_bias = |b: &Vec<f32>, second: bool| -> Vec<f32> {
        (0..heads).flat_map(|h| b[h * 2 * d + usize::from(second) * d..][..d].to_vec()).collect()
    };
    let (qb, gb) = match &w.bias {
        Some(b) => (Some(split_bias(b, false)), Some(split_bias(b, true))),
        None => (None, None),
    };
    (DenseWeights::new(q, qb, inp, half), DenseWeights::new(g, gb, inp, half))
}

/// Qwen3-Next's Gated DeltaNet on the host: the arithmetic of `diep_models`' burn layer
/// (projections, causal depthwise convolution + SiLU, L2-normalised q/k, the gated delta rule
/// per value head, the gated RMSNorm, `out_proj`).
#[derive(Debug, Clone)]
struct DeltaNetLayer {
    qkvz: Dense,
    ba: Dense,
    /// `[channels, kernel]`.
    conv: Vec<f32>,
    a_log: Vec<f32>,
    dt_bias: Vec<f32>,
    norm: Vec<f32>,
    eps: f32,
    out: Dense,
    cfg: diep_models::checkpoint::LinearAttention,
}

impl DeltaNetLayer {
    fn from(a: LinearAttentionWeights) -> Self {
        DeltaNetLayer {
            qkvz: Dense::from(a.in_proj_qkvz),
            ba: Dense::from(a.in_proj_ba),
            conv: a.conv,
            a_log: a.a_log,
            dt_bias: a.dt_bias,
            norm: a.norm,
            eps: a.norm_eps,
            out: Dense::from(a.out_proj),
            cfg: a.cfg,
        }
    }

    /// `h += out_proj(deltanet(x))` for `b` sequences of `t` tokens.
    fn apply(&self, x: &[f32], b: usize, t: usize, h: &mut [f32]) {
        let c = &self.cfg;
        let (nk, nv, dk, dv) = (c.key_heads, c.value_heads, c.key_dim, c.value_dim);
        let r = nv / nk;
        let n = b * t;
        let group = 2 * dk + 2 * r * dv;
        let mut qkvz = vec![0f32; n * nk * group];
        self.qkvz.apply(x, n, &mut qkvz, false, true);
        let mut ba = vec![0f32; n * 2 * nv];
        self.ba.apply(x, n, &mut ba, false, true);
        // Channels [q of every group | k of every group | v of every group], per token.
        let channels = 2 * nk * dk + nv * dv;
        let mut mixed = vec![0f32; n * channels];
        for (row, src) in mixed.chunks_exact_mut(channels).zip(qkvz.chunks_exact(nk * group)) {
            for g in 0..nk {
                let s = &src[g * group..(g + 1) * group];
                row[g * dk..(g + 1) * dk].copy_from_slice(&s[..dk]);
                row[nk * dk + g * dk..nk * dk + (g + 1) * dk].copy_from_slice(&s[dk..2 * dk]);
                row[2 * nk * dk + g * r * dv..2 * nk * dk + (g + 1) * r * dv]
                    .copy_from_slice(&s[2 * dk..2 * dk + r * dv]);
            }
        }
        // Causal depthwise convolution, then SiLU.
        let kw = c.conv_kernel;
        let mut conv = vec![0f32; n * channels];
        for bi in 0..b {
            for pos in 0..t {
                let o = &mut conv[(bi * t + pos) * channels..][..channels];
                for j in 0..kw {
                    let Some(src_pos) = (pos + j).checked_sub(kw - 1) else { continue };
                    let src = &mixed[(bi * t + src_pos) * channels..][..channels];
                    for (ch, v) in o.iter_mut().enumerate() {
                        *v += self.conv[ch * kw + j] * src[ch];
                    }
                }
                o.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp());
            }
        }
        // q and k L2-normalised (`x / sqrt(Σx² + 1e-6)`, q then scaled by 1/sqrt(dk)) once per
        // key head and token; every value head of the group reads them.
        let q_scale = 1.0 / (dk as f32).sqrt();
        for row in conv.chunks_exact_mut(channels) {
            for (head, qk) in row[..2 * nk * dk].chunks_exact_mut(dk).enumerate() {
                let inv = 1.0 / (qk.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt();
                let scale = if head < nk { q_scale } else { 1.0 };
                qk.iter_mut().for_each(|x| *x = *x * inv * scale);
            }
        }
        let mut core = vec![0f32; n * nv * dv];
        for bi in 0..b {
            for vh in 0..nv {
                let kh = vh / r;
                let (a_exp, dt) = (self.a_log[vh].exp(), self.dt_bias[vh]);
                let mut state = vec![0f32; dk * dv];
                for pos in 0..t {
                    let row = bi * t + pos;
                    let m = &conv[row * channels..][..channels];
                    let q = &m[kh * dk..(kh + 1) * dk];
                    let k = &m[nk * dk + kh * dk..nk * dk + (kh + 1) * dk];
                    let v = &m[2 * nk * dk + vh * dv..2 * nk * dk + (vh + 1) * dv];
                    // ba per group: [b (r) | a (r)].
                    let (g, j) = (vh / r, vh % r);
                    let beta_logit = ba[row * 2 * nv + g * 2 * r + j];
                    let a = ba[row * 2 * nv + g * 2 * r + r + j] + dt;
                    let softplus = if a > 20.0 { a } else { a.exp().ln_1p() };
                    let decay = (-a_exp * softplus).exp();
                    let beta = 1.0 / (1.0 + (-beta_logit).exp());
                    state.iter_mut().for_each(|s| *s *= decay);
                    let mut delta = vec![0f32; dv];
                    for (e, d) in delta.iter_mut().enumerate() {
                        let mem: f32 = (0..dk).map(|i| k[i] * state[i * dv + e]).sum();
                        *d = (v[e] - mem) * beta;
                    }
                    for i in 0..dk {
                        for e in 0..dv {
                            state[i * dv + e] += k[i] * delta[e];
                        }
                    }
                    let o = &mut core[(row * nv + vh) * dv..][..dv];
                    for (e, out) in o.iter_mut().enumerate() {
                        *out = (0..dk).map(|i| q[i] * state[i * dv + e]).sum();
                    }
                }
            }
        }
        // Gated RMSNorm per value head: rms(o)·w·silu(z).
        for row in 0..n {
            for vh in 0..nv {
                let (g, j) = (vh / r, vh % r);
                let z = &qkvz[row * nk * group + g * group + 2 * dk + r * dv + j * dv..][..dv];
                let o = &mut core[(row * nv + vh) * dv..][..dv];
                unit_rms_row(o, self.eps);
                for ((v, w), z) in o.iter_mut().zip(&self.norm).zip(z) {
                    *v = *v * w * (z / (1.0 + (-z).exp()));
                }
            }
        }
        self.out.apply(&core, n, h, true, true);
    }
}
