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

fn host1(t: Tensor<1>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Sampled masks: without noise they are the deterministic relaxation; with logistic noise the
/// share of draws that keep an expert (`m > ½`) is its keep probability `p = σ((s − θ)/τ)`, and
/// the smaller the concrete temperature, the closer each mask is to 0 or 1.
#[test]
fn sampled_masks_keep_each_expert_with_its_probability() {
    use diep_relax::{routed_layer_options, sampled_layer_options};
    let d = device();
    let alpha = vec![0.6f32, -0.3, 0.1, -0.9];
    let params =
        LayerParams { alpha: Tensor::from_data(TensorData::new(alpha, [4]), &d), log_beta: Tensor::zeros([1], &d) };
    let (tau, theta) = (0.5, 0.1f32);
    let theta_t = || Tensor::from_data(TensorData::new(vec![theta; 4], [4]), &d);
    let bias = |o: diep_models::MoeForwardOptions| host1(o.router_bias.unwrap());
    let plain = bias(routed_layer_options(&params, theta_t(), tau, true));
    assert_eq!(bias(sampled_layer_options(&params, theta_t(), tau, true, None)), plain);
    let zero = Tensor::zeros([4], &d);
    let at_zero = bias(sampled_layer_options(&params, theta_t(), tau, true, Some((zero, 1.0))));
    assert!(max_rel(&at_zero, &plain) < 1e-6);

    // p by hand: s = log softmax(α) + log N, p = σ((s − θ)/τ).
    let a = [0.6f64, -0.3, 0.1, -0.9];
    let lse = a.iter().map(|x| x.exp()).sum::<f64>().ln();
    let p: Vec<f64> = a.iter().map(|x| 1.0 / (1.0 + (-((x - lse + 4f64.ln() - theta as f64) / tau)).exp())).collect();
    let draws = 4000;
    let mut rng = diep_common::SplitMix64::for_stream(1, "test");
    let (mut kept, mut hard) = (vec![0usize; 4], 0usize);
    for _ in 0..draws {
        let l: Vec<f32> = (0..4).map(|_| rng.logistic() as f32).collect();
        let noise = Tensor::from_data(TensorData::new(l, [4]), &d);
        let m: Vec<f64> = bias(sampled_layer_options(&params, theta_t(), tau, true, Some((noise, 0.1))))
            .into_iter()
            .map(|b| (b as f64).exp())
            .collect();
        for (k, m) in kept.iter_mut().zip(&m) {
            *k += usize::from(*m > 0.5);
        }
        hard += m.iter().filter(|m| **m < 0.05 || **m > 0.95).count();
    }
    for (k, p) in kept.iter().zip(&p) {
        let share = *k as f64 / draws as f64;
        let sd = (p * (1.0 - p) / draws as f64).sqrt();
        assert!((share - p).abs() < 4.0 * sd + 1e-3, "kept share {share} vs p {p}");
    }
    // At t = 0.1 a mask is within 0.05 of 0 or 1 unless |logit + L| < 0.3: most are.
    assert!(hard as f64 > 0.8 * (4 * draws) as f64, "{hard} of {} masks nearly hard", 4 * draws);
}
