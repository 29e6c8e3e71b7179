//! Fused CPU kernels for inference on burn's `flex` backend.
//!
//! At small hidden sizes a forward pass is dominated not by matrix multiplication but by
//! element-wise work that burn runs as separate ops, each a full pass over memory with its own
//! allocation, and some with scalar `exp` (`sigmoid` in SiLU). The kernels here fuse those
//! passes and vectorise `exp`:
//!
//! - [`silu_mul`]: SwiGLU's `silu(gate) · up` from the fused gate/up projection, in one pass;
//! - [`causal_softmax`]: attention's `softmax(scale · s + causal mask)`, computing only the
//!   unmasked part of each row;
//! - [`rms_norm`]: RMSNorm in one pass;
//! - [`rope_heads`]: the `[b·t, heads·d] → [b, heads, t, d]` split and rotate-half RoPE;
//! - [`token_nll`]: per-position `logsumexp(logits) − logits[target]` without materialising
//!   the log-softmax.
//!
//! The row functions (`*_rows`, [`exp_f32`]) work on plain slices and are shared with the
//! tensor-free CPU engine of `diep-infer`.
//!
//! Every kernel has its reference in plain burn ops beside it (the `*_reference` functions),
//! which is also what runs on other devices (wgpu, CUDA) and under autodiff; the tests in
//! `tests/kernels.rs` compare the two. The fused path runs only when the tensors live on the
//! plain (non-autodiff) `flex` device and [`enabled`] is on (it is unless the environment
//! variable `DIEP_REFERENCE_KERNELS=1` is set, which benchmarks use for before/after figures).

use std::sync::OnceLock;

use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

/// Environment variable that forces the burn-op reference path everywhere.
pub const REFERENCE_ENV: &str = "DIEP_REFERENCE_KERNELS";

/// Whether fused kernels may be used at all (`DIEP_REFERENCE_KERNELS` unset or `0`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(REFERENCE_ENV).map(|v| v.is_empty() || v == "0").unwrap_or(true))
}

/// Whether the fused CPU kernels run for tensors on `device`: the plain `flex` device only
/// (never under autodiff, where gradients must flow through burn's ops).
pub fn fused_on(device: &Device) -> bool {
    #[cfg(feature = "cpu")]
    {
        enabled() && !device.is_autodiff() && *device == Device::flex()
    }
    #[cfg(not(feature = "cpu"))]
    {
        let _ = device;
        false
    }
}

/// Rows handled per rayon task: enough work to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

fn into_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 tensor")
}

fn from_vec<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

// ---------------------------------------------------------------------------------------------
// Vectorisable scalar math. Written branch-free so that LLVM turns the loops below into SIMD;
// the `avx2,fma` instantiations are chosen at run time.

/// `e^x` for f32, Cephes' `expf` polynomial: relative error below 2e-7 on `[-87, 88]`; inputs
/// below −87.3 give ≈ 1e-38 instead of 0 (harmless in sums), above 88 are clamped to `e^88`.
/// Branch-free and without float-to-int casts, so that loops over it vectorise: `n = round(x
/// log2 e)` comes from adding 1.5·2²³ (which rounds to nearest even), and `2^n` from the
/// integer bits of that sum.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.3, 88.0);
    let k = x.mul_add(LOG2E, MAGIC);
    let n = k - MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    // k's low mantissa bits hold n (|n| ≤ 127 ≪ 2^22): 2^n has biased exponent n + 127.
    let pow2 = f32::from_bits(k.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    y * pow2
}

/// Maximum of a slice, in eight lanes so that it vectorises (`−∞` when empty).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for &v in tail {
        m = if v > m { v } else { m };
    }
    m
}

/// Replaces each `x` by `exp(x·scale − shift)` and returns their sum (eight f32 lanes).
#[inline(always)]
fn exp_in_place_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            let e = exp_f32(v.mul_add(scale, -shift));
            *v = e;
            *a += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for v in chunks.into_remainder() {
        let e = exp_f32(v.mul_add(scale, -shift));
        *v = e;
        sum += e;
    }
    sum
}

/// `Σ exp(x − shift)` (eight f32 lanes, summed in f64).
#[inline(always)]
fn exp_sum(x: &[f32], shift: f32) -> f64 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += exp_f32(v - shift);
        }
    }
    let mut sum: f64 = acc.iter().map(|a| *a as f64).sum();
    for &v in tail {
        sum += exp_f32(v - shift) as f64;
    }
    sum
}

macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        // The only unsafe code: calling the `avx2,fma` build after checking the CPU has both.
        #[allow(unsafe_code)]
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

simd_dispatch! {
    /// `out[j] = silu(gu[j]) · gu[i + j]` for each row of `[rows, 2i]`.
    pub fn silu_mul_rows(gu: &[f32], out: &mut [f32], i: usize) {
        for (row, o) in gu.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
            let (g, u) = row.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp_f32(-g)) * u;
            }
        }
    }
}

simd_dispatch! {
    /// Causal softmax over rows of `[.., t, t]` score matrices, in place: row `q` of each
    /// matrix keeps columns `lo(q)..=q` (`lo` from the sliding window), scaled, and is zero
    /// elsewhere. `first_row` is the index (mod `t`) of the first row of `s`.
    pub fn causal_softmax_rows(s: &mut [f32], t: usize, first_row: usize, scale: f32, window: usize) {
        for (r, row) in s.chunks_exact_mut(t).enumerate() {
            let q = (first_row + r) % t;
            let lo = (q + 1).saturating_sub(window);
            let (masked_lo, rest) = row.split_at_mut(lo);
            let (live, masked_hi) = rest.split_at_mut(q + 1 - lo);
            masked_lo.fill(0.0);
            masked_hi.fill(0.0);
            // `scale > 0`, so the maximum of the scaled row is the scaled maximum.
            let max = max_lanes(live) * scale;
            let sum = exp_in_place_sum(live, scale, max);
            let inv = 1.0 / sum;
            for x in live.iter_mut() {
                *x *= inv;
            }
        }
    }
}

simd_dispatch! {
    /// `out[r] = logsumexp(logits[r]) − logits[r][target[r]]` per row of width `v`.
    pub fn nll_rows(logits: &[f32], targets: &[u32], out: &mut [f32], v: usize) {
        for ((row, &tgt), o) in logits.chunks_exact(v).zip(targets).zip(out.iter_mut()) {
            let max = max_lanes(row);
            let sum = exp_sum(row, max);
            *o = (max as f64 + sum.ln() - row[tgt as usize] as f64) as f32;
        }
    }
}

simd_dispatch! {
    /// RMSNorm of rows of width `w.len()`: `w · x / sqrt(mean(x²) + eps)`.
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

// ---------------------------------------------------------------------------------------------
// SwiGLU activation.

/// `silu(gate) · up` where `gu` is `[n, 2i]` with the gate columns first: `[n, i]`.
pub fn silu_mul(gu: Tensor<2>, i: usize) -> Tensor<2> {
    let device = gu.device();
    if !fused_on(&device) {
        return silu_mul_reference(gu, i);
    }
    let [n, w] = gu.dims();
    assert_eq!(w, 2 * i, "silu_mul: width {w} is not 2 × {i}");
    let gu = into_vec(gu);
    let mut out = vec![0f32; n * i];
    let rows = rows_per_task(2 * i);
    out.par_chunks_mut(rows * i).zip(gu.par_chunks(rows * 2 * i)).for_each(|(o, g)| silu_mul_rows(g, o, i));
    from_vec(out, [n, i], &device)
}

/// The reference for [`silu_mul`] in burn ops.
pub fn silu_mul_reference(gu: Tensor<2>, i: usize) -> Tensor<2> {
    let gate = gu.clone().narrow(1, 0, i);
    let up = gu.narrow(1, i, i);
    silu(gate) * up
}

// ---------------------------------------------------------------------------------------------
// Attention softmax.

/// `softmax(scale · scores + mask)` over the last axis of `[b, h, t, t]`, where the mask
/// allows key `k` for query `q` iff `k ≤ q` and `q − k < window` (`None`: no window).
pub fn causal_softmax(scores: Tensor<4>, scale: f64, window: Option<usize>, mask: &Tensor<4>) -> Tensor<4> {
    let device = scores.device();
    if !fused_on(&device) {
        return causal_softmax_reference(scores, scale, mask);
    }
    let dims = scores.dims();
    let t = dims[3];
    assert_eq!(dims[2], t, "causal_softmax: scores must be square in the last two axes");
    let mut s = into_vec(scores);
    let rows = rows_per_task(t);
    let window = window.unwrap_or(usize::MAX);
    s.par_chunks_mut(rows * t)
        .enumerate()
        .for_each(|(c, chunk)| causal_softmax_rows(chunk, t, (c * rows) % t, scale as f32, window));
    from_vec(s, dims, &device)
}

/// The reference for [`causal_softmax`]: `softmax(scores · scale + mask)`.
pub fn causal_softmax_reference(scores: Tensor<4>, scale: f64, mask: &Tensor<4>) -> Tensor<4> {
    let dims = scores.dims();
    softmax(scores * scale + mask.clone().expand(dims), 3)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

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

// ---------------------------------------------------------------------------------------------
// RoPE.

/// Splits projection rows `[b·t, heads·d]` into `[b, heads, t, d]` and applies rotate-half
/// RoPE with `cos`/`sin` tables of at least `t` rows of width `d` (`[1, 1, ≥t, d]`), as
/// transformers' `apply_rotary_pos_emb`: `x·cos + rotate_half(x)·sin`.
pub fn rope_heads(x: Tensor<2>, b: usize, heads: usize, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let device = x.device();
    let [n, w] = x.dims();
    let t = n / b;
    let d = w / heads;
    if !fused_on(&device) {
        return rope_heads_reference(x, b, heads, cos, sin);
    }
    let table = |m: &Tensor<4>| m.clone().narrow(2, 0, t).to_data().try_into_vec::<f32>().expect("f32 table");
    let (cos, sin) = (table(cos), table(sin));
    let x = into_vec(x);
    let half = d / 2;
    let mut out = vec![0f32; n * w];
    // Output block (batch, head) is `[t, d]`; its rows read `x[batch·t + pos][head·d ..]`.
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, block)| {
        let (bi, h) = (bh / heads, bh % heads);
        for (pos, o) in block.chunks_exact_mut(d).enumerate() {
            let src = &x[(bi * t + pos) * w + h * d..][..d];
            let (c, s) = (&cos[pos * d..][..d], &sin[pos * d..][..d]);
            for j in 0..half {
                o[j] = src[j] * c[j] - src[j + half] * s[j];
            }
            for j in half..d {
                o[j] = src[j] * c[j] + src[j - half] * s[j];
            }
        }
    });
    from_vec(out, [b, heads, t, d], &device)
}

/// The reference for [`rope_heads`] in burn ops.
pub fn rope_heads_reference(x: Tensor<2>, b: usize, heads: usize, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [n, w] = x.dims();
    let (t, d) = (n / b, w / heads);
    let x = x.reshape([b, t, heads, d]).swap_dims(1, 2);
    let half = d / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, d - half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    let cos = cos.clone().narrow(2, 0, t).expand([b, heads, t, d]);
    let sin = sin.clone().narrow(2, 0, t).expand([b, heads, t, d]);
    x * cos + rotated * sin
}

// ---------------------------------------------------------------------------------------------
// Next-token NLL.

/// Negative log-likelihoods `[b][t − 1]`: position `p` of sequence `s` scores
/// `targets[s][p]` under `logits[s, p, :]` (`logits` is `[b, t, vocab]`, `targets` holds
/// `t − 1` ids per sequence).
pub fn token_nll(logits: Tensor<3>, targets: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let device = logits.device();
    let [b, t, v] = logits.dims();
    assert_eq!(targets.len(), b, "token_nll: {} target rows for a batch of {b}", targets.len());
    if t < 2 {
        return vec![Vec::new(); b];
    }
    if !fused_on(&device) {
        return token_nll_reference(logits, targets);
    }
    for row in targets {
        assert_eq!(row.len(), t - 1, "token_nll: each target row needs {} ids", t - 1);
        if let Some(bad) = row.iter().find(|&&id| id as usize >= v) {
            panic!("token_nll: target id {bad} is outside the vocabulary of {v}");
        }
    }
    let logits = into_vec(logits);
    // Row `s·t + p` for p < t − 1 is scored; the last position of each sequence is not.
    let mut flat_targets = vec![0u32; b * t];
    for (s, row) in targets.iter().enumerate() {
        flat_targets[s * t..s * t + t - 1].copy_from_slice(row);
    }
    let mut out = vec![0f32; b * t];
    let rows = rows_per_task(v);
    out.par_chunks_mut(rows)
        .zip(logits.par_chunks(rows * v))
        .zip(flat_targets.par_chunks(rows))
        .for_each(|((o, l), tg)| nll_rows(l, tg, o, v));
    out.chunks_exact(t).map(|r| r[..t - 1].to_vec()).collect()
}

/// The reference for [`token_nll`]: `−gather(log_softmax(logits[:, :-1]), targets)`.
pub fn token_nll_reference(logits: Tensor<3>, targets: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let device = logits.device();
    let [b, t, _] = logits.dims();
    if t < 2 {
        return vec![Vec::new(); b];
    }
    let logp = log_softmax(logits.narrow(1, 0, t - 1), 2);
    let flat: Vec<i64> = targets.iter().flat_map(|s| s.iter().map(|x| *x as i64)).collect();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(flat, [b, t - 1, 1]), &device);
    let picked: Vec<f32> = logp.gather(2, idx).into_data().iter::<f32>().collect();
    picked.chunks(t - 1).map(|c| c.iter().map(|x| -x).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_2e7_relative() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e30) < 1e-37 && exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn hand_computed_rows() {
        // silu(1)·2 = 2/(1+e^-1); silu(-2)·0.5 = -1/(1+e^2).
        let mut out = [0f32; 2];
        silu_mul_rows(&[1.0, -2.0, 2.0, 0.5], &mut out, 2);
        assert!((out[0] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        assert!((out[1] + 1.0 / (1.0 + 2f32.exp())).abs() < 1e-6);
        // Causal rows of a 2×2 matrix: row 0 is [1, 0]; row 1 is softmax([0, ln 3]) = [1/4, 3/4].
        let mut s = [5.0, 9.0, 0.0, 3f32.ln()];
        causal_softmax_rows(&mut s, 2, 0, 1.0, usize::MAX);
        assert_eq!(&s[..2], &[1.0, 0.0]);
        assert!((s[2] - 0.25).abs() < 1e-6 && (s[3] - 0.75).abs() < 1e-6);
        // NLL of a uniform row is ln(v).
        let mut o = [0f32];
        nll_rows(&[0.5; 10], &[3], &mut o, 10);
        assert!((o[0] - 10f32.ln()).abs() < 1e-6);
        // RMSNorm of [3, 4] with eps 0: rms = sqrt(12.5).
        let mut x = [3.0, 4.0];
        rms_norm_rows(&mut x, &[1.0, 2.0], 0.0);
        let r = 12.5f32.sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
    }
}
