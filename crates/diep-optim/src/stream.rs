//! The end-to-end objectives (`kl`, `ce-norm`) streamed through the model one decoder layer at
//! a time.
//!
//! One step on a batch of calibration sequences, split into micro-batches:
//!
//! 1. **Forward.** The micro-batches are embedded; then each decoder layer is loaded once and
//!    every micro-batch goes through it under the relaxation (no gradients). The input of every
//!    layer is kept — the hidden states at layer boundaries, `[rows, hidden]` per micro-batch —
//!    on the device or, with [`Offload::Host`], on the host.
//! 2. **Head.** The final norm and LM head give the relaxed logits; the objective against the
//!    reference and its gradient with respect to the last hidden state are computed per
//!    micro-batch (for `ce-norm`, whose norm term couples the whole batch, after one pass that
//!    sums the squared differences).
//! 3. **Backward.** In reverse, each layer is loaded again; for every micro-batch its forward is
//!    recomputed from the saved input with autodiff on the input and on the layer's α/β (and,
//!    for the implicit threshold, on its threshold input), and the incoming gradient is pulled
//!    back through it: a vector–Jacobian product giving the layer's parameter gradients and the
//!    gradient for the layer below. Layers below the first MoE layer are skipped.
//! 4. **Threshold.** The thresholds' gradients, accumulated over all layers and micro-batches,
//!    are folded onto the scores once ([`diep_relax::Thresholds::fold`]).
//!
//! Memory: one layer's weights, the boundary states (`(L + 1)·B·T·H` floats), one
//! micro-batch's autodiff graph through one layer, and the reference. Weights are read twice
//! per step.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use burn::tensor::{Device, Tensor, TensorData};
use diep_models::{LayerSource, MoeForwardOptions};

use crate::error::{OptimError, Result};
use crate::optimise::{LayerGrad, StepGrads, StepRelax, scalar};
use crate::reference::ReferenceStore;

/// Where the hidden states at layer boundaries are kept during a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offload {
    /// On the host for GPU devices, on the device (which is the host) for the CPU.
    #[default]
    Auto,
    /// On the compute device.
    Device,
    /// In host memory, uploaded again for the backward pass.
    Host,
}

/// How a streamed step is executed. None of these change the result beyond floating-point
/// summation order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamOptions {
    /// Calibration sequences per micro-batch (`0`: the whole batch at once). The autodiff graph
    /// of one micro-batch through one layer is the largest transient allocation.
    pub micro_batch: usize,
    /// Where boundary states are kept.
    pub offload: Offload,
}

/// The half of a streamed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forward through the layers, keeping boundary states.
    Forward,
    /// Backward through the layers in reverse.
    Backward,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
        })
    }
}

/// What the final logits are compared with.
pub(crate) enum Target<'a> {
    /// `KL(F ‖ F′)` against the stored reference distributions.
    Kl(&'a ReferenceStore),
    /// `CE(y, F′) + λ·‖F′ − F‖_F`, the original model's logits `F` recomputed alongside.
    CeNorm { lambda: f64 },
}

/// A boundary state, on the device or on the host.
enum Stored {
    Device(Tensor<2>),
    Host(TensorData, Device),
}

impl Stored {
    fn new(t: Tensor<2>, host: bool) -> Self {
        if host {
            let device = t.device();
            Stored::Host(t.into_data(), device)
        } else {
            Stored::Device(t)
        }
    }

    fn get(&self) -> Tensor<2> {
        match self {
            Stored::Device(t) => t.clone(),
            Stored::Host(d, device) => Tensor::from_data(d.clone(), device),
        }
    }
}

fn micro_batches(n: usize, opts: &StreamOptions) -> Vec<std::ops::Range<usize>> {
    let size = if opts.micro_batch == 0 { n } else { opts.micro_batch.min(n) };
    (0..n).step_by(size.max(1)).map(|s| s..(s + size).min(n)).collect()
}

fn offload_to_host(opts: &StreamOptions, device: &Device) -> bool {
    match opts.offload {
        Offload::Host => true,
        Offload::Device => false,
        Offload::Auto => {
            !format!("{device:?}").to_ascii_lowercase().contains("cpu")
                && !format!("{device:?}").to_ascii_lowercase().contains("flex")
        }
    }
}

/// How the original model routes the calibration set: per MoE layer, each expert's summed
/// router probability and its number of top-k selections, over `tokens` tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoutingShares {
    /// Tokens seen.
    pub tokens: usize,
    /// Per MoE layer, summed router probability per expert.
    pub soft: BTreeMap<usize, Vec<f64>>,
    /// Per MoE layer, top-k selections per expert.
    pub selected: BTreeMap<usize, Vec<f64>>,
    /// Per MoE layer, REAP's score per expert: the mean over the tokens routed to it of
    /// `g_j(x)·‖E_j(x)‖₂` (0 for an expert no token chose). Measured only when the prepass is
    /// asked to capture expert outputs.
    pub reap: BTreeMap<usize, Vec<f64>>,
}

/// One pass of the original model over the calibration set, streamed layer by layer (each layer
/// loaded once): the reference distributions of every sequence, keeping the top `k` tokens of
/// each position (`0`: all) when `k` is given, and the routing shares of every MoE layer (with
/// REAP's scores when `capture`). `progress(done, total)` counts layers.
pub(crate) fn prepass<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    k: Option<usize>,
    capture: bool,
    opts: &StreamOptions,
    mut progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<(Option<ReferenceStore>, RoutingShares)> {
    let config = source.config();
    let t = ids[0].len();
    let chunks = micro_batches(ids.len(), opts);
    let mut states =
        chunks.iter().map(|c| source.embed(&ids[c.clone()])).collect::<std::result::Result<Vec<_>, _>>()?;
    let plain = MoeForwardOptions { capture_expert_outputs: capture, ..Default::default() };
    let total = config.num_layers;
    let mut shares = RoutingShares { tokens: ids.len() * t, ..Default::default() };
    let mut reap_counts: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for l in 0..total {
        source.with_layer(l, |layer| {
            for (h, ctx) in states.iter_mut() {
                let out = layer.forward(h.clone(), ctx, &plain);
                if let Some(moe) = out.moe {
                    let n = moe.routing.probs.dims()[1];
                    if capture {
                        let sums = shares.reap.entry(l).or_insert_with(|| vec![0.0; n]);
                        let counts = reap_counts.entry(l).or_insert_with(|| vec![0.0; n]);
                        for (e, cap) in moe.expert_outputs.iter().flatten().enumerate() {
                            let Some(cap) = cap else { continue };
                            for (n, w) in cap.norms_and_weights() {
                                sums[e] += f64::from(n) * f64::from(w);
                            }
                            counts[e] += cap.tokens.len() as f64;
                        }
                    }
                    let soft = shares.soft.entry(l).or_insert_with(|| vec![0.0; n]);
                    for (s, p) in soft.iter_mut().zip(moe.routing.probs.sum_dim(0).into_data().iter::<f32>()) {
                        *s += p as f64;
                    }
                    let selected = shares.selected.entry(l).or_insert_with(|| vec![0.0; n]);
                    for e in moe.routing.experts.into_data().iter::<i64>() {
                        selected[e as usize] += 1.0;
                    }
                }
                *h = out.hidden.detach();
            }
        })?;
        progress(l + 1, total)?;
    }
    for (l, sums) in shares.reap.iter_mut() {
        for (s, c) in sums.iter_mut().zip(&reap_counts[l]) {
            *s = if *c > 0.0 { *s / c } else { 0.0 };
        }
    }
    let Some(k) = k else { return Ok((None, shares)) };
    let mut store = ReferenceStore::new(ids.len(), t, config.vocab_size, k);
    let vocab = config.vocab_size;
    source.with_head(|norm, head| {
        for (c, (h, _)) in chunks.iter().zip(states) {
            let logits: Vec<f32> = head.forward(norm.forward(h)).into_data().iter::<f32>().collect();
            for (j, seq) in c.clone().enumerate() {
                store.insert(seq, &logits[j * t * vocab..(j + 1) * t * vocab]);
            }
        }
    })?;
    Ok((Some(store), shares))
}

/// Sum of next-token cross-entropies of `[rows, vocab]` logits for `seqs` (each `t` tokens).
fn ce_sum(logits: Tensor<2>, seqs: &[Vec<u32>]) -> Tensor<1> {
    let [rows, vocab] = logits.dims();
    let t = rows / seqs.len();
    let device = logits.device();
    let logp = burn::tensor::activation::log_softmax(logits.reshape([seqs.len(), t, vocab]).narrow(1, 0, t - 1), 2);
    let targets: Vec<i64> = seqs.iter().flat_map(|s| s[1..].iter().map(|x| *x as i64)).collect();
    let targets = Tensor::<3, burn::tensor::Int>::from_data(TensorData::new(targets, [seqs.len(), t - 1, 1]), &device);
    -logp.gather(2, targets).sum().reshape([1])
}

/// One streamed step: the objective on `seqs` (calibration sequences `batch`) under `relax`,
/// and the gradient of the phase's parameters. `positions` is the number of predicted positions
/// the `kl` objective averages over. `progress(phase, done, total)` counts layers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn streamed_step<S: LayerSource>(
    source: &S,
    seqs: &[Vec<u32>],
    batch: &[usize],
    relax: &StepRelax<'_>,
    target: &Target<'_>,
    positions: usize,
    opts: &StreamOptions,
    progress: &mut dyn FnMut(Phase, usize, usize) -> Result<()>,
) -> Result<StepGrads> {
    let config = source.config();
    let layers = config.num_layers;
    let moe: BTreeSet<usize> = config.moe_layers().into_iter().collect();
    let first_moe = *moe.iter().next().ok_or_else(|| OptimError::Config("the model has no MoE layer".into()))?;
    let chunks = micro_batches(seqs.len(), opts);
    let dual = matches!(target, Target::CeNorm { .. });
    let plain = MoeForwardOptions::default();

    // 1. Forward, keeping each layer's input.
    let mut ctxs = Vec::with_capacity(chunks.len());
    let mut h = Vec::with_capacity(chunks.len());
    let mut h_ref = Vec::new();
    for c in &chunks {
        let (x, ctx) = source.embed(&seqs[c.clone()])?;
        if dual {
            h_ref.push(x.clone());
        }
        h.push(x.detach());
        ctxs.push(ctx);
    }
    let host = offload_to_host(opts, &h[0].device());
    let mut bounds: Vec<Vec<Stored>> = Vec::with_capacity(layers);
    for l in 0..layers {
        let layer_opts = if moe.contains(&l) { relax.plain(l) } else { MoeForwardOptions::default() };
        let saved = source.with_layer(l, |layer| {
            let mut saved = Vec::with_capacity(h.len());
            for (m, ctx) in ctxs.iter().enumerate() {
                let x = h[m].clone();
                if l >= first_moe {
                    saved.push(Stored::new(x.clone(), host));
                }
                h[m] = layer.forward(x, ctx, &layer_opts).hidden.detach();
                if dual {
                    h_ref[m] = layer.forward(h_ref[m].clone(), ctx, &plain).hidden.detach();
                }
            }
            saved
        })?;
        bounds.push(saved);
        progress(Phase::Forward, l + 1, layers)?;
    }

    // 2. The objective and its gradient at the last hidden state.
    let mut out = StepGrads::default();
    let mut g: Vec<Tensor<2>> = Vec::with_capacity(chunks.len());
    source.with_head(|norm, head| -> Result<()> {
        let logits_of = |x: Tensor<2>| head.forward(norm.forward(x));
        match target {
            Target::Kl(store) => {
                let mut total = 0.0;
                for (m, c) in chunks.iter().enumerate() {
                    let x = h[m].clone().require_grad();
                    let logits = logits_of(x.clone());
                    let scale = 1.0 / positions as f64;
                    // On the CPU the objective and its gradient at the logits come from one pass
                    // over each row on the host; elsewhere from burn's ops.
                    let grads = match store.kl_sum_and_grad(&batch[c.clone()], &logits, scale) {
                        Some((kl, dz)) => {
                            total += kl * scale;
                            (logits * dz).sum().backward()
                        }
                        None => {
                            let kl = store.kl_sum(&batch[c.clone()], logits) * scale;
                            total += scalar(kl.clone());
                            kl.backward()
                        }
                    };
                    g.push(x.grad(&grads).expect("the objective depends on the last hidden state").autodiff());
                }
                out.loss = total;
                out.reg = total;
            }
            Target::CeNorm { lambda } => {
                let predicted: usize = seqs.len() * (seqs[0].len() - 1);
                let (mut sq, mut ce) = (0.0, 0.0);
                for (m, c) in chunks.iter().enumerate() {
                    let logits = logits_of(h[m].clone());
                    let reference = logits_of(h_ref[m].clone());
                    sq += scalar((logits.clone() - reference).square().sum());
                    ce += scalar(ce_sum(logits, &seqs[c.clone()]));
                }
                let norm_value = (sq + 1e-12).sqrt();
                for (m, c) in chunks.iter().enumerate() {
                    let x = h[m].clone().require_grad();
                    let logits = logits_of(x.clone());
                    let reference = logits_of(h_ref[m].clone());
                    // d/dF′ of λ‖F′ − F‖ is λ(F′ − F)/‖F′ − F‖ over the whole batch.
                    let surrogate = ce_sum(logits.clone(), &seqs[c.clone()]) / predicted as f64
                        + (logits - reference).square().sum() * (lambda / (2.0 * norm_value));
                    let grads = surrogate.backward();
                    g.push(x.grad(&grads).expect("the objective depends on the last hidden state").autodiff());
                }
                out.ce = ce / predicted as f64;
                out.reg = norm_value;
                out.loss = out.ce + lambda * norm_value;
            }
        }
        Ok(())
    })??;
    drop(h);
    drop(h_ref);
    if !out.loss.is_finite() {
        return Ok(out);
    }

    // 3. Backward, layer by layer in reverse, down to the first MoE layer.
    let mut acc: BTreeMap<usize, LayerGrad> = BTreeMap::new();
    let backward_layers = layers - first_moe;
    for l in (first_moe..layers).rev() {
        let saved = bounds.pop().expect("a boundary per layer");
        let needs_input_grad = l > first_moe;
        source.with_layer(l, |layer| -> Result<()> {
            for (m, ctx) in ctxs.iter().enumerate() {
                let x = saved[m].get().detach();
                let x = if needs_input_grad { x.require_grad() } else { x };
                let tracked = moe.contains(&l).then(|| relax.tracked(l));
                let layer_opts = tracked.as_ref().map_or(&plain, |t| &t.options);
                let y = layer.forward(x.clone(), ctx, layer_opts).hidden;
                let surrogate = (y * g[m].clone()).sum();
                if !surrogate.is_tracked() {
                    continue;
                }
                let grads = surrogate.backward();
                if needs_input_grad {
                    g[m] = x.grad(&grads).expect("the layer output depends on its input").autodiff();
                }
                if let Some(t) = &tracked {
                    relax.accumulate(t, &grads, acc.entry(l).or_default());
                }
            }
            Ok(())
        })??;
        progress(Phase::Backward, layers - l, backward_layers)?;
    }

    // 4. The thresholds' gradient, once over all layers.
    relax.finish(&acc, &mut out);
    Ok(out)
}
