//! Rotary position embeddings: the default "rotate half" variant, DeepSeek's interleaved
//! pairs, yarn frequency scaling and linear position scaling; and the split of projection rows
//! into heads that applies them (including MLA's keys, whose rotary part one latent key
//! shares across heads).

use burn::tensor::{Device, Tensor, TensorData};
use diep_checkpoint::{AttentionConfig, RopeScaling, YarnConfig};
use rayon::prelude::*;

use super::{fused_on, into_vec};

/// The inverse frequencies, `head_dim / 2` of them, in f32 as transformers computes them:
/// `inv_freq = 1 / θ^(2i/d)`.
fn inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    let base = theta as f32;
    (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0f32 / base.powf(exponent)
        })
        .collect()
}

/// Yarn's inverse frequencies, in f32 as transformers' `_compute_yarn_parameters`: a blend of
/// the original (extrapolated) and `factor`-interpolated frequencies along a linear ramp over
/// the correction range.
fn yarn_inv_freq(theta: f64, head_dim: usize, y: &YarnConfig) -> Vec<f32> {
    let dim = head_dim as f64;
    let correction_dim = |rotations: f64| {
        dim * (y.original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001;
    }
    let base = theta as f32;
    let factor = y.factor as f32;
    (0..head_dim / 2)
        .map(|i| {
            let pos_freq = base.powf((2 * i) as f32 / head_dim as f32);
            let extrapolation = 1.0f32 / pos_freq;
            let interpolation = 1.0f32 / (factor * pos_freq);
            let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0f32 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

/// Llama 3's scaling of the inverse frequencies, in f32 as transformers'
/// `_compute_llama3_parameters`: wavelengths `2π / f` above `orig / low` are divided by `factor`,
/// those below `orig / high` kept, and the ones between blended with
/// `s = (orig / wavelen − low) / (high − low)`: `(1 − s)·f / factor + s·f`.
fn llama3_inv_freq(inv: Vec<f32>, factor: f32, low: f32, high: f32, orig: f32) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (orig / low, orig / high);
    inv.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            // (Equal factors, as in Llama 4 Scout, leave no band to blend.)
            if wavelen < high_wavelen || wavelen > low_wavelen || high <= low {
                scaled
            } else {
                let s = (orig / wavelen - low) / (high - low);
                (1.0 - s) * scaled / factor + s * scaled
            }
        })
        .collect()
}

/// cos/sin tables `[len, head_dim]` (row-major) for positions `0..len`, computed in f32 the
/// way transformers does: `freqs = pos · inv_freq`, `emb = [freqs, freqs]`. Yarn also
/// multiplies cos and sin by its attention factor; linear scaling divides the positions by its
/// factor (as DeepSeek-MoE's remote code: `t / factor`).
pub fn rope_tables(theta: f64, head_dim: usize, scaling: &RopeScaling, len: usize) -> (Vec<f32>, Vec<f32>) {
    let (inv, attention_factor) = match scaling {
        RopeScaling::None | RopeScaling::Linear { .. } => (inv_freq(theta, head_dim), None),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => (
            llama3_inv_freq(
                inv_freq(theta, head_dim),
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            ),
            None,
        ),
        RopeScaling::Yarn(y) => (yarn_inv_freq(theta, head_dim, y), Some(y.attention_factor() as f32)),
    };
    let position = |p: usize| match scaling {
        RopeScaling::Linear { factor } => p as f32 / *factor as f32,
        _ => p as f32,
    };
    let half = head_dim / 2;
    let mut cos = vec![0f32; len * head_dim];
    let mut sin = vec![0f32; len * head_dim];
    for p in 0..len {
        for (i, f) in inv.iter().enumerate() {
            let angle = position(p) * f;
            let (mut s, mut c) = angle.sin_cos();
            if let Some(a) = attention_factor {
                s *= a;
                c *= a;
            }
            for j in [i, i + half] {
                cos[p * head_dim + j] = c;
                sin[p * head_dim + j] = s;
            }
        }
    }
    (cos, sin)
}

/// RoPE tables on a device (`[1, 1, len, head_dim]` tensors for the burn-op path) and on the
/// host (for the row path).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor<4>,
    sin: Tensor<4>,
    host_cos: Vec<f32>,
    host_sin: Vec<f32>,
    dim: usize,
}

impl RopeTables {
    /// Tables for `len` positions without frequency scaling.
    pub fn new(theta: f64, head_dim: usize, len: usize, device: &Device) -> Self {
        Self::with_scaling(theta, head_dim, &RopeScaling::None, len, device)
    }

    /// The tables of an attention configuration (its θ, rotary width and scaling).
    pub(crate) fn for_config(cfg: &AttentionConfig, len: usize, device: &Device) -> Self {
        Self::with_scaling(cfg.rope_theta, cfg.rotary_dim, &cfg.rope_scaling, len, device)
    }

    /// Tables for `len` positions with frequency scaling (see [`rope_tables`]).
    fn with_scaling(theta: f64, head_dim: usize, scaling: &RopeScaling, len: usize, device: &Device) -> Self {
        let (host_cos, host_sin) = rope_tables(theta, head_dim, scaling, len);
        let mk = |v: &[f32]| Tensor::from_data(TensorData::new(v.to_vec(), [1, 1, len, head_dim]), device);
        RopeTables { cos: mk(&host_cos), sin: mk(&host_sin), host_cos, host_sin, dim: head_dim }
    }

    /// The cos and sin rows of position `pos`.
    fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.dim..(pos + 1) * self.dim;
        (&self.host_cos[r.clone()], &self.host_sin[r])
    }

    /// Rotates `[b, h, t, dim]` in burn ops.
    fn rotate(&self, x: Tensor<4>, style: RopeStyle) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        match style {
            RopeStyle::RotateHalf => {
                let x1 = x.clone().narrow(3, 0, half);
                let x2 = x.clone().narrow(3, half, d - half);
                let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
                let cos = self.cos.clone().narrow(2, 0, t).expand([b, h, t, d]);
                let sin = self.sin.clone().narrow(2, 0, t).expand([b, h, t, d]);
                x * cos + rotated * sin
            }
            RopeStyle::Interleaved => {
                let pairs = x.reshape([b, h, t, half, 2]);
                let x1 = pairs.clone().narrow(4, 0, 1).reshape([b, h, t, half]);
                let x2 = pairs.narrow(4, 1, 1).reshape([b, h, t, half]);
                let cos = self.cos.clone().narrow(2, 0, t).narrow(3, 0, half).expand([b, h, t, half]);
                let sin = self.sin.clone().narrow(2, 0, t).narrow(3, 0, half).expand([b, h, t, half]);
                let even = x1.clone() * cos.clone() - x2.clone() * sin.clone();
                let odd = x2 * cos + x1 * sin;
                Tensor::cat(vec![even, odd], 3)
            }
        }
    }
}

/// How RoPE pairs the elements of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// transformers' `apply_rotary_pos_emb`: element `j` pairs with `j + d/2`,
    /// `x·cos + rotate_half(x)·sin`.
    RotateHalf,
    /// transformers' `apply_rotary_pos_emb_interleave` (DeepSeek): pairs `(x[2i], x[2i+1])`
    /// rotated by frequency `i`; the output holds the rotated even elements, then the rotated
    /// odd ones. (Any fixed permutation applied to both q and k leaves `q·k` unchanged, so this
    /// equals DeepSeek-V2's complex-number form in attention.)
    Interleaved,
}

impl RopeStyle {
    /// The style of an MLA layer (`rope_interleave`), rotate-half otherwise.
    pub fn interleaved_if(interleave: bool) -> Self {
        if interleave { RopeStyle::Interleaved } else { RopeStyle::RotateHalf }
    }
}

/// RoPE of one head row `x` at one position, into `out`: `cos` and `sin` are that position's
/// table rows, of the rotary width `r ≤ x.len()` (the interleaved style reads their first half);
/// `x[..r]` is rotated, `x[r..]` copied (partial RoPE).
#[inline]
pub(super) fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], style: RopeStyle) {
    let r = cos.len();
    out[r..].copy_from_slice(&x[r..]);
    let half = r / 2;
    match style {
        RopeStyle::RotateHalf => {
            for j in 0..half {
                out[j] = x[j] * cos[j] - x[j + half] * sin[j];
                out[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
            }
        }
        RopeStyle::Interleaved => {
            for i in 0..half {
                let (e, o) = (x[2 * i], x[2 * i + 1]);
                out[i] = e * cos[i] - o * sin[i];
                out[half + i] = o * cos[i] + e * sin[i];
            }
        }
    }
}

/// One head row of queries or keys: `pass` copied as is (MLA's non-rotary part; empty for
/// standard attention), then `rot` rotated: rotate-half (element `j` pairs with `j + r/2`) or
/// interleaved (pairs `(rot[2i], rot[2i+1])`, output even elements first), see [`RopeStyle`];
/// `cos` and `sin` are the position's table rows, of the rotary width `r` (the interleaved
/// style reads their first half). With partial RoPE `r < rot.len()`, and `rot[r..]` is copied.
#[inline]
pub fn head_row(pass: &[f32], rot: &[f32], cos: &[f32], sin: &[f32], style: RopeStyle, out: &mut [f32]) {
    let (o_pass, o_rot) = out.split_at_mut(pass.len());
    o_pass.copy_from_slice(pass);
    rope_row(rot, cos, sin, o_rot, style);
}

/// Splits projection rows `[b·t, heads·d]` into `[b, heads, t, d]`, each head's first `pass`
/// elements copied, the next `tables.dim` rotated with `tables` (at least `t` positions), and
/// the rest copied (partial RoPE; MLA's `pass` is its non-rotary part and nothing follows).
pub fn rope_heads(
    x: Tensor<2>,
    b: usize,
    heads: usize,
    pass: usize,
    tables: &RopeTables,
    style: RopeStyle,
) -> Tensor<4> {
    let device = x.device();
    if !fused_on(&device) {
        return rope_heads_reference(x, b, heads, pass, tables, style);
    }
    let [n, w] = x.dims();
    let (t, d) = (n / b, w / heads);
    assert!(d >= pass + tables.dim, "rope_heads: head width {d} < {pass} passed + {} rotated", tables.dim);
    let x = into_vec(x);
    let mut out = vec![0f32; n * w];
    // Output block (batch, head) is `[t, d]`; its rows read `x[batch·t + pos][head·d ..]`.
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, block)| {
        let (bi, h) = (bh / heads, bh % heads);
        for (pos, o) in block.chunks_exact_mut(d).enumerate() {
            let src = &x[(bi * t + pos) * w + h * d..][..d];
            let (cos, sin) = tables.row(pos);
            head_row(&src[..pass], &src[pass..], cos, sin, style, o);
        }
    });
    Tensor::from_data(TensorData::new(out, [b, heads, t, d]), &device)
}

/// The reference for [`rope_heads`] in burn ops.
pub fn rope_heads_reference(
    x: Tensor<2>,
    b: usize,
    heads: usize,
    pass: usize,
    tables: &RopeTables,
    style: RopeStyle,
) -> Tensor<4> {
    let [n, w] = x.dims();
    let (t, d) = (n / b, w / heads);
    let x = x.reshape([b, t, heads, d]).swap_dims(1, 2);
    let r = tables.dim;
    if pass == 0 && r == d {
        return tables.rotate(x, style);
    }
    let mut parts = Vec::with_capacity(3);
    if pass > 0 {
        parts.push(x.clone().narrow(3, 0, pass));
    }
    parts.push(tables.rotate(x.clone().narrow(3, pass, r), style));
    if pass + r < d {
        parts.push(x.narrow(3, pass + r, d - pass - r));
    }
    Tensor::cat(parts, 3)
}

/// MLA's keys `[b, heads, t, nope + r]`: per head, the first `nope` elements of that head's
/// `kv_b_proj` output (`kv` rows `[b·t, heads·(nope + v_head_dim)]`), then the one rotary key
/// all heads share (`k_rot` rows `[b·t, r]`, rotated with `tables`).
pub fn latent_keys(
    kv: Tensor<2>,
    k_rot: Tensor<2>,
    b: usize,
    heads: usize,
    nope: usize,
    tables: &RopeTables,
    style: RopeStyle,
) -> Tensor<4> {
    let device = kv.device();
    if !fused_on(&device) {
        return latent_keys_reference(kv, k_rot, b, heads, nope, tables, style);
    }
    let [n, kw] = kv.dims();
    let r = k_rot.dims()[1];
    assert_eq!(r, tables.dim, "latent_keys: rotary width {r} but tables of {}", tables.dim);
    let (t, per_head, dq) = (n / b, kw / heads, nope + r);
    let (kv, k_rot) = (into_vec(kv), into_vec(k_rot));
    let mut out = vec![0f32; b * heads * t * dq];
    out.par_chunks_mut(t * dq).enumerate().for_each(|(bh, block)| {
        let (bi, h) = (bh / heads, bh % heads);
        for (pos, o) in block.chunks_exact_mut(dq).enumerate() {
            let row = bi * t + pos;
            let (cos, sin) = tables.row(pos);
            head_row(&kv[row * kw + h * per_head..][..nope], &k_rot[row * r..][..r], cos, sin, style, o);
        }
    });
    Tensor::from_data(TensorData::new(out, [b, heads, t, dq]), &device)
}

/// The reference for [`latent_keys`] in burn ops, as transformers' `DeepseekV3Attention`.
pub fn latent_keys_reference(
    kv: Tensor<2>,
    k_rot: Tensor<2>,
    b: usize,
    heads: usize,
    nope: usize,
    tables: &RopeTables,
    style: RopeStyle,
) -> Tensor<4> {
    let [n, kw] = kv.dims();
    let r = k_rot.dims()[1];
    let t = n / b;
    let k_nope = kv.reshape([b, t, heads, kw / heads]).swap_dims(1, 2).narrow(3, 0, nope);
    let k_rot = tables.rotate(k_rot.reshape([b, 1, t, r]), style);
    Tensor::cat(vec![k_nope, k_rot.expand([b, heads, t, r])], 3)
}
