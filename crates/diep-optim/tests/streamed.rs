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

/// The host path of the exact `kl` (one pass over each row on the CPU) against burn's ops: the
/// same sum, per sequence and in all, and the same gradient with respect to the logits as
/// autodiff through `log_softmax`. Against a hand computation in `f64` where the reference gives
/// a token no mass (burn's ops give NaN there: 0 · log 0).
#[test]
fn host_kl_and_its_gradient_equal_burns_ops() {
    use diep_models::burn::tensor::{Tensor, TensorData};
    use diep_optim::ReferenceStore;
    let (n, t, v) = (3, 5, 37);
    // Deterministic logits of moderate range.
    let value = |seed: usize, i: usize| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 6.0;
    let reference = |s: usize, impossible: bool| {
        let mut z: Vec<f32> = (0..t * v).map(|i| value(s, i)).collect();
        if impossible {
            z[v - 1] = f32::NEG_INFINITY;
        }
        z
    };
    let seqs = [2, 1];
    let dev = device();
    let relaxed: Vec<f32> = (0..seqs.len() * t * v).map(|i| value(7, i) * 0.8 + 0.1).collect();
    let logits = Tensor::<2>::from_data(TensorData::new(relaxed.clone(), [seqs.len() * t, v]), &dev).require_grad();
    let scale = 0.25;
    for impossible in [false, true] {
        let mut store = ReferenceStore::new(n, t, v, 0);
        for s in 0..n {
            // With `impossible`, the first position of sequence 1 gives its last token p = 0.
            store.insert(s, &reference(s, impossible && s == 1));
        }
        let Some((sum, dz)) = store.kl_sum_and_grad(&seqs, &logits, scale) else {
            // Only the CPU device has the host path; elsewhere the step uses `kl_sum`.
            assert!(!diep_models::kernels::host_rows_on(&dev));
            return;
        };
        let host: Vec<f32> = dz.into_data().iter::<f32>().collect();
        assert!(sum.is_finite() && host.iter().all(|x| x.is_finite()));
        // Each row of the gradient sums to zero (q and p are both distributions).
        for row in host.chunks_exact(v) {
            assert!(row.iter().map(|x| *x as f64).sum::<f64>().abs() < 1e-7);
        }
        let per_seq = store.kl_per_sequence(&seqs, logits.clone().detach());
        assert!((per_seq.iter().sum::<f64>() - sum).abs() <= 1e-9 * sum.abs(), "{per_seq:?} vs {sum}");
        // By hand, in f64: Σ p (log p − log q) over the tokens with p > 0.
        let log_softmax = |z: &[f32]| -> Vec<f64> {
            let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + z.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln();
            z.iter().map(|x| *x as f64 - lse).collect()
        };
        let mut by_hand = 0.0;
        for (j, s) in seqs.iter().enumerate() {
            let r = reference(*s, impossible && *s == 1);
            for pos in 0..t {
                let lp = log_softmax(&r[pos * v..(pos + 1) * v]);
                let lq = log_softmax(&relaxed[(j * t + pos) * v..(j * t + pos + 1) * v]);
                by_hand +=
                    lp.iter().zip(&lq).filter(|(a, _)| a.is_finite()).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
            }
        }
        assert!((sum - by_hand).abs() <= 1e-5 * by_hand, "sum {sum} vs {by_hand} by hand");
        if impossible {
            continue;
        }
        let kl = store.kl_sum(&seqs, logits.clone());
        let burn_sum = kl.clone().into_data().iter::<f32>().next().unwrap() as f64;
        assert!((sum - burn_sum).abs() <= 1e-5 * burn_sum.abs(), "sum {sum} vs burn's {burn_sum}");
        let grads = (kl * scale).backward();
        let g: Vec<f32> = logits.grad(&grads).unwrap().into_data().iter::<f32>().collect();
        assert_eq!(g.len(), host.len());
        let worst = g.iter().zip(&host).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-7, "largest gradient difference {worst:e}");
    }
}
