//! The one expert selection every method goes through: from per-expert scores (higher = more
//! important) to the experts each MoE layer keeps, under a budget, per-layer floors and the
//! router's group constraints.
//!
//! - **Budget.** `ratio` (strictly between 0 and 1) is the fraction of routed experts removed:
//!   `round(ratio · N_l)` in each layer under [`Allocation::Uniform`], `round(ratio · Σ N_l)`
//!   in total under [`Allocation::Global`].
//! - **Floor.** No layer keeps fewer than `max(num_experts_per_tok, min_experts)` experts
//!   ([`Constraints::floor`]): the router could not fill its top-k otherwise.
//! - **Routing groups.** A group-limited router (DeepSeek-V2 `group_limited_greedy`,
//!   DeepSeek-V3 `noaux_tc`) splits a layer's experts into `n_group` contiguous groups; after
//!   pruning the kept experts must still form `n_group` equal groups of the same experts, so
//!   every layer keeps `n_group · c_l` experts, the top `c_l` of each group, with `c_l` at
//!   least [`Constraints::min_per_group`]. A router without groups is the case `n_group = 1`
//!   of the same rules.
//! - **Ties.** Among equal scores the higher expert id is removed first, and under a global
//!   ranking the higher layer first.
//!
//! [`select`] applies all of this; [`check_feasible`] answers, before any computation, whether
//! a ratio can be met at all; [`check_groups`] checks a finished plan's groups.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use diep_checkpoint::{GroupLimit, GroupScore, ModelConfig};

use crate::error::PlanError;

/// Kept expert ids per MoE layer (original ids, ascending).
pub type Kept = BTreeMap<usize, Vec<usize>>;

/// How the removal budget is spread over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Each MoE layer removes `round(ratio · N_l)` of its experts: the same count per layer
    /// (the only output vLLM and SGLang serve).
    Uniform,
    /// One ranking over all experts of all layers removes the `round(ratio · Σ N_l)` lowest,
    /// keeping every layer at or above its floor: different counts per layer.
    Global,
}

impl Allocation {
    /// Both allocations.
    pub const ALL: [Allocation; 2] = [Allocation::Uniform, Allocation::Global];

    /// The command-line name (`uniform`, `global`).
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Global => "global",
        }
    }
}

impl FromStr for Allocation {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        Allocation::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| PlanError::UnknownAllocation { name: s.to_string() })
    }
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a selection must respect besides the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Constraints {
    /// The fewest experts a layer may keep: `max(num_experts_per_tok, min_experts)`.
    pub floor: usize,
    /// The router's `num_experts_per_tok`.
    pub top_k: usize,
    /// The router's groups, if it is group-limited.
    pub groups: Option<GroupLimit>,
}

impl Constraints {
    /// The constraints of a model: its top-k, its routing groups, and a floor of
    /// `max(num_experts_per_tok, min_experts)`.
    pub fn for_model(config: &ModelConfig, min_experts: usize) -> Self {
        let top_k = config.moe.top_k;
        Constraints { floor: top_k.max(min_experts), top_k, groups: config.moe.routing.group_limit }
    }

    /// Constraints without routing groups.
    pub fn ungrouped(floor: usize, top_k: usize) -> Self {
        Constraints { floor: floor.max(top_k), top_k, groups: None }
    }

    /// Groups per layer (1 without group-limited routing).
    pub fn n_group(&self) -> usize {
        self.groups.map_or(1, |g| g.n_group.max(1))
    }

    /// The fewest experts a routing group may keep: 2 where a group is scored by its two best
    /// experts (DeepSeek-V3), else 1; enough that the `topk_group` groups a token may use hold
    /// `top_k` experts; and enough that the layer keeps at least the floor. Without groups,
    /// the floor.
    pub fn min_per_group(&self) -> usize {
        match self.groups {
            None => self.floor.max(self.top_k).max(1),
            Some(g) => {
                let score_min = if g.score == GroupScore::Top2Sum { 2 } else { 1 };
                score_min.max(self.top_k.div_ceil(g.topk_group.max(1))).max(self.floor.div_ceil(g.n_group.max(1)))
            }
        }
    }
}

/// Routed experts per MoE layer of a model.
pub fn expert_counts(config: &ModelConfig) -> BTreeMap<usize, usize> {
    config.moe_layers().into_iter().map(|l| (l, config.experts_in_layer(l))).collect()
}

/// Checks `0 < ratio < 1`.
pub fn check_ratio(ratio: f64) -> Result<(), PlanError> {
    if ratio > 0.0 && ratio < 1.0 { Ok(()) } else { Err(PlanError::Ratio { ratio }) }
}

/// Experts removed in total by a global allocation: `round(ratio · total)`.
pub fn budget(total: usize, ratio: f64) -> usize {
    (ratio * total as f64).round() as usize
}

/// Experts each layer removes under a uniform allocation, `round(ratio · N_l)`, checked against
/// the floor and the routing groups (an equal number removed from every group, each group
/// keeping at least [`Constraints::min_per_group`]).
pub fn uniform_removals(
    counts: &BTreeMap<usize, usize>,
    ratio: f64,
    c: &Constraints,
) -> Result<BTreeMap<usize, usize>, PlanError> {
    check_ratio(ratio)?;
    let n_group = c.n_group();
    let min = c.min_per_group();
    counts
        .iter()
        .map(|(&layer, &n)| {
            let remove = budget(n, ratio).min(n);
            if n - remove < c.floor {
                return Err(PlanError::BelowFloor { layer, remove, experts: n, floor: c.floor });
            }
            if let Some(g) = c.groups {
                if n % n_group != 0 {
                    return Err(PlanError::GroupSplit { layer, experts: n, n_group });
                }
                if remove % n_group != 0 {
                    return Err(PlanError::UnevenGroups { layer, remove, experts: n, n_group });
                }
                if n / n_group < remove / n_group + min {
                    return Err(PlanError::GroupMinimum {
                        layer,
                        remove,
                        experts: n,
                        left: (n - remove) / n_group,
                        min,
                        top_k: c.top_k,
                        topk_group: g.topk_group,
                        floor: c.floor,
                    });
                }
            }
            Ok((layer, remove))
        })
        .collect()
}

/// Each group's members, least important first (ascending score; among equals the higher id
/// first).
fn groups_ascending(layer: usize, s: &[f64], n_group: usize) -> Result<Vec<Vec<usize>>, PlanError> {
    let n = s.len();
    if n_group == 0 || !n.is_multiple_of(n_group) {
        return Err(PlanError::GroupSplit { layer, experts: n, n_group });
    }
    let size = n / n_group;
    Ok((0..n_group)
        .map(|gi| {
            let mut order: Vec<usize> = (gi * size..(gi + 1) * size).collect();
            order.sort_by(|a, b| s[*a].total_cmp(&s[*b]).then(b.cmp(a)));
            order
        })
        .collect())
}

fn keep_top(groups: &[Vec<usize>], removed_per_group: usize) -> Vec<usize> {
    let mut kept: Vec<usize> = groups.iter().flat_map(|o| o[removed_per_group..].iter().copied()).collect();
    kept.sort_unstable();
    kept
}

/// The kept experts per layer for `scores` (per layer, per expert; higher = keep).
///
/// - [`Allocation::Uniform`]: each layer removes [`uniform_removals`] experts, split evenly over
///   its routing groups; each group drops its lowest-scoring experts.
/// - [`Allocation::Global`]: one ranking over all layers, in units of one expert per group. In
///   each layer, "slice" `j` is the `j`-th least important expert of every group (removing
///   slices `0..r` keeps the top `size − r` of each group); its cost is the mean score of its
///   `n_group` experts, and a layer's slice costs never decrease with `j`. The cheapest slices
///   over all layers are removed first (ties: the higher layer first), never taking a group
///   below [`Constraints::min_per_group`], until `round(ratio · Σ N_l / n_group)` slices are
///   gone: the multiple of `n_group` closest to the budget `round(ratio · Σ N_l)`. Without
///   groups a slice is one expert and this is the plain global ranking.
pub fn select(
    scores: &BTreeMap<usize, Vec<f64>>,
    ratio: f64,
    allocation: Allocation,
    c: &Constraints,
) -> Result<Kept, PlanError> {
    check_ratio(ratio)?;
    let n_group = c.n_group();
    match allocation {
        Allocation::Uniform => {
            let counts = scores.iter().map(|(l, s)| (*l, s.len())).collect();
            let removals = uniform_removals(&counts, ratio, c)?;
            scores
                .iter()
                .map(|(l, s)| Ok((*l, keep_top(&groups_ascending(*l, s, n_group)?, removals[l] / n_group))))
                .collect()
        }
        Allocation::Global => {
            let min = c.min_per_group();
            let total: usize = scores.values().map(Vec::len).sum();
            let slices = (ratio * total as f64 / n_group as f64).round() as usize;
            let mut groups = BTreeMap::new();
            let mut candidates: Vec<(f64, usize, usize)> = Vec::new();
            for (l, s) in scores {
                let gs = groups_ascending(*l, s, n_group)?;
                let size = s.len() / n_group;
                for j in 0..size.saturating_sub(min) {
                    let cost = gs.iter().map(|o| s[o[j]]).sum::<f64>() / n_group as f64;
                    candidates.push((cost, *l, j));
                }
                groups.insert(*l, gs);
            }
            if slices > candidates.len() {
                return Err(PlanError::OverBudget {
                    remove: slices * n_group,
                    total,
                    n_group,
                    min_per_group: min,
                    removable: candidates.len() * n_group,
                    top_k: c.top_k,
                    topk_group: c.groups.map(|g| g.topk_group),
                    floor: c.floor,
                });
            }
            // A layer's costs never decrease with j, and equal costs keep j ascending: every
            // layer's removed slices are a prefix 0..r_l.
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
            let mut removed: BTreeMap<usize, usize> = scores.keys().map(|l| (*l, 0)).collect();
            for (_, l, _) in candidates.into_iter().take(slices) {
                *removed.get_mut(&l).expect("layer") += 1;
            }
            Ok(groups.iter().map(|(l, gs)| (*l, keep_top(gs, removed[l]))).collect())
        }
    }
}

/// The `keep` best-scoring experts of one layer (`scores` per expert, higher = keep), taken
/// evenly from its routing groups: each group keeps its `keep / n_group` best. Fails where `keep`
/// does not split evenly over the groups.
pub fn keep_best(layer: usize, scores: &[f64], keep: usize, c: &Constraints) -> Result<Vec<usize>, PlanError> {
    let n = scores.len();
    let n_group = c.n_group();
    if keep > n || !keep.is_multiple_of(n_group) {
        return Err(PlanError::UnevenGroups { layer, remove: n.saturating_sub(keep), experts: n, n_group });
    }
    let gs = groups_ascending(layer, scores, n_group)?;
    Ok(keep_top(&gs, (n - keep) / n_group))
}

/// Checks, before any computation, that `ratio` can be met under `allocation` for layers of
/// `counts` experts: the same checks as [`select`], which cannot fail for other reasons.
pub fn check_feasible(
    counts: &BTreeMap<usize, usize>,
    ratio: f64,
    allocation: Allocation,
    c: &Constraints,
) -> Result<(), PlanError> {
    let zero = counts.iter().map(|(l, n)| (*l, vec![0.0; *n])).collect();
    select(&zero, ratio, allocation, c).map(|_| ())
}

/// Checks that a layer's kept experts satisfy its router's groups: every original group keeps
/// the same count, at least the per-group minimum of the scoring (2 for DeepSeek-V3, whose group
/// score is the sum of the two best), and the `topk_group` groups a token may use still hold
/// `top_k` experts.
pub fn check_groups(layer: usize, n: usize, kept: &[usize], g: GroupLimit, top_k: usize) -> Result<(), PlanError> {
    let size = n / g.n_group.max(1);
    let per_group: Vec<usize> = (0..g.n_group).map(|gi| kept.iter().filter(|e| **e / size == gi).count()).collect();
    let invalid = |reason: String| Err(PlanError::Invalid(format!("layer {layer}: {reason}")));
    if per_group.windows(2).any(|w| w[0] != w[1]) {
        return invalid(format!(
            "keeps {per_group:?} experts in its {} routing groups (n_group, groups of {size}); group-limited \
             routing needs the same count in every group",
            g.n_group
        ));
    }
    let new_size = per_group.first().copied().unwrap_or(0);
    let min = if g.score == GroupScore::Top2Sum { 2 } else { 1 };
    if new_size < min {
        let why = if min == 2 { " (DeepSeek-V3 scores a group by the sum of its two best experts)" } else { "" };
        return invalid(format!(
            "keeps {new_size} expert(s) per routing group; at least {min} per group are needed{why}"
        ));
    }
    if top_k > g.topk_group * new_size {
        return invalid(format!(
            "num_experts_per_tok = {top_k} exceeds topk_group ({}) × kept experts per group ({new_size})",
            g.topk_group
        ));
    }
    Ok(())
}
