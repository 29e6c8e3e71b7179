//! The row math of a forward pass, in one place for both engines.
//!
//! Every per-row operation a decoder layer computes is written here once, as a function over
//! plain `f32` slices (the `*_rows` / `*_row` functions). Both the burn model's CPU fast path
//! and the tensor-free engine of `diep-infer` call these functions, so the two engines cannot
//! drift apart:
//!
//! | operation | row function | tensor function |
//! |---|---|---|
//! | SwiGLU's `silu(gate) · up` | [`silu_mul_rows`] | [`silu_mul`] |
//! | gpt-oss's clamped SwiGLU | [`clamped_swiglu_rows`] | [`clamped_swiglu`] |
//! | shared-expert sigmoid gate | [`sigmoid_gate_rows`] | [`sigmoid_gate`] |
//! | causal softmax (window, sink) | [`causal_softmax_rows`] | [`causal_softmax`] |
//! | `clip_qkv` | [`clip_rows`] | [`clip`] |
//! | RMSNorm (and qk-norm) | [`rms_norm_rows`] | [`rms_norm`] |
//! | rotate-half / interleaved RoPE | [`head_row`] | [`rope_heads`] |
//! | MLA keys (latent + shared rotary key) | [`head_row`] | [`latent_keys`] |
//! | next-token NLL | [`nll_rows`] | [`token_nll`] |
//!
//! Decisions that follow from the configuration rather than the data are functions too:
//! [`layer_window`] (which sliding window a layer uses) and [`qkv_steps`] (whether qk-norm
//! comes before or after `clip_qkv`).
//!
//! Each tensor function has its reference in plain burn ops beside it (re-exported in
//! [`mod@reference`]); that reference is what runs on other devices (wgpu, CUDA) and under
//! autodiff, and the tests in `tests/kernels.rs` compare the two. The row path runs only when
//! the tensors live on the plain (non-autodiff) `flex` device and [`enabled`] is on (it is
//! unless the environment variable `DIEP_REFERENCE_KERNELS=1` is set, which benchmarks use for
//! before/after figures).
//!
//! Row functions are branch-free where it matters so that LLVM vectorises them, and the hot
//! ones are compiled twice: plain and with `avx2,fma`, chosen at run time.

use std::sync::OnceLock;

use burn::tensor::{Device, Tensor, TensorData};

/// Declares a function compiled twice, plain and with `avx2,fma`, the latter chosen at run
/// time when the CPU has both.
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

mod activation;
mod attention;
mod nll;
mod norm;
mod rope;

pub use activation::{clamped_swiglu, clamped_swiglu_rows, sigmoid_gate, sigmoid_gate_rows, silu_mul, silu_mul_rows};
pub use attention::{
    QkvStep, Span, causal_mask, causal_softmax, causal_softmax_rows, clip, clip_rows, layer_span, layer_window,
    qkv_steps,
};
pub use nll::{nll_rows, token_nll};
pub use norm::{rms_norm, rms_norm_rows, temperature_scales, unit_rms, unit_rms_row};
pub use rope::{RopeStyle, RopeTables, head_row, latent_keys, rope_heads, rope_tables};

/// The burn-op references of the tensor functions: what runs on GPUs and under autodiff, and
/// what the row path is tested against.
pub mod reference {
    pub use super::activation::{
        clamped_swiglu_reference as clamped_swiglu, sigmoid_gate_reference as sigmoid_gate,
        silu_mul_reference as silu_mul,
    };
    pub use super::attention::{causal_softmax_reference as causal_softmax, clip_reference as clip};
    pub use super::nll::token_nll_reference as token_nll;
    pub use super::norm::rms_norm_reference as rms_norm;
    pub use super::rope::{latent_keys_reference as latent_keys, rope_heads_reference as rope_heads};
}

/// Environment variable that forces the burn-op reference path everywhere.
const REFERENCE_ENV: &str = "DIEP_REFERENCE_KERNELS";

/// Whether the row path may be used at all (`DIEP_REFERENCE_KERNELS` unset or `0`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(REFERENCE_ENV).map(|v| v.is_empty() || v == "0").unwrap_or(true))
}

/// Whether the row path runs for tensors on `device`: the plain `flex` device only (never
/// under autodiff, where gradients must flow through burn's ops).
pub fn fused_on(device: &Device) -> bool {
    !device.is_autodiff() && host_rows_on(device)
}

/// Whether row math on the host may stand in for burn ops on tensors of `device`, autodiff or
/// not: the `flex` CPU device (whose tensors already live in host memory) unless [`enabled`] is
/// off. Callers that use it under autodiff supply the gradient themselves (e.g. the `kl`
/// objective's gradient with respect to the logits, `q − p`).
pub fn host_rows_on(device: &Device) -> bool {
    #[cfg(feature = "cpu")]
    {
        enabled() && device.clone().inner() == Device::flex()
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
// Vectorisable scalar math.

/// `e^x` for f32, Cephes' `expf` polynomial: relative error below 2e-7 on `[-87, 88]`; inputs
/// below −87.3 give ≈ 1e-38 instead of 0 (harmless in sums), above 88 are clamped to `e^88`.
/// Branch-free and without float-to-int casts, so that loops over it vectorise: `n = round(x
/// log2 e)` comes from adding 1.5·2²³ (which rounds to nearest even), and `2^n` from the
/// integer bits of that sum.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
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

/// `1 / (1 + e^−x)` with [`exp_f32`].
#[inline(always)]
fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
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

#[cfg(test)]
mod tests {
    use super::rope::rope_row;
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
        causal_softmax_rows(&mut s, 2, 0, 1.0, Span::Causal, None);
        assert_eq!(&s[..2], &[1.0, 0.0]);
        assert!((s[2] - 0.25).abs() < 1e-6 && (s[3] - 0.75).abs() < 1e-6);
        // With a sink of ln 2, row 0 [ln 2] becomes 2 / (2 + 2) and row 1 [0, ln 3] becomes
        // [1, 3] / (1 + 3 + 2).
        let mut s = [2f32.ln(), 9.0, 0.0, 3f32.ln()];
        causal_softmax_rows(&mut s, 2, 0, 1.0, Span::Causal, Some(2f32.ln()));
        assert!((s[0] - 0.5).abs() < 1e-6 && s[1] == 0.0);
        assert!((s[2] - 1.0 / 6.0).abs() < 1e-6 && (s[3] - 0.5).abs() < 1e-6);
        // A window of 1 keeps only the diagonal.
        let mut s = [1.0, 2.0, 3.0, 4.0];
        causal_softmax_rows(&mut s, 2, 0, 1.0, Span::Sliding(1), None);
        assert_eq!(s, [1.0, 0.0, 0.0, 1.0]);
        // NLL of a uniform row is ln(v).
        let mut o = [0f32];
        nll_rows(&[0.5; 10], &[3], &mut o, 10);
        assert!((o[0] - 10f32.ln()).abs() < 1e-6);
        // RMSNorm of [3, 4] with eps 0: rms = sqrt(12.5).
        let mut x = [3.0, 4.0];
        rms_norm_rows(&mut x, &[1.0, 2.0], 0.0);
        let r = 12.5f32.sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
        // Clamped SwiGLU with α = 1, limit 1: gate 2 → 1, up 3 → 1: (1 + 1)·1·σ(1).
        let mut o = [0f32];
        clamped_swiglu_rows(&[2.0, 3.0], &mut o, 1, 1.0, 1.0);
        assert!((o[0] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
        // The shared-expert gate scales a row by σ(g): σ(0) = 1/2.
        let mut y = [2.0, -4.0];
        sigmoid_gate_rows(&mut y, &[0.0], 2);
        assert_eq!(y, [1.0, -2.0]);
        // Rotate-half RoPE by 90° of the pair (1, 2): (−2, 1); interleaved: pairs (x0, x1).
        let (cos, sin) = ([0.0, 0.0], [1.0, 1.0]);
        let mut out = [0f32; 2];
        rope_row(&[1.0, 2.0], &cos, &sin, &mut out, RopeStyle::RotateHalf);
        assert_eq!(out, [-2.0, 1.0]);
        rope_row(&[1.0, 2.0], &cos, &sin, &mut out, RopeStyle::Interleaved);
        assert_eq!(out, [-2.0, 1.0]);
        let mut x = [-3.0, 0.5, 7.0];
        clip_rows(&mut x, 1.0);
        assert_eq!(x, [-1.0, 0.5, 1.0]);
    }
}
