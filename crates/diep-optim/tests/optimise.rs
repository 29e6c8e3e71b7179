//! The optimiser's invariants on a tiny fixture model: frozen weights, determinism, exact
//! resume, the alternation, the update rule and schedules, and the plan it produces.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::burn::tensor::Device;
use diep_models::{DeviceSpec, MoeModel, StreamingModel};
use diep_optim::{
    DiepSettings, DiepState, Event, Moments, Objective, OptimizerKind, RelaxationKind, ThresholdMode, optimise,
    optimise_layer_wise, pruning_plan,
};
use diep_plan::{Allocation, Constraints};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap().autodiff()
}

/// 8 sequences of 16 tokens from the fixture's parity ids (rotated copies).
fn calibration() -> Vec<Vec<u32>> {
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(root().join("parity/tiny-mixtral/ids.json")).unwrap()).unwrap();
    (0..8)
        .map(|i| {
            let mut s = ids[i % ids.len()].clone();
            s.rotate_left(i);
            s
        })
        .collect()
}

fn settings(relaxation: RelaxationKind, objective: Objective) -> DiepSettings {
    DiepSettings { relaxation, objective, epochs: 2, batch_size: 4, lr: 0.05, ratio: 0.5, ..Default::default() }
}

fn load() -> MoeModel {
    MoeModel::load(root().join("models/tiny-mixtral"), &device()).unwrap()
}

fn run(model: &MoeModel, s: &DiepSettings) -> DiepState {
    optimise(model, &calibration(), s, None, |_| Ok(())).unwrap()
}

/// Every weight of the model, as bits, by HF name.
fn weights(m: &MoeModel) -> Vec<(String, Vec<u32>)> {
    m.to_hf_tensors().into_iter().map(|t| (t.name, t.data.into_iter().map(f32::to_bits).collect())).collect()
}

#[test]
fn model_weights_are_bit_identical_after_optimisation() {
    let model = load();
    let before = weights(&model);
    let files: Vec<Vec<u8>> = ["model.safetensors", "config.json"]
        .iter()
        .map(|f| std::fs::read(root().join("models/tiny-mixtral").join(f)).unwrap())
        .collect();
    for relaxation in [RelaxationKind::Paper, RelaxationKind::Routed] {
        let state = run(&model, &settings(relaxation, Objective::CeNorm));
        // α moved: the test is not vacuous.
        assert!(state.layers.values().any(|l| l.alpha.iter().any(|a| *a != 0.0)));
    }
    assert_eq!(weights(&model), before, "model weights changed");
    let after: Vec<Vec<u8>> = ["model.safetensors", "config.json"]
        .iter()
        .map(|f| std::fs::read(root().join("models/tiny-mixtral").join(f)).unwrap())
        .collect();
    assert_eq!(files, after, "checkpoint files changed");
}

#[test]
fn same_seed_same_state_and_plan() {
    let model = load();
    let s = settings(RelaxationKind::Routed, Objective::CeNorm);
    let (a, b) = (run(&model, &s), run(&model, &s));
    assert_eq!(a.layers, b.layers);
    let plan = |st: &DiepState| {
        pruning_plan(model.config(), st, &Constraints::ungrouped(2, 2), 0, Allocation::Global, &device()).unwrap()
    };
    assert_eq!(plan(&a).kept_experts, plan(&b).kept_experts);
    // Another seed shuffles the calibration order differently.
    let c = run(&model, &DiepSettings { seed: 7, ..s });
    assert_ne!(a.layers, c.layers);
}

/// Sampled masks draw their noise from the seed, the epoch and the step: a run repeats bit
/// for bit, resumes bit for bit, and differs from the deterministic relaxation.
#[test]
fn sampled_masks_are_seeded_and_resumable() {
    let model = load();
    let ids = calibration();
    let s = DiepSettings { epochs: 2, mask_noise: 1.0, ..settings(RelaxationKind::RoutedGated, Objective::Kl) };
    let (a, b) = (run(&model, &s), run(&model, &s));
    assert_eq!(a.layers, b.layers);
    let plain = run(&model, &DiepSettings { mask_noise: 0.0, ..s.clone() });
    assert_ne!(a.layers, plain.layers, "the noise changed nothing");
    let mut after_first: Option<DiepState> = None;
    optimise(&model, &ids, &s, None, |e| {
        if let Event::Epoch { record, state } = e
            && record.epoch == 1
        {
            after_first = Some(state.clone());
        }
        Ok(())
    })
    .unwrap();
    let resumed = optimise(&model, &ids, &s, after_first, |_| Ok(())).unwrap();
    assert_eq!(resumed.layers, a.layers);
    assert!(DiepSettings { mask_noise: -1.0, ..s.clone() }.validate().unwrap_err().contains("mask_noise"));
    for bad in [
        DiepSettings { relaxation: RelaxationKind::Paper, ..s.clone() },
        DiepSettings { objective: Objective::LayerWise, ..s },
    ] {
        assert!(bad.validate().unwrap_err().contains("no effect"));
    }
}

#[test]
fn resume_continues_bit_for_bit() {
    let model = load();
    let ids = calibration();
    let s = DiepSettings { epochs: 3, ..settings(RelaxationKind::Routed, Objective::Kl) };
    let mut after_first: Option<DiepState> = None;
    let full = optimise(&model, &ids, &s, None, |e| {
        if let Event::Epoch { record, state } = e
            && record.epoch == 1
        {
            after_first = Some(state.clone());
        }
        Ok(())
    })
    .unwrap();
    let saved = after_first.unwrap();
    // Through the file, as `--resume` does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    saved.save(&path).unwrap();
    let loaded = DiepState::read(&path).unwrap();
    assert_eq!(loaded, saved, "state JSON must round-trip exactly");
    let mut epochs_seen = Vec::new();
    let resumed = optimise(&model, &ids, &s, Some(loaded), |e| {
        if let Event::Epoch { record, .. } = e {
            epochs_seen.push(record.epoch);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(epochs_seen, vec![2, 3]);
    assert_eq!(resumed.layers, full.layers);
    assert_eq!(resumed.steps_done, full.steps_done);
    assert_eq!(resumed.history.len(), 3);

    // A state from other settings or data is refused, naming what differs.
    let other = DiepSettings { lr: 0.1, ..s.clone() };
    let err = optimise(&model, &ids, &other, Some(saved.clone()), |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("lr"), "{err}");
    let err = optimise(&model, &ids[..4], &s, Some(saved), |_| Ok(())).unwrap_err().to_string();
    assert!(err.contains("calibration"), "{err}");
}

#[test]
fn alternation_updates_only_the_active_block() {
    let model = load();
    // Only α steps: β stays exactly 1 (from the paper's start, α = 0 and β = 1).
    let s = DiepSettings {
        alpha_steps: 1,
        beta_steps: 0,
        alpha_init: diep_optim::AlphaInit::Zero,
        ..settings(RelaxationKind::Routed, Objective::CeNorm)
    };
    let st = run(&model, &s);
    assert!(st.layers.values().all(|l| l.log_beta == 0.0 && l.beta_moments.t == 0));
    assert!(st.layers.values().all(|l| l.alpha_moments.t == st.steps_done as u64));
    // Only β steps: α stays exactly 0.
    let s = DiepSettings { alpha_steps: 0, beta_steps: 1, ..s };
    let st = run(&model, &s);
    assert!(st.layers.values().all(|l| l.alpha.iter().all(|a| *a == 0.0)));
    assert!(st.layers.values().any(|l| l.log_beta != 0.0));
    // 3:1 over 4 steps: three α updates, one β update.
    let s = DiepSettings { alpha_steps: 3, beta_steps: 1, ..s };
    let st = run(&model, &s);
    assert_eq!(st.steps_done, 4);
    assert!(st.layers.values().all(|l| l.alpha_moments.t == 3 && l.beta_moments.t == 1));
}

#[test]
fn objectives_and_relaxations_all_run_and_record_the_curve() {
    let model = load();
    for relaxation in [RelaxationKind::Paper, RelaxationKind::Routed] {
        for objective in [Objective::CeNorm, Objective::Kl, Objective::LayerWise] {
            let st = run(&model, &settings(relaxation, objective));
            assert_eq!(st.history.len(), 2);
            for r in &st.history {
                assert!(r.loss.is_finite() && r.loss >= 0.0, "{relaxation} {objective}: {r:?}");
                if objective == Objective::CeNorm {
                    // CE of a tiny random model is near ln(vocab); the regulariser is λ·norm.
                    assert!((r.loss - (r.ce + 0.01 * r.reg)).abs() < 1e-3 * r.loss.max(1.0), "{r:?}");
                }
            }
        }
    }
}

#[test]
fn layer_wise_streams_the_same_as_in_memory() {
    let model = load();
    let streaming = StreamingModel::open(root().join("models/tiny-mixtral"), &device()).unwrap();
    let s = settings(RelaxationKind::Routed, Objective::LayerWise);
    let a = optimise_layer_wise(&model, &calibration(), &s, None, |_| Ok(())).unwrap();
    let b = optimise_layer_wise(&streaming, &calibration(), &s, None, |_| Ok(())).unwrap();
    assert_eq!(a.layers, b.layers);
}

#[test]
fn plan_meets_the_budget_and_records_alpha_beta_and_curve() {
    let model = load();
    let st = run(&model, &settings(RelaxationKind::Routed, Objective::CeNorm));
    for (allocation, name) in [(Allocation::Global, "global"), (Allocation::Uniform, "uniform")] {
        let plan = pruning_plan(model.config(), &st, &Constraints::ungrouped(2, 2), 0, allocation, &device()).unwrap();
        plan.validate(model.config()).unwrap();
        assert_eq!(plan.method, "diep");
        assert_eq!(plan.allocation.as_deref(), Some(name));
        assert_eq!(plan.removed(), 8, "K = round(0.5 · 16)");
        assert!(plan.kept_experts.values().all(|k| k.len() >= 2));
        let diep = &plan.extra["diep"];
        assert_eq!(diep["alpha"]["0"].as_array().unwrap().len(), 8);
        assert!(diep["beta"]["1"].as_f64().unwrap() > 0.0);
        assert_eq!(diep["loss_curve"].as_array().unwrap().len(), 2);
        let kept: usize = plan.kept_experts.values().map(Vec::len).sum();
        let per_layer: usize =
            diep["kept_per_layer"].as_object().unwrap().values().map(|v| v.as_u64().unwrap() as usize).sum();
        assert_eq!(kept, per_layer);
        // The kept experts are the top-scored ones of each layer.
        for (l, kept) in &plan.kept_experts {
            let s = &plan.scores[l];
            let min_kept = kept.iter().map(|e| s[*e]).fold(f64::INFINITY, f64::min);
            let max_removed = (0..8).filter(|e| !kept.contains(e)).map(|e| s[e]).fold(f64::NEG_INFINITY, f64::max);
            assert!(min_kept >= max_removed, "layer {l}: {s:?} kept {kept:?}");
        }
    }
}

#[test]
fn adam_and_sgd_updates_match_hand_computation() {
    // Adam's first step is lr·g/(|g| + ε) after bias correction.
    let mut m = Moments { m: vec![0.0; 2], v: vec![0.0; 2], t: 0 };
    let mut p = [1.0f32, -2.0];
    m.update(OptimizerKind::Adam, &mut p, &[0.5, -4.0], 0.1);
    assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6, "{p:?}");
    // Second step with g = (0.5, 0): m = (0.095, -0.36), v = (0.0004995, 0.015984).
    m.update(OptimizerKind::Adam, &mut p, &[0.5, 0.0], 0.1);
    let (m1, v1) = (0.9 * 0.05 + 0.1 * 0.5, 0.999 * 0.00025 + 0.001 * 0.25);
    let step0 = 0.1 * (m1 / (1.0 - 0.81)) / ((v1 / (1.0 - 0.998001f64)).sqrt() + 1e-8);
    assert!((p[0] as f64 - (0.9 - step0)).abs() < 1e-6, "{p:?} {step0}");
    let mut s = Moments { m: vec![], v: vec![], t: 0 };
    let mut q = [1.0f32];
    s.update(OptimizerKind::Sgd, &mut q, &[2.0], 0.25);
    assert_eq!(q[0], 0.5);
}

#[test]
fn schedules_and_settings_validation() {
    let d = DiepSettings::default();
    assert_eq!((d.objective, d.lr), (Objective::Kl, 0.02));
    let s = DiepSettings::paper();
    assert_eq!(s.objective, Objective::CeNorm);
    assert_eq!((s.lr, s.epochs, s.batch_size, s.alpha_steps, s.beta_steps, s.lambda), (5e-3, 10, 16, 3, 1, 0.01));
    assert_eq!(s.lr_at(0, 20), 5e-3);
    assert!((s.lr_at(10, 20) - 2.5e-3).abs() < 1e-15);
    assert!((s.tau_at(0, 20) - s.tau_start).abs() < 1e-15 && (s.tau_at(19, 20) - s.tau_end).abs() < 1e-15);
    let pattern: Vec<bool> = (0..8).map(|i| s.is_alpha_step(i)).collect();
    assert_eq!(pattern, [true, true, true, false, true, true, true, false]);
    assert_eq!(s.threshold, ThresholdMode::Implicit);
    for (bad, what) in [
        (DiepSettings { ratio: 1.0, ..s.clone() }, "ratio"),
        (DiepSettings { epochs: 0, ..s.clone() }, "epochs"),
        (DiepSettings { lr: -1.0, ..s.clone() }, "lr"),
        (DiepSettings { alpha_steps: 0, beta_steps: 0, ..s.clone() }, "alternation"),
        (DiepSettings { tau_end: 0.0, ..s.clone() }, "tau_end"),
    ] {
        assert!(bad.validate().unwrap_err().contains(what), "{what}");
    }
    assert!("nope".parse::<Objective>().unwrap_err().contains("ce-norm, kl, layer-wise"));
    let _ = BTreeMap::<usize, usize>::new();
}

/// `--allocation uniform` trains under the plan's per-layer counts: at the end of training each
/// layer's expected kept count `Σ_i σ((s_i − θ_l)/τ_end)`, with the layer's own threshold solved
/// on the final scores, equals the count the uniform plan keeps in that layer (tolerance 1e-6,
/// the bisection's); the same run under `global` has one pool, whose expected count is the
/// global budget. Nothing else differs between the modes: both go through `budget()`.
#[test]
fn uniform_training_expects_the_plans_count_in_every_layer() {
    let model = load();
    for allocation in [Allocation::Uniform, Allocation::Global] {
        let mut s = settings(RelaxationKind::RoutedGated, Objective::Kl);
        s.allocation = allocation;
        let st = run(&model, &s);
        let plan = pruning_plan(model.config(), &st, &Constraints::ungrouped(2, 2), 0, allocation, &device()).unwrap();
        let scores = diep_optim::expert_scores(&st.for_plan(), &device());
        let budget = diep_optim::budget(model.config(), &s);
        let th = diep_relax::Thresholds::solve(&budget, &scores, s.tau_end);
        let expected = |l: usize| -> f64 {
            let theta = th.theta[th.pool[&l][0]];
            scores[&l].iter().map(|x| 1.0 / (1.0 + (-(x - theta) / s.tau_end).exp())).sum()
        };
        match allocation {
            Allocation::Uniform => {
                assert_eq!(budget.pools(), plan.kept_experts.len(), "one pool per layer");
                for (l, kept) in &plan.kept_experts {
                    let e = expected(*l);
                    assert!(
                        (e - kept.len() as f64).abs() < 1e-6,
                        "layer {l}: expects {e}, the plan keeps {}",
                        kept.len()
                    );
                }
            }
            _ => {
                assert_eq!(budget.pools(), 1);
                let total: f64 = plan.kept_experts.keys().map(|l| expected(*l)).sum();
                let kept: usize = plan.kept_experts.values().map(Vec::len).sum();
                assert!((total - kept as f64).abs() < 1e-6, "expects {total}, the plan keeps {kept}");
            }
        }
    }
}

/// A statistics-based start ranks experts as the criterion does: within each layer by the
/// statistic, and under a global allocation (β set too) across layers by the raw statistic, at
/// any scale. Hand-built REAP scores whose layer totals differ, so β carries the difference.
#[test]
fn warm_start_scores_rank_like_the_criterion_in_both_allocations() {
    let reap = BTreeMap::from([
        (0usize, vec![4.0, 0.5, 2.0, 1.0]),
        (1, vec![0.25, 8.0, 3.0, 0.75]),
        (2, vec![1.5, 1.25, 0.1, 6.0]),
    ]);
    let shares = diep_optim::RoutingShares { tokens: 10, reap: reap.clone(), ..Default::default() };
    let experts: BTreeMap<usize, usize> = reap.iter().map(|(l, v)| (*l, v.len())).collect();
    for scale in [1.0, 0.5, 0.2] {
        for allocation in [Allocation::Global, Allocation::Uniform] {
            let s = DiepSettings {
                alpha_init: diep_optim::AlphaInit::Reap,
                alpha_init_scale: scale,
                allocation,
                ..Default::default()
            };
            let init = diep_optim::optimise::initial_alpha(&s, &shares);
            let mut st = DiepState::new(s.clone(), "x".into(), &experts);
            for (l, (alpha, log_beta)) in &init {
                let layer = st.layers.get_mut(l).unwrap();
                layer.alpha = alpha.clone();
                layer.log_beta = *log_beta;
            }
            let scores = diep_optim::expert_scores(&st, &device());
            // s = scale·ln v + c per layer; under global c is one constant for all layers.
            let offsets: Vec<f64> = reap
                .iter()
                .flat_map(|(l, v)| v.iter().zip(&scores[l]).map(|(x, s)| s - scale * x.ln()).collect::<Vec<_>>())
                .collect();
            for (l, v) in &reap {
                let c = scores[l][0] - scale * v[0].ln();
                for (x, sc) in v.iter().zip(&scores[l]) {
                    assert!((sc - scale * x.ln() - c).abs() < 1e-4, "{allocation:?} scale {scale} layer {l}");
                }
            }
            let spread = offsets.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                - offsets.iter().copied().fold(f64::INFINITY, f64::min);
            if allocation == Allocation::Global {
                assert!(spread < 1e-4, "scale {scale}: one constant over all layers, spread {spread}");
                // So the global plan is REAP's global plan: the 6 lowest raw scores go.
                let kept = diep_plan::select(&scores, 0.5, Allocation::Global, &Constraints::ungrouped(1, 1)).unwrap();
                let want: BTreeMap<usize, Vec<usize>> =
                    BTreeMap::from([(0, vec![0, 2]), (1, vec![1, 2]), (2, vec![0, 3])]);
                assert_eq!(kept, want);
            } else {
                assert!(init.values().all(|(_, b)| *b == 0.0), "β has no role under a uniform allocation");
            }
        }
    }
}

/// A warm start's own plan is the epoch selection's first candidate (epoch 0): the selected
/// plan's calibration objective is never worse than the start's. Under `auto` the three
/// statistics' plans are all scored and the lowest is the start.
#[test]
fn warm_start_plan_is_the_first_candidate_of_the_epoch_selection() {
    use diep_optim::AlphaInit;
    let model = load();
    for init in [AlphaInit::Reap, AlphaInit::Frequency, AlphaInit::Auto] {
        let s = DiepSettings {
            alpha_init: init,
            alpha_init_scale: 0.5,
            epochs: 2,
            batch_size: 4,
            ratio: 0.5,
            select_margin: 0.0,
            ..Default::default()
        };
        let mut warm = None;
        let st = optimise(&model, &calibration(), &s, None, |e| {
            if let Event::WarmStart { candidates, chosen } = e {
                warm = Some((candidates, chosen));
            }
            Ok(())
        })
        .unwrap();
        let (candidates, chosen) = warm.expect("the warm start is scored");
        let kinds: Vec<AlphaInit> = candidates.iter().map(|c| c.0).collect();
        match init {
            AlphaInit::Auto => {
                assert_eq!(kinds, [AlphaInit::Reap, AlphaInit::SoftActivation, AlphaInit::Frequency]);
            }
            other => assert_eq!(kinds, [other]),
        }
        let lowest = candidates.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
        assert_eq!(candidates.iter().find(|c| c.0 == chosen).unwrap().1, lowest, "{init:?}: the lowest is taken");
        assert_eq!(st.warm_start, Some(chosen));
        let best = st.best.as_ref().expect("a selected epoch");
        assert!(best.discrete <= lowest, "{init:?}: selected {} above the warm start's {lowest}", best.discrete);
        assert!(st.history.iter().all(|r| r.discrete.unwrap() >= best.discrete));
    }
}

/// The selection margin: with 0 the selected plan is the lowest-scoring candidate; with a margin
/// no difference can meet, the start's plan (epoch 0) stays; in between, a later plan replaces
/// the incumbent only when its paired t statistic over the calibration sequences is at most
/// −margin (checked against the per-sequence scores the state keeps).
#[test]
fn selection_margin_keeps_the_incumbent_unless_the_improvement_is_clear() {
    use diep_optim::{PlanScore, paired_t};
    let model = load();
    let base = DiepSettings { epochs: 3, batch_size: 4, ratio: 0.5, ..Default::default() };
    let loose = run(&model, &DiepSettings { select_margin: 0.0, ..base.clone() });
    let lowest = loose.history.iter().filter_map(|r| r.discrete).fold(f64::INFINITY, f64::min);
    let best = loose.best.as_ref().unwrap();
    assert!(best.discrete <= lowest);
    assert_eq!(best.per_sequence.len(), calibration().len());
    let mean = best.per_sequence.iter().sum::<f64>() / best.per_sequence.len() as f64;
    assert!((mean - best.discrete).abs() <= 1e-9 * mean);
    let strict = run(&model, &DiepSettings { select_margin: 1e9, select_gain: 0.0, ..base.clone() });
    assert_eq!(strict.best.as_ref().unwrap().epoch, 0, "no improvement reaches 1e9 standard errors");
    // Hand-computed: d = (−0.5, −0.5, −0.2, −0.6), mean −0.45, sd √0.03, t = −0.45 / (√0.03 / 2).
    let (a, b) = ([1.0, 2.0, 3.0, 4.0], [1.5, 2.5, 3.2, 4.6]);
    let t = paired_t(&a, &b).unwrap();
    assert!((t - (-0.45 / (0.03f64.sqrt() / 2.0))).abs() < 1e-12, "{t}");
    assert!(paired_t(&[1.0, 2.0], &[2.0, 3.0]).is_none(), "equal differences have no spread");
    let incumbent =
        diep_optim::BestEpoch { epoch: 0, discrete: 3.075, params: Default::default(), per_sequence: b.to_vec() };
    let candidate = PlanScore { loss: 2.5, per_sequence: a.to_vec() };
    assert!(incumbent.is_beaten_by(&candidate, 0.0, 0.0));
    assert!(incumbent.is_beaten_by(&candidate, 5.0, 0.0), "t ≈ −5.2");
    assert!(!incumbent.is_beaten_by(&candidate, 5.5, 0.0));
    // The gain: 2.5 is 18.7 % below 3.075, so a gain of 0.15 replaces it whatever the margin,
    // one of 0.2 leaves the margin to decide.
    assert!(incumbent.is_beaten_by(&candidate, 5.5, 0.15));
    assert!(!incumbent.is_beaten_by(&candidate, 5.5, 0.2));
    let worse = PlanScore { loss: 3.1, per_sequence: b.iter().map(|x| x + 0.1).collect() };
    assert!(!incumbent.is_beaten_by(&worse, 0.0, 0.0), "a higher mean never replaces");
    assert!(!incumbent.is_beaten_by(&worse, 0.0, 0.1), "a higher mean never replaces");
    // A gain confined to one sequence: d = (−0.8, 0.01, −0.01, 0), mean −0.2, sd 0.4001, so
    // t = −1.0: the margin of 2 keeps the incumbent, the 20 % gain replaces it.
    let flat =
        diep_optim::BestEpoch { epoch: 0, discrete: 1.0, params: Default::default(), per_sequence: vec![1.0; 4] };
    let one_domain = PlanScore { loss: 0.8, per_sequence: vec![0.2, 1.01, 0.99, 1.0] };
    let t = paired_t(&one_domain.per_sequence, &flat.per_sequence).unwrap();
    assert!((t + 0.2 / (0.48020f64 / 3.0).sqrt() * 2.0).abs() < 1e-9, "{t}");
    assert!(!flat.is_beaten_by(&one_domain, 2.0, 0.0));
    assert!(flat.is_beaten_by(&one_domain, 2.0, 0.1));
    assert!(!flat.is_beaten_by(&one_domain, 2.0, 0.25));
    // A negative or non-finite margin, and a gain outside [0, 1), are refused by name.
    for m in [-1.0, f64::NAN] {
        let err = DiepSettings { select_margin: m, ..base.clone() }.validate().unwrap_err();
        assert!(err.contains("select_margin"), "{err}");
    }
    for g in [-0.1, 1.0, f64::NAN] {
        let err = DiepSettings { select_gain: g, ..base.clone() }.validate().unwrap_err();
        assert!(err.contains("select_gain"), "{err}");
    }
}

/// Early stopping only truncates: the epochs a `patience` run does are those of the run without
/// stopping (same losses, same plan scores; the schedules are the whole run's), it stops before
/// the first epoch at which `patience` epochs have passed since the selected plan's, and a
/// resumed stopped run does no more epochs.
#[test]
fn early_stopping_truncates_the_same_run() {
    let model = load();
    let ids = calibration();
    let base =
        DiepSettings { epochs: 6, batch_size: 4, ratio: 0.5, select_margin: 0.0, patience: 0, ..Default::default() };
    let mut warm = f64::NAN;
    let full = optimise(&model, &ids, &base, None, |e| {
        if let Event::WarmStart { candidates, .. } = e {
            warm = candidates.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(full.epochs_done, 6);
    for patience in [1, 2] {
        // The selection with margin 0 by hand: the lowest score so far, the start's as epoch 0.
        let (mut best, mut best_epoch, mut expected) = (warm, 0, 6);
        for r in &full.history {
            if r.epoch - 1 - best_epoch >= patience {
                expected = r.epoch - 1;
                break;
            }
            if r.discrete.unwrap() < best {
                (best, best_epoch) = (r.discrete.unwrap(), r.epoch);
            }
        }
        let s = DiepSettings { patience, ..base.clone() };
        let mut stopped = None;
        let short = optimise(&model, &ids, &s, None, |e| {
            if let Event::StoppedEarly { epochs_done, selected } = e {
                stopped = Some((epochs_done, selected));
            }
            Ok(())
        })
        .unwrap();
        assert!(patience > 1 || expected < 6, "patience 1 stops this run early (the check is not vacuous)");
        assert_eq!(short.epochs_done, expected, "patience {patience}");
        assert_eq!(stopped.is_some(), expected < 6);
        let same = |a: &diep_optim::EpochRecord, b: &diep_optim::EpochRecord| {
            (a.epoch, a.loss, a.discrete, a.lr, a.tau) == (b.epoch, b.loss, b.discrete, b.lr, b.tau)
        };
        assert!(short.history.iter().zip(&full.history).all(|(a, b)| same(a, b)), "patience {patience}");
        assert_eq!(short.best.as_ref().unwrap().epoch, best_epoch);
        if let Some((done, selected)) = stopped {
            assert_eq!((done, selected), (expected, best_epoch));
            assert!(done - selected >= patience);
            let resumed = optimise(&model, &ids, &s, Some(short.clone()), |_| Ok(())).unwrap();
            assert_eq!(resumed, short, "a stopped run stays stopped on resume");
        }
    }
}
