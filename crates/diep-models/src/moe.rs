//! The mixture-of-experts block: one shared implementation of routing and expert dispatch.
//!
//! Everything that looks inside an MoE layer — routing statistics, the DiEP relaxations,
//! masking for pruning, evaluation — goes through [`MoeBlock::forward_detailed`], so there is
//! exactly one definition of what a layer computes:
//!
//! 1. router logits `z = x·Wᵀ (+ b)` (`[tokens, experts]`, f32; gpt-oss's router has a bias
//!    `b`), plus an optional additive
//!    per-expert bias (an expert mask is a bias of −∞ on masked experts);
//! 2. [`route_with`]: the architecture's [`RoutingConfig`] — `p = softmax(z)` (Mixtral, Qwen,
//!    OLMoE, DeepSeek-MoE, DeepSeek-V2) or `p = sigmoid(z)` (DeepSeek-V3, whose selection adds a per-expert
//!    correction bias), optionally limited to the best `topk_group` expert groups; top-k,
//!    renormalised when `norm_topk_prob`, times `routed_scaling_factor`;
//! 3. grouped dispatch: each expert gathers the tokens routed to it, runs one SwiGLU over
//!    them (gpt-oss: with biases and its clamped activation, [`ExpertActivation`]), and the
//!    weighted results are scatter-added back;
//! 4. plus the shared expert, gated by `sigmoid(x·w_sg)` (Qwen2-MoE) or ungated (DeepSeek).
//!
//! gpt-oss's rule (top-k of the logits, softmax over the k selected) is the softmax rule with
//! `norm_topk_prob`: a full softmax renormalised over the top-k is the same arithmetic.
//!
//! A masked expert gets probability exactly 0, is never selected, and the softmax
//! renormalises over the kept experts: the same arithmetic as a checkpoint from which the
//! expert was removed. With sigmoid scoring an additive bias `b` multiplies the score by
//! `exp(b)` (so `b = log p` plays the same role as for the softmax, and `−∞` removes the
//! expert from the selection); with group-limited routing, masking equals removal when every
//! group keeps the same number of experts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::activation::{sigmoid, softmax};

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use diep_checkpoint::{ExpertActivation, GroupLimit, GroupScore, Renorm, RoutingConfig, Scoring};

use crate::error::{ModelError, Result};
use crate::kernels;
use crate::nn::{Linear, SwiGlu};

/// The result of routing a batch of tokens.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Raw router logits `[tokens, experts]` (before any bias or mask).
    pub logits: Tensor<2>,
    /// Router scores `[tokens, experts]`: softmax over the (biased, masked) logits, or for
    /// sigmoid routing `sigmoid(logits)·exp(bias)` (0 for masked experts).
    pub probs: Tensor<2>,
    /// Routing weights of the selected experts `[tokens, top_k]`.
    pub weights: Tensor<2>,
    /// Selected experts `[tokens, top_k]`, in descending selection score.
    pub experts: Tensor<2, Int>,
}

/// The routing parameters of one block: the architecture's rule plus `top_k` and
/// `norm_topk_prob`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingRule {
    /// Experts per token.
    pub top_k: usize,
    /// Renormalise the top-k weights.
    pub norm_topk_prob: bool,
    /// Scoring, group limit, scaling.
    pub config: RoutingConfig,
}

impl RoutingRule {
    /// The plain softmax rule of Mixtral, Qwen and OLMoE.
    pub fn softmax(top_k: usize, norm_topk_prob: bool) -> Self {
        RoutingRule { top_k, norm_topk_prob, config: RoutingConfig::softmax() }
    }

    /// Whether this is the plain softmax rule (no groups, no scaling).
    pub fn is_plain_softmax(&self) -> bool {
        let c = &self.config;
        c.scoring == Scoring::Softmax
            && c.group_limit.is_none()
            && c.routed_scaling_factor == 1.0
            && !c.correction_bias
            && c.renorm == Renorm::Sum
    }

    /// Routes one token on the host, restricted to the experts marked `allowed` (the others
    /// are treated as masked): `(expert, weight)` pairs in selection order. `correction` is
    /// the selection bias of sigmoid routing. This is [`route_with`]'s arithmetic for one row,
    /// for searches that re-route many expert subsets (NAEE).
    pub fn route_row(&self, logits: &[f32], allowed: &[bool], correction: Option<&[f32]>) -> Vec<(usize, f32)> {
        let n = logits.len();
        let scores: Vec<f32> = match self.config.scoring {
            Scoring::Softmax => {
                let max = (0..n).filter(|e| allowed[*e]).map(|e| logits[e]).fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = (0..n).map(|e| if allowed[e] { (logits[e] - max).exp() } else { 0.0 }).collect();
                let z: f32 = exps.iter().sum();
                exps.iter().map(|v| v / z).collect()
            }
            Scoring::Sigmoid => {
                (0..n).map(|e| if allowed[e] { 1.0 / (1.0 + (-logits[e]).exp()) } else { 0.0 }).collect()
            }
        };
        let choice: Vec<f32> = (0..n)
            .map(|e| match (allowed[e], correction) {
                (false, _) => f32::NEG_INFINITY,
                (true, Some(c)) => scores[e] + c[e],
                (true, None) => scores[e],
            })
            .collect();
        let chosen = select_experts(&choice, self.top_k, self.config.group_limit);
        let denom = if self.norm_topk_prob {
            let sum: f32 = chosen.iter().map(|e| scores[*e]).sum();
            self.config.renorm.denominator(sum)
        } else {
            1.0
        };
        let scale = self.config.routed_scaling_factor as f32;
        chosen.into_iter().map(|e| (e, scores[e] / denom * scale)).collect()
    }
}

/// Top-k selection on one token's selection scores, optionally limited to the best
/// `topk_group` groups (contiguous blocks of `n / n_group` experts, scored by their maximum
/// or by the sum of their two largest scores). Descending score, ties to the lower id. `−∞`
/// marks an expert that must not be chosen.
fn select_experts(choice: &[f32], top_k: usize, groups: Option<GroupLimit>) -> Vec<usize> {
    let n = choice.len();
    let mut allowed = vec![true; n];
    if let Some(g) = groups {
        let size = n / g.n_group;
        let mut group_scores: Vec<(f32, usize)> = (0..g.n_group)
            .map(|gi| {
                let mut v: Vec<f32> = choice[gi * size..(gi + 1) * size].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                let score = match g.score {
                    GroupScore::Max => v[0],
                    GroupScore::Top2Sum => v[0] + v.get(1).copied().unwrap_or(f32::NEG_INFINITY),
                };
                (score, gi)
            })
            .collect();
        group_scores.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut keep_group = vec![false; g.n_group];
        for (_, gi) in group_scores.iter().take(g.topk_group) {
            keep_group[*gi] = true;
        }
        for (e, a) in allowed.iter_mut().enumerate() {
            *a = keep_group[(e / size).min(g.n_group - 1)];
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Experts outside the kept groups rank below every expert inside them.
    order.sort_by(|&a, &b| allowed[b].cmp(&allowed[a]).then(choice[b].total_cmp(&choice[a])).then(a.cmp(&b)));
    order.truncate(top_k);
    order
}

/// The shared routing rule of Mixtral, Qwen2/3-MoE and OLMoE: softmax in f32, top-k of the
/// probabilities, optional renormalisation of the k weights.
pub fn route(logits: Tensor<2>, bias: Option<&Tensor<1>>, top_k: usize, norm_topk_prob: bool) -> Routing {
    route_with(logits, bias, None, &RoutingRule::softmax(top_k, norm_topk_prob))
}

/// The one routing function of every architecture. `bias` (`[experts]`, e.g. an expert mask of
/// 0/−∞ or a relaxation's `log p`) is added to the logits before a softmax, or multiplies the
/// sigmoid scores by `exp(bias)`; `correction` is DeepSeek-V3's `e_score_correction_bias`,
/// added to the scores for selection only. Plain softmax rules run on the device; rules with
/// groups or sigmoid scores select on the host (selection carries no gradient) and gather the
/// weights on the device.
pub fn route_with(
    logits: Tensor<2>,
    bias: Option<&Tensor<1>>,
    correction: Option<&Tensor<1>>,
    rule: &RoutingRule,
) -> Routing {
    let (top_k, norm_topk_prob) = (rule.top_k, rule.norm_topk_prob);
    let scale = rule.config.routed_scaling_factor;
    if rule.config.scoring == Scoring::Softmax
        && rule.config.group_limit.is_none()
        && correction.is_none()
        && rule.config.renorm == Renorm::Sum
    {
        let routing = route_softmax(logits, bias, top_k, norm_topk_prob);
        return if scale == 1.0 { routing } else { Routing { weights: routing.weights * scale, ..routing } };
    }
    let [n, e] = logits.dims();
    let device = logits.device();
    let probs = match rule.config.scoring {
        Scoring::Softmax => {
            let biased = match bias {
                Some(b) => logits.clone() + b.clone().unsqueeze::<2>(),
                None => logits.clone(),
            };
            softmax(biased, 1)
        }
        Scoring::Sigmoid => {
            let s = sigmoid(logits.clone());
            match bias {
                Some(b) => s * b.clone().exp().unsqueeze::<2>(),
                None => s,
            }
        }
    };
    // Selection scores: the probabilities plus the correction bias; a removed expert (bias
    // −∞) is never selectable, whatever its correction.
    let mut choice: Vec<f32> = probs.clone().detach().into_data().iter::<f32>().collect();
    let corr: Option<Vec<f32>> = correction.map(|c| c.clone().detach().into_data().iter::<f32>().collect());
    let removed: Option<Vec<bool>> =
        bias.map(|b| b.clone().detach().into_data().iter::<f32>().map(|v| v == f32::NEG_INFINITY).collect());
    for (i, c) in choice.iter_mut().enumerate() {
        let j = i % e;
        if removed.as_ref().is_some_and(|r| r[j]) {
            *c = f32::NEG_INFINITY;
        } else if let Some(corr) = &corr {
            *c += corr[j];
        }
    }
    let mut selected = Vec::with_capacity(n * top_k);
    for t in 0..n {
        selected.extend(
            select_experts(&choice[t * e..(t + 1) * e], top_k, rule.config.group_limit).into_iter().map(|x| x as i64),
        );
    }
    let experts = Tensor::<2, Int>::from_data(TensorData::new(selected, [n, top_k]), &device);
    let mut weights = probs.clone().gather(1, experts.clone());
    if norm_topk_prob {
        let sum = weights.clone().sum_dim(1);
        weights = match rule.config.renorm {
            Renorm::Sum => weights / sum,
            Renorm::SumPlusTiny => weights / (sum + 1e-20),
            Renorm::AtLeast(floor) => weights / sum.clamp_min(floor as f32),
        };
    }
    if scale != 1.0 {
        weights = weights * scale;
    }
    Routing { logits, probs, weights, experts }
}

/// Softmax in f32, top-k of the probabilities, optional renormalisation: Mixtral, Qwen, OLMoE,
/// DeepSeek-MoE, DeepSeek-V2 `greedy`.
fn route_softmax(logits: Tensor<2>, bias: Option<&Tensor<1>>, top_k: usize, norm_topk_prob: bool) -> Routing {
    let biased = match bias {
        Some(b) => logits.clone() + b.clone().unsqueeze::<2>(),
        None => logits.clone(),
    };
    let probs = softmax(biased, 1);
    let (weights, experts) = probs.clone().topk_with_indices(top_k, 1);
    let weights = if norm_topk_prob {
        let sum = weights.clone().sum_dim(1);
        weights / sum
    } else {
        weights
    };
    Routing { logits, probs, weights, experts }
}

/// Per-call options of [`MoeBlock::forward_detailed`].
#[derive(Debug, Clone, Default)]
pub struct MoeForwardOptions {
    /// Added to the router logits before the softmax (`[experts]`). Combined with the block's
    /// own mask if it has one. Relaxations use this for `log p`.
    pub router_bias: Option<Tensor<1>>,
    /// Multiplies each expert's routed contribution (`[experts]`), e.g. `N·softmax(α)`.
    pub expert_scale: Option<Tensor<1>>,
    /// Keep each expert's (unweighted) outputs for the tokens routed to it.
    pub capture_expert_outputs: bool,
    /// Use the simple dense reference computation instead of grouped dispatch.
    pub reference: bool,
}

/// What one expert computed for the tokens routed to it.
#[derive(Debug, Clone)]
pub struct ExpertOutput {
    /// Token rows (into the block's input) routed to this expert.
    pub tokens: Vec<usize>,
    /// The routing weight of each of those tokens for this expert.
    pub weights: Tensor<1>,
    /// The expert's output `E_j(x)` for those tokens, before weighting, `[tokens, hidden]`.
    pub output: Tensor<2>,
}

impl ExpertOutput {
    /// Per routed token, `(‖E_j(x)‖₂, g_j(x))`: the output norm and the routing weight, the
    /// terms of REAP's saliency.
    pub fn norms_and_weights(&self) -> Vec<(f32, f32)> {
        let norms = self.output.clone().square().sum_dim(1).sqrt().into_data();
        let weights = self.weights.clone().into_data();
        norms.iter::<f32>().zip(weights.iter::<f32>()).collect()
    }
}

/// The full result of an MoE block.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    /// The block's output `[tokens, hidden]`.
    pub output: Tensor<2>,
    /// How the tokens were routed.
    pub routing: Routing,
    /// Per routed expert, if requested; `None` entries for experts that got no token.
    pub expert_outputs: Option<Vec<Option<ExpertOutput>>>,
}

/// Dynamic skipping (DiEP's optional inference step): a token's `j`-th selected expert
/// (`j ≥ 1`) is skipped when `w_j < γ(e_0, e_j)·w_0`. The skipped expert is not computed and
/// its weight is dropped (the others are not renormalised).
#[derive(Debug, Clone)]
pub struct DynamicSkip {
    /// `γ` row-major `[experts, experts]`: row = first expert, column = the other.
    gamma: Vec<f32>,
    counts: Arc<[AtomicU64; 2]>,
}

impl DynamicSkip {
    /// A rule from the `γ` matrix of a layer with `experts` experts.
    pub fn new(gamma: Vec<f32>, experts: usize) -> Result<Self> {
        if gamma.len() != experts * experts {
            return Err(ModelError::GammaLength { found: gamma.len(), experts });
        }
        Ok(DynamicSkip { gamma, counts: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]) })
    }

    /// `(skipped, eligible)`: expert slots skipped, and slots that could have been (all
    /// slots after the first), since the rule was made.
    pub fn counts(&self) -> (u64, u64) {
        (self.counts[0].load(Ordering::Relaxed), self.counts[1].load(Ordering::Relaxed))
    }
}

/// A shared expert and its sigmoid gate (Qwen2-MoE), or DeepSeek's ungated shared experts.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The expert.
    pub(crate) mlp: SwiGlu,
    /// `[hidden, 1]` gate; `None`: the output is added as is.
    pub(crate) gate: Option<Linear>,
}

impl SharedExpert {
    /// A shared expert, gated by `sigmoid(x·gate)` (`gate` `[hidden, 1]`) or ungated.
    pub fn new(mlp: SwiGlu, gate: Option<Linear>) -> Self {
        SharedExpert { mlp, gate }
    }
}

/// A mixture-of-experts feed-forward block.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// Router `[hidden, experts]`.
    pub(crate) router: Linear,
    /// Routed experts, in on-disk order.
    pub(crate) experts: Vec<SwiGlu>,
    /// The shared expert, if the architecture has one.
    pub(crate) shared: Option<SharedExpert>,
    /// Experts per token.
    pub(crate) top_k: usize,
    /// Renormalise the top-k weights.
    pub(crate) norm_topk_prob: bool,
    /// Scoring, group limit and scaling ([`RoutingConfig::softmax`] unless set with
    /// [`MoeBlock::with_routing`]).
    pub(crate) routing: RoutingConfig,
    /// DeepSeek-V3's `e_score_correction_bias` `[experts]`, added to the scores for selection.
    pub(crate) correction_bias: Option<Tensor<1>>,
    /// The experts' activation ([`ExpertActivation::Silu`] unless set with
    /// [`MoeBlock::with_activation`]).
    pub(crate) activation: ExpertActivation,
    mask: Option<Vec<bool>>,
    mask_bias: Option<Tensor<1>>,
    skip: Option<DynamicSkip>,
}

impl MoeBlock {
    /// Assembles a block.
    pub fn new(
        router: Linear,
        experts: Vec<SwiGlu>,
        shared: Option<SharedExpert>,
        top_k: usize,
        norm_topk_prob: bool,
    ) -> Self {
        MoeBlock {
            router,
            experts,
            shared,
            top_k,
            norm_topk_prob,
            routing: RoutingConfig::softmax(),
            correction_bias: None,
            activation: ExpertActivation::Silu,
            mask: None,
            mask_bias: None,
            skip: None,
        }
    }

    /// Sets the routing rule and the selection bias (DeepSeek).
    pub fn with_routing(mut self, routing: RoutingConfig, correction_bias: Option<Tensor<1>>) -> Self {
        self.routing = routing;
        self.correction_bias = correction_bias;
        self
    }

    /// Sets the experts' activation (gpt-oss's clamped SwiGLU).
    pub fn with_activation(mut self, activation: ExpertActivation) -> Self {
        self.activation = activation;
        self
    }

    /// Experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Whether the top-k weights are renormalised.
    pub fn norm_topk_prob(&self) -> bool {
        self.norm_topk_prob
    }

    /// DeepSeek-V3's `e_score_correction_bias` `[experts]`, if the block has one.
    pub fn correction_bias(&self) -> Option<&Tensor<1>> {
        self.correction_bias.as_ref()
    }

    /// The router `[hidden, experts]`.
    pub fn router(&self) -> &Linear {
        &self.router
    }

    /// The routed experts, in on-disk order.
    pub fn experts(&self) -> &[SwiGlu] {
        &self.experts
    }

    /// The shared expert, if the architecture has one.
    pub fn shared(&self) -> Option<&SharedExpert> {
        self.shared.as_ref()
    }

    /// The block's full routing rule.
    pub fn rule(&self) -> RoutingRule {
        RoutingRule { top_k: self.top_k, norm_topk_prob: self.norm_topk_prob, config: self.routing.clone() }
    }

    /// Routed experts in this block.
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// The device the block lives on.
    pub fn device(&self) -> Device {
        self.router.weight.device()
    }

    /// Restricts routing to the experts marked `true`; a masked expert is never selected,
    /// exactly as if it had been removed from the checkpoint. `None` clears the mask.
    pub fn set_mask(&mut self, keep: Option<&[bool]>) -> Result<()> {
        let Some(keep) = keep else {
            self.mask = None;
            self.mask_bias = None;
            return Ok(());
        };
        let n = self.num_experts();
        if keep.len() != n {
            return Err(ModelError::ExpertMaskLength { found: keep.len(), experts: n });
        }
        let kept = keep.iter().filter(|k| **k).count();
        if kept < self.top_k {
            return Err(ModelError::TooFewExperts { kept, top_k: self.top_k });
        }
        let bias: Vec<f32> = keep.iter().map(|k| if *k { 0.0 } else { f32::NEG_INFINITY }).collect();
        self.mask_bias = Some(Tensor::from_data(TensorData::new(bias, [n]), &self.device()));
        self.mask = Some(keep.to_vec());
        Ok(())
    }

    /// Sets (or clears) dynamic skipping of the second and later experts.
    pub fn set_dynamic_skip(&mut self, skip: Option<DynamicSkip>) -> Result<()> {
        if let Some(s) = &skip {
            let n = self.num_experts();
            if s.gamma.len() != n * n {
                return Err(ModelError::GammaLength { found: s.gamma.len(), experts: n });
            }
        }
        self.skip = skip;
        Ok(())
    }

    /// The dynamic-skip rule, if any.
    pub fn dynamic_skip(&self) -> Option<&DynamicSkip> {
        self.skip.as_ref()
    }

    /// The current mask (`true` = kept), if any.
    pub fn mask(&self) -> Option<&[bool]> {
        self.mask.as_deref()
    }

    /// Router logits `[tokens, experts]`.
    pub fn router_logits(&self, x: Tensor<2>) -> Tensor<2> {
        self.router.forward(x)
    }

    /// Routes tokens with the block's mask and an optional extra bias.
    pub fn route(&self, x: Tensor<2>, extra_bias: Option<&Tensor<1>>) -> Routing {
        let bias = match (&self.mask_bias, extra_bias) {
            (Some(m), Some(b)) => Some(m.clone() + b.clone()),
            (Some(m), None) => Some(m.clone()),
            (None, Some(b)) => Some(b.clone()),
            (None, None) => None,
        };
        let routing = route_with(self.router_logits(x), bias.as_ref(), self.correction_bias.as_ref(), &self.rule());
        match &self.skip {
            Some(skip) if self.top_k >= 2 => apply_skip(routing, skip, self.num_experts()),
            _ => routing,
        }
    }

    /// `E_j(x)` for one expert on `[tokens, hidden]` rows.
    pub fn expert_forward(&self, expert: usize, x: Tensor<2>) -> Tensor<2> {
        let mlp = &self.experts[expert];
        match self.activation {
            ExpertActivation::Silu => mlp.forward(x),
            ExpertActivation::ClampedSwiglu { alpha, limit } => {
                // `gate_up` holds the gate columns first, then the up columns (de-interleaved
                // at load).
                let gu = mlp.gate_up.forward(x);
                mlp.down.forward(kernels::clamped_swiglu(gu, mlp.intermediate(), alpha, limit))
            }
        }
    }

    /// The block's output.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_detailed(x, &MoeForwardOptions::default()).output
    }

    /// The block's output with its routing and, optionally, every expert's outputs.
    pub fn forward_detailed(&self, x: Tensor<2>, opts: &MoeForwardOptions) -> MoeOutput {
        let routing = self.route(x.clone(), opts.router_bias.as_ref());
        let (routed, expert_outputs) = if opts.reference {
            (self.dispatch_reference(x.clone(), &routing, opts), None)
        } else {
            self.dispatch_grouped(x.clone(), &routing, opts)
        };
        let output = match &self.shared {
            Some(SharedExpert { mlp, gate: Some(gate) }) => {
                routed + kernels::sigmoid_gate(mlp.forward(x.clone()), gate.forward(x))
            }
            Some(SharedExpert { mlp, gate: None }) => routed + mlp.forward(x),
            None => routed,
        };
        MoeOutput { output, routing, expert_outputs }
    }

    /// Grouped dispatch: one gather, one SwiGLU and one scatter-add per expert that has tokens.
    fn dispatch_grouped(
        &self,
        x: Tensor<2>,
        routing: &Routing,
        opts: &MoeForwardOptions,
    ) -> (Tensor<2>, Option<Vec<Option<ExpertOutput>>>) {
        let [n, hidden] = x.dims();
        let device = x.device();
        let k = self.top_k;
        let selected: Vec<i64> = routing.experts.to_data().iter::<i64>().collect();
        // Slots dynamic skipping dropped (weight exactly 0) are not computed.
        let skipped: Option<Vec<bool>> = self.skip.as_ref().map(|_| {
            routing.weights.to_data().iter::<f32>().enumerate().map(|(i, w)| i % k != 0 && w == 0.0).collect()
        });
        // For each expert: (token row, flat position in the [n, k] weight matrix).
        let mut groups: Vec<(Vec<i64>, Vec<i64>)> = vec![(Vec::new(), Vec::new()); self.num_experts()];
        for (pos, &e) in selected.iter().enumerate() {
            if skipped.as_ref().is_some_and(|s| s[pos]) {
                continue;
            }
            let (tokens, positions) = &mut groups[e as usize];
            tokens.push((pos / k) as i64);
            positions.push(pos as i64);
        }
        // Llama 4 weights each expert's input by its routing weight; the relaxation's
        // `expert_scale` still scales the output.
        let on_input = self.routing.weight_on_input;
        let routing_weights = routing.weights.clone().reshape([n * k]);
        let scale_per_slot =
            opts.expert_scale.as_ref().map(|s| s.clone().select(0, routing.experts.clone().reshape([n * k])));
        let weights = match (&scale_per_slot, on_input) {
            (Some(s), false) => routing_weights.clone() * s.clone(),
            (None, false) => routing_weights.clone(),
            (Some(s), true) => s.clone(),
            (None, true) => Tensor::<1>::ones([n * k], &device),
        };
        let mut out = Tensor::<2>::zeros([n, hidden], &device);
        let mut captured = opts.capture_expert_outputs.then(|| vec![None; self.num_experts()]);
        for (e, (tokens, positions)) in groups.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let m = tokens.len();
            let tok = Tensor::<1, Int>::from_data(TensorData::new(tokens.clone(), [m]), &device);
            let pos = Tensor::<1, Int>::from_data(TensorData::new(positions, [m]), &device);
            let xs = x.clone().select(0, tok.clone());
            let xs =
                if on_input { xs * routing_weights.clone().select(0, pos.clone()).unsqueeze_dim::<2>(1) } else { xs };
            let y = self.expert_forward(e, xs);
            let w = weights.clone().select(0, pos.clone());
            if let Some(c) = captured.as_mut() {
                // With input weighting the output already carries the routing weight, reported
                // beside it as the slot's weight.
                c[e] = Some(ExpertOutput {
                    tokens: tokens.iter().map(|t| *t as usize).collect(),
                    weights: if on_input { routing_weights.clone().select(0, pos) } else { w.clone() },
                    output: y.clone(),
                });
            }
            out = out.select_assign(0, tok, y * w.unsqueeze_dim::<2>(1), IndexingUpdateOp::Add);
        }
        (out, captured)
    }

    /// The reference computation: every expert on every token, weighted by a dense
    /// `[tokens, experts]` matrix that is zero for unselected experts. Slow; for tests.
    fn dispatch_reference(&self, x: Tensor<2>, routing: &Routing, opts: &MoeForwardOptions) -> Tensor<2> {
        let [n, hidden] = x.dims();
        let device = x.device();
        let dense = Tensor::<2>::zeros([n, self.num_experts()], &device).scatter(
            1,
            routing.experts.clone(),
            routing.weights.clone(),
            IndexingUpdateOp::Add,
        );
        let dense = match &opts.expert_scale {
            Some(s) => dense * s.clone().unsqueeze::<2>(),
            None => dense,
        };
        let mut out = Tensor::<2>::zeros([n, hidden], &device);
        if self.routing.weight_on_input {
            // E(w·x) is 0 for w = 0 (no expert biases), so unselected experts add nothing.
            let input_w = Tensor::<2>::zeros([n, self.num_experts()], &device).scatter(
                1,
                routing.experts.clone(),
                routing.weights.clone(),
                IndexingUpdateOp::Add,
            );
            for e in 0..self.num_experts() {
                let scale = match &opts.expert_scale {
                    Some(s) => s.clone().narrow(0, e, 1).unsqueeze::<2>(),
                    None => Tensor::<2>::ones([1, 1], &device),
                };
                let xe = x.clone() * input_w.clone().narrow(1, e, 1);
                out = out + self.expert_forward(e, xe) * scale;
            }
            return out;
        }
        for e in 0..self.num_experts() {
            let w = dense.clone().narrow(1, e, 1);
            out = out + self.expert_forward(e, x.clone()) * w;
        }
        out
    }
}

/// Zeroes the weight of every slot `j ≥ 1` with `w_j < γ(e_0, e_j)·w_0`, and counts.
fn apply_skip(routing: Routing, skip: &DynamicSkip, experts: usize) -> Routing {
    let [n, k] = routing.weights.dims();
    let w: Vec<f32> = routing.weights.to_data().iter::<f32>().collect();
    let e: Vec<i64> = routing.experts.to_data().iter::<i64>().collect();
    let mut keep = vec![1.0f32; n * k];
    let mut skipped = 0u64;
    for t in 0..n {
        let first = e[t * k] as usize;
        for j in 1..k {
            let gamma = skip.gamma[first * experts + e[t * k + j] as usize];
            if w[t * k + j] < gamma * w[t * k] {
                keep[t * k + j] = 0.0;
                skipped += 1;
            }
        }
    }
    skip.counts[0].fetch_add(skipped, Ordering::Relaxed);
    skip.counts[1].fetch_add((n * (k - 1)) as u64, Ordering::Relaxed);
    let device = routing.weights.device();
    let keep = Tensor::<2>::from_data(TensorData::new(keep, [n, k]), &device);
    Routing { weights: routing.weights * keep, ..routing }
}
