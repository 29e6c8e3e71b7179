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
//!   lowers the objective (optionally, only if clearly: [`SearchOptions::accept_margin`]), so
//!   the objective never rises. Candidates can be screened on the first tokens of each sequence
//!   first ([`SearchOptions::screen_tokens`]); [`refine_round_cost`] estimates a round.

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
use crate::state::{PlanScore, clearly_better};
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
    /// Refinement only: candidates are first scored on a screen, this many of the scored
    /// sequences spread evenly over them (0: all), each cut to [`Self::screen_tokens`]; only
    /// those that lower the objective there, at most [`Self::confirm`] per decision, are scored
    /// on the whole sequences. No screening when the screen would be every token.
    pub screen_samples: usize,
    /// Refinement only: the screen's tokens of each sequence, its first ones (0: all).
    pub screen_tokens: usize,
    /// Refinement only: candidates per decision scored on every sequence after screening.
    pub confirm: usize,
    /// Refinement only: a change is accepted when it is clearly better on every scored sequence
    /// ([`crate::state::clearly_better`]): its paired t over the per-sequence objective at most
    /// `−accept_margin`, or its objective lower by the fraction `accept_gain`. 0 and 0: any
    /// decrease.
    pub accept_margin: f64,
    /// Refinement only: see [`Self::accept_margin`].
    pub accept_gain: f64,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            samples: 0,
            micro_batch: 0,
            reference_top_k: 64,
            candidates_per_pass: 16,
            width: 0,
            screen_samples: 0,
            screen_tokens: 0,
            confirm: 2,
            accept_margin: 0.0,
            accept_gain: 0.0,
        }
    }
}

impl SearchOptions {
    /// The sequences scored out of `available`: the first [`Self::samples`], or all.
    pub fn scored(&self, available: usize) -> usize {
        if self.samples == 0 { available } else { self.samples.min(available) }
    }

    /// The refinement's screen over `scored` sequences of `seq_len` tokens: how many sequences
    /// and how many of their first tokens ([`Self::screen_samples`], [`Self::screen_tokens`]);
    /// `None` when that would be every scored token (no screening).
    pub fn screen(&self, scored: usize, seq_len: usize) -> Option<(usize, usize)> {
        let count = if self.screen_samples == 0 { scored } else { self.screen_samples.min(scored) };
        let tokens = if self.screen_tokens == 0 { seq_len } else { self.screen_tokens.clamp(2, seq_len.max(2)) };
        (count < scored || tokens < seq_len).then_some((count, tokens))
    }

    /// The fraction of the scored tokens the screen reads (1: no screening).
    pub fn screen_share(&self, scored: usize, seq_len: usize) -> f64 {
        self.screen(scored, seq_len)
            .map_or(1.0, |(count, tokens)| (count * tokens) as f64 / (scored * seq_len).max(1) as f64)
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
    /// Refinement: the paired t statistic of the move's per-sequence objective against the plan
    /// before it (what [`SearchOptions::accept_margin`] is compared with).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub t: Option<f64>,
    /// Refinement: the round that made the move (from 1; 0 for the greedy search's removals).
    #[serde(skip_serializing_if = "is_zero")]
    pub round: usize,
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
    /// Refinement: the sequences candidates were screened on first (0: none).
    #[serde(skip_serializing_if = "is_zero")]
    pub screen_samples: usize,
    /// Refinement: the tokens of each screened sequence scored (0: no screening).
    #[serde(skip_serializing_if = "is_zero")]
    pub screen_tokens: usize,
    /// Refinement: the rounds run (the last one changed nothing unless the limit was reached).
    #[serde(skip_serializing_if = "is_zero")]
    pub rounds: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
    /// The current plan's objective: the mean `kl` per position, and each scored sequence's.
    current: PlanScore,
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
        let n = opts.scored(ids.len());
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
        let n = opts.scored(ids.len());
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
            current: PlanScore { loss: f64::NAN, per_sequence: Vec::new() },
            candidates_per_pass: opts.candidates_per_pass.max(1),
            evaluations: 0,
            layer_forwards: 0,
        };
        eval.recompute_from(0)?;
        Ok(eval)
    }

    /// The current plan's objective.
    pub fn loss(&self) -> f64 {
        self.current.loss
    }

    /// The current plan's objective on each scored sequence (mean `kl` per position; their
    /// mean is [`Evaluator::loss`]).
    pub fn sequence_losses(&self) -> &[f64] {
        &self.current.per_sequence
    }

    /// The current plan's score: [`Evaluator::loss`] and [`Evaluator::sequence_losses`].
    pub fn score(&self) -> PlanScore {
        self.current.clone()
    }

    /// The reference distributions plans are scored against.
    pub fn reference(&self) -> &ReferenceStore {
        &self.store
    }

    /// Sequences scored.
    pub fn samples(&self) -> usize {
        self.current.per_sequence.len()
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

    /// The score of per-sequence `kl` sums: their mean per position, and each sequence's.
    fn score_of(&self, per_seq: &[f64]) -> PlanScore {
        let seq_len = (self.positions / per_seq.len().max(1)) as f64;
        PlanScore {
            loss: per_seq.iter().sum::<f64>() / self.positions as f64,
            per_sequence: per_seq.iter().map(|v| v / seq_len).collect(),
        }
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
        self.current = self.score_of(&per_seq);
        Ok(())
    }

    /// The objective of each candidate change of the current plan.
    pub fn evaluate(&mut self, candidates: &[Change]) -> Result<Vec<f64>> {
        Ok(self.evaluate_scores(candidates)?.into_iter().map(|s| s.loss).collect())
    }

    /// The objective of each candidate change of the current plan, with its value on each
    /// scored sequence.
    pub fn evaluate_scores(&mut self, candidates: &[Change]) -> Result<Vec<PlanScore>> {
        let layers = self.source.config().num_layers;
        let device = self.device();
        let mut out = vec![PlanScore { loss: f64::NAN, per_sequence: Vec::new() }; candidates.len()];
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
                    out[*i] = self.score_of(&per_seq);
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
        Ok(self.current.loss)
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
            opts.scored(ids.len())
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
        moves.push(Move { removed: vec![what[best]], restored: vec![], loss, t: None, round: 0 });
        progress(step + 1, total_remove, loss)?;
    }
    Ok(SearchOutcome {
        kept: eval.kept(),
        loss_before,
        loss_after: eval.loss(),
        moves,
        evaluations: eval.evaluations(),
        forward_passes: eval.forward_passes(),
        samples: opts.scored(ids.len()),
        screen_samples: 0,
        screen_tokens: 0,
        rounds: 0,
    })
}

/// Local search from `kept`: up to `rounds` rounds of the best within-layer swap in every MoE
/// layer (and, under a global allocation without routing groups, the best move of one expert
/// between two layers), each accepted only if it is clearly better on the calibration objective
/// ([`SearchOptions::accept_margin`], [`SearchOptions::accept_gain`]; by default any decrease),
/// so the objective never rises. With [`SearchOptions::screen_samples`] or
/// [`SearchOptions::screen_tokens`] candidates are screened on part of the scored tokens first.
/// After the first round, the within-layer swaps are scanned only in the layers the previous
/// round changed (a swap elsewhere was rejected in a context that has since changed only
/// downstream or upstream of it); the move between layers is scanned every round. Stops when a
/// round changes nothing.
/// `progress(round, rounds, loss)` after each round.
pub fn refine<S: LayerSource>(
    source: &S,
    ids: &[Vec<u32>],
    kept: &Kept,
    scores: Option<&BTreeMap<usize, Vec<f64>>>,
    rounds: usize,
    allocation: Allocation,
    constraints: &Constraints,
    opts: &SearchOptions,
    progress: impl FnMut(usize, usize, f64) -> Result<()>,
) -> Result<SearchOutcome> {
    let eval = Evaluator::new(source, ids, Some(kept), opts)?;
    refine_from(eval, ids, scores, rounds, allocation, constraints, opts, progress)
}

/// [`refine`] from an evaluator already at the plan to refine (its reference, sequences and
/// cached states are reused; `ids` are the sequences it was made on).
pub fn refine_from<S: LayerSource>(
    mut eval: Evaluator<'_, S>,
    ids: &[Vec<u32>],
    scores: Option<&BTreeMap<usize, Vec<f64>>>,
    rounds: usize,
    allocation: Allocation,
    constraints: &Constraints,
    opts: &SearchOptions,
    mut progress: impl FnMut(usize, usize, f64) -> Result<()>,
) -> Result<SearchOutcome> {
    let source = eval.source;
    let n = eval.samples();
    // The screening evaluator: `screen_samples` of the scored sequences, spread evenly, each cut
    // to its first `screen_tokens` tokens.
    let len = ids.first().map_or(0, Vec::len);
    let mut screen = if let Some((count, tokens)) = opts.screen(n, len) {
        let picked: Vec<usize> = (0..count).map(|i| i * n / count).collect();
        let sub_ids: Vec<Vec<u32>> = picked.iter().map(|i| ids[*i][..tokens.min(ids[*i].len())].to_vec()).collect();
        let store = eval.reference().prefixes(&picked, tokens);
        let sub_opts = SearchOptions { samples: 0, ..opts.clone() };
        Some(Evaluator::with_reference(source, &sub_ids, Cow::Owned(store), Some(&eval.kept()), &sub_opts)?)
    } else {
        None
    };
    let loss_before = eval.loss();
    let n_group = constraints.n_group();
    let mut moves = Vec::new();
    let mut rounds_run = 0;
    // The layers whose swaps a round scans: all in the first, then those the last round changed.
    let mut scan: BTreeSet<usize> = eval.masks().keys().copied().collect();
    for round in 0..rounds {
        rounds_run += 1;
        let mut improved = false;
        let first_move = moves.len();
        let layers: Vec<usize> = eval.masks().keys().copied().collect();
        for l in layers.iter().filter(|l| scan.contains(l)) {
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
            let picked = screened(screen.as_mut(), &candidates, opts.confirm)?;
            if let Some((i, t)) = best_accepted(&mut eval, &candidates, &picked, opts)? {
                let loss = eval.apply(&candidates[i])?;
                if let Some(sc) = screen.as_mut() {
                    sc.apply(&candidates[i])?;
                }
                moves.push(Move {
                    removed: vec![(*l, what[i].0)],
                    restored: vec![(*l, what[i].1)],
                    loss,
                    t,
                    round: round + 1,
                });
                improved = true;
            }
        }
        if allocation == Allocation::Global && constraints.groups.is_none() && layers.len() > 1 {
            improved |= cross_layer_move(&mut eval, screen.as_mut(), constraints, scores, opts, round + 1, &mut moves)?;
        }
        progress(round + 1, rounds, eval.loss())?;
        if !improved {
            break;
        }
        scan = changed_layers(&moves[first_move..]);
    }
    let (screen_evals, screen_passes) = screen.as_ref().map_or((0, 0.0), |sc| (sc.evaluations(), sc.forward_passes()));
    let (screen_n, screen_tokens) = opts.screen(n, len).unwrap_or((0, 0));
    Ok(SearchOutcome {
        kept: eval.kept(),
        loss_before,
        loss_after: eval.loss(),
        moves,
        evaluations: eval.evaluations() + screen_evals,
        // A screening pass costs its share of the scored tokens.
        forward_passes: eval.forward_passes() + screen_passes * opts.screen_share(n, len),
        samples: n,
        screen_samples: screen_n,
        screen_tokens,
        rounds: rounds_run,
    })
}

/// The candidates worth scoring on every sequence: with a screening evaluator, those that lower
/// its objective, at most `confirm`, best first; without, all.
fn screened<S: LayerSource>(
    screen: Option<&mut Evaluator<'_, S>>,
    candidates: &[Change],
    confirm: usize,
) -> Result<Vec<usize>> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let Some(sc) = screen else { return Ok((0..candidates.len()).collect()) };
    let losses = sc.evaluate(candidates)?;
    let base = sc.loss();
    let mut order: Vec<usize> = (0..candidates.len()).filter(|i| losses[*i] < base).collect();
    order.sort_by(|a, b| losses[*a].total_cmp(&losses[*b]));
    order.truncate(confirm.max(1));
    Ok(order)
}

/// Scores `picked` of `candidates` on every sequence; the best of them, with its paired t against
/// the current plan, if it is to be accepted.
fn best_accepted<S: LayerSource>(
    eval: &mut Evaluator<'_, S>,
    candidates: &[Change],
    picked: &[usize],
    opts: &SearchOptions,
) -> Result<Option<(usize, Option<f64>)>> {
    if picked.is_empty() {
        return Ok(None);
    }
    let subset: Vec<Change> = picked.iter().map(|i| candidates[*i].clone()).collect();
    let scored = eval.evaluate_scores(&subset)?;
    let best = (0..scored.len()).min_by(|a, b| scored[*a].loss.total_cmp(&scored[*b].loss)).expect("picked");
    let current = eval.score();
    let accept = scored[best].loss < current.loss * (1.0 - 1e-9)
        && clearly_better(&scored[best], &current, opts.accept_margin, opts.accept_gain);
    let t = crate::state::paired_t(&scored[best].per_sequence, &current.per_sequence);
    Ok(accept.then_some((picked[best], t)))
}

/// One move of an expert between layers: the cheapest single removal of each layer above its
/// floor and the most useful single restoration of each layer are scanned (on the screening
/// sequences when there are), the pairs of two different layers are ranked by the sum of their
/// separate effects, and the best few are evaluated together on every sequence (screened: the
/// `confirm` best-ranked, or the best one alone when no sum is negative); the best is accepted
/// under the refinement's rule.
fn cross_layer_move<'a, S: LayerSource>(
    eval: &mut Evaluator<'a, S>,
    mut screen: Option<&mut Evaluator<'a, S>>,
    constraints: &Constraints,
    scores: Option<&BTreeMap<usize, Vec<f64>>>,
    opts: &SearchOptions,
    round: usize,
    moves: &mut Vec<Move>,
) -> Result<bool> {
    let masks = eval.masks().clone();
    let mut removals: Vec<Change> = Vec::new();
    let mut removal_of: Vec<(usize, usize)> = Vec::new();
    let mut restores: Vec<Change> = Vec::new();
    let mut restore_of: Vec<(usize, usize)> = Vec::new();
    for (l, m) in &masks {
        let kept = m.iter().filter(|k| **k).count();
        let (outs, ins) = near_the_cut(m, scores.and_then(|s| s.get(l)), opts.width.div_ceil(2));
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
    let scan = match screen.as_deref_mut() {
        Some(sc) => sc,
        None => &mut *eval,
    };
    let base = scan.loss();
    let lr = scan.evaluate(&removals)?;
    let lg = scan.evaluate(&restores)?;
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
    pairs.truncate(if screen.is_some() { opts.confirm.max(1) } else { 4 });
    // On the screen the sum of two separate effects only ranks the pairs: the best-ranked pair
    // is confirmed on every sequence even when that sum is not negative (on the fixture, a
    // quarter removed, seed 0, the round's best move is +0.0016 on the screen and −0.0026 on
    // the whole sequences). Unscreened, the sums are the objective's own and gate the pairs.
    match pairs.first() {
        None => return Ok(false),
        Some(p) if p.0 >= 0.0 && screen.is_none() => return Ok(false),
        Some(p) if p.0 >= 0.0 => pairs.truncate(1),
        _ => {}
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
    let picked: Vec<usize> = (0..candidates.len()).collect();
    if let Some((best, t)) = best_accepted(eval, &candidates, &picked, opts)? {
        let loss = eval.apply(&candidates[best])?;
        if let Some(sc) = screen {
            sc.apply(&candidates[best])?;
        }
        let (_, a, ea, b, eb) = pairs[best];
        moves.push(Move { removed: vec![(a, ea)], restored: vec![(b, eb)], loss, t, round });
        return Ok(true);
    }
    Ok(false)
}

/// The estimated cost of one round of [`refine`] from `kept`, in forward passes over the scored
/// sequences: every candidate it screens (at the screening share of the tokens) or scores, each
/// from its layer up, the candidates confirmed on the whole sequences, a move accepted in every
/// layer and between layers, and the evaluators' first passes, for `scored` sequences of
/// `seq_len` tokens ([`SearchOptions::screen_share`]). `num_layers` counts every decoder layer;
/// `width` as [`SearchOptions::width`] (it applies only with scores). An upper bound of what the
/// round's [`SearchOutcome::forward_passes`] reports.
pub fn refine_round_cost(
    kept: &Kept,
    counts: &BTreeMap<usize, usize>,
    num_layers: usize,
    allocation: Allocation,
    constraints: &Constraints,
    opts: &SearchOptions,
    scored: usize,
    seq_len: usize,
) -> f64 {
    let layers = num_layers.max(1) as f64;
    let screened = opts.screen(scored, seq_len).is_some();
    let share = opts.screen_share(scored, seq_len);
    let cross = allocation == Allocation::Global && constraints.groups.is_none() && counts.len() > 1;
    let mut cost = 1.0 + if screened { share } else { 0.0 };
    // An accepted move recomputes the plan's states from its layer up (screen too).
    let apply = 1.0 + if screened { share } else { 0.0 };
    for (l, n) in counts {
        let depth = (layers - *l as f64).max(0.0) / layers;
        let k = kept.get(l).map_or(*n, Vec::len);
        let r = n.saturating_sub(k);
        let cap = |x: usize, w: usize| if opts.width > 0 { x.min(w) } else { x };
        let swaps = (cap(k, opts.width) * cap(r, opts.width)) as f64;
        cost += (if screened { swaps * share + swaps.min(opts.confirm.max(1) as f64) } else { swaps } + apply) * depth;
        if cross {
            let w = opts.width.div_ceil(2);
            let singles = (if k > constraints.floor { cap(k, w) } else { 0 } + cap(r, w)) as f64;
            cost += singles * depth * if screened { share } else { 1.0 };
        }
    }
    if cross {
        cost += if screened { opts.confirm.max(1) as f64 } else { 4.0 } + apply;
    }
    cost
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

/// The layers some moves touch.
pub fn changed_layers<'a>(moves: impl IntoIterator<Item = &'a Move>) -> BTreeSet<usize> {
    moves.into_iter().flat_map(|m| m.removed.iter().chain(&m.restored).map(|(l, _)| *l)).collect()
}
