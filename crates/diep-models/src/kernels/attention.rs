//! Attention's row math: the causal softmax (sliding window, attention sinks), `clip_qkv`, and
//! the two configuration decisions both engines share: which window a layer uses and in which
//! order qk-norm and `clip_qkv` apply.

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use diep_checkpoint::{AttentionConfig, QkNorm};
use rayon::prelude::*;

use super::{exp_f32, exp_in_place_sum, from_vec, fused_on, into_vec, max_lanes, rows_per_task};

/// The sliding window layer `layer` attends with (`None`: plain causal attention): every
/// layer's when the config has `sliding_window` and no `sliding_layers`, otherwise only the
/// layers `sliding_layers` marks (gpt-oss's `layer_types`).
pub fn layer_window(cfg: &AttentionConfig, layer: usize) -> Option<usize> {
    match &cfg.sliding_layers {
        None => cfg.sliding_window,
        Some(sliding) if sliding.get(layer).copied().unwrap_or(false) => cfg.sliding_window,
        Some(_) => None,
    }
}

/// Which keys a query attends to, besides causality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Every earlier key.
    Causal,
    /// Keys less than `w` positions back (sliding window).
    Sliding(usize),
    /// Keys of the query's own block of `c` positions (Llama 4's chunked attention).
    Chunked(usize),
}

impl Span {
    /// The first key query `q` attends to.
    #[inline]
    pub fn lo(self, q: usize) -> usize {
        match self {
            Span::Causal => 0,
            Span::Sliding(w) => (q + 1).saturating_sub(w),
            Span::Chunked(c) => q / c * c,
        }
    }
}

impl From<Option<usize>> for Span {
    /// A sliding window, or plain causal attention.
    fn from(window: Option<usize>) -> Span {
        window.map_or(Span::Causal, Span::Sliding)
    }
}

/// What layer `layer` attends to: Llama 4's chunks on its chunked layers, else the sliding
/// window of [`layer_window`], else every earlier key.
pub fn layer_span(cfg: &AttentionConfig, layer: usize) -> Span {
    if let Some(l4) = &cfg.llama4
        && l4.chunked_layers.get(layer).copied().unwrap_or(false)
    {
        return Span::Chunked(l4.chunk_size);
    }
    layer_window(cfg, layer).into()
}

/// One step after the q/k/v projections, see [`qkv_steps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvStep {
    /// RMSNorm of q and k, per head or over the whole projection (`qk_norm`).
    Norm,
    /// Clamp q, k and v to `±clip_qkv` (when the config sets it).
    Clip,
}

/// The order of qk-norm and `clip_qkv`, as transformers applies them: OLMoE's whole-projection
/// norms come before the clip, Qwen3's per-head norms after it.
pub fn qkv_steps(qk_norm: QkNorm) -> &'static [QkvStep] {
    match qk_norm {
        QkNorm::None => &[QkvStep::Clip],
        QkNorm::Full => &[QkvStep::Norm, QkvStep::Clip],
        QkNorm::PerHead => &[QkvStep::Clip, QkvStep::Norm],
    }
}

simd_dispatch! {
    /// Causal softmax over rows of `[.., t, t]` score matrices, in place: row `q` of a matrix
    /// keeps columns `lo(q)..=q` (`lo` from the [`Span`]: sliding window, chunk, or none),
    /// scaled by `scale > 0`, and is zero elsewhere. `first_row` is the index (mod `t`) of the
    /// first row of `s`. A `sink` logit (gpt-oss, not scaled) joins each softmax's denominator
    /// and is dropped after it, as `softmax(cat[scores, sink])[..t]`.
    ///
    /// `s` may also hold rows `first_row..` of a matrix cut to its first `t` columns (keys
    /// `0..t` for queries below `t`), which is all these rows read or write.
    pub fn causal_softmax_rows(s: &mut [f32], t: usize, first_row: usize, scale: f32, span: Span, sink: Option<f32>) {
        for (r, row) in s.chunks_exact_mut(t).enumerate() {
            let q = (first_row + r) % t;
            let lo = span.lo(q);
            let (masked_lo, rest) = row.split_at_mut(lo);
            let (live, masked_hi) = rest.split_at_mut(q + 1 - lo);
            masked_lo.fill(0.0);
            masked_hi.fill(0.0);
            // `scale > 0`, so the maximum of the scaled row is the scaled maximum.
            let mut max = max_lanes(live) * scale;
            if let Some(sink) = sink {
                max = max.max(sink);
            }
            let mut sum = exp_in_place_sum(live, scale, max);
            if let Some(sink) = sink {
                sum += exp_f32(sink - max);
            }
            let inv = 1.0 / sum;
            for x in live.iter_mut() {
                *x *= inv;
            }
        }
    }
}

/// The additive causal mask `[1, 1, len, len]`: 0 where query `q` may attend key `k`
/// (`span.lo(q) ≤ k ≤ q`), −∞ elsewhere.
pub fn causal_mask(len: usize, span: impl Into<Span>, device: &Device) -> Tensor<4> {
    let span = span.into();
    let mut mask = vec![0f32; len * len];
    for q in 0..len {
        for k in 0..len {
            if k > q || k < span.lo(q) {
                mask[q * len + k] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_data(TensorData::new(mask, [1, 1, len, len]), device)
}

/// `softmax(scale · scores + mask)` over the last axis of `[b, h, t, t]`, where `mask` is
/// [`causal_mask`]`(t, span)`; with `sinks` (`[h]`, one logit per head) each row's softmax
/// also counts its head's sink (see [`causal_softmax_rows`]).
pub fn causal_softmax(
    scores: Tensor<4>,
    scale: f64,
    span: impl Into<Span>,
    mask: &Tensor<4>,
    sinks: Option<&Tensor<1>>,
) -> Tensor<4> {
    let span = span.into();
    let device = scores.device();
    if !fused_on(&device) {
        return causal_softmax_reference(scores, scale, mask, sinks);
    }
    let dims = scores.dims();
    let [_, h, t, _] = dims;
    assert_eq!(dims[3], t, "causal_softmax: scores must be square in the last two axes");
    let mut s = into_vec(scores);
    let scale = scale as f32;
    match sinks {
        None => {
            let rows = rows_per_task(t);
            s.par_chunks_mut(rows * t)
                .enumerate()
                .for_each(|(c, chunk)| causal_softmax_rows(chunk, t, (c * rows) % t, scale, span, None));
        }
        Some(sinks) => {
            let sinks = sinks.to_data().try_into_vec::<f32>().expect("f32 sinks");
            assert_eq!(sinks.len(), h, "causal_softmax: {} sinks for {h} heads", sinks.len());
            // One task per (sequence, head) matrix: every row of it has that head's sink.
            s.par_chunks_mut(t * t)
                .enumerate()
                .for_each(|(m, matrix)| causal_softmax_rows(matrix, t, 0, scale, span, Some(sinks[m % h])));
        }
    }
    from_vec(s, dims, &device)
}

/// The reference for [`causal_softmax`]: `softmax(scores · scale + mask)`, with the sinks as
/// one more column that is dropped after the softmax.
pub fn causal_softmax_reference(
    scores: Tensor<4>,
    scale: f64,
    mask: &Tensor<4>,
    sinks: Option<&Tensor<1>>,
) -> Tensor<4> {
    let dims = scores.dims();
    let [b, h, t, _] = dims;
    let scores = scores * scale + mask.clone().expand(dims);
    match sinks {
        None => softmax(scores, 3),
        Some(s) => {
            let sink = s.clone().reshape([1, h, 1, 1]).expand([b, h, t, 1]);
            softmax(Tensor::cat(vec![scores, sink], 3), 3).narrow(3, 0, t)
        }
    }
}

simd_dispatch! {
    /// Clamps every value to `±c` (`clip_qkv`).
    pub fn clip_rows(x: &mut [f32], c: f32) {
        for v in x.iter_mut() {
            *v = v.clamp(-c, c);
        }
    }
}

/// Clamps every value to `±c` (`clip_qkv`).
pub fn clip(x: Tensor<2>, c: f64) -> Tensor<2> {
    let device = x.device();
    if !fused_on(&device) {
        return clip_reference(x, c);
    }
    let dims = x.dims();
    let mut v = into_vec(x);
    v.par_chunks_mut(16_384).for_each(|chunk| clip_rows(chunk, c as f32));
    from_vec(v, dims, &device)
}

/// The reference for [`clip`] in burn ops.
pub fn clip_reference(x: Tensor<2>, c: f64) -> Tensor<2> {
    x.clamp(-c, c)
}
