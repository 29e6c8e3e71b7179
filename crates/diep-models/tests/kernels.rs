//! The row math of `diep_models::kernels` (which the burn model's CPU path and `diep-infer`
//! both run) against its burn-op references, on the `flex` device (where the row path runs),
//! over random inputs and the shapes the models use; and the configuration decisions both
//! engines share.

use diep_models::burn::tensor::{Device, Distribution, Tensor, TensorData};
use diep_models::checkpoint::{AttentionConfig, ModelConfig, QkNorm};
use diep_models::kernels::{self, QkvStep, RopeStyle, RopeTables, reference};

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
        let want = values(reference::silu_mul(gu.clone(), i));
        let got = values(kernels::silu_mul(gu, i));
        assert_close(&got, &want, 1e-6, &format!("silu_mul {n}x{i}"));
    }
}

#[test]
fn causal_softmax_matches_reference_with_and_without_window() {
    for window in [None, Some(1), Some(5), Some(64)] {
        for (b, h, t) in [(1, 1, 1), (2, 3, 17), (3, 4, 100)] {
            let mask = kernels::causal_mask(t, window, &device());
            let scores = random([b, h, t, t], 4.0);
            let want = values(reference::causal_softmax(scores.clone(), 0.3, &mask, None));
            let got = values(kernels::causal_softmax(scores, 0.3, window, &mask, None));
            assert_close(&got, &want, 1e-6, &format!("causal_softmax {b}x{h}x{t} window {window:?}"));
        }
    }
}

#[test]
fn causal_softmax_with_sinks_matches_reference() {
    for window in [None, Some(3)] {
        for (b, h, t) in [(1, 1, 1), (2, 3, 17), (1, 4, 70)] {
            let mask = kernels::causal_mask(t, window, &device());
            let scores = random([b, h, t, t], 4.0);
            let sinks = random([h], 2.0);
            let want = values(reference::causal_softmax(scores.clone(), 0.3, &mask, Some(&sinks)));
            let got = values(kernels::causal_softmax(scores, 0.3, window, &mask, Some(&sinks)));
            assert_close(&got, &want, 1e-6, &format!("causal_softmax sinks {b}x{h}x{t} window {window:?}"));
        }
    }
}

#[test]
fn clamped_swiglu_matches_reference() {
    for (n, i) in [(1, 1), (7, 13), (300, 64)] {
        // Scale 8 puts many values beyond the limit on both sides.
        let gu = random([n, 2 * i], 8.0);
        let want = values(reference::clamped_swiglu(gu.clone(), i, 1.702, 7.0));
        let got = values(kernels::clamped_swiglu(gu, i, 1.702, 7.0));
        assert_close(&got, &want, 1e-6, &format!("clamped_swiglu {n}x{i}"));
    }
}

#[test]
fn sigmoid_gate_matches_reference() {
    for (n, w) in [(1, 1), (9, 16), (513, 64)] {
        let y = random([n, w], 2.0);
        let g = random([n, 1], 3.0);
        let want = values(reference::sigmoid_gate(y.clone(), g.clone()));
        assert_close(&values(kernels::sigmoid_gate(y, g)), &want, 1e-6, &format!("sigmoid_gate {n}x{w}"));
    }
}

#[test]
fn clip_matches_reference() {
    let x = random([300, 70], 3.0);
    let want = values(reference::clip(x.clone(), 1.5));
    assert_eq!(values(kernels::clip(x, 1.5)), want);
}

#[test]
fn rms_norm_matches_reference() {
    for (n, d) in [(1, 1), (5, 7), (513, 128)] {
        let x = random([n, d], 2.0);
        let w = random([d], 1.0);
        let want = values(reference::rms_norm(x.clone(), &w, 1e-6));
        let got = values(kernels::rms_norm(x, &w, 1e-6));
        assert_close(&got, &want, 1e-5, &format!("rms_norm {n}x{d}"));
    }
    // Per head: a 4-D input normalised over its last axis.
    let x = random([2, 3, 4, 16], 1.0);
    let w = random([16], 1.0);
    let want = values(reference::rms_norm(x.clone(), &w, 1e-5));
    assert_close(&values(kernels::rms_norm(x, &w, 1e-5)), &want, 1e-5, "rms_norm 4-D");
}

#[test]
fn rope_heads_matches_reference() {
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        // pass > 0: MLA queries, whose first `pass` elements per head are not rotated;
        // tail > 0: partial RoPE (GLM-4.5, MiniMax-M2), whose last `tail` elements are not.
        for (b, t, heads, pass, d, tail) in
            [(1, 1, 1, 0, 2, 0), (2, 9, 3, 0, 8, 0), (4, 33, 2, 0, 32, 0), (2, 9, 3, 5, 8, 0), (2, 9, 3, 0, 8, 8)]
        {
            let tables = RopeTables::new(10_000.0, d, t + 5, &device());
            let w = pass + d + tail;
            let x = random([b * t, heads * w], 1.0);
            let want = values(reference::rope_heads(x.clone(), b, heads, pass, &tables, style));
            let got = values(kernels::rope_heads(x.clone(), b, heads, pass, &tables, style));
            assert_close(&got, &want, 1e-6, &format!("rope_heads {style:?} {b}x{t}x{heads}x{pass}+{d}+{tail}"));
            if tail > 0 {
                // The tail is the input's, untouched; the rotated part is RoPE of its own slice.
                let xs = values(x.clone());
                let narrow: Vec<f32> = xs.chunks(w).flat_map(|head| head[..d].iter().copied()).collect::<Vec<_>>();
                let narrow = Tensor::<2>::from_data(TensorData::new(narrow, [b * t, heads * d]), &device());
                let rotated = values(reference::rope_heads(narrow, b, heads, 0, &tables, style));
                // got is [b, heads, t, w]; input rows are [b·t, heads·w].
                for bi in 0..b {
                    for h in 0..heads {
                        for p in 0..t {
                            let g = &got[((bi * heads + h) * t + p) * w..][..w];
                            let src = &xs[(bi * t + p) * heads * w + h * w..][..w];
                            let r = &rotated[((bi * heads + h) * t + p) * d..][..d];
                            assert_eq!(&g[d..], &src[d..], "tail of head {h}");
                            assert_close(&g[..d], r, 1e-6, "rotated part");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn latent_keys_match_reference() {
    for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
        for (b, t, heads, nope, vd, r) in [(1, 1, 1, 2, 2, 2), (2, 17, 3, 8, 6, 4)] {
            let tables = RopeTables::new(10_000.0, r, t, &device());
            let kv = random([b * t, heads * (nope + vd)], 1.0);
            let k_rot = random([b * t, r], 1.0);
            let want = values(reference::latent_keys(kv.clone(), k_rot.clone(), b, heads, nope, &tables, style));
            let got = values(kernels::latent_keys(kv, k_rot, b, heads, nope, &tables, style));
            assert_close(&got, &want, 1e-6, &format!("latent_keys {style:?} {b}x{t}x{heads}"));
        }
    }
}

#[test]
fn token_nll_matches_reference() {
    for (b, t, v) in [(1, 2, 3), (3, 17, 50), (2, 64, 2048)] {
        let logits = random([b, t, v], 5.0);
        let targets: Vec<Vec<u32>> =
            (0..b).map(|s| (0..t - 1).map(|p| ((s * 31 + p * 7) % v) as u32).collect()).collect();
        let want = reference::token_nll(logits.clone(), &targets);
        let got = kernels::token_nll(logits, &targets);
        for (g, w) in got.iter().zip(&want) {
            assert_close(g, w, 1e-5, &format!("token_nll {b}x{t}x{v}"));
        }
    }
}

fn attention_config() -> AttentionConfig {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-mixtral");
    ModelConfig::from_dir(&dir).unwrap().attention
}

/// Every layer slides when the config has a window and no `layer_types`; with them, only the
/// marked layers do.
#[test]
fn layer_window_follows_sliding_layers() {
    let mut cfg = attention_config();
    cfg.sliding_window = None;
    assert_eq!(kernels::layer_window(&cfg, 0), None);
    cfg.sliding_window = Some(16);
    assert_eq!((0..3).map(|i| kernels::layer_window(&cfg, i)).collect::<Vec<_>>(), [Some(16); 3]);
    cfg.sliding_layers = Some(vec![true, false, true]);
    assert_eq!((0..3).map(|i| kernels::layer_window(&cfg, i)).collect::<Vec<_>>(), [Some(16), None, Some(16)]);
}

/// transformers: OLMoE normalises the whole projections before `clip_qkv`, Qwen3 each head
/// after it.
#[test]
fn qk_norm_and_clip_order() {
    assert_eq!(kernels::qkv_steps(QkNorm::None), [QkvStep::Clip]);
    assert_eq!(kernels::qkv_steps(QkNorm::Full), [QkvStep::Norm, QkvStep::Clip]);
    assert_eq!(kernels::qkv_steps(QkNorm::PerHead), [QkvStep::Clip, QkvStep::Norm]);
}
