//! Small building blocks: linear layers, RMSNorm, SwiGLU.

use burn::tensor::Tensor;

use crate::kernels;

/// `y = x · W (+ b)` with `W` stored `[in, out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[in, out]`.
    pub(crate) weight: Tensor<2>,
    /// `[out]`.
    pub(crate) bias: Option<Tensor<1>>,
}

impl Linear {
    /// A layer from its weight `[in, out]` and optional bias `[out]`.
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Linear { weight, bias }
    }

    /// The weight `[in, out]`.
    pub fn weight(&self) -> &Tensor<2> {
        &self.weight
    }

    /// Applies the layer to `[n, in]` rows.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = x.matmul(self.weight.clone());
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }

    /// Output width.
    pub(crate) fn out_features(&self) -> usize {
        self.weight.dims()[1]
    }
}

/// RMSNorm as transformers computes it: `w · x / sqrt(mean(x²) + eps)`, in f32.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[dim]`.
    pub(crate) weight: Tensor<1>,
    /// Epsilon inside the square root.
    pub(crate) eps: f64,
}

impl RmsNorm {
    /// A norm from its weight `[dim]` and epsilon.
    pub(crate) fn new(weight: Tensor<1>, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// Normalises over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        kernels::rms_norm(x, &self.weight, self.eps)
    }
}

/// A SwiGLU feed-forward `down(silu(gate·x) * (up·x))` with gate and up fused in one matmul.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// `[hidden, 2·intermediate]`: gate columns first, then up.
    pub(crate) gate_up: Linear,
    /// `[intermediate, hidden]`.
    pub(crate) down: Linear,
}

impl SwiGlu {
    /// A block from its fused gate/up projection (`[hidden, 2·intermediate]`, gate columns
    /// first) and its down projection (`[intermediate, hidden]`).
    pub fn new(gate_up: Linear, down: Linear) -> Self {
        SwiGlu { gate_up, down }
    }

    /// Intermediate width.
    pub(crate) fn intermediate(&self) -> usize {
        self.gate_up.out_features() / 2
    }

    /// Applies the block to `[n, hidden]` rows.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let i = self.intermediate();
        self.down.forward(kernels::silu_mul(self.gate_up.forward(x), i))
    }
}
