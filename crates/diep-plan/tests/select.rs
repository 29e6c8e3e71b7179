//! The one selection: hand-computed cases for both allocations with and without routing
//! groups, and properties against a plain reference ranking.

use std::collections::BTreeMap;
use std::path::Path;

use diep_checkpoint::{GroupLimit, GroupScore, ModelConfig};
use diep_plan::{Allocation, Constraints, PlanError, check_feasible, check_groups, check_ratio, select};
use proptest::prelude::*;

const V3: GroupLimit = GroupLimit { n_group: 2, topk_group: 1, score: GroupScore::Top2Sum };
const V2: GroupLimit = GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Max };

fn grouped(g: GroupLimit, top_k: usize, floor: usize) -> Constraints {
    Constraints { floor, top_k, groups: Some(g) }
}

fn scores_of(v: &[&[f64]]) -> BTreeMap<usize, Vec<f64>> {
    v.iter().enumerate().map(|(l, s)| (l, s.to_vec())).collect()
}

fn two_layers() -> BTreeMap<usize, Vec<f64>> {
    BTreeMap::from([
        // Group 0 holds the four best; slices: j0 = {3, 7} (mean 3.25), j1 = {2, 4} (4.0).
        (1, vec![9.0, 8.0, 7.0, 6.0, 1.0, 3.0, 2.0, 0.5]),
        // Ties at 4.0 drop the higher id first; slices: j0 = {0, 4} (0.2), j1 = {1, 5} (0.3).
        (2, vec![0.1, 0.2, 4.0, 4.0, 0.3, 0.4, 4.0, 4.0]),
    ])
}

fn config(name: &str) -> ModelConfig {
    ModelConfig::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name)).unwrap()
}

#[test]
fn uniform_keeps_the_top_scores_per_layer() {
    let s = scores_of(&[&[0.1, 0.9, 0.5, 0.2], &[0.4, 0.3, 0.2, 0.1]]);
    let kept = select(&s, 0.5, Allocation::Uniform, &Constraints::ungrouped(2, 2)).unwrap();
    assert_eq!(kept[&0], vec![1, 2]);
    assert_eq!(kept[&1], vec![0, 1]);
    let err = select(&s, 0.75, Allocation::Uniform, &Constraints::ungrouped(2, 2)).unwrap_err();
    assert!(matches!(err, PlanError::BelowFloor { layer: 0, remove: 3, experts: 4, floor: 2 }), "{err}");
    assert!(err.to_string().contains("floor"), "{err}");
}

#[test]
fn global_ranks_across_layers_and_respects_floors() {
    // Layer 1's experts all score below layer 0's: a global ranking takes them first, down to
    // the floor of 2, then continues in layer 0.
    let s = scores_of(&[&[0.5, 0.9, 0.6, 0.8], &[0.1, 0.3, 0.2, 0.05]]);
    let kept = select(&s, 0.5, Allocation::Global, &Constraints::ungrouped(2, 2)).unwrap();
    assert_eq!(kept[&1], vec![1, 2]);
    assert_eq!(kept[&0], vec![1, 3]);
    let err = select(&s, 0.9, Allocation::Global, &Constraints::ungrouped(2, 2)).unwrap_err();
    assert!(err.to_string().contains("impossible") && err.to_string().contains("at most 4"), "{err}");
}

#[test]
fn ties_remove_the_higher_id_and_the_higher_layer_first() {
    let s = scores_of(&[&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]]);
    let kept = select(&s, 0.25, Allocation::Global, &Constraints::ungrouped(1, 1)).unwrap();
    assert_eq!(kept[&0], vec![0, 1, 2, 3]);
    assert_eq!(kept[&1], vec![0, 1]);
    let kept = select(&s, 0.5, Allocation::Uniform, &Constraints::ungrouped(1, 1)).unwrap();
    assert_eq!(kept[&0], vec![0, 1]);
}

#[test]
fn ratio_bounds() {
    for r in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
        assert!(matches!(check_ratio(r), Err(PlanError::Ratio { .. })), "{r}");
        for a in Allocation::ALL {
            let err = select(&two_layers(), r, a, &Constraints::ungrouped(2, 2)).unwrap_err();
            assert!(err.to_string().contains("between 0 and 1"), "{err}");
        }
    }
    assert!(check_ratio(0.5).is_ok());
}

#[test]
fn allocation_names_round_trip() {
    for a in Allocation::ALL {
        assert_eq!(a.name().parse::<Allocation>().unwrap(), a);
        assert_eq!(a.to_string(), a.name());
    }
    assert!("flat".parse::<Allocation>().unwrap_err().to_string().contains("uniform"));
}

#[test]
fn minimum_per_group() {
    assert_eq!(grouped(V3, 2, 2).min_per_group(), 2);
    assert_eq!(grouped(V3, 3, 3).min_per_group(), 3); // topk_group 1: one group must hold top_k
    assert_eq!(grouped(V2, 2, 2).min_per_group(), 1);
    assert_eq!(grouped(V2, 3, 3).min_per_group(), 2); // ceil(3 / 2)
    assert_eq!(grouped(V2, 2, 6).min_per_group(), 2); // ceil(6 / 4)
    assert_eq!(Constraints::ungrouped(3, 2).min_per_group(), 3);
}

#[test]
fn global_removes_the_cheapest_slices() {
    let c = grouped(V3, 2, 2);
    // 16 experts, ratio 0.25 -> 4 experts = 2 slices: both of layer 2 (0.2, 0.3).
    let kept = select(&two_layers(), 0.25, Allocation::Global, &c).unwrap();
    assert_eq!(kept[&1], (0..8).collect::<Vec<_>>());
    assert_eq!(kept[&2], vec![2, 3, 6, 7]);
    // ratio 0.375 -> 6 experts = 3 slices: then layer 1's j0 = {3, 7}. (A flat ranking would
    // remove 7 and 4 from layer 1's second group and leave its groups at [4, 2].)
    let kept = select(&two_layers(), 0.375, Allocation::Global, &c).unwrap();
    assert_eq!(kept[&1], vec![0, 1, 2, 4, 5, 6]);
    assert_eq!(kept[&2], vec![2, 3, 6, 7]);
    let flat = select(&two_layers(), 0.375, Allocation::Global, &Constraints::ungrouped(2, 2)).unwrap();
    assert_eq!(flat[&1], vec![0, 1, 2, 3, 5, 6]);
    // ratio 0.3 -> budget 4.8 experts = 2.4 slices -> 2 slices.
    assert_eq!(select(&two_layers(), 0.3, Allocation::Global, &c).unwrap()[&1].len(), 8);
    // Layer 2 is at its minimum (2 per group): ratio 0.5 takes both slices of layer 1 too.
    let kept = select(&two_layers(), 0.5, Allocation::Global, &c).unwrap();
    assert_eq!(kept[&1], vec![0, 1, 5, 6]);
    // 5 slices exceed the 4 removable.
    let err = select(&two_layers(), 0.625, Allocation::Global, &c).unwrap_err().to_string();
    assert!(err.contains("at least 2") && err.contains("at most 8") && err.contains("routing group"), "{err}");
}

#[test]
fn global_with_one_expert_per_group_minimum() {
    // V2-like: 4 groups of 2, min 1 per group. Layer 1 slices: j0 = {1, 3, 4, 7} (mean 4.125),
    // layer 2: j0 = {0, 3, 4, 7} (mean 2.15; ties at 4.0 drop the higher id).
    let kept = select(&two_layers(), 0.25, Allocation::Global, &grouped(V2, 2, 2)).unwrap();
    assert_eq!(kept[&1], (0..8).collect::<Vec<_>>());
    assert_eq!(kept[&2], vec![1, 2, 5, 6]);
}

#[test]
fn uniform_picks_per_group() {
    let c = grouped(V3, 2, 2);
    let kept = select(&two_layers(), 0.5, Allocation::Uniform, &c).unwrap();
    assert_eq!(kept[&1], vec![0, 1, 5, 6]);
    assert_eq!(kept[&2], vec![2, 3, 6, 7]);
    // 3 of 8 per layer cannot be split over 2 groups.
    let err = select(&two_layers(), 0.375, Allocation::Uniform, &c).unwrap_err();
    assert!(matches!(err, PlanError::UnevenGroups { .. }) && err.to_string().contains("n_group"), "{err}");
    // 6 of 8 leaves one per group, below V3's two; the floor of 2 is met.
    let err = select(&two_layers(), 0.75, Allocation::Uniform, &c).unwrap_err();
    assert!(err.to_string().contains("fewer than the 2"), "{err}");
}

#[test]
fn model_constraints_come_from_the_config() {
    // tiny-deepseek-v3: n_group 2 (groups of 4), topk_group 1, top_k 2, V3 top-2-sum scores.
    let c = Constraints::for_model(&config("tiny-deepseek-v3"), 0);
    assert_eq!((c.floor, c.top_k, c.n_group(), c.min_per_group()), (2, 2, 2, 2));
    let kept = select(&two_layers(), 0.375, Allocation::Global, &c).unwrap();
    assert_eq!(kept[&1], vec![0, 1, 2, 4, 5, 6]);
    // Ungrouped models use the plain ranking; --min-experts raises the floor.
    let c = Constraints::for_model(&config("tiny-gpt-oss"), 3);
    assert_eq!((c.floor, c.groups), (3, None));
    let counts = BTreeMap::from([(0, 8), (1, 8)]);
    assert!(check_feasible(&counts, 0.75, Allocation::Uniform, &c).is_err());
    assert!(check_feasible(&counts, 0.625, Allocation::Uniform, &c).is_ok());
}

#[test]
fn finished_plans_are_checked_against_the_groups() {
    assert!(check_groups(1, 8, &[0, 1, 5, 6], V3, 2).is_ok());
    let err = check_groups(1, 8, &[0, 1, 2, 5], V3, 2).unwrap_err().to_string();
    assert!(err.contains("[3, 1]") && err.contains("same count"), "{err}");
    let err = check_groups(1, 8, &[0, 4], V3, 2).unwrap_err().to_string();
    assert!(err.contains("at least 2 per group"), "{err}");
    let err = check_groups(1, 8, &[0, 2, 4, 6], V2, 3).unwrap_err().to_string();
    assert!(err.contains("exceeds topk_group"), "{err}");
}

/// A plain global ranking, written independently: sort all experts ascending (ties: higher
/// layer, then higher id first) and remove them one by one while their layer is above the floor.
fn reference_global(
    scores: &BTreeMap<usize, Vec<f64>>,
    ratio: f64,
    floor: usize,
) -> Option<BTreeMap<usize, Vec<usize>>> {
    let total: usize = scores.values().map(Vec::len).sum();
    let budget = (ratio * total as f64).round() as usize;
    let mut all: Vec<(usize, usize, f64)> =
        scores.iter().flat_map(|(l, s)| s.iter().enumerate().map(move |(e, v)| (*l, e, *v))).collect();
    all.sort_by(|a, b| a.2.total_cmp(&b.2).then(b.0.cmp(&a.0)).then(b.1.cmp(&a.1)));
    let mut kept: BTreeMap<usize, Vec<usize>> = scores.iter().map(|(l, s)| (*l, (0..s.len()).collect())).collect();
    let mut removed = 0;
    for (l, e, _) in all {
        if removed == budget {
            break;
        }
        let k = kept.get_mut(&l).unwrap();
        if k.len() > floor {
            k.retain(|x| *x != e);
            removed += 1;
        }
    }
    (removed == budget).then_some(kept)
}

proptest! {
    #[test]
    fn global_without_groups_is_the_plain_ranking(
        layers in prop::collection::vec(prop::collection::vec(-5.0f64..5.0, 4..16), 1..6),
        ratio in 0.05f64..0.95,
        floor in 1usize..4,
    ) {
        let scores: BTreeMap<usize, Vec<f64>> = layers.into_iter().enumerate().collect();
        let total: usize = scores.values().map(Vec::len).sum();
        let ours = select(&scores, ratio, Allocation::Global, &Constraints::ungrouped(floor, 1)).ok();
        prop_assert_eq!(&ours, &reference_global(&scores, ratio, floor));
        if let Some(kept) = ours {
            let k: usize = kept.values().map(Vec::len).sum();
            prop_assert_eq!(total - k, (ratio * total as f64).round() as usize);
            prop_assert!(kept.values().all(|v| v.len() >= floor));
            for (l, v) in &kept {
                prop_assert!(v.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(v.iter().all(|e| *e < scores[l].len()));
            }
        }
        if let Ok(kept) = select(&scores, ratio, Allocation::Uniform, &Constraints::ungrouped(floor, 1)) {
            for (l, v) in &kept {
                let n = scores[l].len();
                prop_assert_eq!(n - v.len(), (ratio * n as f64).round() as usize);
                let min_kept = v.iter().map(|e| scores[l][*e]).fold(f64::INFINITY, f64::min);
                let max_removed =
                    (0..n).filter(|e| !v.contains(e)).map(|e| scores[l][e]).fold(f64::NEG_INFINITY, f64::max);
                prop_assert!(min_kept >= max_removed);
            }
        }
    }

    #[test]
    fn grouped_selections_pass_the_plan_check(
        layers in prop::collection::vec(prop::collection::vec(-5.0f64..5.0, 16), 1..5),
        ratio in 0.05f64..0.95,
        v3 in any::<bool>(),
        top_k in 1usize..4,
    ) {
        let g = if v3 { V3 } else { V2 };
        let c = grouped(g, top_k, top_k);
        let scores: BTreeMap<usize, Vec<f64>> = layers.into_iter().enumerate().collect();
        for a in Allocation::ALL {
            if let Ok(kept) = select(&scores, ratio, a, &c) {
                for (l, k) in &kept {
                    prop_assert!(check_groups(*l, 16, k, g, top_k).is_ok(), "{:?} {:?}", a, k);
                    prop_assert!(k.len() >= c.floor);
                }
                let removed: usize = kept.values().map(|k| 16 - k.len()).sum();
                prop_assert_eq!(removed % g.n_group, 0);
                if a == Allocation::Global {
                    let total = 16 * scores.len();
                    let slices = (ratio * total as f64 / g.n_group as f64).round() as usize;
                    prop_assert_eq!(removed, slices * g.n_group);
                }
            }
        }
    }
}

/// MTP layers (DeepSeek-V3's `num_nextn_predict_layers`): a non-uniform trunk plan gives the
/// MTP layer the largest trunk count (the `n_routed_experts` the pruned config states), chosen
/// by its own scores evenly over its routing groups; plans without it, or with another count,
/// are refused.
#[test]
fn mtp_layers_keep_the_largest_trunk_count_by_their_own_scores() {
    let c = config("tiny-deepseek-v3-fp8");
    assert_eq!((c.num_layers, c.mtp_layers, c.experts_in_layer(3)), (3, 1, 8));
    let cons = Constraints::for_model(&c, 0);
    let counts = BTreeMap::from([(1, 8), (2, 8)]);
    let kept = BTreeMap::from([(1, vec![0, 1, 2, 4, 5, 6]), (2, vec![0, 1, 4, 5])]);
    let mut plan = diep_plan::PruningPlan::new("deepseek_v3", counts, kept, "test");
    let err = plan.validate(&c).unwrap_err().to_string();
    assert!(err.contains("MTP layer 3") && err.contains("num_nextn_predict_layers"), "{err}");
    // Group 0 = experts 0-3, group 1 = 4-7: the best three of each.
    let scores = BTreeMap::from([(3, vec![0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.3, 0.6])]);
    plan.add_mtp_layers(&c, &scores, &cons, "test scores").unwrap();
    assert_eq!(plan.kept_experts[&3], vec![0, 2, 3, 5, 6, 7]);
    assert_eq!(plan.original_experts[&3], 8);
    assert_eq!(plan.extra["mtp"]["layers"], serde_json::json!([3]));
    plan.validate(&c).unwrap();
    plan.kept_experts.insert(3, vec![0, 3, 5, 7]);
    let err = plan.validate(&c).unwrap_err().to_string();
    assert!(err.contains("MTP layer 3 keeps 4 experts") && err.contains("states 6"), "{err}");
}
