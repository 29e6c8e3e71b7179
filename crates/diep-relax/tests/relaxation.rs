//! The relaxations against the real model.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::burn::tensor::{Device, Tensor, TensorData};
use diep_models::{DeviceSpec, MoeModel};
use diep_plan::{Allocation, Constraints, select};
use diep_relax::{LayerParams, Relaxation, forward_options, hard_mask_options, threshold};

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap()
}

fn fixture(name: &str) -> (MoeModel, Vec<Vec<u32>>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let model = MoeModel::load(root.join("models").join(name), &device()).unwrap();
    let ids = serde_json::from_str(&std::fs::read_to_string(root.join("parity").join(name).join("ids.json")).unwrap())
        .unwrap();
    (model, ids)
}

fn host(t: Tensor<3>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0, f32::max)
}

#[test]
fn paper_relaxation_at_init_is_the_original_model() {
    for name in ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"] {
        let (m, ids) = fixture(name);
        let params: BTreeMap<usize, LayerParams> = m
            .moe_layers()
            .into_iter()
            .map(|l| (l, LayerParams::init(m.moe_block(l).unwrap().num_experts(), &device())))
            .collect();
        let relaxed = host(m.forward_per_layer(&ids, &forward_options(Relaxation::Paper, &params, 0)).unwrap());
        let plain = host(m.forward(&ids).unwrap());
        assert!(max_rel(&relaxed, &plain) < 1e-5, "{name}");
    }
}

#[test]
fn routed_relaxation_at_hard_masks_is_the_pruned_model() {
    for name in ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"] {
        let (mut m, ids) = fixture(name);
        // Distinct α per expert, a small temperature: p hardens to exactly {0, 1}.
        let mut params = BTreeMap::new();
        for (j, l) in m.moe_layers().into_iter().enumerate() {
            let n = m.moe_block(l).unwrap().num_experts();
            let alpha: Vec<f32> = (0..n).map(|e| ((e * 7 + j * 3) % n) as f32 * 0.25).collect();
            let mut p = LayerParams::init(n, &device());
            p.alpha = Tensor::from_data(TensorData::new(alpha, [n]), &device());
            params.insert(l, p);
        }
        let total: usize = params.values().map(LayerParams::num_experts).sum();
        let keep = total - total / 4;
        let opts = forward_options(Relaxation::Routed { tau: 1e-4 }, &params, keep);
        let relaxed = host(m.forward_per_layer(&ids, &opts).unwrap());

        // The same choice as a discrete plan: the top `keep` routed scores, masked.
        let scores = diep_relax::scores(Relaxation::Routed { tau: 1e-4 }, &params);
        let ratio = (total - keep) as f64 / total as f64;
        let kept = select(&scores, ratio, Allocation::Global, &Constraints::ungrouped(2, 2)).unwrap();
        for (l, k) in &kept {
            let n = params[l].num_experts();
            m.set_expert_mask(*l, Some(&(0..n).map(|e| k.contains(&e)).collect::<Vec<_>>())).unwrap();
        }
        let masked = host(m.forward(&ids).unwrap());
        assert!(max_rel(&relaxed, &masked) < 1e-5, "{name}: {}", max_rel(&relaxed, &masked));

        // Hard-mask options are the same thing.
        m.clear_expert_masks();
        let hard: BTreeMap<usize, Vec<bool>> =
            kept.iter().map(|(l, k)| (*l, (0..params[l].num_experts()).map(|e| k.contains(&e)).collect())).collect();
        let via_bias = host(m.forward_per_layer(&ids, &hard_mask_options(&hard, &device())).unwrap());
        assert!(max_rel(&via_bias, &masked) < 1e-5, "{name}");
    }
}

#[test]
fn threshold_meets_the_expected_kept_count() {
    let scores: Vec<f64> = (0..24).map(|i| ((i * 37) % 11) as f64 * 0.3 - 1.0).collect();
    for tau in [0.05, 0.5, 2.0] {
        for keep in [6.0, 12.0, 18.5] {
            let theta = threshold(&scores, keep, tau);
            let sum: f64 = scores.iter().map(|s| 1.0 / (1.0 + (-(s - theta) / tau).exp())).sum();
            assert!((sum - keep).abs() < 1e-6, "tau {tau} keep {keep}: {sum}");
        }
    }
}
