//! Causal self-attention with GQA, RoPE, optional q/k/v biases, qk-norm, `clip_qkv` and a
//! sliding window, covering Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE; and DeepSeek-V2/V3's
//! multi-head latent attention ([`MlaAttention`]).

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use diep_checkpoint::{AttentionConfig, MlaConfig, QkNorm};

use crate::kernels;
use crate::nn::{Linear, RmsNorm};
use crate::rope::RopeTables;

/// Per-forward inputs shared by every layer: batch shape, RoPE tables and the causal mask.
#[derive(Debug, Clone)]
pub struct AttentionContext {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// RoPE tables for `0..seq_len`.
    pub rope: RopeTables,
    /// Additive mask `[1, 1, seq_len, seq_len]`: 0 where attention is allowed, -inf elsewhere.
    pub mask: Tensor<4>,
    /// The sliding-window mask of models that window only some layers (gpt-oss's
    /// `layer_types`); `mask` is then the plain causal one.
    pub sliding_mask: Option<Tensor<4>>,
    /// The window `mask` applies (`None`: plain causal), for the fused softmax.
    pub mask_window: Option<usize>,
    /// The window of `sliding_mask`.
    pub sliding_window: Option<usize>,
}

impl AttentionContext {
    /// Builds the context for a `[batch, seq_len]` input.
    pub fn new(cfg: &AttentionConfig, batch: usize, seq_len: usize, device: &Device) -> Self {
        let causal = |window: Option<usize>| {
            let mut mask = vec![0f32; seq_len * seq_len];
            for q in 0..seq_len {
                for k in 0..seq_len {
                    let too_far = window.is_some_and(|w| q - k.min(q) >= w);
                    if k > q || too_far {
                        mask[q * seq_len + k] = f32::NEG_INFINITY;
                    }
                }
            }
            Tensor::from_data(TensorData::new(mask, [1, 1, seq_len, seq_len]), device)
        };
        let (mask_window, sliding_window) = match &cfg.sliding_layers {
            None => (cfg.sliding_window, None),
            Some(layers) if layers.iter().any(|s| *s) => (None, cfg.sliding_window),
            Some(_) => (None, None),
        };
        let sliding_mask = cfg.sliding_layers.as_ref().filter(|l| l.iter().any(|s| *s)).map(|_| causal(sliding_window));
        let mask = causal(mask_window);
        AttentionContext {
            batch,
            seq_len,
            rope: RopeTables::with_scaling(cfg.rope_theta, cfg.head_dim, &cfg.rope_scaling, seq_len, device),
            mask,
            sliding_mask,
            mask_window,
            sliding_window,
        }
    }
}

/// One attention layer.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Query norm (per head or over the whole projection, per `cfg.qk_norm`).
    pub q_norm: Option<RmsNorm>,
    /// Key norm.
    pub k_norm: Option<RmsNorm>,
    /// Per-head sink logits `[heads]` (gpt-oss): a column that joins the softmax and is
    /// dropped after it.
    pub sinks: Option<Tensor<1>>,
    /// This layer uses [`AttentionContext::sliding_mask`] when the context has one.
    pub sliding: bool,
    /// Settings.
    pub cfg: AttentionConfig,
}

impl Attention {
    /// `[batch·seq, hidden]` rows in, the same shape out.
    pub fn forward(&self, x: Tensor<2>, ctx: &AttentionContext) -> Tensor<2> {
        let c = &self.cfg;
        let (b, t, hd) = (ctx.batch, ctx.seq_len, c.head_dim);
        let mut q = self.q_proj.forward(x.clone());
        let mut k = self.k_proj.forward(x.clone());
        let mut v = self.v_proj.forward(x);
        if c.qk_norm == QkNorm::Full {
            q = self.q_norm.as_ref().expect("q_norm").forward(q);
            k = self.k_norm.as_ref().expect("k_norm").forward(k);
        }
        if let Some(clip) = c.clip_qkv {
            q = q.clamp(-clip, clip);
            k = k.clamp(-clip, clip);
            v = v.clamp(-clip, clip);
        }
        if c.qk_norm == QkNorm::PerHead {
            let per_head = |norm: &RmsNorm, x: Tensor<2>, heads: usize| {
                norm.forward(x.reshape([b * t * heads, hd])).reshape([b * t, heads * hd])
            };
            q = per_head(self.q_norm.as_ref().expect("q_norm"), q, c.num_heads);
            k = per_head(self.k_norm.as_ref().expect("k_norm"), k, c.num_kv_heads);
        }
        let q = kernels::rope_heads(q, b, c.num_heads, &ctx.rope.cos, &ctx.rope.sin);
        let k = kernels::rope_heads(k, b, c.num_kv_heads, &ctx.rope.cos, &ctx.rope.sin);
        let v = v.reshape([b, t, c.num_kv_heads, hd]).swap_dims(1, 2);
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));

        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(k.swap_dims(2, 3));
        let (mask, window) = match (&ctx.sliding_mask, self.sliding) {
            (Some(m), true) => (m, ctx.sliding_window),
            _ => (&ctx.mask, ctx.mask_window),
        };
        let probs = match &self.sinks {
            None => kernels::causal_softmax(scores, scale, window, mask),
            Some(s) => {
                let scores = scores * scale + mask.clone().expand([b, c.num_heads, t, t]);
                let sink = s.clone().reshape([1, c.num_heads, 1, 1]).expand([b, c.num_heads, t, 1]);
                softmax(Tensor::cat(vec![scores, sink], 3), 3).narrow(3, 0, t)
            }
        };
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b * t, c.num_heads * hd]);
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
pub enum SelfAttention {
    /// Mixtral, Qwen, OLMoE.
    Standard(Attention),
    /// DeepSeek-V2/V3.
    Latent(MlaAttention),
}

impl SelfAttention {
    /// `[batch·seq, hidden]` rows in, the same shape out.
    pub fn forward(&self, x: Tensor<2>, ctx: &AttentionContext) -> Tensor<2> {
        match self {
            SelfAttention::Standard(a) => a.forward(x, ctx),
            SelfAttention::Latent(a) => a.forward(x, ctx),
        }
    }

    /// The standard attention, if this is one.
    pub fn standard(&self) -> Option<&Attention> {
        match self {
            SelfAttention::Standard(a) => Some(a),
            SelfAttention::Latent(_) => None,
        }
    }

    /// The output projection (both kinds have one).
    pub fn o_proj(&self) -> &Linear {
        match self {
            SelfAttention::Standard(a) => &a.o_proj,
            SelfAttention::Latent(a) => &a.o_proj,
        }
    }
}

/// How an MLA layer computes its queries.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum MlaQuery {
    /// `q_proj` (when `q_lora_rank` is null).
    Direct(Linear),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    LowRank {
        /// `q_a_proj`.
        a: Linear,
        /// `q_a_layernorm`.
        norm: RmsNorm,
        /// `q_b_proj`.
        b: Linear,
    },
}

/// DeepSeek's multi-head latent attention, as transformers' `DeepseekV3Attention` computes it
/// without a cache: keys and values are expanded from a normalised `kv_lora_rank` latent by
/// `kv_b_proj`; one rotary key of `qk_rope_head_dim` is shared by all heads.
#[derive(Debug, Clone)]
pub struct MlaAttention {
    /// Query projection(s).
    pub q: MlaQuery,
    /// `kv_a_proj_with_mqa`: `[hidden, kv_lora_rank + qk_rope_head_dim]`.
    pub kv_a: Linear,
    /// `kv_a_layernorm` over the latent.
    pub kv_norm: RmsNorm,
    /// `kv_b_proj`: `[kv_lora_rank, heads·(qk_nope_head_dim + v_head_dim)]`.
    pub kv_b: Linear,
    /// `o_proj`: `[heads·v_head_dim, hidden]`.
    pub o_proj: Linear,
    /// MLA dimensions.
    pub mla: MlaConfig,
    /// Settings (heads, RoPE, softmax scale).
    pub cfg: AttentionConfig,
}

impl MlaAttention {
    /// `[batch·seq, hidden]` rows in, the same shape out.
    pub fn forward(&self, x: Tensor<2>, ctx: &AttentionContext) -> Tensor<2> {
        let m = &self.mla;
        let (b, t, heads) = (ctx.batch, ctx.seq_len, self.cfg.num_heads);
        let (nope, rope, vd) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim);
        let q = match &self.q {
            MlaQuery::Direct(p) => p.forward(x.clone()),
            MlaQuery::LowRank { a, norm, b } => b.forward(norm.forward(a.forward(x.clone()))),
        };
        let q = q.reshape([b, t, heads, nope + rope]).swap_dims(1, 2);
        let q_pass = q.clone().narrow(3, 0, nope);
        let q_rot = q.narrow(3, nope, rope);

        let compressed = self.kv_a.forward(x);
        let latent = self.kv_norm.forward(compressed.clone().narrow(1, 0, m.kv_lora_rank));
        let k_rot = compressed.narrow(1, m.kv_lora_rank, rope).reshape([b, 1, t, rope]);
        let (q_rot, k_rot) = if m.rope_interleave {
            (ctx.rope.apply_interleaved(q_rot), ctx.rope.apply_interleaved(k_rot))
        } else {
            (ctx.rope.apply(q_rot), ctx.rope.apply(k_rot))
        };

        let kv = self.kv_b.forward(latent).reshape([b, t, heads, nope + vd]).swap_dims(1, 2);
        let k_nope = kv.clone().narrow(3, 0, nope);
        let v = kv.narrow(3, nope, vd);
        let k = Tensor::cat(vec![k_nope, k_rot.expand([b, heads, t, rope])], 3);
        let q = Tensor::cat(vec![q_pass, q_rot], 3);

        let scores = q.matmul(k.swap_dims(2, 3));
        let probs = kernels::causal_softmax(scores, self.cfg.softmax_scale(), ctx.mask_window, &ctx.mask);
        let out = probs.matmul(v).swap_dims(1, 2).reshape([b * t, heads * vd]);
        self.o_proj.forward(out)
    }
}
