//! The alternating α/β optimisation loop and its objectives.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use diep_models::{LayerSource, MoeForwardOptions, MoeModel};
use diep_relax::{LayerParams, Relaxation, forward_options, routed_options_implicit};

use crate::error::{OptimError, Result};
use crate::settings::{DiepSettings, Objective, RelaxationKind, ThresholdMode};
use crate::state::{DiepState, EpochRecord, fingerprint};

/// Reference logits are cached for the whole calibration set up to this size; above it they
/// are recomputed for every batch.
const REFERENCE_CACHE_BYTES: usize = 1 << 30;

/// Progress of an optimisation.
#[derive(Debug)]
pub enum Event<'a> {
    /// The loop is about to start (or resume).
    Started {
        /// Steps per epoch.
        steps_per_epoch: usize,
        /// Epochs in total.
        epochs: usize,
        /// Epochs already done (a resumed run).
        epochs_done: usize,
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
    /// An epoch finished; `state` is what `--resume` continues from.
    Epoch {
        /// The epoch's record.
        record: &'a EpochRecord,
        /// The state after the epoch.
        state: &'a DiepState,
    },
}

/// Routed experts per MoE layer of a model.
pub fn expert_counts(config: &diep_models::checkpoint::ModelConfig) -> BTreeMap<usize, usize> {
    config.moe_layers().into_iter().map(|l| (l, config.experts_in_layer(l))).collect()
}

/// Experts the routed relaxation's threshold keeps: `Σ N − round(ratio·Σ N)`.
pub fn keep_count(experts: &BTreeMap<usize, usize>, ratio: f64) -> usize {
    let total: usize = experts.values().sum();
    total - (ratio * total as f64).round() as usize
}

/// The relaxation at a temperature.
pub fn relaxation(kind: RelaxationKind, tau: f64) -> Relaxation {
    match kind {
        RelaxationKind::Paper => Relaxation::Paper,
        RelaxationKind::Routed | RelaxationKind::RoutedGated => Relaxation::Routed { tau },
    }
}

/// Optimises α and β with an end-to-end objective (`ce-norm` or `kl`) on `model`, loaded on
/// an autodiff device (`device.autodiff()`). The model's weights are never updated: only α
/// and β are tracked. `resume` continues a saved state of the same run.
pub fn optimise(
    model: &MoeModel,
    ids: &[Vec<u32>],
    settings: &DiepSettings,
    resume: Option<DiepState>,
    on_event: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<DiepState> {
    if settings.objective == Objective::LayerWise {
        return optimise_layer_wise(model, ids, settings, resume, on_event);
    }
    check_inputs(ids, settings)?;
    let device = model.device().clone();
    let experts = expert_counts(model.config());
    let vocab = model.config().vocab_size;
    let cache_bytes = ids.iter().map(Vec::len).sum::<usize>() * vocab * 4;
    let reference_of = |seq: &[Vec<u32>]| -> Result<Tensor<3>> { Ok(model.forward(seq)?.detach()) };
    let cache: Option<Vec<Tensor<3>>> = if cache_bytes <= REFERENCE_CACHE_BYTES {
        let mut cached = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(settings.batch_size) {
            let logits = reference_of(chunk)?;
            let [b, t, v] = logits.dims();
            cached.extend((0..b).map(|i| logits.clone().slice([i..i + 1, 0..t, 0..v])));
        }
        Some(cached)
    } else {
        None
    };
    let objective = settings.objective;
    let lambda = settings.lambda;
    let loss_fn = |batch: &[usize], opts: &BTreeMap<usize, MoeForwardOptions>| -> Result<Loss> {
        let seqs: Vec<Vec<u32>> = batch.iter().map(|i| ids[*i].clone()).collect();
        let logits = model.forward_per_layer(&seqs, opts)?;
        let reference = match &cache {
            Some(c) => Tensor::cat(batch.iter().map(|i| c[*i].clone()).collect(), 0),
            None => reference_of(&seqs)?,
        };
        Ok(match objective {
            Objective::CeNorm => {
                let ce = next_token_ce(logits.clone(), &seqs, &device);
                let norm = (logits - reference).square().sum().add_scalar(1e-12).sqrt();
                Loss::new(ce.clone() + norm.clone() * lambda, Some(ce), norm)
            }
            Objective::Kl => {
                let log_q = log_softmax(logits, 2);
                let log_p = log_softmax(reference, 2);
                let [b, t, _] = log_q.dims();
                let kl = (log_p.clone().exp() * (log_p - log_q)).sum() / (b * t) as f64;
                Loss::new(kl.clone(), None, kl)
            }
            Objective::LayerWise => unreachable!("handled by optimise_layer_wise"),
        })
    };
    run(&device, &experts, ids, settings, resume, loss_fn, on_event)
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
    let experts = expert_counts(&config);
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
    run(&device, &experts, ids, settings, resume, loss_fn, on_event)
}

/// A step's objective and its parts.
struct Loss {
    total: Tensor<1>,
    ce: Option<Tensor<1>>,
    reg: Tensor<1>,
}

impl Loss {
    fn new(total: Tensor<1>, ce: Option<Tensor<1>>, reg: Tensor<1>) -> Self {
        Loss { total, ce, reg }
    }
}

fn scalar(t: Tensor<1>) -> f64 {
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

/// The order of calibration sequences in an epoch: a seeded shuffle (SplitMix64 +
/// Fisher–Yates), so a resumed run sees the same batches.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut s = seed ^ (epoch as u64 + 1).wrapping_mul(0x9E3779B97F4A7C15);
    let mut next = move || {
        s = s.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn run(
    device: &Device,
    experts: &BTreeMap<usize, usize>,
    ids: &[Vec<u32>],
    settings: &DiepSettings,
    resume: Option<DiepState>,
    mut loss_fn: impl FnMut(&[usize], &BTreeMap<usize, MoeForwardOptions>) -> Result<Loss>,
    mut on_event: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<DiepState> {
    if experts.is_empty() {
        return Err(OptimError::Config("the model has no MoE layer".into()));
    }
    let fresh = DiepState::new(settings.clone(), fingerprint(ids), experts);
    let mut state = match resume {
        Some(saved) => {
            fresh.check_resumable(&saved)?;
            saved
        }
        None => fresh,
    };
    let keep = keep_count(experts, settings.ratio);
    let steps_per_epoch = ids.len().div_ceil(settings.batch_size);
    let total = steps_per_epoch * settings.epochs;
    on_event(Event::Started { steps_per_epoch, epochs: settings.epochs, epochs_done: state.epochs_done })?;
    for epoch in state.epochs_done..settings.epochs {
        let started = Instant::now();
        let order = epoch_order(ids.len(), settings.seed, epoch);
        let (mut sum, mut sum_ce, mut sum_reg) = (0.0, 0.0, 0.0);
        let (mut lr, mut tau) = (0.0, 0.0);
        for (b, batch) in order.chunks(settings.batch_size).enumerate() {
            let step = state.steps_done;
            let alpha_phase = settings.is_alpha_step(step);
            lr = settings.lr_at(step, total);
            tau = settings.tau_at(step, total);
            let params: BTreeMap<usize, LayerParams> =
                state.layers.iter().map(|(l, s)| (*l, s.params(device, alpha_phase, !alpha_phase))).collect();
            let opts = match (settings.relaxation, settings.threshold) {
                (RelaxationKind::Routed, ThresholdMode::Implicit) => routed_options_implicit(&params, keep, tau, false),
                (RelaxationKind::RoutedGated, ThresholdMode::Implicit) => {
                    routed_options_implicit(&params, keep, tau, true)
                }
                (RelaxationKind::RoutedGated, ThresholdMode::Fixed) => {
                    return Err(OptimError::Config("the routed-gated relaxation needs the implicit threshold".into()));
                }
                (kind, _) => forward_options(relaxation(kind, tau), &params, keep),
            };
            let loss = loss_fn(batch, &opts)?;
            let value = scalar(loss.total.clone());
            if !value.is_finite() {
                return Err(OptimError::Diverged(format!(
                    "the objective is {value} at epoch {} step {} (lr {lr:.3e}, τ {tau:.3e})",
                    epoch + 1,
                    b + 1
                )));
            }
            sum += value;
            sum_ce += loss.ce.map(scalar).unwrap_or(0.0);
            sum_reg += scalar(loss.reg);
            let grads = loss.total.backward();
            for (l, p) in &params {
                let s = state.layers.get_mut(l).expect("layer");
                if alpha_phase {
                    let g = p.alpha.grad(&grads).map(host).unwrap_or_else(|| vec![0.0; s.alpha.len()]);
                    s.alpha_moments.update(settings.optimizer, &mut s.alpha, &g, lr);
                } else {
                    let g = p.log_beta.grad(&grads).map(host).unwrap_or_else(|| vec![0.0]);
                    let mut lb = [s.log_beta];
                    s.beta_moments.update(settings.optimizer, &mut lb, &g, lr);
                    s.log_beta = lb[0];
                }
            }
            state.steps_done += 1;
            on_event(Event::Step { epoch: epoch + 1, step: b + 1, steps_per_epoch, loss: value, alpha: alpha_phase })?;
        }
        let n = steps_per_epoch as f64;
        let record = EpochRecord {
            epoch: epoch + 1,
            loss: sum / n,
            ce: sum_ce / n,
            reg: sum_reg / n,
            lr,
            tau,
            seconds: started.elapsed().as_secs_f64(),
        };
        state.history.push(record.clone());
        state.epochs_done = epoch + 1;
        on_event(Event::Epoch { record: &record, state: &state })?;
    }
    Ok(state)
}
