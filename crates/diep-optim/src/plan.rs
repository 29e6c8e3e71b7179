//! From learned α and β to a pruning plan.

use std::collections::BTreeMap;

use burn::tensor::Device;
use diep_models::checkpoint::ModelConfig;
use diep_plan::{Allocation, Constraints, PruningPlan, expert_counts, select};
use diep_relax::scores;
use serde_json::{Value, json};

use crate::error::Result;
use crate::optimise::relaxation;
use crate::state::DiepState;

/// The global score of every expert under the state's relaxation (`α·β` for the paper's,
/// `s = log softmax(α) + log N + log β` for the routed one).
pub fn expert_scores(state: &DiepState, device: &Device) -> BTreeMap<usize, Vec<f64>> {
    let tau = state.settings.tau_end;
    scores(relaxation(state.settings.relaxation, tau), &state.params(device))
}

/// A complete `pruning.json` for the optimised state: the experts [`diep_plan::select()`] keeps
/// for the learned scores under `allocation` and the model's constraints (floor, routing
/// groups), the scores, the settings, and under `diep` the learned α and β, the kept count per
/// layer and the loss curve.
pub fn pruning_plan(
    config: &ModelConfig,
    state: &DiepState,
    constraints: &Constraints,
    min_experts: usize,
    allocation: Allocation,
    device: &Device,
) -> Result<PruningPlan> {
    let chosen = state.for_plan();
    let scores = expert_scores(&chosen, device);
    let kept = select(&scores, state.settings.ratio, allocation, constraints)?;
    let mut plan = PruningPlan::new(config.architecture.model_type(), expert_counts(config), kept.clone(), "diep");
    plan.allocation = Some(allocation.name().into());
    plan.ratio = Some(state.settings.ratio);
    plan.scores = scores;
    let mut settings = serde_json::to_value(&state.settings).expect("settings serialise");
    settings["floor"] = constraints.floor.into();
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
            "alpha": by_layer(&|l| json!(chosen.layers[&l].alpha)),
            "beta": by_layer(&|l| json!(chosen.layers[&l].beta())),
            "selected_epoch": state.best.as_ref().map_or(state.epochs_done, |b| b.epoch),
            "epochs_run": state.epochs_done,
            "warm_start": state.warm_start.map_or("zero", |w| w.name()),
            "kept_per_layer": by_layer(&|l| json!(kept[&l].len())),
            "loss_curve": state.history,
            "steps": state.steps_done,
        }),
    );
    Ok(plan)
}
