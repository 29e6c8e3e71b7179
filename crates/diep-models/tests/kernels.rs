//! The fused CPU kernels against their burn-op references, on the `flex` device (where the
//! fused path runs), over random inputs and the shapes the models use.

use diep_models::burn::tensor::{Device, Distribution, Tensor};
use diep_models::kernels;

fn device() -> Device {
    Device::flex()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: max rel err {worst:.3e} > {tol:.0e}");
}

fn random<const D: usize>(shape: [usize; D], scale: f64) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, scale), &device())
}

#[test]
fn fused_path_is_active_on_flex() {
    assert!(kernels::fused_on(&device()) || !kernels::enabled(), "flex should take the fused path");
}

#[test]
fn silu_mul_matches_reference() {
    for (n, i) in [(1, 1), (7, 13), (300, 64), (1000, 256)] {
        let gu = random([n, 2 * i], 3.0);
        let want = values(kernels::silu_mul_reference(gu.clone(), i));
        let got = values(kernels::silu_mul(gu, i));
        assert_close(&got, &want, 1e-6, &format!("silu_mul {n}x{i}"));
    }
}

#[test]
fn causal_softmax_matches_reference_with_and_without_window() {
    use diep_models::attention::AttentionContext;
    use diep_models::checkpoint::ModelConfig;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-mixtral");
    let mut cfg = ModelConfig::from_dir(&dir).unwrap().attention;
    for window in [None, Some(1), Some(5), Some(64)] {
        cfg.sliding_window = window;
        for (b, h, t) in [(1, 1, 1), (2, 3, 17), (3, 4, 100)] {
            let ctx = AttentionContext::new(&cfg, b, t, &device());
            let scores = random([b, h, t, t], 4.0);
            let want = values(kernels::causal_softmax_reference(scores.clone(), 0.3, &ctx.mask));
            let got = values(kernels::causal_softmax(scores, 0.3, ctx.mask_window, &ctx.mask));
            assert_close(&got, &want, 1e-6, &format!("causal_softmax {b}x{h}x{t} window {window:?}"));
        }
    }
}

#[test]
fn rms_norm_matches_reference() {
    for (n, d) in [(1, 1), (5, 7), (513, 128)] {
        let x = random([n, d], 2.0);
        let w = random([d], 1.0);
        let want = values(kernels::rms_norm_reference(x.clone(), &w, 1e-6));
        let got = values(kernels::rms_norm(x, &w, 1e-6));
        assert_close(&got, &want, 1e-5, &format!("rms_norm {n}x{d}"));
    }
    // Per head: a 4-D input normalised over its last axis.
    let x = random([2, 3, 4, 16], 1.0);
    let w = random([16], 1.0);
    let want = values(kernels::rms_norm_reference(x.clone(), &w, 1e-5));
    assert_close(&values(kernels::rms_norm(x, &w, 1e-5)), &want, 1e-5, "rms_norm 4-D");
}

#[test]
fn rope_heads_matches_reference() {
    use diep_models::rope::RopeTables;
    for (b, t, heads, d) in [(1, 1, 1, 2), (2, 9, 3, 8), (4, 33, 2, 32)] {
        let tables = RopeTables::new(10_000.0, d, t + 5, &device());
        let x = random([b * t, heads * d], 1.0);
        let want = values(kernels::rope_heads_reference(x.clone(), b, heads, &tables.cos, &tables.sin));
        let got = values(kernels::rope_heads(x, b, heads, &tables.cos, &tables.sin));
        assert_close(&got, &want, 1e-6, &format!("rope_heads {b}x{t}x{heads}x{d}"));
    }
}

#[test]
fn token_nll_matches_reference() {
    for (b, t, v) in [(1, 2, 3), (3, 17, 50), (2, 64, 2048)] {
        let logits = random([b, t, v], 5.0);
        let targets: Vec<Vec<u32>> =
            (0..b).map(|s| (0..t - 1).map(|p| ((s * 31 + p * 7) % v) as u32).collect()).collect();
        let want = kernels::token_nll_reference(logits.clone(), &targets);
        let got = kernels::token_nll(logits, &targets);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-5, &format!("token_nll {b}x{t}x{v}"));
        }
    }
}
