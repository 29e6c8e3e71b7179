//! Small building blocks: linear layers, RMSNorm, SwiGLU.

use burn::tensor::Tensor;

use crate::kernels;

/// `y = x · W (+ b)` with `W` stored `[in, out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`.
    pub weight: Tensor<2>,
    /// `[out]`.
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    /// Applies the layer to `[n, in]` rows.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.weight.clone());
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }
}

/// RMSNorm as transformers computes it: `w · x / sqrt(mean(x²) + eps)`, in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[dim]`.
    pub weight: Tensor<1>,
    /// Epsilon inside the square root.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        kernels::rms_norm(x, &self.weight, self.eps)
    }
}

/// A SwiGLU feed-forward `down(silu(gate·x) * (up·x))` with gate and up fused in one matmul.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// `[hidden, 2·intermediate]`: gate columns first, then up.
    pub gate_up: Linear,
    /// `[intermediate, hidden]`.
    pub down: Linear,
}

impl SwiGlu {
    /// Intermediate width.
    pub fn intermediate(&self) -> usize {
        self.gate_up.out_features() / 2
    }

    /// Applies the block to `[n, hidden]` rows.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let i = self.intermediate();
        self.down.forward(kernels::silu_mul(self.gate_up.forward(x), i))
    }
}
