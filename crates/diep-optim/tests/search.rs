//! The discrete searches: greedy's first step against an exhaustive single-expert scan done
//! independently (whole-model forwards with masks), refinement never raising the objective (with
//! and without screening, each accepted move clearly better under the acceptance rule), and the
//! per-sequence objective the epoch selection compares against the same independent KL.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::burn::tensor::Device;
use diep_models::burn::tensor::activation::log_softmax;
use diep_models::{DeviceSpec, MoeModel, StreamingModel};
use diep_optim::{Evaluator, SearchOptions, changed_layers, greedy_search, paired_t, refine, refine_round_cost};
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

/// `true` for each kept expert of every MoE layer.
fn masks_of(kept: &Kept, counts: &BTreeMap<usize, usize>) -> BTreeMap<usize, Vec<bool>> {
    kept.iter().map(|(l, k)| (*l, (0..counts[l]).map(|e| k.contains(&e)).collect())).collect()
}

/// A fixture model loaded whole (for independent KLs) and streamed (what the refinement runs
/// on), its calibration, expert counts and constraints, and a poor start: the first half of
/// every layer.
struct HalfStart {
    model: MoeModel,
    streaming: StreamingModel,
    ids: Vec<Vec<u32>>,
    counts: BTreeMap<usize, usize>,
    kept: Kept,
    c: Constraints,
}

fn half_start(name: &str) -> HalfStart {
    let model = MoeModel::load(root().join("models").join(name), &device()).unwrap();
    let streaming = StreamingModel::open(root().join("models").join(name), &device()).unwrap();
    let ids = calibration(name);
    let counts = diep_plan::expert_counts(model.config());
    let kept: Kept = counts.iter().map(|(l, n)| (*l, (0..n / 2).collect())).collect();
    let c = Constraints::for_model(model.config(), 0);
    HalfStart { model, streaming, ids, counts, kept, c }
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
        let HalfStart { mut model, streaming, ids, counts, kept, c } = half_start(name);
        let opts = SearchOptions { reference_top_k: 0, ..Default::default() };
        let out = refine(&streaming, &ids, &kept, None, 8, allocation, &c, &opts, |_, _, _| Ok(())).unwrap();
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
        let exact = exact_kl(&mut model, &ids, &masks_of(&out.kept, &counts));
        assert!((out.loss_after - exact).abs() <= 1e-5 * exact, "{name}: {} vs {exact}", out.loss_after);
        // Rounds: numbered from 1 in order; after the first, a swap within a layer is made only in
        // a layer the round before changed.
        assert!((1..=8).contains(&out.rounds), "{name}: {} rounds", out.rounds);
        assert!(out.moves.windows(2).all(|w| w[0].round <= w[1].round) && out.moves[0].round == 1);
        assert!(out.moves.iter().all(|m| m.round <= out.rounds));
        let changed_in = |r: usize| changed_layers(out.moves.iter().filter(|m| m.round == r));
        for m in out.moves.iter().filter(|m| m.round > 1 && m.removed[0].0 == m.restored[0].0) {
            assert!(changed_in(m.round - 1).contains(&m.removed[0].0), "{name}: {m:?}");
        }
        // Stopped before the limit: the last round changed nothing, so no swap within a layer the
        // round before it changed lowers the objective (every swap of those layers, whole-model KL).
        if out.rounds < 8 {
            assert!(out.moves.iter().all(|m| m.round < out.rounds), "{name}: {:?}", out.moves);
            let plan = masks_of(&out.kept, &counts);
            for l in changed_in(out.rounds - 1) {
                for out_e in (0..counts[&l]).filter(|e| plan[&l][*e]) {
                    for in_e in (0..counts[&l]).filter(|e| !plan[&l][*e]) {
                        let mut m = plan.clone();
                        m.get_mut(&l).unwrap()[out_e] = false;
                        m.get_mut(&l).unwrap()[in_e] = true;
                        let kl = exact_kl(&mut model, &ids, &m);
                        assert!(kl >= exact * (1.0 - 1e-5), "{name}: layer {l}, {out_e} for {in_e}: {kl} < {exact}");
                    }
                }
            }
        }
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
    let masks = masks_of(&kept, &counts);
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

/// Screened refinement (candidates scored on 2 of the 4 sequences first) under an acceptance
/// margin: every accepted move is checked against independent whole-model KLs per sequence —
/// lower mean, and a paired t at most −margin or a gain of at least the fraction `gain`.
/// With an unreachable rule nothing moves.
#[test]
fn screened_refinement_accepts_only_clear_improvements() {
    let HalfStart { mut model, streaming, ids, counts, kept, c } = half_start("tiny-qwen2-moe");
    let (margin, gain) = (2.0, 0.05);
    let opts = SearchOptions {
        reference_top_k: 0,
        screen_samples: 2,
        confirm: 2,
        accept_margin: margin,
        accept_gain: gain,
        ..Default::default()
    };
    // One round's cost stays within its estimate (2 of the 4 sequences whole: half the tokens).
    let one = refine(&streaming, &ids, &kept, None, 1, Allocation::Global, &c, &opts, |_, _, _| Ok(())).unwrap();
    let len = ids[0].len();
    let estimate = refine_round_cost(&kept, &counts, model.config().num_layers, Allocation::Global, &c, &opts, 4, len);
    assert!(one.forward_passes <= estimate + 1e-9, "{} > {estimate}", one.forward_passes);
    let out = refine(&streaming, &ids, &kept, None, 3, Allocation::Global, &c, &opts, |_, _, _| Ok(())).unwrap();
    assert_eq!(out.screen_samples, 2);
    assert!(!out.moves.is_empty(), "a half-layer start can be improved clearly");
    // Replay the moves on the plan and check each against per-sequence KLs from whole forwards.
    let mut plan = masks_of(&kept, &counts);
    let per_seq = |model: &mut MoeModel, masks: &BTreeMap<usize, Vec<bool>>| -> Vec<f64> {
        ids.iter().map(|s| exact_kl(model, std::slice::from_ref(s), masks)).collect()
    };
    let mut before = per_seq(&mut model, &plan);
    for m in &out.moves {
        for (l, e) in &m.removed {
            plan.get_mut(l).unwrap()[*e] = false;
        }
        for (l, e) in &m.restored {
            plan.get_mut(l).unwrap()[*e] = true;
        }
        let after = per_seq(&mut model, &plan);
        let (mb, ma) = (before.iter().sum::<f64>() / 4.0, after.iter().sum::<f64>() / 4.0);
        assert!((m.loss - ma).abs() <= 1e-5 * ma, "{m:?}: {ma}");
        assert!(ma < mb, "{m:?}: {ma} >= {mb}");
        let t = paired_t(&after, &before).unwrap_or(f64::NEG_INFINITY);
        assert!(t <= -margin + 1e-6 || ma <= (1.0 - gain) * mb * (1.0 + 1e-6), "{m:?}: t {t}, {ma} vs {mb}");
        before = after;
    }
    assert!((out.loss_after - before.iter().sum::<f64>() / 4.0).abs() <= 1e-5 * out.loss_after);
    // A rule no change can meet keeps the plan.
    let strict = SearchOptions { accept_margin: 1e9, accept_gain: 0.999, ..opts };
    let out = refine(&streaming, &ids, &kept, None, 3, Allocation::Global, &c, &strict, |_, _, _| Ok(())).unwrap();
    assert!(out.moves.is_empty() && out.kept == kept, "{:?}", out.moves);
}

/// A store cut to some sequences scores them as the whole store does, and cut to their first
/// tokens as a reference computed on those tokens alone; a candidate's score per sequence
/// equals the exact KL of that sequence under the candidate plan.
#[test]
fn reference_subset_scores_its_sequences_alike() {
    let name = "tiny-mixtral";
    let model = MoeModel::load(root().join("models").join(name), &device()).unwrap();
    let mut independent = MoeModel::load(root().join("models").join(name), &device()).unwrap();
    let ids = calibration(name);
    let counts = diep_plan::expert_counts(model.config());
    let kept: Kept = counts.iter().map(|(l, n)| (*l, (1..*n).step_by(2).collect())).collect();
    for top_k in [0, 8] {
        let opts = SearchOptions { reference_top_k: top_k, ..Default::default() };
        let whole = Evaluator::new(&model, &ids, Some(&kept), &opts).unwrap();
        let picked = [3, 1];
        let sub_ids: Vec<Vec<u32>> = picked.iter().map(|i| ids[*i].clone()).collect();
        let store = whole.reference().subset(&picked);
        let sub =
            Evaluator::with_reference(&model, &sub_ids, std::borrow::Cow::Owned(store), Some(&kept), &opts).unwrap();
        for (j, i) in picked.iter().enumerate() {
            let (a, b) = (sub.sequence_losses()[j], whole.sequence_losses()[*i]);
            assert!((a - b).abs() <= 1e-6 * b.max(1e-9), "k {top_k}, seq {i}: {a} vs {b}");
        }
        // Cut to the first 5 tokens: as a reference computed afresh on those 5 tokens alone.
        let short: Vec<Vec<u32>> = sub_ids.iter().map(|s| s[..5].to_vec()).collect();
        let cut = whole.reference().prefixes(&picked, 5);
        let cut = Evaluator::with_reference(&model, &short, std::borrow::Cow::Owned(cut), Some(&kept), &opts).unwrap();
        let fresh = Evaluator::new(&model, &short, Some(&kept), &opts).unwrap();
        for (a, b) in cut.sequence_losses().iter().zip(fresh.sequence_losses()) {
            assert!((a - b).abs() <= 1e-5 * b.max(1e-9), "k {top_k}, prefixes: {a} vs {b}");
        }
    }
    let opts = SearchOptions { reference_top_k: 0, ..Default::default() };
    let mut whole = Evaluator::new(&model, &ids, Some(&kept), &opts).unwrap();
    let mut masks = masks_of(&kept, &counts);
    let last = *masks.keys().last().unwrap();
    let m = masks.get_mut(&last).unwrap();
    m[0] = true;
    m[1] = false;
    let change = BTreeMap::from([(last, m.clone())]);
    let scored = whole.evaluate_scores(&[change]).unwrap().remove(0);
    let exact: Vec<f64> = ids.iter().map(|s| exact_kl(&mut independent, std::slice::from_ref(s), &masks)).collect();
    for (g, e) in scored.per_sequence.iter().zip(&exact) {
        assert!((g - e).abs() <= 1e-5 * e.max(1e-6), "{:?} vs {exact:?}", scored.per_sequence);
    }
    let mean = exact.iter().sum::<f64>() / exact.len() as f64;
    assert!((scored.loss - mean).abs() <= 1e-5 * mean);
}
