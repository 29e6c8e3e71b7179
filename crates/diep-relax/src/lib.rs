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
//! `diep_plan::select`, the one shared by every method.
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

/// Which experts share a threshold of the routed relaxation, and how many each group keeps in
/// expectation: the relaxation's keep budget.
///
/// - [`Budget::global`]: one pool of all experts of all layers keeping `Σ N − K` — the budget
///   of a global allocation, where layers compete for experts;
/// - [`Budget::per_layer`]: one pool per layer keeping `N_l − round(r·N_l)` — the budget of a
///   uniform allocation, so the optimiser sees the per-layer counts that will be cut;
/// - [`Budget::per_group`]: one pool per routing group of each layer, for group-limited
///   routers under a uniform allocation (each group keeps the same count).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Members of each pool, `(layer, expert)`.
    pools: Vec<Vec<(usize, usize)>>,
    /// Experts each pool keeps in expectation.
    keep: Vec<f64>,
}

impl Budget {
    /// One pool of every expert of `experts` (routed experts per MoE layer), keeping `keep`.
    pub fn global(experts: &BTreeMap<usize, usize>, keep: usize) -> Self {
        let members = experts.iter().flat_map(|(l, n)| (0..*n).map(move |e| (*l, e))).collect();
        Budget { pools: vec![members], keep: vec![keep as f64] }
    }

    /// One pool per layer, layer `l` keeping `keep[l]` of its `experts[l]`.
    pub fn per_layer(experts: &BTreeMap<usize, usize>, keep: &BTreeMap<usize, usize>) -> Self {
        Self::per_group(experts, 1, keep)
    }

    /// One pool per routing group (`n_group` contiguous groups per layer), layer `l` keeping
    /// `keep[l]` split evenly over its groups.
    pub fn per_group(experts: &BTreeMap<usize, usize>, n_group: usize, keep: &BTreeMap<usize, usize>) -> Self {
        let n_group = n_group.max(1);
        let mut b = Budget { pools: Vec::new(), keep: Vec::new() };
        for (l, n) in experts {
            let size = n / n_group;
            for g in 0..n_group {
                b.pools.push((g * size..(g + 1) * size).map(|e| (*l, e)).collect());
                b.keep.push(keep.get(l).copied().unwrap_or(*n) as f64 / n_group as f64);
            }
        }
        b
    }

    /// Number of pools.
    pub fn pools(&self) -> usize {
        self.pools.len()
    }

    /// Expected kept count of each pool.
    pub fn keep(&self) -> &[f64] {
        &self.keep
    }
}

/// The thresholds of a routed relaxation at one step: `θ_P` of every pool `P` of a [`Budget`],
/// set by bisection so that `Σ_{i∈P} σ((s_i − θ_P)/τ) = keep_P`, and the weights of its
/// implicit gradient `∂θ_P/∂s_i = σ'_i / Σ_{j∈P} σ'_j` (zero outside `P`). Computed on the host,
/// without gradients: a whole-model autodiff pass ([`routed_options_budget`]) and a streamed
/// per-layer one (each layer's `θ` a leaf whose gradient is folded back through these weights)
/// use the same numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// `θ` of each pool.
    pub theta: Vec<f64>,
    /// Per layer, the pool of each expert.
    pub pool: BTreeMap<usize, Vec<usize>>,
    /// Per layer, `∂θ_{pool(i)}/∂s_i` of each expert.
    pub weights: BTreeMap<usize, Vec<f64>>,
}

impl Thresholds {
    /// Solves every pool's threshold for `scores` (per layer, per expert `s`) at temperature
    /// `tau`.
    pub fn solve(budget: &Budget, scores: &BTreeMap<usize, Vec<f64>>, tau: f64) -> Self {
        let mut pool: BTreeMap<usize, Vec<usize>> = scores.iter().map(|(l, s)| (*l, vec![0; s.len()])).collect();
        let mut weights: BTreeMap<usize, Vec<f64>> = scores.iter().map(|(l, s)| (*l, vec![0.0; s.len()])).collect();
        let mut theta = Vec::with_capacity(budget.pools.len());
        for (p, members) in budget.pools.iter().enumerate() {
            let s: Vec<f64> = members.iter().map(|(l, e)| scores[l][*e]).collect();
            let t = threshold(&s, budget.keep[p], tau);
            // σ'((s − θ)/τ) per member, normalised over the pool: the weights of ∂θ/∂s.
            let slope: Vec<f64> = s
                .iter()
                .map(|s| {
                    let q = 1.0 / (1.0 + (-(s - t) / tau).exp());
                    q * (1.0 - q)
                })
                .collect();
            let norm: f64 = slope.iter().sum::<f64>().max(f64::MIN_POSITIVE);
            for ((l, e), w) in members.iter().zip(slope) {
                pool.get_mut(l).expect("layer")[*e] = p;
                weights.get_mut(l).expect("layer")[*e] = w / norm;
            }
            theta.push(t);
        }
        Thresholds { theta, pool, weights }
    }

    /// `θ` of each expert of `layer` (its pool's), as an f32 tensor: the threshold input of
    /// [`routed_layer_options`].
    pub fn layer_theta(&self, layer: usize, device: &Device) -> Tensor<1> {
        let v: Vec<f32> = self.pool[&layer].iter().map(|p| self.theta[*p] as f32).collect();
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), device)
    }

    /// Folds the gradient of the loss with respect to each expert's threshold input (`dθ`, per
    /// layer and expert, as returned for [`Thresholds::layer_theta`] leaves) back onto the
    /// scores: the implicit-gradient term `Σ_{j∈P} dθ_j · ∂θ_P/∂s_i` of every expert `i` of
    /// pool `P`, per layer. Add it to the direct `∂L/∂s`.
    pub fn fold(&self, dtheta: &BTreeMap<usize, Vec<f64>>) -> BTreeMap<usize, Vec<f64>> {
        let mut per_pool = vec![0.0; self.theta.len()];
        for (l, d) in dtheta {
            for (e, g) in d.iter().enumerate() {
                per_pool[self.pool[l][e]] += g;
            }
        }
        self.weights
            .iter()
            .map(|(l, w)| (*l, w.iter().zip(&self.pool[l]).map(|(w, p)| w * per_pool[*p]).collect()))
            .collect()
    }
}

/// The routed relaxation's options for one layer given its threshold input `theta` (`[N_l]`,
/// each expert's pool threshold; a tensor so a streamed backward can take its gradient):
/// router bias `log p`, `p = σ((s − θ)/τ)`, and with `gate_outputs` every routed contribution
/// multiplied by `p`.
pub fn routed_layer_options(p: &LayerParams, theta: Tensor<1>, tau: f64, gate_outputs: bool) -> MoeForwardOptions {
    sampled_layer_options(p, theta, tau, gate_outputs, None)
}

/// [`routed_layer_options`] with a sampled mask: given logistic noise `L` (`[N_l]`, one draw
/// per expert) and a concrete temperature `t`, the mask is `m = σ(((s − θ)/τ + L)/t)` in place
/// of `p = σ((s − θ)/τ)`. `P(m > ½) = p`, so `p` stays the keep probability the budget
/// constrains, while each forward pass sees a nearly hard mask (the smaller `t`, the harder).
/// The expected objective over such masks is smallest at a hard plan, which the deterministic
/// relaxation's is not: with every `p` of a layer equal and fractional its softmax is unchanged.
/// `None`: the deterministic relaxation.
pub fn sampled_layer_options(
    p: &LayerParams,
    theta: Tensor<1>,
    tau: f64,
    gate_outputs: bool,
    noise: Option<(Tensor<1>, f64)>,
) -> MoeForwardOptions {
    let z = (p.routed_score() - theta) / tau;
    let z = match noise {
        Some((l, t)) => (z + l) / t,
        None => z,
    };
    // log σ computed stably: finite (with a finite gradient) even where p underflows.
    let log_p = log_sigmoid(z);
    let expert_scale = gate_outputs.then(|| log_p.clone().exp());
    MoeForwardOptions { router_bias: Some(log_p), expert_scale, ..Default::default() }
}

/// The routed relaxation over a whole model under a [`Budget`], for one autodiff pass through
/// every layer. With `implicit`, each pool's threshold carries its implicit gradient: `θ_P(s)`
/// solves `Σ_{i∈P} σ((s_i − θ_P)/τ) = keep_P`, so `∂θ_P/∂s_i = σ'_i / Σ_{j∈P} σ'_j`; the value
/// is the bisection's, and the gradient makes each pool's keep budget zero-sum, so raising one
/// expert's (or layer's) score lowers the others' keep-probability, as the discrete ranking
/// will. Without, θ is a constant of the step.
///
/// With `gate_outputs`, each routed contribution is also multiplied by `p` (still exact at
/// hard masks: a kept expert has `p = 1`, a removed one is never selected), so a uniformly
/// lowered `p` — invisible to the softmax — is felt through the block's output.
pub fn routed_options_budget(
    params: &BTreeMap<usize, LayerParams>,
    budget: &Budget,
    tau: f64,
    gate_outputs: bool,
    implicit: bool,
) -> BTreeMap<usize, MoeForwardOptions> {
    let scores: BTreeMap<usize, Tensor<1>> = params.iter().map(|(l, p)| (*l, p.routed_score())).collect();
    let host_scores: BTreeMap<usize, Vec<f64>> = scores.iter().map(|(l, s)| (*l, host(s.clone().detach()))).collect();
    let th = Thresholds::solve(budget, &host_scores, tau);
    // θ_P = θ0_P + Σ_{j∈P} w_j (s_j − detach(s_j)): the bisection's value, the implicit gradient.
    let mut pool_theta: Vec<Option<Tensor<1>>> = vec![None; th.theta.len()];
    if implicit {
        for (l, s) in &scores {
            let n = s.dims()[0];
            for (p, slot) in pool_theta.iter_mut().enumerate() {
                let w: Vec<f32> =
                    (0..n).map(|e| if th.pool[l][e] == p { th.weights[l][e] as f32 } else { 0.0 }).collect();
                if w.iter().all(|x| *x == 0.0) {
                    continue;
                }
                let w = Tensor::from_data(TensorData::new(w, [n]), &s.device());
                let term = ((s.clone() - s.clone().detach()) * w).sum();
                *slot = Some(match slot.take() {
                    Some(t) => t + term,
                    None => term,
                });
            }
        }
    }
    params
        .iter()
        .map(|(l, p)| {
            let device = p.alpha.device();
            let n = p.num_experts();
            let mut theta = th.layer_theta(*l, &device);
            for (pi, t) in pool_theta.iter().enumerate() {
                let Some(t) = t else { continue };
                let ind: Vec<f32> = th.pool[l].iter().map(|q| if *q == pi { 1.0 } else { 0.0 }).collect();
                if ind.iter().any(|x| *x != 0.0) {
                    theta = theta + t.clone().expand([n]) * Tensor::from_data(TensorData::new(ind, [n]), &device);
                }
            }
            (*l, routed_layer_options(p, theta, tau, gate_outputs))
        })
        .collect()
}

/// [`routed_options_budget`] with one global pool keeping `keep` experts and the implicit
/// threshold gradient.
pub fn routed_options_implicit(
    params: &BTreeMap<usize, LayerParams>,
    keep: usize,
    tau: f64,
    gate_outputs: bool,
) -> BTreeMap<usize, MoeForwardOptions> {
    let experts = params.iter().map(|(l, p)| (*l, p.num_experts())).collect();
    routed_options_budget(params, &Budget::global(&experts, keep), tau, gate_outputs, true)
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
