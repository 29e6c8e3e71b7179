//! The streamed end-to-end objectives against the whole-model autodiff reference: the same α/β
//! gradients for every relaxation and objective, micro-batches summing to the whole batch, and
//! one layer resident at a time when streaming from disk.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::burn::tensor::Device;
use diep_models::{DeviceSpec, MoeModel, StreamingModel};
use diep_optim::optimise::{reference_step_grads, streamed_step_grads};
use diep_optim::{
    DiepSettings, DiepState, Objective, Offload, RelaxationKind, StepGrads, StreamOptions, ThresholdMode, fingerprint,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap().autodiff()
}

fn calibration(name: &str) -> Vec<Vec<u32>> {
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(root().join("parity").join(name).join("ids.json")).unwrap())
            .unwrap();
    (0..6)
        .map(|i| {
            let mut s = ids[i % ids.len()].clone();
            s.rotate_left(i);
            s
        })
        .collect()
}

/// A state away from the initial point: distinct α per expert and β per layer.
fn state(model: &MoeModel, ids: &[Vec<u32>], settings: DiepSettings) -> DiepState {
    let experts = diep_plan::expert_counts(model.config());
    let mut st = DiepState::new(settings, fingerprint(ids), &experts);
    for (j, (_, layer)) in st.layers.iter_mut().enumerate() {
        let n = layer.alpha.len();
        layer.alpha = (0..n).map(|e| ((e * 7 + j * 3) % n) as f32 * 0.3 - 0.8).collect();
        layer.log_beta = 0.2 * j as f32 - 0.1;
    }
    st
}

/// `‖a − b‖ / ‖b‖` over all of the step's gradients (α of every layer, or β of every layer).
fn max_rel(a: &StepGrads, b: &StepGrads) -> f64 {
    assert_eq!(a.alpha.keys().collect::<Vec<_>>(), b.alpha.keys().collect::<Vec<_>>());
    assert_eq!(a.log_beta.keys().collect::<Vec<_>>(), b.log_beta.keys().collect::<Vec<_>>());
    let flat = |g: &StepGrads| -> Vec<f64> {
        g.alpha.values().flatten().chain(g.log_beta.values()).map(|x| *x as f64).collect()
    };
    let (a, b) = (flat(a), flat(b));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    diff / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-30)
}

fn check(name: &str, relaxation: RelaxationKind, threshold: ThresholdMode, objective: Objective) {
    let model = MoeModel::load(root().join("models").join(name), &device()).unwrap();
    let streaming = StreamingModel::open(root().join("models").join(name), &device()).unwrap();
    let ids = calibration(name);
    let settings = DiepSettings { relaxation, threshold, objective, reference_top_k: 0, ..Default::default() };
    let st = state(&model, &ids, settings);
    let batch = [4, 1, 3, 0];
    for alpha_phase in [true, false] {
        let reference = reference_step_grads(&model, &ids, &batch, &st, alpha_phase, 0.1).unwrap();
        assert!(reference.alpha.values().flatten().chain(reference.log_beta.values()).any(|g| g.abs() > 1e-6));
        for (source, micro_batch) in [("memory", 0), ("memory", 1), ("disk", 3)] {
            let opts = StreamOptions { micro_batch, offload: Offload::Host };
            let streamed = if source == "memory" {
                streamed_step_grads(&model, &ids, &batch, &st, alpha_phase, 0.1, &opts).unwrap()
            } else {
                streamed_step_grads(&streaming, &ids, &batch, &st, alpha_phase, 0.1, &opts).unwrap()
            };
            let what = format!("{name} {relaxation} {threshold} {objective} α {alpha_phase} {source} mb {micro_batch}");
            assert!(
                (streamed.loss - reference.loss).abs() <= 1e-5 * reference.loss.abs().max(1e-3),
                "{what}: loss {} vs {}",
                streamed.loss,
                reference.loss
            );
            let err = max_rel(&streamed, &reference);
            eprintln!("{what}: max relative gradient difference {err:.2e}");
            assert!(err < 1e-6, "{what}: {err:e}\n{streamed:?}\n{reference:?}");
        }
    }
}

#[test]
fn streamed_kl_gradients_equal_the_whole_model_gradients() {
    check("tiny-mixtral", RelaxationKind::RoutedGated, ThresholdMode::Implicit, Objective::Kl);
    check("tiny-qwen2-moe", RelaxationKind::Routed, ThresholdMode::Implicit, Objective::Kl);
}

#[test]
fn streamed_ce_norm_gradients_equal_the_whole_model_gradients() {
    check("tiny-mixtral", RelaxationKind::Paper, ThresholdMode::Implicit, Objective::CeNorm);
    check("tiny-mixtral", RelaxationKind::Routed, ThresholdMode::Fixed, Objective::CeNorm);
    check("tiny-deepseek-v3", RelaxationKind::RoutedGated, ThresholdMode::Implicit, Objective::CeNorm);
}

#[test]
fn micro_batches_sum_to_the_whole_batch() {
    let model = MoeModel::load(root().join("models/tiny-olmoe"), &device()).unwrap();
    let ids = calibration("tiny-olmoe");
    let st = state(&model, &ids, DiepSettings::default());
    let batch = [0, 1, 2, 3, 4, 5];
    let whole = streamed_step_grads(&model, &ids, &batch, &st, true, 0.05, &StreamOptions::default()).unwrap();
    for micro_batch in [1, 2, 4] {
        let opts = StreamOptions { micro_batch, ..Default::default() };
        let parts = streamed_step_grads(&model, &ids, &batch, &st, true, 0.05, &opts).unwrap();
        assert!((parts.loss - whole.loss).abs() <= 1e-6 * whole.loss.abs(), "mb {micro_batch}");
        let err = max_rel(&parts, &whole);
        assert!(err < 1e-6, "micro-batch {micro_batch}: {err:e}");
    }
}

#[test]
fn one_layer_is_resident_at_a_time() {
    let name = "tiny-deepseek-v3"; // a dense first layer: backward stops at the first MoE layer
    let streaming = StreamingModel::open(root().join("models").join(name), &device()).unwrap();
    let ids = calibration(name);
    let model = MoeModel::load(root().join("models").join(name), &device()).unwrap();
    let st = state(&model, &ids, DiepSettings { reference_top_k: 8, ..Default::default() });
    let layers = streaming.config().num_layers;
    streamed_step_grads(&streaming, &ids, &[0, 1, 2], &st, true, 0.05, &StreamOptions::default()).unwrap();
    // The reference pass and the step's forward load every layer once, the backward every layer
    // from the first MoE layer up.
    let first_moe = streaming.config().moe_layers()[0];
    let expect: Vec<usize> = (0..layers).map(|l| 2 + usize::from(l >= first_moe)).collect();
    assert_eq!(streaming.residency().loads(), expect);
    assert_eq!(streaming.residency().max_resident(), 1);
    let _ = BTreeMap::<usize, usize>::new();
}
