//! The discrete searches: greedy's first step against an exhaustive single-expert scan done
//! independently (whole-model forwards with masks), refinement never raising the objective, and
//! the per-sequence objective the epoch selection compares against the same independent KL.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::burn::tensor::Device;
use diep_models::burn::tensor::activation::log_softmax;
use diep_models::{DeviceSpec, MoeModel, StreamingModel};
use diep_optim::{Evaluator, SearchOptions, greedy_search, refine};
use diep_plan::{Allocation, Constraints, Kept};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap()
}

fn calibration(name: &str) -> Vec<Vec<u32>> {
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(root().join("parity").join(name).join("ids.json")).unwrap())
            .unwrap();
    (0..4)
        .map(|i| {
            let mut s = ids[i % ids.len()].clone();
            s.rotate_left(i);
            s
        })
        .collect()
}

/// Exact `KL(original ‖ masked)` per position, from two whole-model forwards.
fn exact_kl(model: &mut MoeModel, ids: &[Vec<u32>], masks: &BTreeMap<usize, Vec<bool>>) -> f64 {
    model.clear_expert_masks();
    let p = log_softmax(model.forward(ids).unwrap(), 2);
    for (l, m) in masks {
        model.set_expert_mask(*l, Some(m)).unwrap();
    }
    let q = log_softmax(model.forward(ids).unwrap(), 2);
    model.clear_expert_masks();
    let [b, t, _] = p.dims();
    let kl = (p.clone().exp() * (p - q)).sum() / (b * t) as f64;
    kl.into_data().iter::<f32>().next().unwrap() as f64
}

#[test]
fn greedy_first_step_is_the_best_single_removal() {
    let name = "tiny-mixtral";
    let mut model = MoeModel::load(root().join("models").join(name), &device()).unwrap();
    let ids = calibration(name);
    let counts = diep_plan::expert_counts(model.config());
    let total: usize = counts.values().sum();
    // Exhaustive scan: every single expert removed alone.
    let mut scan = Vec::new();
    for (l, n) in &counts {
        for e in 0..*n {
            let mut masks: BTreeMap<usize, Vec<bool>> = counts.iter().map(|(l, n)| (*l, vec![true; *n])).collect();
            masks.get_mut(l).unwrap()[e] = false;
            scan.push((exact_kl(&mut model, &ids, &masks), *l, e));
        }
    }
    scan.sort_by(|a, b| a.0.total_cmp(&b.0));
    let opts = SearchOptions { reference_top_k: 0, ..Default::default() };
    let c = Constraints::for_model(model.config(), 0);
    let out =
        greedy_search(&model, &ids, 1.0 / total as f64, Allocation::Global, &c, &opts, 1e9, |_, _, _| Ok(())).unwrap();
    assert_eq!(out.moves.len(), 1);
    assert_eq!(out.moves[0].removed, vec![(scan[0].1, scan[0].2)], "scan: {:?}", &scan[..3]);
    assert!((out.loss_after - scan[0].0).abs() <= 1e-5 * scan[0].0.max(1e-6), "{} vs {}", out.loss_after, scan[0].0);
    // Two removals under a uniform allocation: one per layer.
    let out = greedy_search(&model, &ids, 0.125, Allocation::Uniform, &c, &opts, 1e9, |_, _, _| Ok(())).unwrap();
    assert!(out.kept.values().all(|k| k.len() == 7), "{:?}", out.kept);
    // The cost limit refuses before computing, naming the estimate.
    let err = greedy_search(&model, &ids, 0.5, Allocation::Global, &c, &opts, 10.0, |_, _, _| panic!("no step"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("forward passes") && err.contains("--search-max-passes"), "{err}");
}

#[test]
fn refinement_never_raises_the_objective() {
    for (name, allocation) in [("tiny-qwen2-moe", Allocation::Global), ("tiny-mixtral", Allocation::Uniform)] {
        let mut model = MoeModel::load(root().join("models").join(name), &device()).unwrap();
        let streaming = StreamingModel::open(root().join("models").join(name), &device()).unwrap();
        let ids = calibration(name);
        let counts = diep_plan::expert_counts(model.config());
        // A poor start: the first half of every layer.
        let kept: Kept = counts.iter().map(|(l, n)| (*l, (0..n / 2).collect())).collect();
        let c = Constraints::for_model(model.config(), 0);
        let opts = SearchOptions { reference_top_k: 0, ..Default::default() };
        let out = refine(&streaming, &ids, &kept, None, 3, allocation, &c, &opts, |_, _, _| Ok(())).unwrap();
        assert!(out.loss_after <= out.loss_before, "{name}: {} > {}", out.loss_after, out.loss_before);
        assert!(!out.moves.is_empty(), "{name}: a half-layer start can be improved");
        let mut last = out.loss_before;
        for m in &out.moves {
            assert!(m.loss < last, "{name}: {m:?}");
            last = m.loss;
        }
        // Counts are kept under a uniform allocation, the total under a global one.
        let total = |k: &Kept| k.values().map(Vec::len).sum::<usize>();
        assert_eq!(total(&out.kept), total(&kept));
        if allocation == Allocation::Uniform {
            assert!(out.kept.iter().all(|(l, k)| k.len() == kept[l].len()));
        }
        // The reported objective is the plan's, computed independently.
        let masks = out.kept.iter().map(|(l, k)| (*l, (0..counts[l]).map(|e| k.contains(&e)).collect())).collect();
        let exact = exact_kl(&mut model, &ids, &masks);
        assert!((out.loss_after - exact).abs() <= 1e-5 * exact, "{name}: {} vs {exact}", out.loss_after);
    }
}

/// The objective on each sequence (what the epoch selection compares plan against plan) equals
/// the exact KL of that sequence alone from whole-model forwards, exact reference or top-k
/// (then it is the coarsened KL: never above the exact one); their mean is the loss.
#[test]
fn per_sequence_objective_matches_whole_model_kl() {
    let name = "tiny-mixtral";
    let mut model = MoeModel::load(root().join("models").join(name), &device()).unwrap();
    let ids = calibration(name);
    let counts = diep_plan::expert_counts(model.config());
    let kept: Kept = counts.iter().map(|(l, n)| (*l, (1..*n).step_by(2).collect())).collect();
    let masks: BTreeMap<usize, Vec<bool>> =
        kept.iter().map(|(l, k)| (*l, (0..counts[l]).map(|e| k.contains(&e)).collect())).collect();
    let per_seq: Vec<f64> = ids.iter().map(|s| exact_kl(&mut model, std::slice::from_ref(s), &masks)).collect();
    for (top_k, micro_batch) in [(0, 0), (0, 3), (8, 0)] {
        let opts = SearchOptions { reference_top_k: top_k, micro_batch, ..Default::default() };
        let eval = Evaluator::new(&model, &ids, Some(&kept), &opts).unwrap();
        let got = eval.sequence_losses();
        assert_eq!(got.len(), ids.len());
        for (g, e) in got.iter().zip(&per_seq) {
            if top_k == 0 {
                assert!((g - e).abs() <= 1e-5 * e.max(1e-6), "k {top_k}: {got:?} vs {per_seq:?}");
            } else {
                assert!(*g <= e * (1.0 + 1e-5) && *g > 0.0, "k {top_k}: {got:?} vs {per_seq:?}");
            }
        }
        let mean = got.iter().sum::<f64>() / got.len() as f64;
        assert!((eval.loss() - mean).abs() <= 1e-9 * mean, "{} vs {mean}", eval.loss());
    }
}
