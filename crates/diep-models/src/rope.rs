//! Rotary position embeddings (the default, non-interleaved "rotate half" variant).

use burn::tensor::{Device, Tensor, TensorData};

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

impl RopeTables {
    /// Tables for `len` positions starting at 0.
    pub fn new(theta: f64, head_dim: usize, len: usize, device: &Device) -> Self {
        let inv = inv_freq(theta, head_dim);
        let half = head_dim / 2;
        let mut cos = vec![0f32; len * head_dim];
        let mut sin = vec![0f32; len * head_dim];
        for p in 0..len {
            for (i, f) in inv.iter().enumerate() {
                let angle = p as f32 * f;
                let (s, c) = angle.sin_cos();
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
}
