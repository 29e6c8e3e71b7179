//! Group-aware expert selection for group-limited routers (DeepSeek-V2 `group_limited_greedy`,
//! DeepSeek-V3 `noaux_tc`), shared by the baselines (`diep-prune`) and DiEP (`diep-optim`).
//!
//! Such a router splits a layer's experts into `n_group` contiguous groups; after pruning the
//! kept experts must still form `n_group` equal groups of the same experts (see
//! [`PruningPlan::validate`](crate::PruningPlan::validate)). So every layer keeps
//! `n_group · c_l` experts, the top-`c_l` of each group by score, with `c_l` at least the
//! per-group minimum ([`min_per_group`]).

use std::collections::BTreeMap;

use diep_checkpoint::{GroupLimit, GroupScore};

use crate::plan::PlanError;

/// The fewest experts a group may keep: 2 where a group is scored by its two best experts
/// (DeepSeek-V3), else 1; enough that the `topk_group` groups a token may use hold `top_k`
/// experts; and enough that the layer keeps at least `floor`.
pub fn min_per_group(g: GroupLimit, top_k: usize, floor: usize) -> usize {
    let score_min = if g.score == GroupScore::Top2Sum { 2 } else { 1 };
    score_min.max(top_k.div_ceil(g.topk_group.max(1))).max(floor.div_ceil(g.n_group.max(1)))
}

/// Each group's members, least important first (ascending score; among equals the higher id
/// first, as in the ungrouped selections).
fn groups_ascending(layer: usize, s: &[f64], g: GroupLimit) -> Result<Vec<Vec<usize>>, PlanError> {
    let n = s.len();
    if g.n_group == 0 || !n.is_multiple_of(g.n_group) {
        return Err(PlanError(format!(
            "layer {layer}: {n} experts cannot be split into the router's {} groups (n_group)",
            g.n_group
        )));
    }
    let size = n / g.n_group;
    Ok((0..g.n_group)
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

/// Uniform selection: each layer removes `removals[l]` experts, split evenly over its groups;
/// each group drops its lowest-scoring experts. Kept ids ascending.
///
/// Errors if a layer's removals are not a multiple of `n_group`, or leave a group below
/// [`min_per_group`]`(g, top_k, floor)`.
pub fn select_uniform_per_group(
    scores: &BTreeMap<usize, Vec<f64>>,
    removals: &BTreeMap<usize, usize>,
    g: GroupLimit,
    top_k: usize,
    floor: usize,
) -> Result<BTreeMap<usize, Vec<usize>>, PlanError> {
    let min = min_per_group(g, top_k, floor);
    let mut out = BTreeMap::new();
    for (l, s) in scores {
        let (n, r) = (s.len(), removals.get(l).copied().unwrap_or(0));
        let groups = groups_ascending(*l, s, g)?;
        if r % g.n_group != 0 {
            return Err(PlanError(format!(
                "layer {l}: removing {r} of {n} experts cannot be split evenly over the router's {} groups \
                 (n_group); choose a ratio that removes a multiple of {} experts per layer",
                g.n_group, g.n_group
            )));
        }
        let size = n / g.n_group;
        if size < r / g.n_group + min {
            return Err(PlanError(format!(
                "layer {l}: removing {r} of {n} experts leaves {} per routing group, fewer than the {min} \
                 group-limited routing needs (top_k {top_k}, topk_group {}, floor {floor}); lower the ratio",
                size.saturating_sub(r / g.n_group),
                g.topk_group
            )));
        }
        out.insert(*l, keep_top(&groups, r / g.n_group));
    }
    Ok(out)
}

/// Global selection: one ranking over all layers, in units of one expert per group.
///
/// In each layer, "slice" `j` is the `j`-th least important expert of every group (so removing
/// slices `0..r` keeps the top `size - r` of each group); its cost is the mean score of its
/// `n_group` experts, and a layer's slice costs never decrease with `j`. The cheapest slices
/// over all layers are removed first (ties: the higher layer first), never taking a group below
/// [`min_per_group`]`(g, top_k, floor)`, until `round(ratio · Σ N_l / n_group)` slices are gone:
/// the multiple of `n_group` closest to the budget `round(ratio · Σ N_l)`. With `n_group = 1`
/// this is the plain global ranking. Kept ids ascending.
pub fn select_global_per_group(
    scores: &BTreeMap<usize, Vec<f64>>,
    ratio: f64,
    g: GroupLimit,
    top_k: usize,
    floor: usize,
) -> Result<BTreeMap<usize, Vec<usize>>, PlanError> {
    if !(ratio > 0.0 && ratio < 1.0) {
        return Err(PlanError(format!("the ratio must be strictly between 0 and 1, got {ratio}")));
    }
    let min = min_per_group(g, top_k, floor);
    let total: usize = scores.values().map(Vec::len).sum();
    let slices = (ratio * total as f64 / g.n_group as f64).round() as usize;
    let mut groups = BTreeMap::new();
    let mut candidates: Vec<(f64, usize, usize)> = Vec::new();
    for (l, s) in scores {
        let gs = groups_ascending(*l, s, g)?;
        let size = s.len() / g.n_group;
        for j in 0..size.saturating_sub(min) {
            let cost = gs.iter().map(|o| s[o[j]]).sum::<f64>() / g.n_group as f64;
            candidates.push((cost, *l, j));
        }
        groups.insert(*l, gs);
    }
    if slices > candidates.len() {
        return Err(PlanError(format!(
            "removing {} of {total} experts ({slices} per routing group) is impossible while every routing group \
             keeps at least {min} (top_k {top_k}, topk_group {}, floor {floor}; at most {} can go); lower the ratio",
            slices * g.n_group,
            g.topk_group,
            candidates.len() * g.n_group
        )));
    }
    // A layer's costs never decrease with j, and equal costs keep j ascending: every layer's
    // removed slices are a prefix 0..r_l.
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    let mut removed: BTreeMap<usize, usize> = scores.keys().map(|l| (*l, 0)).collect();
    for (_, l, _) in candidates.into_iter().take(slices) {
        *removed.get_mut(&l).expect("layer") += 1;
    }
    Ok(groups.iter().map(|(l, gs)| (*l, keep_top(gs, removed[l]))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: GroupLimit = GroupLimit { n_group: 2, topk_group: 1, score: GroupScore::Top2Sum };
    const V2: GroupLimit = GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Max };

    fn scores() -> BTreeMap<usize, Vec<f64>> {
        BTreeMap::from([
            // Group 0 holds the four best; slices: j0 = {3, 7} (mean 3.25), j1 = {2, 4} (4.0).
            (1, vec![9.0, 8.0, 7.0, 6.0, 1.0, 3.0, 2.0, 0.5]),
            // Ties at 4.0 drop the higher id first; slices: j0 = {0, 4} (0.2), j1 = {1, 5} (0.3).
            (2, vec![0.1, 0.2, 4.0, 4.0, 0.3, 0.4, 4.0, 4.0]),
        ])
    }

    #[test]
    fn minimum_per_group() {
        assert_eq!(min_per_group(V3, 2, 2), 2);
        assert_eq!(min_per_group(V3, 3, 2), 3); // topk_group 1: one group must hold top_k
        assert_eq!(min_per_group(V2, 2, 2), 1);
        assert_eq!(min_per_group(V2, 3, 2), 2); // ceil(3 / 2)
        assert_eq!(min_per_group(V2, 2, 6), 2); // ceil(6 / 4)
    }

    #[test]
    fn global_removes_the_cheapest_slices() {
        // 16 experts, ratio 0.25 -> 4 experts = 2 slices: both of layer 2 (0.2, 0.3).
        let kept = select_global_per_group(&scores(), 0.25, V3, 2, 2).unwrap();
        assert_eq!(kept[&1], (0..8).collect::<Vec<_>>());
        assert_eq!(kept[&2], vec![2, 3, 6, 7]);
        // ratio 0.375 -> 6 experts = 3 slices: then layer 1's j0 = {3, 7}. (A flat ranking would
        // remove 7 and 4 from layer 1's second group and leave its groups at [4, 2].)
        let kept = select_global_per_group(&scores(), 0.375, V3, 2, 2).unwrap();
        assert_eq!(kept[&1], vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(kept[&2], vec![2, 3, 6, 7]);
        // ratio 0.3 -> budget 4.8 experts = 2.4 slices -> 2 slices.
        assert_eq!(select_global_per_group(&scores(), 0.3, V3, 2, 2).unwrap()[&1].len(), 8);
        // Layer 2 is at its minimum (2 per group): ratio 0.5 takes both slices of layer 1 too.
        let kept = select_global_per_group(&scores(), 0.5, V3, 2, 2).unwrap();
        assert_eq!(kept[&1], vec![0, 1, 5, 6]);
        // 5 slices exceed the 4 removable.
        let err = select_global_per_group(&scores(), 0.625, V3, 2, 2).unwrap_err().to_string();
        assert!(err.contains("at least 2") && err.contains("at most 8"), "{err}");
    }

    #[test]
    fn global_with_one_expert_per_group_minimum() {
        // V2-like: 4 groups of 2, min 1 per group. Layer 1 slices: j0 = {1, 3, 4, 7} (mean 4.125),
        // layer 2: j0 = {0, 3, 4, 7} (mean 2.15; ties at 4.0 drop the higher id).
        let kept = select_global_per_group(&scores(), 0.25, V2, 2, 2).unwrap();
        assert_eq!(kept[&1], (0..8).collect::<Vec<_>>());
        assert_eq!(kept[&2], vec![1, 2, 5, 6]);
    }

    #[test]
    fn uniform_picks_per_group() {
        let kept = select_uniform_per_group(&scores(), &BTreeMap::from([(1, 4), (2, 4)]), V3, 2, 2).unwrap();
        assert_eq!(kept[&1], vec![0, 1, 5, 6]);
        assert_eq!(kept[&2], vec![2, 3, 6, 7]);
        let err =
            select_uniform_per_group(&scores(), &BTreeMap::from([(1, 3), (2, 4)]), V3, 2, 2).unwrap_err().to_string();
        assert!(err.contains("n_group"), "{err}");
        let err =
            select_uniform_per_group(&scores(), &BTreeMap::from([(1, 6), (2, 6)]), V3, 2, 2).unwrap_err().to_string();
        assert!(err.contains("fewer than the 2"), "{err}");
    }
}
