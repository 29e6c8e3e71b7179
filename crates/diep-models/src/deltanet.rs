//! Qwen3-Next's Gated DeltaNet ("linear attention") layer, in burn ops (so it runs on every
//! device and differentiates for DiEP), exactly as transformers' recurrent reference
//! (`torch_recurrent_gated_delta_rule`); its chunked form computes the same recurrence.
//!
//! Per token, with `nk` key heads, `nv = r·nk` value heads:
//!
//! 1. `in_proj_qkvz` gives, per key head group, `[q (dk) | k (dk) | v (r·dv) | z (r·dv)]`, and
//!    `in_proj_ba` `[b (r) | a (r)]`;
//! 2. `[q | k | v]` (all groups' q, then k, then v) goes through a causal depthwise convolution
//!    of width `K` (`conv1d.weight [C, 1, K]`, no bias) and SiLU;
//! 3. `β = sigmoid(b)`, `g = −exp(A_log)·softplus(a + dt_bias)`; value head `h` reads key head
//!    `h / r`; `q` and `k` are L2-normalised (`x / sqrt(Σx² + 1e-6)`), `q` scaled by
//!    `1/sqrt(dk)`;
//! 4. the state `S [dk, dv]` of each value head: `S ← S·exp(g_t)`,
//!    `S ← S + k_t ⊗ β_t·(v_t − k_tᵀS)`, output `o_t = q_tᵀS`;
//! 5. a gated RMSNorm per value head, `rms(o)·w·silu(z)` (`w` not zero-centred), then
//!    `out_proj`.

use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, silu, softplus};
use diep_checkpoint::LinearAttention;

use crate::nn::Linear;

/// One Gated DeltaNet layer.
#[derive(Debug, Clone)]
pub(crate) struct GatedDeltaNet {
    pub(crate) in_proj_qkvz: Linear,
    pub(crate) in_proj_ba: Linear,
    /// `[C, K]`, one causal filter per channel.
    pub(crate) conv: Tensor<2>,
    /// `A_log [nv]`.
    pub(crate) a_log: Tensor<1>,
    /// `dt_bias [nv]`.
    pub(crate) dt_bias: Tensor<1>,
    /// The gated norm's weight `[dv]`.
    pub(crate) norm: Tensor<1>,
    pub(crate) norm_eps: f64,
    pub(crate) out_proj: Linear,
    pub(crate) cfg: LinearAttention,
}

impl GatedDeltaNet {
    /// `[batch·seq, hidden]` rows in, the same shape out.
    pub(crate) fn forward(&self, x: Tensor<2>, b: usize, t: usize) -> Tensor<2> {
        let c = &self.cfg;
        let (nk, nv, dk, dv) = (c.key_heads, c.value_heads, c.key_dim, c.value_dim);
        let r = nv / nk;
        let n = b * t;
        let group = 2 * dk + 2 * r * dv;
        let qkvz = self.in_proj_qkvz.forward(x.clone()).reshape([n, nk, group]);
        let ba = self.in_proj_ba.forward(x).reshape([n, nk, 2 * r]);
        let q = qkvz.clone().narrow(2, 0, dk).reshape([n, nk * dk]);
        let k = qkvz.clone().narrow(2, dk, dk).reshape([n, nk * dk]);
        let v = qkvz.clone().narrow(2, 2 * dk, r * dv).reshape([n, nv * dv]);
        let z = qkvz.narrow(2, 2 * dk + r * dv, r * dv).reshape([n, nv, dv]);
        let beta = sigmoid(ba.clone().narrow(2, 0, r).reshape([b, t, nv]));
        let a = ba.narrow(2, r, r).reshape([b, t, nv]);
        let g = softplus(a + self.dt_bias.clone().reshape([1, 1, nv]), 1.0)
            * self.a_log.clone().exp().neg().reshape([1, 1, nv]);

        // Causal depthwise convolution over time, then SiLU.
        let channels = 2 * nk * dk + nv * dv;
        let mixed = Tensor::cat(vec![q, k, v], 1).reshape([b, t, channels]);
        let kw = c.conv_kernel;
        let device = mixed.device();
        let padded = Tensor::cat(vec![Tensor::<3>::zeros([b, kw - 1, channels], &device), mixed], 1);
        let mut conv = Tensor::<3>::zeros([b, t, channels], &device);
        for j in 0..kw {
            let w = self.conv.clone().narrow(1, j, 1).reshape([1, 1, channels]);
            conv = conv + padded.clone().narrow(1, j, t) * w;
        }
        let conv = silu(conv);
        let q = conv.clone().narrow(2, 0, nk * dk).reshape([b, t, nk, dk]);
        let k = conv.clone().narrow(2, nk * dk, nk * dk).reshape([b, t, nk, dk]);
        let v = conv.narrow(2, 2 * nk * dk, nv * dv).reshape([b, t, nv, dv]);

        // Value head h reads key head h / r.
        let expand = |x: Tensor<4>| -> Tensor<4> {
            if r == 1 {
                return x;
            }
            x.unsqueeze_dim::<5>(3).expand([b, t, nk, r, dk]).reshape([b, t, nv, dk])
        };
        let l2 = |x: Tensor<4>| -> Tensor<4> {
            let ss = x.clone().powi_scalar(2).sum_dim(3);
            x / (ss + 1e-6).sqrt()
        };
        let q = l2(expand(q)) * (1.0 / (dk as f64).sqrt());
        let k = l2(expand(k));
        // [b, nv, t, d]
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
        let decay = g.exp().swap_dims(1, 2).reshape([b, nv, t, 1]);
        let beta = beta.swap_dims(1, 2).reshape([b, nv, t, 1]);

        let mut state = Tensor::<4>::zeros([b, nv, dk, dv], &device);
        let mut outs = Vec::with_capacity(t);
        for i in 0..t {
            let q_t = q.clone().narrow(2, i, 1);
            let k_t = k.clone().narrow(2, i, 1);
            let v_t = v.clone().narrow(2, i, 1);
            state = state * decay.clone().narrow(2, i, 1);
            let kv_mem = k_t.clone().matmul(state.clone());
            let delta = (v_t - kv_mem) * beta.clone().narrow(2, i, 1);
            state = state + k_t.swap_dims(2, 3).matmul(delta);
            outs.push(q_t.matmul(state.clone()));
        }
        // [b, nv, t, dv] → rows [b·t, nv, dv]
        let o = Tensor::cat(outs, 2).swap_dims(1, 2).reshape([n, nv, dv]);
        let normed = crate::kernels::unit_rms(o, self.norm_eps) * self.norm.clone().reshape([1, 1, dv]);
        let gated = normed * silu(z);
        self.out_proj.forward(gated.reshape([n, nv * dv]))
    }
}
