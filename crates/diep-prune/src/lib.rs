//! The expert-pruning pipeline every method plugs into.
//!
//! 1. [`calib`]: calibration text (plain or JSONL) tokenised and sampled from a seed;
//! 2. [`stats`]: one layer-by-layer pass collecting per-expert routing statistics (and
//!    NAEE's cached block inputs/outputs);
//! 3. [`criteria`] and [`naee`]: the baseline criteria — random, frequency, soft activation,
//!    REAP, NAEE — and the allocation of the removal budget, uniform or global, with
//!    per-layer floors;
//! 4. the result is a [`PruningPlan`] (`pruning.json`) that `diep-surgery` applies.
#![warn(missing_docs)]

pub mod calib;
pub mod criteria;
mod error;
pub mod naee;
pub mod rng;
pub mod similarity;
pub mod stats;

use std::collections::BTreeMap;

use diep_checkpoint::ModelConfig;
pub use diep_surgery::PruningPlan;
use serde_json::json;

pub use criteria::{Allocation, Method};
pub use error::{PruneError, Result};
pub use stats::{CalibrationStats, NaeeSpec, StatsOptions, collect_statistics};

/// What a baseline run should produce.
#[derive(Debug, Clone)]
pub struct BaselineSpec {
    /// The criterion.
    pub method: Method,
    /// Uniform or global allocation.
    pub allocation: Allocation,
    /// Fraction of routed experts removed, `0 < ratio < 1`.
    pub ratio: f64,
    /// Minimum experts kept per layer; the floor is `max(num_experts_per_tok, min_experts)`.
    pub min_experts: usize,
    /// Seed (the `random` method's scores).
    pub seed: u64,
    /// NAEE refuses layers with more subsets than this.
    pub naee_max_subsets: u128,
}

/// The per-layer floor: `max(num_experts_per_tok, min_experts)`.
pub fn floor(config: &ModelConfig, min_experts: usize) -> usize {
    config.moe.top_k.max(min_experts)
}

/// Routed experts per MoE layer.
pub fn expert_counts(config: &ModelConfig) -> BTreeMap<usize, usize> {
    config.moe_layers().into_iter().map(|l| (l, config.experts_in_layer(l))).collect()
}

/// The statistics options a baseline needs: NAEE's cache and per-layer search, sized by the
/// uniform allocation, for `--method naee`; plain statistics otherwise.
pub fn stats_options(
    config: &ModelConfig,
    spec: &BaselineSpec,
    batch_size: usize,
    naee_tokens: usize,
) -> Result<StatsOptions> {
    if spec.method != Method::Naee {
        return Ok(StatsOptions { batch_size, naee_tokens: 0, naee: None });
    }
    if spec.allocation == Allocation::Global {
        return Err(naee_global_error());
    }
    let counts = expert_counts(config);
    let removals = criteria::uniform_removals(&counts, spec.ratio, floor(config, spec.min_experts))?;
    let keep = counts.iter().map(|(l, n)| (*l, n - removals[l])).collect();
    Ok(StatsOptions { batch_size, naee_tokens, naee: Some(NaeeSpec { keep, max_subsets: spec.naee_max_subsets }) })
}

fn naee_global_error() -> PruneError {
    PruneError::Config(
        "NAEE searches each layer for a given kept count, so it has no global ranking; use \
         --allocation uniform with --method naee"
            .into(),
    )
}

/// Uniform selection for group-limited routers (DeepSeek): each layer's removals are split
/// evenly over its `n_group` contiguous expert groups, and each group drops its lowest-scoring
/// experts (ties: the higher id first), so the pruned checkpoint keeps equal groups. See
/// [`diep_surgery::select_uniform_per_group`] (shared with DiEP).
pub fn select_uniform_per_group(
    scores: &BTreeMap<usize, Vec<f64>>,
    removals: &BTreeMap<usize, usize>,
    g: diep_checkpoint::GroupLimit,
    top_k: usize,
    floor: usize,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    diep_surgery::select_uniform_per_group(scores, removals, g, top_k, floor).map_err(|e| PruneError::Config(e.0))
}

/// Global selection for group-limited routers (DeepSeek): one ranking over all layers in units
/// of one expert per group, so every layer keeps the top-`c_l` experts of each group. See
/// [`diep_surgery::select_global_per_group`] (shared with DiEP).
pub fn select_global_per_group(
    scores: &BTreeMap<usize, Vec<f64>>,
    ratio: f64,
    g: diep_checkpoint::GroupLimit,
    top_k: usize,
    floor: usize,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    criteria::check_ratio(ratio)?;
    diep_surgery::select_global_per_group(scores, ratio, g, top_k, floor).map_err(|e| PruneError::Config(e.0))
}

/// Runs a baseline criterion on collected statistics and returns the plan.
pub fn plan_baseline(config: &ModelConfig, stats: &CalibrationStats, spec: &BaselineSpec) -> Result<PruningPlan> {
    criteria::check_ratio(spec.ratio)?;
    let floor = floor(config, spec.min_experts);
    let counts: BTreeMap<usize, usize> = stats.layers.iter().map(|(l, s)| (*l, s.num_experts())).collect();
    let mut settings = json!({
        "min_experts": spec.min_experts,
        "floor": floor,
        "seed": spec.seed,
        "calibration_tokens": stats.tokens,
    });
    let (kept, scores) = match (spec.method, spec.allocation) {
        (Method::Naee, Allocation::Global) => return Err(naee_global_error()),
        (Method::Naee, Allocation::Uniform) => {
            let removals = criteria::uniform_removals(&counts, spec.ratio, floor)?;
            let mut kept = BTreeMap::new();
            let mut errors = BTreeMap::new();
            for (l, s) in &stats.layers {
                let r = s.naee.clone().ok_or_else(|| {
                    PruneError::Config(format!(
                        "layer {l}: statistics were collected without NAEE's search (see stats_options)"
                    ))
                })?;
                if r.kept.len() != s.num_experts() - removals[l] {
                    return Err(PruneError::Config(format!(
                        "layer {l}: NAEE searched for {} kept experts, the budget needs {}",
                        r.kept.len(),
                        s.num_experts() - removals[l]
                    )));
                }
                errors.insert(l.to_string(), json!({"relative_error": r.error, "subsets": r.subsets as f64}));
                kept.insert(*l, r.kept);
            }
            settings["naee"] = json!({"cached_tokens": stats.layers.values().next().and_then(|s| s.cache.as_ref()).map_or(0, |c| c.tokens), "layers": errors});
            (kept, BTreeMap::new())
        }
        (method, allocation) => {
            let scores = criteria::scores(method, stats, spec.seed);
            let kept = match (allocation, config.moe.routing.group_limit) {
                // Group-limited routing (DeepSeek): the same number removed from every group.
                (Allocation::Uniform, Some(g)) => select_uniform_per_group(
                    &scores,
                    &criteria::uniform_removals(&counts, spec.ratio, floor)?,
                    g,
                    config.moe.top_k,
                    floor,
                )?,
                (Allocation::Uniform, None) => {
                    criteria::select_uniform(&scores, &criteria::uniform_removals(&counts, spec.ratio, floor)?)
                }
                // ... and the same number kept in every group of a layer, layers differing.
                (Allocation::Global, Some(g)) => {
                    select_global_per_group(&scores, spec.ratio, g, config.moe.top_k, floor)?
                }
                (Allocation::Global, None) => criteria::select_global(&scores, spec.ratio, floor)?,
            };
            (kept, scores)
        }
    };
    let mut plan = PruningPlan::new(config.architecture.model_type(), counts, kept, spec.method.name());
    plan.allocation = Some(spec.allocation.name().to_string());
    plan.ratio = Some(spec.ratio);
    plan.scores = scores;
    plan.settings = settings;
    plan.timings.insert("statistics_s".into(), stats.seconds);
    Ok(plan)
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn per_group_selection_keeps_equal_groups() {
        let g = diep_checkpoint::GroupLimit { n_group: 2, topk_group: 1, score: diep_checkpoint::GroupScore::Top2Sum };
        // Group 0 (experts 0-3) holds the four best scores; a flat ranking would empty group 1.
        let scores = BTreeMap::from([(1, vec![9.0, 8.0, 7.0, 6.0, 1.0, 3.0, 2.0, 0.5])]);
        let kept = select_uniform_per_group(&scores, &BTreeMap::from([(1, 4)]), g, 2, 2).unwrap();
        assert_eq!(kept[&1], vec![0, 1, 5, 6]);
        let err = select_uniform_per_group(&scores, &BTreeMap::from([(1, 3)]), g, 2, 2).unwrap_err().to_string();
        assert!(err.contains("n_group"), "{err}");
    }

    #[test]
    fn per_group_global_selection_keeps_equal_groups() {
        let g = diep_checkpoint::GroupLimit { n_group: 2, topk_group: 1, score: diep_checkpoint::GroupScore::Top2Sum };
        let scores = BTreeMap::from([
            (1, vec![9.0, 8.0, 7.0, 6.0, 1.0, 3.0, 2.0, 0.5]),
            (2, vec![0.1, 0.2, 4.0, 4.0, 0.3, 0.4, 4.0, 4.0]),
        ]);
        // 6 of 16 = 3 slices: layer 2's {0, 4} (mean 0.2) and {1, 5} (0.3), then layer 1's {3, 7} (3.25).
        let kept = select_global_per_group(&scores, 0.375, g, 2, 2).unwrap();
        assert_eq!(kept[&1], vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(kept[&2], vec![2, 3, 6, 7]);
        // The flat ranking would unbalance layer 1's groups ([4, 2]).
        let flat = criteria::select_global(&scores, 0.375, 2).unwrap();
        assert_eq!(flat[&1], vec![0, 1, 2, 3, 5, 6]);
        assert!(select_global_per_group(&scores, 1.5, g, 2, 2).is_err());
    }
}
