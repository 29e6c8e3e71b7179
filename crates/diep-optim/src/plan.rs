//! From learned α and β to a pruning plan.

use std::collections::BTreeMap;

use burn::tensor::Device;
use diep_models::checkpoint::ModelConfig;
use diep_relax::{Allocation, discretise, scores};
use diep_surgery::PruningPlan;
use serde_json::{Value, json};

use crate::error::{OptimError, Result};
use crate::optimise::{expert_counts, relaxation};
use crate::state::DiepState;

/// The global score of every expert under the state's relaxation (`α·β` for the paper's,
/// `s = log softmax(α) + log N + log β` for the routed one).
pub fn expert_scores(state: &DiepState, device: &Device) -> BTreeMap<usize, Vec<f64>> {
    let tau = state.settings.tau_end;
    scores(relaxation(state.settings.relaxation, tau), &state.params(device))
}

/// The kept experts per layer: `round(ratio·Σ N)` removed by the global ranking (never
/// below `floor` in a layer), or `round(ratio·N_l)` per layer by α for `Uniform`. Ignores
/// routing groups (it has no config); [`diep_plan`] uses [`select_kept`], which respects them.
pub fn kept_experts(
    state: &DiepState,
    floor: usize,
    allocation: Allocation,
    device: &Device,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    Ok(discretise(&expert_scores(state, device), state.settings.ratio, floor, allocation)?)
}

/// The kept experts per layer for `scores` under `allocation`, respecting the model's routing
/// groups: for group-limited routers (DeepSeek-V2/V3 with `n_group`) every layer keeps the same
/// number of experts in each group, the top ones of each group by score (`Uniform`: the
/// removals of [`discretise`] split evenly over the groups; `Global`: one ranking in units of
/// one expert per group, see [`diep_surgery::select_global_per_group`]). Other configs use
/// [`discretise`] unchanged.
pub fn select_kept(
    config: &ModelConfig,
    scores: &BTreeMap<usize, Vec<f64>>,
    ratio: f64,
    floor: usize,
    allocation: Allocation,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    let Some(g) = config.moe.routing.group_limit else {
        return Ok(discretise(scores, ratio, floor, allocation)?);
    };
    let top_k = config.moe.top_k;
    let grouped = match allocation {
        Allocation::Uniform => {
            // The budget and floor checks of the ungrouped rule, then per-group selection.
            discretise(scores, ratio, floor, allocation)?;
            let removals = scores.iter().map(|(l, s)| (*l, (ratio * s.len() as f64).round() as usize)).collect();
            diep_surgery::select_uniform_per_group(scores, &removals, g, top_k, floor)
        }
        Allocation::Global => {
            if !(ratio > 0.0 && ratio < 1.0) {
                return Ok(discretise(scores, ratio, floor, allocation)?); // the ratio error
            }
            diep_surgery::select_global_per_group(scores, ratio, g, top_k, floor)
        }
    };
    grouped.map_err(|e| OptimError::Config(e.0))
}

/// A complete `pruning.json` for the optimised state: kept experts, the scores they were
/// ranked by, the settings, and under `diep` the learned α and β, the kept count per layer and
/// the loss curve.
pub fn diep_plan(
    config: &ModelConfig,
    state: &DiepState,
    floor: usize,
    min_experts: usize,
    allocation: Allocation,
    device: &Device,
) -> Result<PruningPlan> {
    let scores = expert_scores(state, device);
    let kept = select_kept(config, &scores, state.settings.ratio, floor, allocation)?;
    let mut plan = PruningPlan::new(config.architecture.model_type(), expert_counts(config), kept.clone(), "diep");
    plan.allocation = Some(
        match allocation {
            Allocation::Uniform => "uniform",
            Allocation::Global => "global",
        }
        .into(),
    );
    plan.ratio = Some(state.settings.ratio);
    plan.scores = scores;
    let mut settings = serde_json::to_value(&state.settings).expect("settings serialise");
    settings["floor"] = floor.into();
    settings["min_experts"] = min_experts.into();
    plan.settings = settings;
    let by_layer = |f: &dyn Fn(usize) -> Value| -> Value {
        Value::Object(state.layers.keys().map(|l| (l.to_string(), f(*l))).collect())
    };
    plan.extra.insert(
        "diep".into(),
        json!({
            "relaxation": state.settings.relaxation.name(),
            "objective": state.settings.objective.name(),
            "alpha": by_layer(&|l| json!(state.layers[&l].alpha)),
            "beta": by_layer(&|l| json!(state.layers[&l].beta())),
            "kept_per_layer": by_layer(&|l| json!(kept[&l].len())),
            "loss_curve": state.history,
            "steps": state.steps_done,
        }),
    );
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str) -> ModelConfig {
        ModelConfig::from_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name))
            .unwrap()
    }

    fn scores() -> BTreeMap<usize, Vec<f64>> {
        BTreeMap::from([
            (1, vec![9.0, 8.0, 7.0, 6.0, 1.0, 3.0, 2.0, 0.5]),
            (2, vec![0.1, 0.2, 4.0, 4.0, 0.3, 0.4, 4.0, 4.0]),
        ])
    }

    #[test]
    fn grouped_configs_keep_equal_groups() {
        // tiny-deepseek-v3: n_group 2 (groups of 4), topk_group 1, top_k 2, V3 top-2-sum scores.
        let c = config("tiny-deepseek-v3");
        let kept = select_kept(&c, &scores(), 0.375, 2, Allocation::Global).unwrap();
        assert_eq!(kept[&1], vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(kept[&2], vec![2, 3, 6, 7]);
        // Uniform: 4 per layer, 2 from each group, by score within the group.
        let kept = select_kept(&c, &scores(), 0.5, 2, Allocation::Uniform).unwrap();
        assert_eq!(kept[&1], vec![0, 1, 5, 6]);
        assert_eq!(kept[&2], vec![2, 3, 6, 7]);
        // 3 of 8 per layer cannot be split over 2 groups.
        assert!(select_kept(&c, &scores(), 0.375, 2, Allocation::Uniform).is_err());
        // The ungrouped flat ranking, for comparison, unbalances layer 1.
        let flat = discretise(&scores(), 0.375, 2, Allocation::Global).unwrap();
        assert_eq!(flat[&1], vec![0, 1, 2, 3, 5, 6]);
    }

    #[test]
    fn ungrouped_configs_use_the_plain_ranking() {
        let c = config("tiny-gpt-oss");
        let s: BTreeMap<usize, Vec<f64>> = (0..3).map(|l| (l, scores()[&(1 + l % 2)].clone())).collect();
        for allocation in [Allocation::Global, Allocation::Uniform] {
            assert_eq!(
                select_kept(&c, &s, 0.375, 2, allocation).unwrap(),
                discretise(&s, 0.375, 2, allocation).unwrap()
            );
        }
    }
}
