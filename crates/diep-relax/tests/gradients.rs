//! Finite-difference checks of the gradients of α and β through the real model, with the
//! model weights frozen. Needs the `autodiff` feature.
#![cfg(feature = "autodiff")] // on by default; the optimiser cannot work without it

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::burn::tensor::activation::log_softmax;
use diep_models::burn::tensor::{Device, Int, Tensor, TensorData};
use diep_models::{DeviceSpec, MoeForwardOptions, MoeModel};
use diep_relax::{LayerParams, Relaxation, forward_options, routed_options, routed_options_implicit};

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap().autodiff()
}

/// Mean next-token cross-entropy.
fn loss(model: &MoeModel, ids: &[Vec<u32>], opts: &BTreeMap<usize, MoeForwardOptions>) -> Tensor<1> {
    let logits = model.forward_per_layer(ids, opts).unwrap();
    let [b, t, _] = logits.dims();
    let logp = log_softmax(logits.narrow(1, 0, t - 1), 2);
    let targets: Vec<i64> = ids.iter().flat_map(|s| s[1..].iter().map(|x| *x as i64)).collect();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t - 1, 1]), &logp.device());
    -logp.gather(2, targets).mean().reshape([1])
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_data().iter::<f32>().next().unwrap() as f64
}

fn check(relaxation: Relaxation) {
    check_with(&format!("{relaxation:?}"), |params| match relaxation {
        Relaxation::Paper => forward_options(relaxation, params, 0),
        // θ is fixed for the check (it carries no gradient in this variant).
        Relaxation::Routed { tau } => routed_options(params, 1.5, tau),
    });
}

fn check_with(relaxation: &str, opts: impl Fn(&BTreeMap<usize, LayerParams>) -> BTreeMap<usize, MoeForwardOptions>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let device = device();
    let model = MoeModel::load(root.join("models/tiny-mixtral"), &device).unwrap();
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(root.join("parity/tiny-mixtral/ids.json")).unwrap()).unwrap();
    let alpha0: Vec<f32> = (0..8).map(|e| (e as f32 * 0.37).sin() * 0.5).collect();
    let make = |alpha: &[f32], log_beta: f32| -> BTreeMap<usize, LayerParams> {
        [0usize, 1]
            .into_iter()
            .map(|l| {
                let p = LayerParams {
                    alpha: Tensor::from_data(TensorData::new(alpha.to_vec(), [8]), &device).require_grad(),
                    log_beta: Tensor::from_data(TensorData::new(vec![log_beta], [1]), &device).require_grad(),
                };
                (l, p)
            })
            .collect()
    };
    let params = make(&alpha0, 0.1);
    let l = loss(&model, &ids, &opts(&params));
    let grads = l.backward();
    let g_alpha: Vec<f32> = params[&1].alpha.grad(&grads).unwrap().into_data().iter::<f32>().collect();
    let g_beta = params[&1].log_beta.grad(&grads).unwrap().into_data().iter::<f32>().next().unwrap() as f64;
    // Weights get no gradient.
    assert!(model.lm_head().weight().grad(&grads).is_none(), "model weights must stay frozen");

    let eps = 1e-2f32;
    let at = |alpha1: &[f32], log_beta1: f32| -> f64 {
        let mut p = make(&alpha0, 0.1);
        p.insert(1, make(alpha1, log_beta1).remove(&1).unwrap());
        scalar(loss(&model, &ids, &opts(&p)))
    };
    for e in [0usize, 3, 6] {
        let (mut up, mut down) = (alpha0.clone(), alpha0.clone());
        up[e] += eps;
        down[e] -= eps;
        let fd = (at(&up, 0.1) - at(&down, 0.1)) / (2.0 * eps as f64);
        let an = g_alpha[e] as f64;
        assert!(
            (fd - an).abs() <= 2e-2 * fd.abs().max(an.abs()) + 2e-4,
            "{relaxation} α[{e}]: fd {fd} vs autodiff {an}"
        );
    }
    let fd = (at(&alpha0, 0.1 + eps) - at(&alpha0, 0.1 - eps)) / (2.0 * eps as f64);
    assert!(
        (fd - g_beta).abs() <= 2e-2 * fd.abs().max(g_beta.abs()) + 2e-4,
        "{relaxation} β: fd {fd} vs autodiff {g_beta}"
    );
}

#[test]
fn paper_relaxation_gradients_match_finite_differences() {
    check(Relaxation::Paper);
}

#[test]
fn routed_relaxation_gradients_match_finite_differences() {
    check(Relaxation::Routed { tau: 1.0 });
}

#[test]
fn implicit_threshold_gradients_match_finite_differences_with_theta_re_solved() {
    // Finite differences re-solve θ by bisection at every point, so they measure the total
    // derivative through the budget; autodiff gets it from the implicit-function weights.
    // The functional is a fixed random combination of every layer's router bias (the model
    // downstream of the bias is covered by the checks above; a top-k flip inside a
    // finite-difference step would blur this one).
    let device = device();
    let n = 8;
    let alpha = |l: usize| -> Vec<f32> { (0..n).map(|e| ((e * 7 + l * 3) as f32 * 0.61).sin() * 0.8).collect() };
    let make = |delta: Option<(usize, Option<usize>, f32)>| -> BTreeMap<usize, LayerParams> {
        (0..3usize)
            .map(|l| {
                let mut a = alpha(l);
                let mut b = 0.2 * l as f32 - 0.1;
                if let Some((dl, which, eps)) = delta
                    && dl == l
                {
                    match which {
                        Some(e) => a[e] += eps,
                        None => b += eps,
                    }
                }
                let p = LayerParams {
                    alpha: Tensor::from_data(TensorData::new(a, [n]), &device).require_grad(),
                    log_beta: Tensor::from_data(TensorData::new(vec![b], [1]), &device).require_grad(),
                };
                (l, p)
            })
            .collect()
    };
    let weights = |l: usize| -> Tensor<1> {
        let w: Vec<f32> = (0..n).map(|e| ((e * 5 + l * 11) as f32 * 0.37).cos()).collect();
        Tensor::from_data(TensorData::new(w, [n]), &device)
    };
    let f = |p: &BTreeMap<usize, LayerParams>| -> Tensor<1> {
        let opts = routed_options_implicit(p, 12, 0.3, false);
        (0..3).map(|l| (opts[&l].router_bias.clone().unwrap() * weights(l)).sum()).reduce(|a, b| a + b).unwrap()
    };
    let params = make(None);
    let grads = f(&params).backward();
    let eps = 1e-3f32;
    for l in 0..3 {
        let ga: Vec<f32> = params[&l].alpha.grad(&grads).unwrap().into_data().iter::<f32>().collect();
        let gb = params[&l].log_beta.grad(&grads).unwrap().into_data().iter::<f32>().next().unwrap();
        for which in [Some(0), Some(3), Some(6), None] {
            let fd = (scalar(f(&make(Some((l, which, eps))))) - scalar(f(&make(Some((l, which, -eps))))))
                / (2.0 * eps as f64);
            let an = match which {
                Some(e) => ga[e],
                None => gb,
            } as f64;
            assert!(
                (fd - an).abs() <= 1e-2 * fd.abs().max(an.abs()) + 1e-3,
                "layer {l} {which:?}: fd {fd} vs autodiff {an}"
            );
        }
    }
    // The θ path matters: a fixed threshold gives a different β gradient.
    let fixed = |p: &BTreeMap<usize, LayerParams>| -> Tensor<1> {
        let opts = routed_options(p, 0.0, 0.3);
        (0..3).map(|l| (opts[&l].router_bias.clone().unwrap() * weights(l)).sum()).reduce(|a, b| a + b).unwrap()
    };
    let params2 = make(None);
    let g2 = fixed(&params2).backward();
    let gb_fixed = params2[&1].log_beta.grad(&g2).unwrap().into_data().iter::<f32>().next().unwrap();
    let gb_implicit = params[&1].log_beta.grad(&grads).unwrap().into_data().iter::<f32>().next().unwrap();
    assert!((gb_fixed - gb_implicit).abs() > 1e-2, "{gb_fixed} vs {gb_implicit}");
}
