//! Rotary position embeddings: the default "rotate half" variant, DeepSeek's interleaved
//! pairs, yarn frequency scaling and linear position scaling.

use burn::tensor::{Device, Tensor, TensorData};
use diep_checkpoint::{RopeScaling, YarnConfig};

/// cos/sin tables for positions `0..len`, computed in f32 the way transformers does:
/// `inv_freq = 1 / θ^(2i/d)`, `freqs = pos · inv_freq`, `emb = [freqs, freqs]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// `[1, 1, len, head_dim]`.
    pub cos: Tensor<4>,
    /// `[1, 1, len, head_dim]`.
    pub sin: Tensor<4>,
}

/// The inverse frequencies, `head_dim / 2` of them, in f32 as transformers computes them.
pub fn inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
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
pub fn yarn_inv_freq(theta: f64, head_dim: usize, y: &YarnConfig) -> Vec<f32> {
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

impl RopeTables {
    /// Tables for `len` positions starting at 0.
    pub fn new(theta: f64, head_dim: usize, len: usize, device: &Device) -> Self {
        Self::with_scaling(theta, head_dim, &RopeScaling::None, len, device)
    }

    /// Tables for `len` positions with frequency scaling; yarn also multiplies cos and sin by
    /// its attention factor (as transformers does); linear scaling divides the positions by
    /// its factor.
    pub fn with_scaling(theta: f64, head_dim: usize, scaling: &RopeScaling, len: usize, device: &Device) -> Self {
        let (inv, attention_factor) = match scaling {
            RopeScaling::None | RopeScaling::Linear { .. } => (inv_freq(theta, head_dim), None),
            RopeScaling::Yarn(y) => (yarn_inv_freq(theta, head_dim, y), Some(y.attention_factor() as f32)),
        };
        // Linear scaling divides the positions (as DeepSeek-MoE's remote code: `t / factor`).
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
        let mk = |v| Tensor::from_data(TensorData::new(v, [1, 1, len, head_dim]), device);
        RopeTables { cos: mk(cos), sin: mk(sin) }
    }

    /// Applies the rotation to `[batch, heads, len, head_dim]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, d - half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let cos = self.cos.clone().narrow(2, 0, t).expand([b, h, t, d]);
        let sin = self.sin.clone().narrow(2, 0, t).expand([b, h, t, d]);
        x * cos + rotated * sin
    }

    /// Applies the rotation to `[batch, heads, len, head_dim]` laid out in interleaved pairs
    /// `(x0, x1), (x2, x3), ...` (DeepSeek), as transformers'
    /// `apply_rotary_pos_emb_interleave`: the output holds the rotated even elements, then the
    /// rotated odd ones. (Any fixed permutation applied to both q and k leaves `q·k` unchanged,
    /// so this equals DeepSeek-V2's complex-number form in attention.)
    pub fn apply_interleaved(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
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
