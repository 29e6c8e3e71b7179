//! The alternating α/β optimisation loop and its objectives.
//!
//! Every step computes the gradient of the objective with respect to α (or β) of every MoE
//! layer and applies one update. How the gradient is computed depends on the objective:
//!
//! - `kl` and `ce-norm` ([`crate::stream`]): the calibration batch goes forward through the
//!   model one decoder layer at a time, keeping only the hidden states at layer boundaries; the
//!   objective's gradient at the last hidden state is then pulled back layer by layer in
//!   reverse (each layer loaded again, its forward recomputed from the saved input under
//!   autodiff: a vector–Jacobian product), giving each layer's α/β gradient. Only one layer's
//!   weights are resident at a time, so the model may stream from disk.
//! - `layer-wise`: each MoE block's relaxed output against its original output on the original
//!   block inputs, cached once.
//!
//! The routed relaxation's threshold θ couples all layers of a budget pool; its gradient is
//! accumulated over layers and applied once per step ([`Thresholds::fold`]), so the streamed
//! gradient is the whole-model gradient.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use diep_models::{LayerSource, MoeForwardOptions};
use diep_relax::{Budget, LayerParams, Relaxation, Thresholds, forward_options, sampled_layer_options};

use crate::error::{OptimError, Result};
use crate::reference::ReferenceStore;
use crate::settings::AlphaInit;
use crate::settings::{DiepSettings, Objective, RelaxationKind, ThresholdMode};
use crate::state::{DiepState, EpochRecord, PlanScore, fingerprint};
use crate::stream::{Phase, RoutingShares, StreamOptions, Target, prepass, streamed_step};

/// Progress of an optimisation.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// The original model's reference distributions are being computed (`kl`): `done` of
    /// `total` decoder layers.
    Reference {
        /// Layers done.
        done: usize,
        /// Layers in all.
        total: usize,
    },
    /// The statistics-based starts (`alpha_init`) were scored by the epoch selection's
    /// objective with hard masks: the plan of each criterion the run could start from.
    WarmStart {
        /// Each candidate start and its `kl` on the selection's calibration sequences.
        candidates: Vec<(AlphaInit, f64)>,
        /// The start taken: the lowest.
        chosen: AlphaInit,
    },
    /// The loop is about to start (or resume).
    Started {
        /// Steps per epoch.
        steps_per_epoch: usize,
        /// Epochs in total.
        epochs: usize,
        /// Epochs already done (a resumed run).
        epochs_done: usize,
    },
    /// A decoder layer of the current step was processed (streamed objectives).
    Layer {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// Forward or backward.
        phase: Phase,
        /// Layers done in this phase.
        done: usize,
        /// Layers in the phase.
        total: usize,
    },
    /// One update was applied.
    Step {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based step within the epoch.
        step: usize,
        /// Steps per epoch.
        steps_per_epoch: usize,
        /// The objective on this step's batch.
        loss: f64,
        /// Whether the step updated α (else β).
        alpha: bool,
    },
    /// The run ends before `epochs`: `patience` epochs in a row did not replace the selected
    /// plan ([`DiepSettings::patience`]).
    StoppedEarly {
        /// Epochs run.
        epochs_done: usize,
        /// The selected plan's epoch (0: the start's).
        selected: usize,
    },
    /// An epoch finished; `state` is what `--resume` continues from.
    Epoch {
        /// The epoch's record.
        record: &'a EpochRecord,
        /// The state after the epoch.
        state: &'a DiepState,
    },
}

/// Experts the routed relaxation's threshold keeps: `Σ N − round(ratio·Σ N)`.
pub fn keep_count(experts: &BTreeMap<usize, usize>, ratio: f64) -> usize {
    let total: usize = experts.values().sum();
    total - diep_plan::budget(total, ratio)
}

/// The relaxation at a temperature.
pub fn relaxation(kind: RelaxationKind, tau: f64) -> Relaxation {
    match kind {
        RelaxationKind::Paper => Relaxation::Paper,
        RelaxationKind::Routed | RelaxationKind::RoutedGated => Relaxation::Routed { tau },
    }
}

/// The routed relaxation's keep budget for a run on a model: under a global allocation one
/// pool of all experts keeping `Σ N − round(ratio·Σ N)`; under a uniform allocation one pool
/// per layer keeping `N_l − round(ratio·N_l)` — one per routing group of each layer for
/// group-limited routers, each keeping its share.
pub fn budget(config: &diep_models::checkpoint::ModelConfig, settings: &DiepSettings) -> Budget {
    let experts = diep_plan::expert_counts(config);
    match settings.allocation {
        diep_plan::Allocation::Global => Budget::global(&experts, keep_count(&experts, settings.ratio)),
        diep_plan::Allocation::Uniform => {
            let keep = experts.iter().map(|(l, n)| (*l, n - diep_plan::budget(*n, settings.ratio).min(*n))).collect();
            let n_group = config.moe.routing.group_limit.map_or(1, |g| g.n_group.max(1));
            Budget::per_group(&experts, n_group, &keep)
        }
    }
}

/// Optimises α and β on `source` (a [`diep_models::MoeModel`] or a
/// [`diep_models::StreamingModel`] on an autodiff device, `device.autodiff()`) with the
/// settings' objective, streaming the end-to-end objectives layer by layer with the default
/// [`StreamOptions`]. The model's weights are never updated: only α and β are tracked.
/// `resume` continues a saved state of the same run.
pub fn optimise<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    settings: &DiepSettings,
    resume: Option<DiepState>,
    on_event: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<DiepState> {
    optimise_with(source, ids, settings, resume, &StreamOptions::default(), on_event)
}

/// [`optimise`] with explicit [`StreamOptions`] (micro-batch size, where boundary states live).
pub fn optimise_with<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    settings: &DiepSettings,
    resume: Option<DiepState>,
    stream: &StreamOptions,
    on_event: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<DiepState> {
    Ok(optimise_keeping_reference(source, ids, settings, resume, stream, on_event)?.0)
}

/// [`optimise_with`], also returning the original model's reference distributions it computed
/// for `ids` (`kl` objective only), so that a refinement of the plan ([`crate::refine_from`])
/// scores against them without another pass.
pub fn optimise_keeping_reference<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    settings: &DiepSettings,
    resume: Option<DiepState>,
    stream: &StreamOptions,
    mut on_event: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<(DiepState, Option<ReferenceStore>)> {
    if settings.objective == Objective::LayerWise {
        return Ok((optimise_layer_wise(source, ids, settings, resume, on_event)?, None));
    }
    check_inputs(ids, settings)?;
    check_lengths(ids)?;
    let config = source.config().clone();
    let experts = diep_plan::expert_counts(&config);
    let budget = budget(&config, settings);
    let k = (settings.objective == Objective::Kl).then_some(settings.reference_top_k);
    let needs_stats = settings.alpha_init != AlphaInit::Zero;
    let (reference, shares) = if k.is_some() || needs_stats {
        let capture = matches!(settings.alpha_init, AlphaInit::Reap | AlphaInit::Auto);
        prepass(source, ids, k, capture, stream, |done, total| on_event(Event::Reference { done, total }))?
    } else {
        (None, RoutingShares::default())
    };
    let init = initial_alphas(settings, &shares);
    let target = match &reference {
        Some(store) => Target::Kl(store),
        None => Target::CeNorm { lambda: settings.lambda },
    };
    let device = source.embed(&ids[..1])?.0.device();
    // Each epoch's plan scored on the first calibration sequences (kl only: it needs the reference).
    let constraints = diep_plan::Constraints::for_model(&config, settings.min_experts);
    let select_opts = crate::search::SearchOptions {
        samples: settings.select_samples,
        micro_batch: stream.micro_batch,
        ..Default::default()
    };
    // A plan that recurs (late epochs often select the same experts) is scored once.
    let scored_plans = std::cell::RefCell::new(BTreeMap::<diep_plan::Kept, PlanScore>::new());
    let score_epoch = |state: &DiepState| -> Result<Option<PlanScore>> {
        let (Some(store), true) = (&reference, settings.select_epoch) else { return Ok(None) };
        let scores = crate::plan::expert_scores(state, &device);
        let kept = diep_plan::select(&scores, settings.ratio, settings.allocation, &constraints)?;
        if let Some(score) = scored_plans.borrow().get(&kept) {
            return Ok(Some(score.clone()));
        }
        let eval = crate::search::Evaluator::with_reference(
            source,
            ids,
            std::borrow::Cow::Borrowed(store),
            Some(&kept),
            &select_opts,
        )?;
        let score = PlanScore { loss: eval.loss(), per_sequence: eval.sequence_losses().to_vec() };
        scored_plans.borrow_mut().insert(kept, score.clone());
        Ok(Some(score))
    };
    let events = std::cell::RefCell::new(&mut on_event);
    let step =
        |input: &StepInput<'_>| -> Result<StepGrads> {
            let relax = StepRelax::new(input.state, settings, &budget, input.tau, input.alpha_phase, &device)?
                .with_noise(settings, input.epoch, input.step);
            let seqs: Vec<Vec<u32>> = input.batch.iter().map(|i| ids[*i].clone()).collect();
            let positions = seqs.len() * ids[0].len();
            streamed_step(source, &seqs, input.batch, &relax, &target, positions, stream, &mut |phase, done, total| {
                (events.borrow_mut())(Event::Layer { epoch: input.epoch, step: input.step, phase, done, total })
            })
        };
    let state = run(&experts, ids, settings, resume, init, step, score_epoch, |e| (events.borrow_mut())(e))?;
    Ok((state, reference))
}

/// The candidate starts of a run: none for `zero`, the one the settings name, or for `auto`
/// `reap`, `soft-activation` and `frequency` (in that order), each as [`initial_alpha`].
pub fn initial_alphas(settings: &DiepSettings, shares: &RoutingShares) -> Vec<(AlphaInit, StartParams)> {
    let kinds: &[AlphaInit] = match settings.alpha_init {
        AlphaInit::Zero => &[],
        AlphaInit::Auto => &[AlphaInit::Reap, AlphaInit::SoftActivation, AlphaInit::Frequency],
        _ => std::slice::from_ref(&settings.alpha_init),
    };
    kinds.iter().map(|k| (*k, start_from(statistic(*k, shares), settings))).filter(|(_, p)| !p.is_empty()).collect()
}

/// `(α_l, log β_l)` per MoE layer at the start of a run.
pub type StartParams = BTreeMap<usize, (Vec<f32>, f32)>;

/// The routing statistic a start is built from (`auto` is taken as `reap`; `zero`: none).
fn statistic(kind: AlphaInit, shares: &RoutingShares) -> Option<&BTreeMap<usize, Vec<f64>>> {
    match kind {
        AlphaInit::Zero => None,
        AlphaInit::SoftActivation => Some(&shares.soft),
        AlphaInit::Frequency => Some(&shares.selected),
        AlphaInit::Reap | AlphaInit::Auto => Some(&shares.reap),
    }
}

/// α (and `log β`) at the start of a run: zero, or from the routing statistics the settings
/// name, `v_{l,i}` per expert: `α_{l,i} = scale·(ln(v_{l,i}/Σ_j v_{l,j} + 10⁻⁶) − mean)`, so the
/// relaxation starts at the criterion's ranking within each layer. Under a global allocation
/// (routed relaxations) `log β_l` is set too, so that the relaxation's keep score
/// `s = log softmax(α) + log N + log β` is `scale·ln v` up to one constant over all layers: the
/// starting scores rank every expert of the model as the criterion's global plan does.
/// (`auto` is taken as `reap` here; [`initial_alphas`] gives its candidates.)
pub fn initial_alpha(settings: &DiepSettings, shares: &RoutingShares) -> StartParams {
    start_from(statistic(settings.alpha_init, shares), settings)
}

fn start_from(source: Option<&BTreeMap<usize, Vec<f64>>>, settings: &DiepSettings) -> StartParams {
    let Some(source) = source else { return BTreeMap::new() };
    let scale = settings.alpha_init_scale;
    let mut out: BTreeMap<usize, (Vec<f32>, f32)> = BTreeMap::new();
    // Per layer: the offset that the keep score needs from log β (before centring).
    let mut offsets = BTreeMap::new();
    for (l, v) in source {
        let total: f64 = v.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let logs: Vec<f64> = v.iter().map(|x| (x / total + 1e-6).ln()).collect();
        let mean = logs.iter().sum::<f64>() / logs.len().max(1) as f64;
        let alpha: Vec<f64> = logs.iter().map(|x| scale * (x - mean)).collect();
        // s_i = α_i − LSE(α) + ln N + log β must equal scale·ln(v_i/total + ε) + scale·ln total − c:
        // log β = scale·(mean + ln total) + LSE(α) − ln N − c.
        let max = alpha.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + alpha.iter().map(|a| (a - max).exp()).sum::<f64>().ln();
        offsets.insert(*l, scale * (mean + total.ln()) + lse - (v.len() as f64).ln());
        out.insert(*l, (alpha.iter().map(|a| *a as f32).collect(), 0.0));
    }
    let global = settings.allocation == diep_plan::Allocation::Global && settings.relaxation != RelaxationKind::Paper;
    if global && !offsets.is_empty() {
        let c = offsets.values().sum::<f64>() / offsets.len() as f64;
        for (l, (_, log_beta)) in out.iter_mut() {
            *log_beta = (offsets[l] - c) as f32;
        }
    }
    out
}

/// Optimises α and β with the `layer-wise` objective: each MoE block's relaxed output is
/// compared with its original output on the original model's block inputs, so no pass
/// through the whole model is differentiated and `source` may stream layers from disk
/// ([`diep_models::StreamingModel`] on an autodiff device).
pub fn optimise_layer_wise<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    settings: &DiepSettings,
    resume: Option<DiepState>,
    on_event: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<DiepState> {
    check_inputs(ids, settings)?;
    let config = source.config().clone();
    let experts = diep_plan::expert_counts(&config);
    let budget = budget(&config, settings);
    // One layer-by-layer pass of the original model: each MoE block's input and output,
    // per calibration sequence.
    let mut inputs: BTreeMap<usize, Vec<Tensor<2>>> = experts.keys().map(|l| (*l, Vec::new())).collect();
    let mut outputs = inputs.clone();
    let mut device = None;
    for chunk in ids.chunks(settings.batch_size) {
        let (mut h, ctx) = source.embed(chunk)?;
        device.get_or_insert_with(|| h.device());
        let t = ctx.seq_len();
        for i in 0..config.num_layers {
            let out = source.with_layer(i, |layer| layer.forward(h.clone(), &ctx, &MoeForwardOptions::default()))?;
            if let Some(moe) = &out.moe {
                for s in 0..chunk.len() {
                    inputs.get_mut(&i).expect("moe layer").push(out.ffn_input.clone().narrow(0, s * t, t).detach());
                    outputs.get_mut(&i).expect("moe layer").push(moe.output.clone().narrow(0, s * t, t).detach());
                }
            }
            h = out.hidden.detach();
        }
    }
    let device = device.expect("at least one batch");
    let loss_fn = |batch: &[usize], opts: &BTreeMap<usize, MoeForwardOptions>| -> Result<Loss> {
        let mut total: Option<Tensor<1>> = None;
        for (l, opt) in opts {
            let x = Tensor::cat(batch.iter().map(|i| inputs[l][*i].clone()).collect(), 0);
            let y = Tensor::cat(batch.iter().map(|i| outputs[l][*i].clone()).collect(), 0);
            let y_hat = source.with_layer(*l, |layer| {
                layer
                    .moe()
                    .map(|m| m.forward_detailed(x, opt).output)
                    .ok_or_else(|| OptimError::Config(format!("layer {l} is not an MoE layer of this model")))
            })??;
            let err = (y_hat - y.clone()).square().sum() / y.square().sum().add_scalar(1e-30);
            total = Some(match total {
                Some(t) => t + err,
                None => err,
            });
        }
        let total = total.ok_or_else(|| OptimError::Config("the model has no MoE layer".into()))?;
        Ok(Loss::new(total.clone(), None, total))
    };
    let step = |input: &StepInput<'_>| autodiff_step(input, settings, &budget, &device, &loss_fn);
    run(&experts, ids, settings, resume, Vec::new(), step, |_| Ok(None), on_event)
}

/// A step's objective and its parts, as a tracked tensor.
pub(crate) struct Loss {
    total: Tensor<1>,
    ce: Option<Tensor<1>>,
    reg: Tensor<1>,
}

impl Loss {
    pub(crate) fn new(total: Tensor<1>, ce: Option<Tensor<1>>, reg: Tensor<1>) -> Self {
        Loss { total, ce, reg }
    }
}

/// What a step works on.
pub(crate) struct StepInput<'a> {
    /// Calibration sequences of the step.
    pub batch: &'a [usize],
    /// The state before the step.
    pub state: &'a DiepState,
    /// Whether the step updates α (else β).
    pub alpha_phase: bool,
    /// The routed relaxation's temperature.
    pub tau: f64,
    /// 1-based epoch and step within it.
    pub epoch: usize,
    pub step: usize,
}

/// A step's objective value and the gradient of the phase's parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepGrads {
    /// The objective.
    pub loss: f64,
    /// Its cross-entropy part (`ce-norm`), or 0.
    pub ce: f64,
    /// Its regulariser / divergence part.
    pub reg: f64,
    /// `∂L/∂α_l` per MoE layer (alpha steps).
    pub alpha: BTreeMap<usize, Vec<f32>>,
    /// `∂L/∂log β_l` per MoE layer (beta steps).
    pub log_beta: BTreeMap<usize, f32>,
}

pub(crate) fn scalar(t: Tensor<1>) -> f64 {
    t.into_data().iter::<f32>().next().map(f64::from).unwrap_or(f64::NAN)
}

fn host(t: Tensor<1>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn check_inputs(ids: &[Vec<u32>], settings: &DiepSettings) -> Result<()> {
    settings.validate().map_err(OptimError::Config)?;
    if ids.is_empty() {
        return Err(OptimError::Config("no calibration sequences".into()));
    }
    if ids.iter().any(|s| s.len() < 2) {
        return Err(OptimError::Config("calibration sequences need at least 2 tokens".into()));
    }
    if settings.relaxation == RelaxationKind::RoutedGated && settings.threshold == ThresholdMode::Fixed {
        return Err(OptimError::Config("the routed-gated relaxation needs the implicit threshold".into()));
    }
    Ok(())
}

fn check_lengths(ids: &[Vec<u32>]) -> Result<()> {
    if ids.iter().any(|s| s.len() != ids[0].len()) {
        return Err(OptimError::Config("calibration sequences must all have the same length".into()));
    }
    Ok(())
}

/// Mean next-token cross-entropy of `[b, t, v]` logits.
pub fn next_token_ce(logits: Tensor<3>, ids: &[Vec<u32>], device: &Device) -> Tensor<1> {
    let [b, t, _] = logits.dims();
    let logp = log_softmax(logits.narrow(1, 0, t - 1), 2);
    let targets: Vec<i64> = ids.iter().flat_map(|s| s[1..].iter().map(|x| *x as i64)).collect();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t - 1, 1]), device);
    -logp.gather(2, targets).mean().reshape([1])
}

/// The order of calibration sequences in an epoch: a seeded shuffle, so a resumed run sees the
/// same batches.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    diep_common::SplitMix64::for_stream(seed, &format!("epoch-{epoch}")).permutation(n)
}

/// The relaxation of one step: the state's α/β, the phase, the temperature and, for the routed
/// relaxations, the thresholds of the budget's pools.
pub(crate) struct StepRelax<'a> {
    state: &'a DiepState,
    kind: RelaxationKind,
    tau: f64,
    alpha_phase: bool,
    implicit: bool,
    thresholds: Option<Thresholds>,
    /// Sampled masks: per layer the step's logistic noise, and the concrete temperature.
    noise: Option<(BTreeMap<usize, Vec<f32>>, f64)>,
    device: Device,
}

/// A layer's tracked parameters and the leaf of its threshold input.
pub(crate) struct Tracked {
    pub params: LayerParams,
    pub theta: Option<Tensor<1>>,
    pub options: MoeForwardOptions,
}

/// Gradients of one layer accumulated over micro-batches.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerGrad {
    pub alpha: Vec<f64>,
    pub log_beta: f64,
    pub theta: Vec<f64>,
}

impl<'a> StepRelax<'a> {
    pub(crate) fn new(
        state: &'a DiepState,
        settings: &DiepSettings,
        budget: &Budget,
        tau: f64,
        alpha_phase: bool,
        device: &Device,
    ) -> Result<Self> {
        let kind = settings.relaxation;
        let thresholds = (kind != RelaxationKind::Paper).then(|| {
            let scores = state.params(device).iter().map(|(l, p)| (*l, host_f64(p.routed_score()))).collect();
            Thresholds::solve(budget, &scores, tau)
        });
        Ok(StepRelax {
            state,
            kind,
            tau,
            alpha_phase,
            implicit: settings.threshold == ThresholdMode::Implicit,
            thresholds,
            noise: None,
            device: device.clone(),
        })
    }

    /// Draws the logistic noise of sampled masks for step `step` of epoch `epoch` (both
    /// 1-based), seeded by the settings' seed, when `settings.mask_noise > 0` and the
    /// relaxation is routed; otherwise unchanged.
    pub(crate) fn with_noise(mut self, settings: &DiepSettings, epoch: usize, step: usize) -> Self {
        if settings.mask_noise > 0.0 && self.thresholds.is_some() {
            let mut rng = diep_common::SplitMix64::for_stream(settings.seed, &format!("mask-{epoch}-{step}"));
            let noise = self
                .state
                .layers
                .iter()
                .map(|(l, layer)| (*l, (0..layer.alpha.len()).map(|_| rng.logistic() as f32).collect()))
                .collect();
            self.noise = Some((noise, settings.mask_noise));
        }
        self
    }

    /// The options of MoE layer `l` without gradients (the forward sweep).
    pub(crate) fn plain(&self, l: usize) -> MoeForwardOptions {
        let p = self.state.layers[&l].params(&self.device, false, false);
        self.options(l, &p, None)
    }

    fn options(&self, l: usize, p: &LayerParams, theta: Option<Tensor<1>>) -> MoeForwardOptions {
        match (self.kind, &self.thresholds) {
            (RelaxationKind::Paper, _) | (_, None) => {
                forward_options(Relaxation::Paper, &BTreeMap::from([(l, p.clone())]), 0).remove(&l).expect("layer")
            }
            (kind, Some(th)) => {
                let theta = theta.unwrap_or_else(|| th.layer_theta(l, &self.device));
                let noise = self.noise.as_ref().map(|(noise, t)| {
                    let v = noise[&l].clone();
                    let n = v.len();
                    (Tensor::from_data(TensorData::new(v, [n]), &self.device), *t)
                });
                sampled_layer_options(p, theta, self.tau, kind == RelaxationKind::RoutedGated, noise)
            }
        }
    }

    /// The options of MoE layer `l` with the phase's parameter (and the threshold input, for
    /// the implicit threshold) tracked.
    pub(crate) fn tracked(&self, l: usize) -> Tracked {
        let params = self.state.layers[&l].params(&self.device, self.alpha_phase, !self.alpha_phase);
        let theta = match &self.thresholds {
            Some(th) if self.implicit && self.kind != RelaxationKind::Paper => {
                Some(th.layer_theta(l, &self.device).require_grad())
            }
            _ => None,
        };
        let options = self.options(l, &params, theta.clone());
        Tracked { params, theta, options }
    }

    /// Adds one backward pass's gradients of layer `l`'s tracked tensors to `acc`.
    pub(crate) fn accumulate(&self, t: &Tracked, grads: &burn::tensor::Gradients, acc: &mut LayerGrad) {
        let n = t.params.num_experts();
        if acc.alpha.is_empty() {
            acc.alpha = vec![0.0; n];
            acc.theta = vec![0.0; n];
        }
        if self.alpha_phase {
            if let Some(g) = t.params.alpha.grad(grads) {
                for (a, x) in acc.alpha.iter_mut().zip(host(g)) {
                    *a += x as f64;
                }
            }
        } else if let Some(g) = t.params.log_beta.grad(grads) {
            acc.log_beta += host(g)[0] as f64;
        }
        if let Some(theta) = &t.theta
            && let Some(g) = theta.grad(grads)
        {
            for (a, x) in acc.theta.iter_mut().zip(host(g)) {
                *a += x as f64;
            }
        }
    }

    /// The phase's gradients from the per-layer accumulations: the direct terms plus the
    /// thresholds' implicit-gradient terms, folded once over all layers and chained through
    /// `s = log softmax(α) + log N + log β`.
    pub(crate) fn finish(&self, acc: &BTreeMap<usize, LayerGrad>, out: &mut StepGrads) {
        let folded = match &self.thresholds {
            Some(th) if self.implicit => Some(th.fold(&acc.iter().map(|(l, g)| (*l, g.theta.clone())).collect())),
            _ => None,
        };
        for (l, layer) in &self.state.layers {
            let n = layer.alpha.len();
            let g = acc.get(l).cloned().unwrap_or_else(|| LayerGrad { alpha: vec![0.0; n], ..Default::default() });
            let extra = folded.as_ref().map(|f| f[l].clone()).unwrap_or_else(|| vec![0.0; n]);
            let sum_extra: f64 = extra.iter().sum();
            if self.alpha_phase {
                let max = layer.alpha.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let e: Vec<f64> = layer.alpha.iter().map(|a| (*a as f64 - max).exp()).collect();
                let z: f64 = e.iter().sum();
                let grad = (0..n)
                    .map(|k| {
                        let direct = g.alpha.get(k).copied().unwrap_or(0.0);
                        (direct + extra[k] - e[k] / z * sum_extra) as f32
                    })
                    .collect();
                out.alpha.insert(*l, grad);
            } else {
                out.log_beta.insert(*l, (g.log_beta + sum_extra) as f32);
            }
        }
    }
}

fn host_f64(t: Tensor<1>) -> Vec<f64> {
    t.into_data().iter::<f32>().map(f64::from).collect()
}

/// The loss of a batch (sequence indices) under per-layer forward options.
pub(crate) type LossFn<'a> = dyn Fn(&[usize], &BTreeMap<usize, MoeForwardOptions>) -> Result<Loss> + 'a;

/// One step through a whole-graph autodiff pass: the phase's parameters tracked, the
/// relaxation's options for every layer at once ([`diep_relax::routed_options_budget`]), one
/// backward. Used by the `layer-wise` objective, and as the reference the streamed gradients
/// are tested against.
pub(crate) fn autodiff_step(
    input: &StepInput<'_>,
    settings: &DiepSettings,
    budget: &Budget,
    device: &Device,
    loss_fn: &LossFn<'_>,
) -> Result<StepGrads> {
    let alpha_phase = input.alpha_phase;
    let params: BTreeMap<usize, LayerParams> =
        input.state.layers.iter().map(|(l, s)| (*l, s.params(device, alpha_phase, !alpha_phase))).collect();
    let opts = match settings.relaxation {
        RelaxationKind::Paper => forward_options(Relaxation::Paper, &params, 0),
        kind => diep_relax::routed_options_budget(
            &params,
            budget,
            input.tau,
            kind == RelaxationKind::RoutedGated,
            settings.threshold == ThresholdMode::Implicit,
        ),
    };
    let loss = loss_fn(input.batch, &opts)?;
    let mut out = StepGrads {
        loss: scalar(loss.total.clone()),
        ce: loss.ce.map(scalar).unwrap_or(0.0),
        reg: scalar(loss.reg),
        ..Default::default()
    };
    if !out.loss.is_finite() {
        return Ok(out);
    }
    let grads = loss.total.backward();
    for (l, p) in &params {
        if alpha_phase {
            let g = p.alpha.grad(&grads).map(host).unwrap_or_else(|| vec![0.0; p.num_experts()]);
            out.alpha.insert(*l, g);
        } else {
            let g = p.log_beta.grad(&grads).map(host).map_or(0.0, |v| v[0]);
            out.log_beta.insert(*l, g);
        }
    }
    Ok(out)
}

/// The whole-model objective of the in-memory reference: `kl` or `ce-norm` on the final logits
/// of `model` under per-layer options, against the original model's logits. Kept beside the
/// streamed implementation, which the tests compare with it.
#[doc(hidden)]
pub fn reference_step_grads(
    model: &diep_models::MoeModel,
    ids: &[Vec<u32>],
    batch: &[usize],
    state: &DiepState,
    alpha_phase: bool,
    tau: f64,
) -> Result<StepGrads> {
    let settings = &state.settings;
    let device = model.device().clone();
    let budget = budget(model.config(), settings);
    let loss_fn = |batch: &[usize], opts: &BTreeMap<usize, MoeForwardOptions>| -> Result<Loss> {
        let seqs: Vec<Vec<u32>> = batch.iter().map(|i| ids[*i].clone()).collect();
        let logits = model.forward_per_layer(&seqs, opts)?;
        let reference = model.forward(&seqs)?.detach();
        Ok(match settings.objective {
            Objective::CeNorm => {
                let ce = next_token_ce(logits.clone(), &seqs, &device);
                let norm = (logits - reference).square().sum().add_scalar(1e-12).sqrt();
                Loss::new(ce.clone() + norm.clone() * settings.lambda, Some(ce), norm)
            }
            _ => {
                let log_q = log_softmax(logits, 2);
                let log_p = log_softmax(reference, 2);
                let [b, t, _] = log_q.dims();
                let kl = (log_p.clone().exp() * (log_p - log_q)).sum() / (b * t) as f64;
                Loss::new(kl.clone(), None, kl)
            }
        })
    };
    let input = StepInput { batch, state, alpha_phase, tau, epoch: 1, step: 1 };
    autodiff_step(&input, settings, &budget, &device, &loss_fn)
}

/// One step of the streamed objectives outside the optimisation loop, for benchmarks and
/// tests: the reference is computed once by [`Stepper::new`], then [`Stepper::step`] returns the
/// objective and the phase's gradients for any batch and state.
pub struct Stepper<'a, S: LayerSource> {
    source: &'a S,
    ids: &'a [Vec<u32>],
    settings: DiepSettings,
    budget: Budget,
    store: Option<ReferenceStore>,
    stream: StreamOptions,
    device: Device,
}

impl<'a, S: LayerSource> Stepper<'a, S> {
    /// Prepares steps on `ids` with `settings` (`kl`: computes the reference distributions).
    pub fn new(source: &'a S, ids: &'a [Vec<u32>], settings: &DiepSettings, stream: &StreamOptions) -> Result<Self> {
        check_inputs(ids, settings)?;
        check_lengths(ids)?;
        let k = (settings.objective == Objective::Kl).then_some(settings.reference_top_k);
        let store = match k {
            Some(_) => prepass(source, ids, k, false, stream, |_, _| Ok(()))?.0,
            None => None,
        };
        Ok(Stepper {
            source,
            ids,
            settings: settings.clone(),
            budget: budget(source.config(), settings),
            store,
            stream: stream.clone(),
            device: source.embed(&ids[..1])?.0.device(),
        })
    }

    /// The objective on calibration sequences `batch` and the gradient of α (`alpha_phase`) or
    /// of `log β`, at `state` and temperature `tau`.
    pub fn step(&self, batch: &[usize], state: &DiepState, alpha_phase: bool, tau: f64) -> Result<StepGrads> {
        let target = match &self.store {
            Some(s) => Target::Kl(s),
            None => Target::CeNorm { lambda: self.settings.lambda },
        };
        let relax = StepRelax::new(state, &self.settings, &self.budget, tau, alpha_phase, &self.device)?;
        let seqs: Vec<Vec<u32>> = batch.iter().map(|i| self.ids[*i].clone()).collect();
        let positions = seqs.len() * self.ids[0].len();
        streamed_step(self.source, &seqs, batch, &relax, &target, positions, &self.stream, &mut |_, _, _| Ok(()))
    }
}

/// The streamed gradients of one step, for tests: [`Stepper::step`] with the settings of
/// `state`.
#[doc(hidden)]
pub fn streamed_step_grads<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    batch: &[usize],
    state: &DiepState,
    alpha_phase: bool,
    tau: f64,
    stream: &StreamOptions,
) -> Result<StepGrads> {
    Stepper::new(source, ids, &state.settings, stream)?.step(batch, state, alpha_phase, tau)
}

fn run(
    experts: &BTreeMap<usize, usize>,
    ids: &[Vec<u32>],
    settings: &DiepSettings,
    resume: Option<DiepState>,
    inits: Vec<(AlphaInit, StartParams)>,
    mut step_fn: impl FnMut(&StepInput<'_>) -> Result<StepGrads>,
    mut score_epoch: impl FnMut(&DiepState) -> Result<Option<PlanScore>>,
    mut on_event: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<DiepState> {
    if experts.is_empty() {
        return Err(OptimError::Config("the model has no MoE layer".into()));
    }
    let blank = DiepState::new(settings.clone(), fingerprint(ids), experts);
    let start = |init: &StartParams| {
        let mut st = blank.clone();
        for (l, (alpha, log_beta)) in init {
            if let Some(layer) = st.layers.get_mut(l)
                && layer.alpha.len() == alpha.len()
            {
                layer.alpha = alpha.clone();
                layer.log_beta = *log_beta;
            }
        }
        st
    };
    let mut state = match resume {
        Some(saved) => {
            blank.check_resumable(&saved)?;
            saved
        }
        None => {
            // Each candidate start's own plan is scored; the lowest is the start, and its plan
            // the first candidate of the epoch selection ("epoch 0"): training must beat it to
            // replace it. Unscored (no selection objective), the first candidate is the start.
            let mut scored: Vec<(AlphaInit, PlanScore)> = Vec::new();
            for (kind, params) in &inits {
                match score_epoch(&start(params))? {
                    Some(d) => scored.push((*kind, d)),
                    None => break,
                }
            }
            let chosen = (0..scored.len()).min_by(|a, b| scored[*a].1.loss.total_cmp(&scored[*b].1.loss)).unwrap_or(0);
            let mut fresh = match inits.get(chosen) {
                Some((kind, params)) => DiepState { warm_start: Some(*kind), ..start(params) },
                None => blank.clone(),
            };
            if let Some((kind, d)) = scored.get(chosen) {
                fresh.best = Some(crate::state::BestEpoch::of(&fresh, 0, d));
                let candidates = scored.iter().map(|(k, s)| (*k, s.loss)).collect();
                on_event(Event::WarmStart { candidates, chosen: *kind })?;
            }
            fresh
        }
    };
    let steps_per_epoch = ids.len().div_ceil(settings.batch_size);
    let total = steps_per_epoch * settings.epochs;
    on_event(Event::Started { steps_per_epoch, epochs: settings.epochs, epochs_done: state.epochs_done })?;
    for epoch in state.epochs_done..settings.epochs {
        if settings.stops_early(&state) {
            let selected = state.best.as_ref().map_or(0, |b| b.epoch);
            on_event(Event::StoppedEarly { epochs_done: state.epochs_done, selected })?;
            break;
        }
        let started = Instant::now();
        let order = epoch_order(ids.len(), settings.seed, epoch);
        let (mut sum, mut sum_ce, mut sum_reg) = (0.0, 0.0, 0.0);
        let (mut lr, mut tau) = (0.0, 0.0);
        for (b, batch) in order.chunks(settings.batch_size).enumerate() {
            let step = state.steps_done;
            let alpha_phase = settings.is_alpha_step(step);
            lr = settings.lr_at(step, total);
            tau = settings.tau_at(step, total);
            let input = StepInput { batch, state: &state, alpha_phase, tau, epoch: epoch + 1, step: b + 1 };
            let grads = step_fn(&input)?;
            let value = grads.loss;
            if !value.is_finite() {
                return Err(OptimError::Diverged(format!(
                    "the objective is {value} at epoch {} step {} (lr {lr:.3e}, τ {tau:.3e})",
                    epoch + 1,
                    b + 1
                )));
            }
            sum += value;
            sum_ce += grads.ce;
            sum_reg += grads.reg;
            for (l, s) in state.layers.iter_mut() {
                if alpha_phase {
                    let g = grads.alpha.get(l).cloned().unwrap_or_else(|| vec![0.0; s.alpha.len()]);
                    s.alpha_moments.update(settings.optimizer, &mut s.alpha, &g, lr);
                } else {
                    let g = grads.log_beta.get(l).copied().unwrap_or(0.0);
                    let mut lb = [s.log_beta];
                    s.beta_moments.update(settings.optimizer, &mut lb, &[g], lr);
                    s.log_beta = lb[0];
                }
            }
            state.steps_done += 1;
            on_event(Event::Step { epoch: epoch + 1, step: b + 1, steps_per_epoch, loss: value, alpha: alpha_phase })?;
        }
        let n = steps_per_epoch as f64;
        let mut record = EpochRecord {
            epoch: epoch + 1,
            loss: sum / n,
            ce: sum_ce / n,
            reg: sum_reg / n,
            lr,
            tau,
            seconds: started.elapsed().as_secs_f64(),
            discrete: None,
        };
        if let Some(score) = score_epoch(&state)? {
            record.discrete = Some(score.loss);
            if state.best.as_ref().is_none_or(|b| b.is_beaten_by(&score, settings.select_margin, settings.select_gain))
            {
                state.best = Some(crate::state::BestEpoch::of(&state, epoch + 1, &score));
            }
        }
        state.history.push(record.clone());
        state.epochs_done = epoch + 1;
        on_event(Event::Epoch { record: &record, state: &state })?;
    }
    Ok(state)
}
