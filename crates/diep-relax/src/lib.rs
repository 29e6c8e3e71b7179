//! DiEP's continuous relaxation of the expert-combination search space.
//!
//! Each MoE layer `l` with `N_l` routed experts gets intra-layer scores `α_l ∈ R^{N_l}` and an
//! inter-layer importance `β_l > 0`. A [`Relaxation`] turns them into the per-layer
//! [`MoeForwardOptions`] of the shared MoE block, so the relaxed model is the real model with
//! frozen weights and only α and β as free parameters:
//!
//! - [`Relaxation::Paper`] (the paper's Eq. 4–5 made concrete): the routed contributions are
//!   scaled, `y_l = β_l · Σ_{i∈topk(x)} g_i(x) · N_l·softmax(α_l)_i · E_i(x)`; at α = 0, β = 1
//!   this is the original model.
//! - [`Relaxation::Routed`]: keep-probabilities `p = σ((s − θ)/τ)` with
//!   `s = log softmax(α_l) + log N_l + log β_l`, and `θ` a global threshold set by bisection
//!   so that `Σ p = Σ N − K`; the router sees `z + log p` before its usual top-k. At
//!   `p ∈ {0, 1}` this is exactly the pruned model.
//!
//! [`scores`] gives the per-expert scores the discrete choice ranks by; the choice itself is
//! [`diep_plan::select`], the one shared by every method.
#![warn(missing_docs)]

use std::collections::BTreeMap;

use burn::tensor::activation::{log_sigmoid, log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use diep_models::MoeForwardOptions;

/// Which relaxation the model runs under.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Relaxation {
    /// Scale the routed contributions by `β·N·softmax(α)`.
    Paper,
    /// Bias the router by `log p`, `p = σ((s − θ)/τ)`, with temperature `τ`.
    Routed {
        /// The temperature.
        tau: f64,
    },
}

/// The learnable parameters of one MoE layer.
#[derive(Debug, Clone)]
pub struct LayerParams {
    /// `α_l`, `[N_l]`.
    pub alpha: Tensor<1>,
    /// `log β_l`, `[1]` (β is kept positive through its logarithm).
    pub log_beta: Tensor<1>,
}

impl LayerParams {
    /// α = 0, β = 1: the relaxed model equals the original model (paper relaxation) and
    /// every expert is equally likely to be kept (routed relaxation).
    pub fn init(num_experts: usize, device: &Device) -> Self {
        LayerParams { alpha: Tensor::zeros([num_experts], device), log_beta: Tensor::zeros([1], device) }
    }

    /// Experts in the layer.
    pub fn num_experts(&self) -> usize {
        self.alpha.dims()[0]
    }

    /// `s = log softmax(α) + log N + log β`, the routed relaxation's per-expert score.
    pub fn routed_score(&self) -> Tensor<1> {
        let n = self.num_experts() as f64;
        log_softmax(self.alpha.clone(), 0) + n.ln() + self.log_beta.clone()
    }

    /// `β·N·softmax(α)`, the paper relaxation's per-expert output scale.
    pub fn paper_scale(&self) -> Tensor<1> {
        let n = self.num_experts() as f64;
        softmax(self.alpha.clone(), 0) * n * self.log_beta.clone().exp()
    }
}

fn host(t: Tensor<1>) -> Vec<f64> {
    t.into_data().iter::<f32>().map(f64::from).collect()
}

/// Sets the global threshold `θ` so that `Σ σ((s − θ)/τ) = keep` (bisection; no gradient).
pub fn threshold(scores: &[f64], keep: f64, tau: f64) -> f64 {
    let kept = |theta: f64| scores.iter().map(|s| 1.0 / (1.0 + (-(s - theta) / tau).exp())).sum::<f64>();
    let (lo0, hi0) = scores.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), s| (a.min(*s), b.max(*s)));
    // kept(θ) decreases in θ; widen the bracket until it holds the target.
    let span = 50.0 * tau + 1.0;
    let (mut lo, mut hi) = (lo0 - span, hi0 + span);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if kept(mid) > keep {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The per-layer forward options of a relaxation, for [`diep_models::MoeModel::forward_per_layer`].
/// `keep` is `Σ N − K`, the number of experts the routed relaxation's threshold keeps.
pub fn forward_options(
    relaxation: Relaxation,
    params: &BTreeMap<usize, LayerParams>,
    keep: usize,
) -> BTreeMap<usize, MoeForwardOptions> {
    match relaxation {
        Relaxation::Paper => params
            .iter()
            .map(|(l, p)| (*l, MoeForwardOptions { expert_scale: Some(p.paper_scale()), ..Default::default() }))
            .collect(),
        Relaxation::Routed { tau } => {
            let all: Vec<f64> = params.values().flat_map(|p| host(p.routed_score().detach())).collect();
            routed_options(params, threshold(&all, keep as f64, tau), tau)
        }
    }
}

/// The routed relaxation's options for a given threshold `θ` (treated as a constant: it
/// carries no gradient).
pub fn routed_options(
    params: &BTreeMap<usize, LayerParams>,
    theta: f64,
    tau: f64,
) -> BTreeMap<usize, MoeForwardOptions> {
    params
        .iter()
        .map(|(l, p)| {
            // log σ computed stably: finite (with a finite gradient) even where p underflows.
            let log_p = log_sigmoid((p.routed_score() - theta) / tau);
            (*l, MoeForwardOptions { router_bias: Some(log_p), ..Default::default() })
        })
        .collect()
}

/// The routed relaxation with a threshold that carries the budget's gradient: `θ(s)` is the
/// solution of `Σ σ((s − θ)/τ) = keep`, so by the implicit function theorem
/// `∂θ/∂s_i = σ'_i / Σ_j σ'_j`. The value is the bisection's; the gradient makes the keep
/// budget zero-sum, so raising one expert's (or layer's) score lowers everyone else's
/// keep-probability, as the discrete ranking will.
///
/// With `gate_outputs`, each routed contribution is also multiplied by `p` (still exact at
/// hard masks: a kept expert has `p = 1`, a removed one is never selected), so a uniformly
/// lowered `p` — invisible to the softmax — is felt through the block's output.
pub fn routed_options_implicit(
    params: &BTreeMap<usize, LayerParams>,
    keep: usize,
    tau: f64,
    gate_outputs: bool,
) -> BTreeMap<usize, MoeForwardOptions> {
    let scores: BTreeMap<usize, Tensor<1>> = params.iter().map(|(l, p)| (*l, p.routed_score())).collect();
    let all: Vec<f64> = scores.values().flat_map(|s| host(s.clone().detach())).collect();
    let theta0 = threshold(&all, keep as f64, tau);
    // σ'((s − θ)/τ) per expert, normalised over all experts: the weights of ∂θ/∂s.
    let slope: Vec<f64> = all
        .iter()
        .map(|s| {
            let p = 1.0 / (1.0 + (-(s - theta0) / tau).exp());
            p * (1.0 - p)
        })
        .collect();
    let norm: f64 = slope.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let mut offset = 0;
    let mut theta: Option<Tensor<1>> = None;
    for s in scores.values() {
        let n = s.dims()[0];
        let w: Vec<f32> = slope[offset..offset + n].iter().map(|x| (x / norm) as f32).collect();
        offset += n;
        let w = Tensor::from_data(TensorData::new(w, [n]), &s.device());
        let term = ((s.clone() - s.clone().detach()) * w).sum();
        theta = Some(match theta {
            Some(t) => t + term,
            None => term,
        });
    }
    let theta = theta.map(|t| t + theta0);
    params
        .keys()
        .map(|l| {
            let t = theta.clone().expect("at least one layer");
            let log_p = log_sigmoid((scores[l].clone() - t) / tau);
            let expert_scale = gate_outputs.then(|| log_p.clone().exp());
            (*l, MoeForwardOptions { router_bias: Some(log_p), expert_scale, ..Default::default() })
        })
        .collect()
}

/// Router biases that keep exactly the given experts (0 kept, −∞ removed): the routed
/// relaxation's hard limit, and a plain expert mask.
pub fn hard_mask_options(kept: &BTreeMap<usize, Vec<bool>>, device: &Device) -> BTreeMap<usize, MoeForwardOptions> {
    kept.iter()
        .map(|(l, keep)| {
            let bias: Vec<f32> = keep.iter().map(|k| if *k { 0.0 } else { f32::NEG_INFINITY }).collect();
            let n = bias.len();
            let t = Tensor::from_data(TensorData::new(bias, [n]), device);
            (*l, MoeForwardOptions { router_bias: Some(t), ..Default::default() })
        })
        .collect()
}

/// The global score of each expert under a relaxation: the paper ranks by `α·β` (raw
/// logits); the routed relaxation by its own `s`, so the discrete choice is the one the
/// optimiser saw. Under a uniform allocation only the order within a layer matters.
pub fn scores(relaxation: Relaxation, params: &BTreeMap<usize, LayerParams>) -> BTreeMap<usize, Vec<f64>> {
    params
        .iter()
        .map(|(l, p)| {
            let v = match relaxation {
                Relaxation::Paper => {
                    let beta = host(p.log_beta.clone().exp())[0];
                    host(p.alpha.clone()).into_iter().map(|a| a * beta).collect()
                }
                Relaxation::Routed { .. } => host(p.routed_score()),
            };
            (*l, v)
        })
        .collect()
}
