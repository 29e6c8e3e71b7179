//! Searching the discrete plan directly on the calibration objective: a greedy global search
//! (the quality reference methods are compared with) and a local refinement of any plan.
//!
//! Both score a plan by the `kl` objective of the pruned model — the experts it removes masked
//! out of the router, which is exactly the pruned checkpoint — against the original model's
//! reference distributions ([`ReferenceStore`]) on a subset of the calibration sequences. An
//! [`Evaluator`] keeps the hidden states of the current plan at every layer boundary, so a
//! candidate that changes layer `l` is evaluated by running only layers `l..L` and the head;
//! candidates that start at the same layer share each layer's load.
//!
//! - [`greedy_search`]: removes one expert at a time, each time the one whose removal raises
//!   the objective least, until the budget is met — respecting per-layer floors, the uniform
//!   allocation's per-layer counts and routing groups (a group-limited layer is finished to
//!   equal groups before another is opened).
//! - [`refine`]: rounds of local search from a plan: in every MoE layer, the best swap of one
//!   kept and one removed expert (within a routing group); under a global allocation without
//!   groups, also moves of one expert between two layers (the best single removal of one layer
//!   paired with the best single restoration of another). An improvement is accepted only if it
//!   lowers the objective, so the objective never rises.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use burn::tensor::{Tensor, TensorData};
use diep_models::AttentionContext;
use diep_models::{LayerSource, MoeForwardOptions};
use diep_plan::{Allocation, Constraints, Kept};
use serde::Serialize;

use crate::error::{OptimError, Result};
use crate::reference::ReferenceStore;
use crate::stream::{StreamOptions, prepass};

/// How a search scores plans.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchOptions {
    /// Calibration sequences scored (the first ones given; 0: all).
    pub samples: usize,
    /// Sequences per forward batch.
    pub micro_batch: usize,
    /// Tokens per position of the reference distribution (0: all).
    pub reference_top_k: usize,
    /// Candidate plans evaluated together through a layer (bounds their hidden states' memory).
    pub candidates_per_pass: usize,
    /// Refinement only: with scores, the experts considered in each layer are the `width`
    /// lowest-scored kept and the `width` highest-scored removed (those nearest the cut); 0: all.
    pub width: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions { samples: 0, micro_batch: 0, reference_top_k: 64, candidates_per_pass: 16, width: 0 }
    }
}

/// One accepted change of a search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Move {
    /// Experts removed, `(layer, expert)`.
    pub removed: Vec<(usize, usize)>,
    /// Experts restored, `(layer, expert)`.
    pub restored: Vec<(usize, usize)>,
    /// The objective after the move.
    pub loss: f64,
}

/// What a search found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchOutcome {
    /// Kept experts per MoE layer.
    pub kept: Kept,
    /// The objective of the plan it started from (all experts, for the greedy search).
    pub loss_before: f64,
    /// The objective of the plan found.
    pub loss_after: f64,
    /// The accepted moves, in order.
    pub moves: Vec<Move>,
    /// Candidate plans evaluated.
    pub evaluations: u64,
    /// Decoder-layer forwards over the scored sequences, divided by the number of layers: the
    /// cost in equivalent full forward passes.
    pub forward_passes: f64,
    /// Calibration sequences scored.
    pub samples: usize,
}

/// A change of some layers' masks.
type Change = BTreeMap<usize, Vec<bool>>;

/// Scores plans by the `kl` objective of the masked model, with the current plan's hidden states
/// cached at every layer boundary.
pub struct Evaluator<'a, S: LayerSource> {
    source: &'a S,
    chunks: Vec<Range<usize>>,
    ctxs: Vec<AttentionContext>,
    store: Cow<'a, ReferenceStore>,
    positions: usize,
    masks: BTreeMap<usize, Vec<bool>>,
    /// `[layer][chunk]`: the input of every layer, and at `L` the last hidden state.
    bounds: Vec<Vec<Tensor<2>>>,
    loss: f64,
    /// The current plan's mean `kl` per position of each scored sequence.
    seq_losses: Vec<f64>,
    candidates_per_pass: usize,
    evaluations: u64,
    layer_forwards: u64,
}

fn mask_options(mask: Option<&Vec<bool>>, device: &burn::tensor::Device) -> MoeForwardOptions {
    match mask {
        Some(m) if m.iter().any(|k| !k) => {
            let bias: Vec<f32> = m.iter().map(|k| if *k { 0.0 } else { f32::NEG_INFINITY }).collect();
            let n = bias.len();
            MoeForwardOptions {
                router_bias: Some(Tensor::from_data(TensorData::new(bias, [n]), device)),
                ..Default::default()
            }
        }
        _ => MoeForwardOptions::default(),
    }
}

impl<'a, S: LayerSource> Evaluator<'a, S> {
    /// An evaluator on `ids` (the first `opts.samples`) starting from `kept` (`None`: every
    /// expert). Computes the reference distributions and the plan's boundary states: two passes
    /// over the model.
    pub fn new(source: &'a S, ids: &[Vec<u32>], kept: Option<&Kept>, opts: &SearchOptions) -> Result<Self> {
        let n = if opts.samples == 0 { ids.len() } else { opts.samples.min(ids.len()) };
        let ids = &ids[..n];
        if ids.is_empty() || ids.iter().any(|s| s.len() != ids[0].len() || s.len() < 2) {
            return Err(OptimError::Config("the search needs calibration sequences of one length ≥ 2".into()));
        }
        let stream = StreamOptions { micro_batch: opts.micro_batch, ..Default::default() };
        let (store, _) = prepass(source, ids, Some(opts.reference_top_k), false, &stream, |_, _| Ok(()))?;
        Self::with_reference(source, ids, Cow::Owned(store.expect("a reference was asked for")), kept, opts)
    }

    /// An evaluator on the first `opts.samples` of `ids` with reference distributions already
    /// computed for `ids` (sequence `i` of the store is `ids[i]`): one pass over the model.
    pub fn with_reference(
        source: &'a S,
        ids: &[Vec<u32>],
        store: Cow<'a, ReferenceStore>,
        kept: Option<&Kept>,
        opts: &SearchOptions,
    ) -> Result<Self> {
        let n = if opts.samples == 0 { ids.len() } else { opts.samples.min(ids.len()) };
        let ids = &ids[..n];
        let size = if opts.micro_batch == 0 { n } else { opts.micro_batch.min(n) };
        let chunks: Vec<Range<usize>> = (0..n).step_by(size).map(|s| s..(s + size).min(n)).collect();
        let config = source.config();
        let masks: BTreeMap<usize, Vec<bool>> = diep_plan::expert_counts(config)
            .into_iter()
            .map(|(l, e)| (l, (0..e).map(|x| kept.is_none_or(|k| k.get(&l).is_some_and(|v| v.contains(&x)))).collect()))
            .collect();
        let mut first = Vec::with_capacity(chunks.len());
        let mut ctxs = Vec::with_capacity(chunks.len());
        for c in &chunks {
            let (h, ctx) = source.embed(&ids[c.clone()])?;
            first.push(h);
            ctxs.push(ctx);
        }
        let mut eval = Evaluator {
            source,
            chunks,
            ctxs,
            store,
            positions: n * ids[0].len(),
            masks,
            bounds: vec![first],
            loss: f64::NAN,
            seq_losses: Vec::new(),
            candidates_per_pass: opts.candidates_per_pass.max(1),
            evaluations: 0,
            layer_forwards: 0,
        };
        eval.recompute_from(0)?;
        Ok(eval)
    }

    /// The current plan's objective.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// The current plan's objective on each scored sequence (mean `kl` per position; their
    /// mean is [`Evaluator::loss`]).
    pub fn sequence_losses(&self) -> &[f64] {
        &self.seq_losses
    }

    /// The current masks (`true`: kept).
    pub fn masks(&self) -> &BTreeMap<usize, Vec<bool>> {
        &self.masks
    }

    /// The current plan's kept experts.
    pub fn kept(&self) -> Kept {
        self.masks.iter().map(|(l, m)| (*l, (0..m.len()).filter(|e| m[*e]).collect())).collect()
    }

    /// Candidate plans evaluated so far.
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    /// Decoder-layer forwards over the scored sequences so far, per layer of the model.
    pub fn forward_passes(&self) -> f64 {
        self.layer_forwards as f64 / (self.source.config().num_layers.max(1) * self.chunks.len().max(1)) as f64
    }

    fn device(&self) -> burn::tensor::Device {
        self.bounds[0][0].device()
    }

    /// Per candidate hidden states, the `kl` summed over each scored sequence's positions.
    fn head_losses(&self, hs: &[Vec<Tensor<2>>]) -> Result<Vec<Vec<f64>>> {
        Ok(self.source.with_head(|norm, head| {
            hs.iter()
                .map(|h| {
                    let mut per_seq = Vec::new();
                    for (c, x) in self.chunks.iter().zip(h) {
                        let seqs: Vec<usize> = c.clone().collect();
                        per_seq.extend(self.store.kl_per_sequence(&seqs, head.forward(norm.forward(x.clone()))));
                    }
                    per_seq
                })
                .collect()
        })?)
    }

    /// The objective (mean `kl` per position) of per-sequence sums.
    fn mean(&self, per_seq: &[f64]) -> f64 {
        per_seq.iter().sum::<f64>() / self.positions as f64
    }

    /// Runs layers `from..L` under the current masks from the cached input of `from`, replacing
    /// the cache above it.
    fn recompute_from(&mut self, from: usize) -> Result<()> {
        let layers = self.source.config().num_layers;
        self.bounds.truncate(from + 1);
        let device = self.device();
        for l in from..layers {
            let opts = mask_options(self.masks.get(&l), &device);
            let input = self.bounds[l].clone();
            let ctxs = &self.ctxs;
            let out = self.source.with_layer(l, |layer| {
                input.iter().zip(ctxs).map(|(h, ctx)| layer.forward(h.clone(), ctx, &opts).hidden).collect::<Vec<_>>()
            })?;
            self.layer_forwards += self.chunks.len() as u64;
            self.bounds.push(out);
        }
        let per_seq = self.head_losses(&self.bounds[layers..=layers])?.remove(0);
        self.loss = self.mean(&per_seq);
        let seq_len = (self.positions / per_seq.len().max(1)) as f64;
        self.seq_losses = per_seq.iter().map(|v| v / seq_len).collect();
        Ok(())
    }

    /// The objective of each candidate change of the current plan.
    pub fn evaluate(&mut self, candidates: &[Change]) -> Result<Vec<f64>> {
        let layers = self.source.config().num_layers;
        let device = self.device();
        let mut out = vec![f64::NAN; candidates.len()];
        let mut by_start: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, c) in candidates.iter().enumerate() {
            let start = *c.keys().next().ok_or_else(|| OptimError::Config("an empty candidate change".into()))?;
            by_start.entry(start).or_default().push(i);
        }
        for (start, members) in by_start {
            for group in members.chunks(self.candidates_per_pass) {
                let mut hs: Vec<Vec<Tensor<2>>> = group.iter().map(|_| self.bounds[start].clone()).collect();
                for l in start..layers {
                    let opts: Vec<MoeForwardOptions> = group
                        .iter()
                        .map(|i| mask_options(candidates[*i].get(&l).or(self.masks.get(&l)), &device))
                        .collect();
                    let ctxs = &self.ctxs;
                    self.source.with_layer(l, |layer| {
                        for (h, o) in hs.iter_mut().zip(&opts) {
                            for (x, ctx) in h.iter_mut().zip(ctxs) {
                                *x = layer.forward(x.clone(), ctx, o).hidden;
                            }
                        }
                    })?;
                    self.layer_forwards += (group.len() * self.chunks.len()) as u64;
                }
                for (i, per_seq) in group.iter().zip(self.head_losses(&hs)?) {
                    out[*i] = self.mean(&per_seq);
                }
                self.evaluations += group.len() as u64;
            }
        }
        Ok(out)
    }

    /// Makes a change part of the current plan.
    pub fn apply(&mut self, change: &Change) -> Result<f64> {
        let start = *change.keys().next().ok_or_else(|| OptimError::Config("an empty change".into()))?;
        for (l, m) in change {
            self.masks.insert(*l, m.clone());
        }
        self.recompute_from(start)?;
        Ok(self.loss)
    }
}

/// The group of expert `e` among `n` experts in `n_group` contiguous groups.
fn group_of(e: usize, n: usize, n_group: usize) -> usize {
    e / (n / n_group.max(1)).max(1)
}

fn per_group_counts(mask: &[bool], n_group: usize) -> Vec<usize> {
    let n = mask.len();
    let mut counts = vec![0; n_group.max(1)];
    for (e, k) in mask.iter().enumerate() {
        if *k {
            counts[group_of(e, n, n_group)] += 1;
        }
    }
    counts
}

/// The greedy global search: from every expert kept, removes one expert at a time — the one
/// whose removal raises the objective least — until `ratio`'s budget under `allocation` is met.
/// Refuses, before any computation, when the estimated cost exceeds `max_forward_passes` full
/// forward passes over the scored sequences. `progress(removed, total, loss)` after each step.
pub fn greedy_search<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    ratio: f64,
    allocation: Allocation,
    constraints: &Constraints,
    opts: &SearchOptions,
    max_forward_passes: f64,
    mut progress: impl FnMut(usize, usize, f64) -> Result<()>,
) -> Result<SearchOutcome> {
    let config = source.config();
    let counts = diep_plan::expert_counts(config);
    diep_plan::check_feasible(&counts, ratio, allocation, constraints)?;
    // The target kept counts: the selection's own budget (any scores give the same counts under
    // a uniform allocation; the global total is what matters).
    let zero: BTreeMap<usize, Vec<f64>> = counts.iter().map(|(l, n)| (*l, vec![0.0; *n])).collect();
    let target = diep_plan::select(&zero, ratio, allocation, constraints)?;
    let quota: BTreeMap<usize, usize> = target.iter().map(|(l, k)| (*l, counts[l] - k.len())).collect();
    let total_remove: usize = quota.values().sum();
    // Cost estimate: every step tries every removable expert, each from its layer up.
    let layers = config.num_layers as f64;
    let per_step: f64 = counts.iter().map(|(l, n)| *n as f64 * (layers - *l as f64) / layers).sum();
    let estimate = total_remove as f64 * per_step * 0.75 + 2.0;
    if estimate > max_forward_passes {
        return Err(OptimError::Config(format!(
            "greedy search would take about {estimate:.0} forward passes over the {} scored calibration \
             sequences ({total_remove} removals, each trying every remaining expert), more than the limit of \
             {max_forward_passes:.0} (--search-max-passes); raise the limit or score fewer sequences \
             (--search-samples)",
            if opts.samples == 0 { ids.len() } else { opts.samples.min(ids.len()) }
        )));
    }
    let n_group = constraints.n_group();
    let min_group = constraints.min_per_group();
    let mut eval = Evaluator::new(source, ids, None, opts)?;
    let loss_before = eval.loss();
    let mut moves = Vec::new();
    let mut removed_in: BTreeMap<usize, usize> = counts.keys().map(|l| (*l, 0)).collect();
    for step in 0..total_remove {
        // Eligible layers: under a uniform allocation those with quota left; under a global one
        // those above the floor; with groups, a layer whose groups are unequal must be finished.
        let unbalanced: Vec<usize> = eval
            .masks()
            .iter()
            .filter(|(_, m)| {
                let c = per_group_counts(m, n_group);
                c.iter().any(|x| *x != c[0])
            })
            .map(|(l, _)| *l)
            .collect();
        let mut candidates: Vec<Change> = Vec::new();
        let mut what: Vec<(usize, usize)> = Vec::new();
        for (l, mask) in eval.masks() {
            let kept = mask.iter().filter(|k| **k).count();
            let allowed_layer = match allocation {
                Allocation::Uniform => removed_in[l] < quota[l],
                Allocation::Global => kept > constraints.floor,
            } && (unbalanced.is_empty() || unbalanced.contains(l));
            if !allowed_layer {
                continue;
            }
            let groups = per_group_counts(mask, n_group);
            let top = *groups.iter().max().unwrap_or(&0);
            if n_group > 1 && top <= min_group {
                continue;
            }
            for e in (0..mask.len()).filter(|e| mask[*e]) {
                if n_group > 1 && groups[group_of(e, mask.len(), n_group)] != top {
                    continue;
                }
                let mut m = mask.clone();
                m[e] = false;
                candidates.push(BTreeMap::from([(*l, m)]));
                what.push((*l, e));
            }
        }
        if candidates.is_empty() {
            return Err(OptimError::Config(format!(
                "greedy search: no expert can be removed after {step} of {total_remove} removals under the floors \
                 and routing groups"
            )));
        }
        let losses = eval.evaluate(&candidates)?;
        // Lowest objective; ties to the higher layer, then the higher id (as the selection).
        let best = (0..candidates.len())
            .min_by(|a, b| losses[*a].total_cmp(&losses[*b]).then(what[*b].cmp(&what[*a])))
            .expect("candidates");
        let loss = eval.apply(&candidates[best])?;
        *removed_in.get_mut(&what[best].0).expect("layer") += 1;
        moves.push(Move { removed: vec![what[best]], restored: vec![], loss });
        progress(step + 1, total_remove, loss)?;
    }
    Ok(SearchOutcome {
        kept: eval.kept(),
        loss_before,
        loss_after: eval.loss(),
        moves,
        evaluations: eval.evaluations(),
        forward_passes: eval.forward_passes(),
        samples: if opts.samples == 0 { ids.len() } else { opts.samples.min(ids.len()) },
    })
}

/// Local search from `kept`: `rounds` rounds of the best within-layer swap in every MoE layer
/// (and, under a global allocation without routing groups, the best move of one expert between
/// two layers), each accepted only if it lowers the objective. Stops early when a round changes
/// nothing. `progress(round, rounds, loss)` after each round.
pub fn refine<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    kept: &Kept,
    scores: Option<&BTreeMap<usize, Vec<f64>>>,
    rounds: usize,
    allocation: Allocation,
    constraints: &Constraints,
    opts: &SearchOptions,
    mut progress: impl FnMut(usize, usize, f64) -> Result<()>,
) -> Result<SearchOutcome> {
    let mut eval = Evaluator::new(source, ids, Some(kept), opts)?;
    let loss_before = eval.loss();
    let n_group = constraints.n_group();
    let mut moves = Vec::new();
    for round in 0..rounds {
        let mut improved = false;
        let layers: Vec<usize> = eval.masks().keys().copied().collect();
        for l in &layers {
            let mask = eval.masks()[l].clone();
            let n = mask.len();
            let (outs, ins) = near_the_cut(&mask, scores.and_then(|s| s.get(l)), opts.width);
            let mut candidates = Vec::new();
            let mut what = Vec::new();
            for &out in &outs {
                for &inn in &ins {
                    if group_of(out, n, n_group) != group_of(inn, n, n_group) {
                        continue;
                    }
                    let mut m = mask.clone();
                    m[out] = false;
                    m[inn] = true;
                    candidates.push(BTreeMap::from([(*l, m)]));
                    what.push((out, inn));
                }
            }
            if candidates.is_empty() {
                continue;
            }
            let losses = eval.evaluate(&candidates)?;
            let best = (0..candidates.len()).min_by(|a, b| losses[*a].total_cmp(&losses[*b])).expect("candidates");
            if losses[best] < eval.loss() * (1.0 - 1e-9) {
                let loss = eval.apply(&candidates[best])?;
                moves.push(Move { removed: vec![(*l, what[best].0)], restored: vec![(*l, what[best].1)], loss });
                improved = true;
            }
        }
        if allocation == Allocation::Global && constraints.groups.is_none() && layers.len() > 1 {
            improved |= cross_layer_move(&mut eval, constraints, scores, opts.width, &mut moves)?;
        }
        progress(round + 1, rounds, eval.loss())?;
        if !improved {
            break;
        }
    }
    Ok(SearchOutcome {
        kept: eval.kept(),
        loss_before,
        loss_after: eval.loss(),
        moves,
        evaluations: eval.evaluations(),
        forward_passes: eval.forward_passes(),
        samples: if opts.samples == 0 { ids.len() } else { opts.samples.min(ids.len()) },
    })
}

/// One move of an expert between layers: the cheapest single removal of each layer above its
/// floor and the most useful single restoration of each layer are scanned, the pairs of two
/// different layers are ranked by the sum of their separate effects, and the best few are
/// evaluated together; the best is accepted if it lowers the objective.
fn cross_layer_move<S: LayerSource>(
    eval: &mut Evaluator<'_, S>,
    constraints: &Constraints,
    scores: Option<&BTreeMap<usize, Vec<f64>>>,
    width: usize,
    moves: &mut Vec<Move>,
) -> Result<bool> {
    let base = eval.loss();
    let masks = eval.masks().clone();
    let mut removals: Vec<Change> = Vec::new();
    let mut removal_of: Vec<(usize, usize)> = Vec::new();
    let mut restores: Vec<Change> = Vec::new();
    let mut restore_of: Vec<(usize, usize)> = Vec::new();
    for (l, m) in &masks {
        let kept = m.iter().filter(|k| **k).count();
        let (outs, ins) = near_the_cut(m, scores.and_then(|s| s.get(l)), width.div_ceil(2));
        for e in outs.into_iter().filter(|_| kept > constraints.floor).chain(ins) {
            let mut c = m.clone();
            c[e] = !c[e];
            if m[e] {
                removals.push(BTreeMap::from([(*l, c)]));
                removal_of.push((*l, e));
            } else {
                restores.push(BTreeMap::from([(*l, c)]));
                restore_of.push((*l, e));
            }
        }
    }
    if removals.is_empty() || restores.is_empty() {
        return Ok(false);
    }
    let lr = eval.evaluate(&removals)?;
    let lg = eval.evaluate(&restores)?;
    // The best removal and the best restoration of each layer.
    let best_per_layer = |of: &[(usize, usize)], loss: &[f64]| -> BTreeMap<usize, (usize, f64)> {
        let mut best: BTreeMap<usize, (usize, f64)> = BTreeMap::new();
        for ((l, e), v) in of.iter().zip(loss) {
            if best.get(l).is_none_or(|(_, b)| v < b) {
                best.insert(*l, (*e, *v));
            }
        }
        best
    };
    let (rm, rs) = (best_per_layer(&removal_of, &lr), best_per_layer(&restore_of, &lg));
    let mut pairs: Vec<(f64, usize, usize, usize, usize)> = Vec::new();
    for (a, (ea, va)) in &rm {
        for (b, (eb, vb)) in &rs {
            if a != b {
                pairs.push(((va - base) + (vb - base), *a, *ea, *b, *eb));
            }
        }
    }
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
    pairs.truncate(4);
    if pairs.first().is_none_or(|p| p.0 >= 0.0) {
        return Ok(false);
    }
    let candidates: Vec<Change> = pairs
        .iter()
        .map(|(_, a, ea, b, eb)| {
            let (mut ma, mut mb) = (masks[a].clone(), masks[b].clone());
            ma[*ea] = false;
            mb[*eb] = true;
            BTreeMap::from([(*a, ma), (*b, mb)])
        })
        .collect();
    let losses = eval.evaluate(&candidates)?;
    let best = (0..candidates.len()).min_by(|x, y| losses[*x].total_cmp(&losses[*y])).expect("pairs");
    if losses[best] < base * (1.0 - 1e-9) {
        let loss = eval.apply(&candidates[best])?;
        let (_, a, ea, b, eb) = pairs[best];
        moves.push(Move { removed: vec![(a, ea)], restored: vec![(b, eb)], loss });
        return Ok(true);
    }
    Ok(false)
}

/// The kept experts and the removed experts of a layer a refinement considers: all of them, or
/// with scores and a width, the `width` lowest-scored kept and `width` highest-scored removed.
fn near_the_cut(mask: &[bool], scores: Option<&Vec<f64>>, width: usize) -> (Vec<usize>, Vec<usize>) {
    let mut kept: Vec<usize> = (0..mask.len()).filter(|e| mask[*e]).collect();
    let mut removed: Vec<usize> = (0..mask.len()).filter(|e| !mask[*e]).collect();
    if let (Some(s), true) = (scores, width > 0) {
        kept.sort_by(|a, b| s[*a].total_cmp(&s[*b]));
        removed.sort_by(|a, b| s[*b].total_cmp(&s[*a]));
        kept.truncate(width);
        removed.truncate(width);
    }
    (kept, removed)
}

/// The layers a change touches (for reporting).
pub fn changed_layers(moves: &[Move]) -> BTreeSet<usize> {
    moves.iter().flat_map(|m| m.removed.iter().chain(&m.restored).map(|(l, _)| *l)).collect()
}
