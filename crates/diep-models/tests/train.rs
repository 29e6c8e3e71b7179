//! The training support of `diep_models::train`: export to the HF layout is the exact inverse of
//! loading, a random model has exactly the tensors of a real checkpoint, AdamW follows the
//! textbook arithmetic, the load-balancing loss is what its formula says, and one optimiser step
//! on the tiny fixture lowers the loss.

use std::path::PathBuf;

use diep_models::burn::tensor::{Device, Tensor, TensorData};
use diep_models::checkpoint::{Checkpoint, ModelConfig};
use diep_models::train::{AdamWConfig, InitOptions, adamw_update, save_safetensors};
use diep_models::{DeviceSpec, MoeModel};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tiny() -> PathBuf {
    fixtures().join("models/tiny-mixtral")
}

fn ids() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixtures().join("parity/tiny-mixtral/ids.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Loading a checkpoint and exporting it gives back every tensor bit for bit.
#[test]
fn export_is_the_inverse_of_load() {
    let model = MoeModel::load(tiny(), &device()).unwrap();
    let ckpt = Checkpoint::open(tiny()).unwrap();
    let exported = model.to_hf_tensors();
    let mut names: Vec<&str> = exported.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    let mut on_disk: Vec<&str> = ckpt.names().collect();
    on_disk.sort_unstable();
    assert_eq!(names, on_disk);
    for t in &exported {
        let disk = ckpt.get(&t.name).unwrap();
        assert_eq!(disk.shape, t.shape.as_slice(), "{}", t.name);
        assert!(disk.to_f32().unwrap() == t.data, "{} differs", t.name);
    }
}

/// A random model has the names and shapes of a real checkpoint of the same config, and its
/// exported checkpoint loads back to the identical model (same logits, bit for bit).
#[test]
fn random_model_round_trips_through_safetensors() {
    let config = ModelConfig::from_dir(tiny()).unwrap();
    let device = device();
    let model = MoeModel::random(config.clone(), InitOptions { seed: 3, std: 0.2 }, &device).unwrap();
    let exported = model.to_hf_tensors();
    let ckpt = Checkpoint::open(tiny()).unwrap();
    for t in &exported {
        assert_eq!(ckpt.get(&t.name).unwrap().shape, t.shape.as_slice(), "{}", t.name);
    }
    assert_eq!(exported.len(), ckpt.names().count());

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("config.json"), dir.path().join("config.json")).unwrap();
    save_safetensors(&exported, dir.path().join("model.safetensors")).unwrap();
    let reloaded = MoeModel::load(dir.path(), &device).unwrap();
    let a = values(model.forward(&ids()).unwrap());
    let b = values(reloaded.forward(&ids()).unwrap());
    assert!(a == b, "logits of the reloaded model differ");
    assert!(a.iter().any(|x| x.abs() > 1e-3), "a random model should not be all zeros");

    // The same seed gives the same weights; another seed does not.
    let again = MoeModel::random(config.clone(), InitOptions { seed: 3, std: 0.2 }, &device).unwrap();
    assert!(again.to_hf_tensors() == exported);
    let other = MoeModel::random(config, InitOptions { seed: 4, std: 0.2 }, &device).unwrap();
    assert!(other.to_hf_tensors() != exported);
}

/// Two AdamW steps on a scalar, against the formulas evaluated by hand in f64.
#[test]
fn adamw_matches_the_hand_computed_update() {
    let device = device();
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let (lr, wd) = (0.01, 0.1);
    let s = |x: f64| Tensor::<1>::from_data(TensorData::new(vec![x as f32], [1]), &device);
    let (mut p, mut m, mut v) = (s(0.5), s(0.0), s(0.0));
    let (mut hp, mut hm, mut hv) = (0.5f64, 0.0f64, 0.0f64);
    for (step, g) in [(1u64, 0.2f64), (2, -0.3)] {
        (p, m, v) = adamw_update(p, s(g), m, v, step, lr, wd, &cfg);
        hp *= 1.0 - lr * wd;
        hm = 0.9 * hm + 0.1 * g;
        hv = 0.95 * hv + 0.05 * g * g;
        let (mh, vh) = (hm / (1.0 - 0.9f64.powi(step as i32)), hv / (1.0 - 0.95f64.powi(step as i32)));
        hp -= lr * mh / (vh.sqrt() + 1e-8);
        let got = values(p.clone())[0] as f64;
        assert!((got - hp).abs() < 1e-6, "step {step}: {got} vs {hp}");
    }
    // After step 1 the update is lr·sign(g) (bias-corrected Adam), plus the decay.
    let (p1, _, _) = adamw_update(s(0.5), s(0.2), s(0.0), s(0.0), 1, lr, 0.0, &cfg);
    assert!((values(p1)[0] as f64 - (0.5 - lr)).abs() < 1e-6);
}

#[cfg(feature = "autodiff")]
mod autodiff {
    use super::*;
    use diep_models::MoeForwardOptions;
    use diep_models::train::{AdamW, grad_norm, training_loss};

    fn scalar(t: Tensor<1>) -> f64 {
        values(t)[0] as f64
    }

    /// The auxiliary loss is `E · Σ_e f_e · P_e` per layer, averaged over layers.
    #[test]
    fn load_balancing_loss_follows_its_formula() {
        let model = MoeModel::load(tiny(), &device()).unwrap();
        let ids = ids();
        let loss = training_loss(&model, &ids, 0.5).unwrap();
        let mut per_layer = Vec::new();
        model
            .forward_with(&ids, &MoeForwardOptions::default(), |_, _, out| {
                let [n, e] = out.routing.probs.dims();
                let probs = values(out.routing.probs);
                let mut f = vec![0f64; e];
                for x in out.routing.experts.into_data().iter::<i64>() {
                    f[x as usize] += 1.0 / n as f64;
                }
                let p: Vec<f64> =
                    (0..e).map(|j| (0..n).map(|t| probs[t * e + j] as f64).sum::<f64>() / n as f64).collect();
                per_layer.push(e as f64 * (0..e).map(|j| f[j] * p[j]).sum::<f64>());
            })
            .unwrap();
        let expected = per_layer.iter().sum::<f64>() / per_layer.len() as f64;
        let (aux, lm, total) = (scalar(loss.aux), scalar(loss.lm), scalar(loss.total));
        assert!((aux - expected).abs() < 1e-5, "{aux} vs {expected}");
        assert!((total - (lm + 0.5 * aux)).abs() < 1e-5);
        assert_eq!(loss.expert_counts.len(), 2);
        let slots: usize = loss.expert_counts[0].iter().sum();
        assert_eq!(slots, ids.len() * ids[0].len() * 2);
    }

    /// One AdamW step on the tiny fixture lowers the training loss, touches every parameter
    /// that got a gradient, and the updated tensors still require gradients.
    #[test]
    fn one_adamw_step_lowers_the_loss() {
        let device = device().autodiff();
        let mut model = MoeModel::load(tiny(), &device).unwrap();
        model.require_grad();
        let before = model.to_hf_tensors();
        let ids = ids();
        let loss = training_loss(&model, &ids, 0.01).unwrap();
        let l0 = scalar(loss.total.clone());
        let grads = loss.total.backward();
        let params = model.parameters_mut();
        assert_eq!(params.len(), 1 + 2 * (1 + 4 + 1 + 1 + 8 * 2) + 2);
        let norm = grad_norm(&params, &grads);
        assert!(norm.is_finite() && norm > 0.0);
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(params, &grads, 1e-3, 1.0);
        assert_eq!(opt.steps(), 1);
        let after = model.to_hf_tensors();
        let changed = before.iter().zip(&after).filter(|(a, b)| a.data != b.data).count();
        assert!(changed * 10 >= before.len() * 9, "only {changed} of {} tensors changed", before.len());
        let loss = training_loss(&model, &ids, 0.01).unwrap();
        let l1 = scalar(loss.total.clone());
        assert!(l1 < l0, "loss went from {l0} to {l1}");
        // The updated parameters are leaves that take part in the next backward pass.
        let grads = loss.total.backward();
        assert!(model.lm_head.weight.grad(&grads).is_some());
    }
}
