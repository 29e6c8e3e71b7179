//! Expert similarity (linear CKA) and merge groups on a fixture model.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::{DeviceSpec, MoeModel};
use diep_prune::similarity::{LayerSimilarity, expert_similarity, merge_groups};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn cka_is_a_normalised_symmetric_similarity_and_masks_change_the_ratio() {
    let device = DeviceSpec::from_test_env().unwrap().device().unwrap();
    let model = MoeModel::load(root().join("models/tiny-mixtral"), &device).unwrap();
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(root().join("parity/tiny-mixtral/ids.json")).unwrap()).unwrap();
    let sim = expert_similarity(&model, &ids, &BTreeMap::new(), 40, |_, _| {}).unwrap();
    assert_eq!(sim.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    for s in sim.values() {
        assert_eq!(s.tokens, 40);
        for i in 0..8 {
            assert!((s.cka[i][i] - 1.0).abs() < 1e-4, "{:?}", s.cka[i]);
            for j in 0..8 {
                assert!((s.cka[i][j] - s.cka[j][i]).abs() < 1e-5);
                assert!(s.cka[i][j] >= 0.0 && s.cka[i][j] <= 1.0 + 1e-6);
            }
        }
        let r = s.median_weight_ratio.unwrap();
        assert!(r > 0.0 && r <= 1.0, "w1/w0 ≤ 1 by top-k order: {r}");
    }
    // With all but the top-k experts masked the pass runs through the pruned model.
    let keep = BTreeMap::from([(0, vec![true, true, false, false, false, false, false, false])]);
    let masked = expert_similarity(&model, &ids, &keep, 40, |_, _| {}).unwrap();
    assert_ne!(masked[&0].median_weight_ratio, sim[&0].median_weight_ratio);
    assert_eq!(masked[&0].cka, sim[&0].cka, "layer 0's inputs do not depend on its own mask");
}

#[test]
fn merge_groups_fold_into_the_most_similar_kept_expert_with_softmax_weights() {
    let cka =
        vec![vec![1.0, 0.2, 0.9, 0.1], vec![0.2, 1.0, 0.3, 0.6], vec![0.9, 0.3, 1.0, 0.4], vec![0.1, 0.6, 0.4, 1.0]];
    let sim = BTreeMap::from([(3, LayerSimilarity { cka, median_weight_ratio: None, tokens: 8 })]);
    let groups = merge_groups(&sim, &BTreeMap::from([(3, vec![0, 1])]));
    // 2 is closest to 0 (0.9), 3 to 1 (0.6).
    let g = &groups[&3];
    let z0 = 1f64.exp() + 0.9f64.exp();
    assert_eq!(g[&0].iter().map(|m| m.0).collect::<Vec<_>>(), vec![0, 2]);
    assert!((g[&0][0].1 - 1f64.exp() / z0).abs() < 1e-12 && (g[&0][1].1 - 0.9f64.exp() / z0).abs() < 1e-12);
    assert_eq!(g[&1].iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!((g[&1].iter().map(|m| m.1).sum::<f64>() - 1.0).abs() < 1e-12);
}
