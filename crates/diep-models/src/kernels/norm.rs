//! RMSNorm, which is also qk-norm: per head or over a whole projection, a row is normalised in
//! chunks of the weight's length.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::{from_vec, fused_on, into_vec, rows_per_task};

simd_dispatch! {
    /// RMSNorm of rows of width `w.len()`: `w · x / sqrt(mean(x²) + eps)`. A buffer of several
    /// heads normalised with one head's weight is qk-norm per head.
    pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
        let d = w.len();
        for row in x.chunks_exact_mut(d) {
            let mut acc = [0.0f32; 8];
            let chunks = row.chunks_exact(8);
            let tail = chunks.remainder();
            for c in chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a = v.mul_add(v, *a);
                }
            }
            let mut ss: f32 = acc.iter().sum();
            for &v in tail {
                ss += v * v;
            }
            let inv = 1.0 / (ss / d as f32 + eps).sqrt();
            for (v, &w) in row.iter_mut().zip(w) {
                *v = w * (*v * inv);
            }
        }
    }
}

/// RMSNorm over the last axis: `weight · x / sqrt(mean(x²) + eps)`, in f32.
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f64) -> Tensor<D> {
    let device = x.device();
    if !fused_on(&device) {
        return rms_norm_reference(x, weight, eps);
    }
    let dims = x.dims();
    let d = dims[D - 1];
    let w = weight.to_data().try_into_vec::<f32>().expect("f32 weight");
    assert_eq!(w.len(), d, "rms_norm: weight has {} elements for rows of {d}", w.len());
    let mut v = into_vec(x);
    let rows = rows_per_task(d);
    v.par_chunks_mut(rows * d).for_each(|c| rms_norm_rows(c, &w, eps as f32));
    from_vec(v, dims, &device)
}

/// The reference for [`rms_norm`] in burn ops (transformers' order of operations).
pub fn rms_norm_reference<const D: usize>(x: Tensor<D>, weight: &Tensor<1>, eps: f64) -> Tensor<D> {
    let ms = x.clone().square().mean_dim(D - 1);
    let inv = (ms + eps).sqrt().recip();
    x * inv * weight.clone().unsqueeze::<D>()
}

/// Llama 4's weightless qk-norm over the last axis: `x / sqrt(mean(x²) + eps)`.
pub fn unit_rms<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let ms = x.clone().powi_scalar(2).mean_dim(D - 1);
    x / (ms + eps).sqrt()
}

/// The same on one row, in place.
pub fn unit_rms_row(x: &mut [f32], eps: f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Llama 4's attention temperature of positions `0..t` on NoPE layers, in f32 as transformers:
/// `1 + attn_scale · ln(1 + floor((p + 1) / floor_scale))`.
pub fn temperature_scales(t: usize, floor_scale: f64, attn_scale: f64) -> Vec<f32> {
    (0..t).map(|p| ((p as f32 + 1.0) / floor_scale as f32).floor().ln_1p() * attn_scale as f32 + 1.0).collect()
}
