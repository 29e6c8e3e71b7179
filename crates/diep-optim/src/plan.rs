//! From learned α and β to a pruning plan.

use std::collections::BTreeMap;

use burn::tensor::Device;
use diep_models::checkpoint::ModelConfig;
use diep_relax::{Allocation, discretise, scores};
use diep_surgery::PruningPlan;
use serde_json::{Value, json};

use crate::error::Result;
use crate::optimise::{expert_counts, relaxation};
use crate::state::DiepState;

/// The global score of every expert under the state's relaxation (`α·β` for the paper's,
/// `s = log softmax(α) + log N + log β` for the routed one).
pub fn expert_scores(state: &DiepState, device: &Device) -> BTreeMap<usize, Vec<f64>> {
    let tau = state.settings.tau_end;
    scores(relaxation(state.settings.relaxation, tau), &state.params(device))
}

/// The kept experts per layer: `round(ratio·Σ N)` removed by the global ranking (never
/// below `floor` in a layer), or `round(ratio·N_l)` per layer by α for `Uniform`.
pub fn kept_experts(
    state: &DiepState,
    floor: usize,
    allocation: Allocation,
    device: &Device,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    Ok(discretise(&expert_scores(state, device), state.settings.ratio, floor, allocation)?)
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
    let kept = discretise(&scores, state.settings.ratio, floor, allocation)?;
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
