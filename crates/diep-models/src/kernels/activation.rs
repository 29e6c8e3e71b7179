//! Gated activations: SwiGLU's `silu(gate) · up`, gpt-oss's clamped SwiGLU, and the shared
//! expert's sigmoid gate.

use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, silu};
use rayon::prelude::*;

use super::{exp_f32, from_vec, fused_on, into_vec, rows_per_task, sigmoid_f32};

simd_dispatch! {
    /// `out[j] = silu(gu[j]) · gu[i + j]` for each row of `[rows, 2i]` (gate columns first).
    pub fn silu_mul_rows(gu: &[f32], out: &mut [f32], i: usize) {
        for (row, o) in gu.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
            let (g, u) = row.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + exp_f32(-g)) * u;
            }
        }
    }
}

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

simd_dispatch! {
    /// gpt-oss's clamped SwiGLU for each row of `[rows, 2i]` (gate columns first):
    /// `out = (clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)` with `g = min(gate, limit)`.
    pub fn clamped_swiglu_rows(gu: &[f32], out: &mut [f32], i: usize, alpha: f32, limit: f32) {
        for (row, o) in gu.chunks_exact(2 * i).zip(out.chunks_exact_mut(i)) {
            let (g, u) = row.split_at(i);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                let g = g.min(limit);
                let u = u.clamp(-limit, limit);
                *o = (u + 1.0) * (g * sigmoid_f32(g * alpha));
            }
        }
    }
}

/// gpt-oss's clamped SwiGLU (see [`clamped_swiglu_rows`]) of `[n, 2i]` gate/up rows: `[n, i]`.
pub fn clamped_swiglu(gu: Tensor<2>, i: usize, alpha: f64, limit: f64) -> Tensor<2> {
    let device = gu.device();
    if !fused_on(&device) {
        return clamped_swiglu_reference(gu, i, alpha, limit);
    }
    let [n, w] = gu.dims();
    assert_eq!(w, 2 * i, "clamped_swiglu: width {w} is not 2 × {i}");
    let gu = into_vec(gu);
    let mut out = vec![0f32; n * i];
    let rows = rows_per_task(2 * i);
    let (alpha, limit) = (alpha as f32, limit as f32);
    out.par_chunks_mut(rows * i)
        .zip(gu.par_chunks(rows * 2 * i))
        .for_each(|(o, g)| clamped_swiglu_rows(g, o, i, alpha, limit));
    from_vec(out, [n, i], &device)
}

/// The reference for [`clamped_swiglu`] in burn ops, as transformers' `GptOssExperts`.
pub fn clamped_swiglu_reference(gu: Tensor<2>, i: usize, alpha: f64, limit: f64) -> Tensor<2> {
    let gate = gu.clone().narrow(1, 0, i).clamp_max(limit);
    let up = gu.narrow(1, i, i).clamp(-limit, limit);
    let glu = gate.clone() * sigmoid(gate * alpha);
    (up + 1.0) * glu
}

simd_dispatch! {
    /// Scales row `r` of `y` (rows of `width`) by `sigmoid(gate[r])`: the shared expert's gate
    /// (Qwen2-MoE's `shared_expert_gate`).
    pub fn sigmoid_gate_rows(y: &mut [f32], gate: &[f32], width: usize) {
        for (row, &g) in y.chunks_exact_mut(width).zip(gate) {
            let s = sigmoid_f32(g);
            for v in row.iter_mut() {
                *v *= s;
            }
        }
    }
}

/// `sigmoid(gate) · y` for `y` `[n, width]` and gate logits `[n, 1]`.
pub fn sigmoid_gate(y: Tensor<2>, gate: Tensor<2>) -> Tensor<2> {
    let device = y.device();
    if !fused_on(&device) {
        return sigmoid_gate_reference(y, gate);
    }
    let [n, w] = y.dims();
    assert_eq!(gate.dims(), [n, 1], "sigmoid_gate: one gate logit per row");
    let gate = into_vec(gate);
    let mut y = into_vec(y);
    let rows = rows_per_task(w);
    y.par_chunks_mut(rows * w).zip(gate.par_chunks(rows)).for_each(|(y, g)| sigmoid_gate_rows(y, g, w));
    from_vec(y, [n, w], &device)
}

/// The reference for [`sigmoid_gate`] in burn ops.
pub fn sigmoid_gate_reference(y: Tensor<2>, gate: Tensor<2>) -> Tensor<2> {
    sigmoid(gate) * y
}
