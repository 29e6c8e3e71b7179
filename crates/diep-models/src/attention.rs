//! Causal self-attention with GQA, RoPE, optional q/k/v biases, qk-norm, `clip_qkv`, sliding
//! windows and attention sinks, covering Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and gpt-oss; and
//! DeepSeek-V2/V3's multi-head latent attention ([`MlaAttention`]). The per-row math is
//! [`crate::kernels`]'.

use burn::tensor::{Device, Tensor};
use diep_checkpoint::{AttentionConfig, MlaConfig};

use crate::kernels::{self, QkvStep, RopeStyle, RopeTables, Span};
use crate::nn::{Linear, RmsNorm};

/// Per-forward inputs shared by every layer: the batch shape, RoPE tables and causal masks.
#[derive(Debug, Clone)]
pub struct AttentionContext {
    pub(crate) batch: usize,
    pub(crate) seq_len: usize,
    rope: RopeTables,
    /// The additive mask `[1, 1, seq_len, seq_len]` of each span the model's layers use, for
    /// the burn-op softmax.
    masks: Vec<(Span, Tensor<4>)>,
}

impl AttentionContext {
    /// Builds the context for a `[batch, seq_len]` input.
    pub(crate) fn new(cfg: &AttentionConfig, batch: usize, seq_len: usize, device: &Device) -> Self {
        let layers = cfg
            .sliding_layers
            .as_ref()
            .map_or(1, Vec::len)
            .max(cfg.llama4.as_ref().map_or(1, |l| l.chunked_layers.len()))
            .max(1);
        let mut masks: Vec<(Span, Tensor<4>)> = Vec::new();
        for span in (0..layers).map(|i| kernels::layer_span(cfg, i)) {
            if !masks.iter().any(|(w, _)| *w == span) {
                masks.push((span, kernels::causal_mask(seq_len, span, device)));
            }
        }
        AttentionContext { batch, seq_len, rope: RopeTables::for_config(cfg, seq_len, device), masks }
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The mask of `span` (built for every span the model uses).
    fn mask(&self, span: Span) -> &Tensor<4> {
        &self.masks.iter().find(|(w, _)| *w == span).expect("a mask for every layer's span").1
    }
}

/// One attention layer.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    /// Query norm (per head or over the whole projection, per `cfg.qk_norm`).
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    /// Per-head sink logits `[heads]` (gpt-oss).
    pub(crate) sinks: Option<Tensor<1>>,
    /// What this layer attends to ([`kernels::layer_span`]).
    pub(crate) span: Span,
    /// Llama 4: this layer applies RoPE (false: a NoPE layer).
    pub(crate) rope: bool,
    pub(crate) cfg: AttentionConfig,
}

/// qk-norm: RMSNorm over chunks of the norm's width (one head, or the whole projection).
fn qk_norm(norm: &RmsNorm, x: Tensor<2>) -> Tensor<2> {
    let [n, w] = x.dims();
    let d = norm.weight.dims()[0];
    if d == w {
        return norm.forward(x);
    }
    norm.forward(x.reshape([n * w / d, d])).reshape([n, w])
}

impl Attention {
    /// `[batch·seq, hidden]` rows in, the same shape out.
    fn forward(&self, x: Tensor<2>, ctx: &AttentionContext) -> Tensor<2> {
        let c = &self.cfg;
        let (b, t, hd) = (ctx.batch, ctx.seq_len, c.head_dim);
        let mut q = self.q_proj.forward(x.clone());
        // Qwen3-Next: each head's `q_proj` output is `[q | gate]`.
        let gate = if c.gated_output {
            let heads = q.reshape([b * t, c.num_heads, 2 * hd]);
            let gate = heads.clone().narrow(2, hd, hd).reshape([b * t, c.num_heads * hd]);
            q = heads.narrow(2, 0, hd).reshape([b * t, c.num_heads * hd]);
            Some(gate)
        } else {
            None
        };
        let mut k = self.k_proj.forward(x.clone());
        let mut v = self.v_proj.forward(x);
        for step in kernels::qkv_steps(c.qk_norm) {
            match step {
                QkvStep::Norm => {
                    q = qk_norm(self.q_norm.as_ref().expect("q_norm"), q);
                    k = qk_norm(self.k_norm.as_ref().expect("k_norm"), k);
                }
                QkvStep::Clip => {
                    if let Some(clip) = c.clip_qkv {
                        q = kernels::clip(q, clip);
                        k = kernels::clip(k, clip);
                        v = kernels::clip(v, clip);
                    }
                }
            }
        }
        let style = RopeStyle::interleaved_if(c.rope_interleave);
        let (q, k) = if self.rope {
            let q = kernels::rope_heads(q, b, c.num_heads, 0, &ctx.rope, style);
            let k = kernels::rope_heads(k, b, c.num_kv_heads, 0, &ctx.rope, style);
            match c.llama4.as_ref().and_then(|l| l.l2_qk_norm) {
                Some(eps) => (kernels::unit_rms(q, eps), kernels::unit_rms(k, eps)),
                None => (q, k),
            }
        } else {
            let q = q.reshape([b, t, c.num_heads, hd]).swap_dims(1, 2);
            let k = k.reshape([b, t, c.num_kv_heads, hd]).swap_dims(1, 2);
            match c.llama4.as_ref().and_then(|l| l.temperature_tuning) {
                Some((floor_scale, attn_scale)) => {
                    let scales = kernels::temperature_scales(t, floor_scale, attn_scale);
                    let scales = Tensor::<1>::from_data(burn::tensor::TensorData::new(scales, [t]), &q.device());
                    (q * scales.reshape([1, 1, t, 1]), k)
                }
                None => (q, k),
            }
        };
        let v = v.reshape([b, t, c.num_kv_heads, hd]).swap_dims(1, 2);
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));

        let scores = q.matmul(k.swap_dims(2, 3));
        let mask = ctx.mask(self.span);
        let probs = kernels::causal_softmax(scores, c.softmax_scale(), self.span, mask, self.sinks.as_ref());
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b * t, c.num_heads * hd]);
        let out = match gate {
            Some(g) => out * burn::tensor::activation::sigmoid(g),
            None => out,
        };
        self.o_proj.forward(out)
    }

    /// `[b, kv_heads, t, d]` to `[b, heads, t, d]`: query head `h` reads kv head `h / rep`.
    fn repeat_kv(&self, x: Tensor<4>) -> Tensor<4> {
        let rep = self.cfg.num_heads / self.cfg.num_kv_heads;
        if rep == 1 {
            return x;
        }
        let [b, kv, t, d] = x.dims();
        x.unsqueeze_dim::<5>(2).expand([b, kv, rep, t, d]).reshape([b, kv * rep, t, d])
    }
}

/// A decoder layer's attention: standard (GQA) or multi-head latent attention.
// A model has one per layer, so the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum SelfAttention {
    /// Mixtral, Qwen, OLMoE, DeepSeek-MoE, gpt-oss.
    Standard(Attention),
    /// DeepSeek-V2/V3.
    Latent(MlaAttention),
    /// Qwen3-Next's Gated DeltaNet layers.
    Linear(crate::deltanet::GatedDeltaNet),
}

impl SelfAttention {
    /// `[batch·seq, hidden]` rows in, the same shape out.
    pub(crate) fn forward(&self, x: Tensor<2>, ctx: &AttentionContext) -> Tensor<2> {
        match self {
            SelfAttention::Standard(a) => a.forward(x, ctx),
            SelfAttention::Latent(a) => a.forward(x, ctx),
            SelfAttention::Linear(a) => a.forward(x, ctx.batch, ctx.seq_len),
        }
    }
}

/// How an MLA layer computes its queries.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum MlaQuery {
    /// `q_proj` (when `q_lora_rank` is null).
    Direct(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// DeepSeek's multi-head latent attention, as transformers' `DeepseekV3Attention` computes it
/// without a cache: keys and values are expanded from a normalised `kv_lora_rank` latent by
/// `kv_b_proj`; one rotary key of `qk_rope_head_dim` is shared by all heads.
#[derive(Debug, Clone)]
pub(crate) struct MlaAttention {
    /// Query projection(s).
    pub(crate) q: MlaQuery,
    /// `kv_a_proj_with_mqa`: `[hidden, kv_lora_rank + qk_rope_head_dim]`.
    pub(crate) kv_a: Linear,
    /// `kv_a_layernorm` over the latent.
    pub(crate) kv_norm: RmsNorm,
    /// `kv_b_proj`: `[kv_lora_rank, heads·(qk_nope_head_dim + v_head_dim)]`.
    pub(crate) kv_b: Linear,
    /// `o_proj`: `[heads·v_head_dim, hidden]`.
    pub(crate) o_proj: Linear,
    /// What this layer attends to ([`kernels::layer_span`]).
    pub(crate) span: Span,
    pub(crate) mla: MlaConfig,
    pub(crate) cfg: AttentionConfig,
}

impl MlaAttention {
    /// `[batch·seq, hidden]` rows in, the same shape out.
    fn forward(&self, x: Tensor<2>, ctx: &AttentionContext) -> Tensor<2> {
        let m = &self.mla;
        let (b, t, heads) = (ctx.batch, ctx.seq_len, self.cfg.num_heads);
        let (nope, rope, vd) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim);
        let style = RopeStyle::interleaved_if(m.rope_interleave);
        let q = match &self.q {
            MlaQuery::Direct(p) => p.forward(x.clone()),
            MlaQuery::LowRank { a, norm, b } => b.forward(norm.forward(a.forward(x.clone()))),
        };
        let q = kernels::rope_heads(q, b, heads, nope, &ctx.rope, style);

        let compressed = self.kv_a.forward(x);
        let latent = self.kv_norm.forward(compressed.clone().narrow(1, 0, m.kv_lora_rank));
        let k_rot = compressed.narrow(1, m.kv_lora_rank, rope);
        let kv = self.kv_b.forward(latent);
        let k = kernels::latent_keys(kv.clone(), k_rot, b, heads, nope, &ctx.rope, style);
        let v = kv.reshape([b, t, heads, nope + vd]).swap_dims(1, 2).narrow(3, nope, vd);

        let scores = q.matmul(k.swap_dims(2, 3));
        let mask = ctx.mask(self.span);
        let probs = kernels::causal_softmax(scores, self.cfg.softmax_scale(), self.span, mask, None);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b * t, heads * vd]);
        self.o_proj.forward(out)
    }
}
