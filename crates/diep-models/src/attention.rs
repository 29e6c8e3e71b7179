//! Causal self-attention with GQA, RoPE, optional q/k/v biases, qk-norm, `clip_qkv` and a
//! sliding window, covering Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use diep_checkpoint::{AttentionConfig, QkNorm};

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
}

impl AttentionContext {
    /// Builds the context for a `[batch, seq_len]` input.
    pub fn new(cfg: &AttentionConfig, batch: usize, seq_len: usize, device: &Device) -> Self {
        let mut mask = vec![0f32; seq_len * seq_len];
        for q in 0..seq_len {
            for k in 0..seq_len {
                let too_far = cfg.sliding_window.is_some_and(|w| q - k.min(q) >= w);
                if k > q || too_far {
                    mask[q * seq_len + k] = f32::NEG_INFINITY;
                }
            }
        }
        AttentionContext {
            batch,
            seq_len,
            rope: RopeTables::new(cfg.rope_theta, cfg.head_dim, seq_len, device),
            mask: Tensor::from_data(TensorData::new(mask, [1, 1, seq_len, seq_len]), device),
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
        let split = |x: Tensor<2>, heads: usize| x.reshape([b, t, heads, hd]);
        let mut q = split(q, c.num_heads);
        let mut k = split(k, c.num_kv_heads);
        if c.qk_norm == QkNorm::PerHead {
            q = self.q_norm.as_ref().expect("q_norm").forward(q);
            k = self.k_norm.as_ref().expect("k_norm").forward(k);
        }
        let q = ctx.rope.apply(q.swap_dims(1, 2));
        let k = ctx.rope.apply(k.swap_dims(1, 2));
        let v = split(v, c.num_kv_heads).swap_dims(1, 2);
        let (k, v) = (self.repeat_kv(k), self.repeat_kv(v));

        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(k.swap_dims(2, 3)) * scale;
        let scores = scores + ctx.mask.clone().expand([b, c.num_heads, t, t]);
        let probs = softmax(scores, 3);
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
