//! Properties of the shared MoE block: grouped dispatch equals the dense reference, masking
//! equals removal, captured per-expert outputs reassemble the output, and routing matches
//! hand-computed values.

use diep_models::DeviceSpec;
use diep_models::burn::tensor::{Device, Tensor, TensorData};
use diep_models::checkpoint::{GroupLimit, GroupScore, Renorm, RoutingConfig, Scoring};
use diep_models::moe::{MoeBlock, MoeForwardOptions, RoutingRule, SharedExpert, route, route_with};
use diep_models::nn::{Linear, SwiGlu};
use proptest::prelude::*;

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap()
}

/// A small deterministic generator (SplitMix64) so proptest only has to shrink a seed.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn tensor<const D: usize>(&mut self, shape: [usize; D], scale: f32, device: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.next_f32() * scale).collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }
}

fn linear(rng: &mut Rng, inp: usize, out: usize, device: &Device) -> Linear {
    Linear::new(rng.tensor([inp, out], 0.5, device), None)
}

fn swiglu(rng: &mut Rng, h: usize, i: usize, device: &Device) -> SwiGlu {
    SwiGlu::new(linear(rng, h, 2 * i, device), linear(rng, i, h, device))
}

fn block(seed: u64, h: usize, e: usize, k: usize, norm: bool, shared: bool, device: &Device) -> MoeBlock {
    let mut rng = Rng(seed);
    let router = Linear::new(rng.tensor([h, e], 2.0, device), None);
    let experts = (0..e).map(|_| swiglu(&mut rng, h, 6, device)).collect();
    let shared =
        shared.then(|| SharedExpert::new(swiglu(&mut rng, h, 5, device), Some(linear(&mut rng, h, 1, device))));
    MoeBlock::new(router, experts, shared, k, norm)
}

fn vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn grouped_dispatch_equals_reference(seed in any::<u64>(), e in 2usize..9, k in 1usize..3, n in 1usize..20,
                                          norm in any::<bool>(), shared in any::<bool>(), scaled in any::<bool>()) {
        let k = k.min(e);
        let device = device();
        let b = block(seed, 8, e, k, norm, shared, &device);
        let x = Rng(seed ^ 1).tensor([n, 8], 1.0, &device);
        let scale = scaled.then(|| Rng(seed ^ 2).tensor([e], 1.0, &device).exp());
        let opts = MoeForwardOptions { expert_scale: scale.clone(), ..Default::default() };
        let reference = MoeForwardOptions { expert_scale: scale, reference: true, ..Default::default() };
        let fast = vec(b.forward_detailed(x.clone(), &opts).output);
        let slow = vec(b.forward_detailed(x, &reference).output);
        prop_assert!(max_abs_diff(&fast, &slow) < 1e-5, "grouped vs reference: {}", max_abs_diff(&fast, &slow));
    }

    /// Llama 4: the routing weight scales each expert's input; grouped dispatch, the dense
    /// reference and the hand-written `E(w·x)` agree.
    #[test]
    fn input_weighted_dispatch_equals_reference(seed in any::<u64>(), e in 2usize..9, k in 1usize..3,
                                                n in 1usize..12, scaled in any::<bool>()) {
        let k = k.min(e);
        let device = device();
        let rule = RoutingConfig {
            scoring: Scoring::Sigmoid,
            group_limit: None,
            routed_scaling_factor: 1.0,
            correction_bias: false,
            renorm: Renorm::Sum,
            weight_on_input: true,
        };
        let b = block(seed, 8, e, k, false, true, &device).with_routing(rule, None);
        let x = Rng(seed ^ 1).tensor([n, 8], 1.0, &device);
        let scale = scaled.then(|| Rng(seed ^ 2).tensor([e], 1.0, &device).exp());
        let opts = MoeForwardOptions { expert_scale: scale.clone(), ..Default::default() };
        let reference = MoeForwardOptions { expert_scale: scale.clone(), reference: true, ..Default::default() };
        let out = b.forward_detailed(x.clone(), &opts);
        let fast = vec(out.output.clone());
        let slow = vec(b.forward_detailed(x.clone(), &reference).output);
        prop_assert!(max_abs_diff(&fast, &slow) < 1e-5, "grouped vs reference: {}", max_abs_diff(&fast, &slow));
        // By hand: shared(x) gated, plus Σ_j scale_e · E_e(w_j · x).
        let plain = MoeForwardOptions::default();
        let routing = b.forward_detailed(x.clone(), &plain).routing;
        let idx: Vec<i64> = routing.experts.into_data().iter::<i64>().collect();
        let w = vec(routing.weights);
        let without_routed = {
            let zero = Tensor::<1>::zeros([e], &device);
            vec(b.forward_detailed(x.clone(), &MoeForwardOptions { expert_scale: Some(zero), ..Default::default() }).output)
        };
        let xs = vec(x.clone());
        let sc = scale.map(vec).unwrap_or_else(|| vec![1.0; e]);
        for t in 0..n {
            let mut want: Vec<f32> = without_routed[t * 8..(t + 1) * 8].to_vec();
            for j in 0..k {
                let ex = idx[t * k + j] as usize;
                let xi: Vec<f32> = xs[t * 8..(t + 1) * 8].iter().map(|v| v * w[t * k + j]).collect();
                let xi = Tensor::<2>::from_data(TensorData::new(xi, [1, 8]), &device);
                let y = vec(b.expert_forward(ex, xi));
                for (o, v) in want.iter_mut().zip(&y) {
                    *o += sc[ex] * v;
                }
            }
            prop_assert!(max_abs_diff(&fast[t * 8..(t + 1) * 8], &want) < 1e-5, "token {t}");
        }
    }

    #[test]
    fn masking_equals_removing(seed in any::<u64>(), e in 3usize..9, n in 1usize..16, norm in any::<bool>(),
                               mask_bits in any::<u16>()) {
        let k = 2;
        let device = device();
        let mut keep: Vec<bool> = (0..e).map(|i| mask_bits >> i & 1 == 1).collect();
        // Keep at least top_k experts.
        for i in 0..k { keep[i] = true; }
        let mut masked = block(seed, 8, e, k, norm, true, &device);
        let full = masked.clone();
        masked.set_mask(Some(&keep)).unwrap();

        // The same block with the masked experts physically removed (router rows dropped).
        let kept: Vec<usize> = (0..e).filter(|i| keep[*i]).collect();
        let idx = Tensor::<1, diep_models::burn::tensor::Int>::from_data(
            TensorData::new(kept.iter().map(|i| *i as i64).collect::<Vec<_>>(), [kept.len()]), &device);
        let removed = MoeBlock::new(
            Linear::new(full.router().weight().clone().select(1, idx), None),
            kept.iter().map(|i| full.experts()[*i].clone()).collect(),
            full.shared().cloned(), k, norm);

        let x = Rng(seed ^ 7).tensor([n, 8], 1.0, &device);
        let a = masked.forward_detailed(x.clone(), &Default::default());
        let b = removed.forward(x);
        prop_assert!(max_abs_diff(&vec(a.output), &vec(b)) < 1e-5);
        // A masked expert is never selected and has probability exactly zero.
        let selected: Vec<i64> = a.routing.experts.into_data().iter::<i64>().collect();
        prop_assert!(selected.iter().all(|s| keep[*s as usize]));
        let probs = vec(a.routing.probs);
        for (j, p) in probs.iter().enumerate() {
            if !keep[j % e] { prop_assert_eq!(*p, 0.0); }
        }
    }

    #[test]
    fn captured_expert_outputs_reassemble_the_output(seed in any::<u64>(), n in 1usize..16) {
        let device = device();
        let b = block(seed, 8, 6, 2, true, false, &device);
        let x = Rng(seed ^ 3).tensor([n, 8], 1.0, &device);
        let out = b.forward_detailed(x.clone(), &MoeForwardOptions { capture_expert_outputs: true, ..Default::default() });
        let mut sum = vec![0f32; n * 8];
        for (e, cap) in out.expert_outputs.unwrap().into_iter().enumerate() {
            let Some(cap) = cap else { continue };
            let w = vec(cap.weights);
            let y = vec(cap.output.clone());
            // The captured output is E_j(x) for exactly those tokens.
            let direct = vec(b.expert_forward(e, x.clone().select(0, Tensor::from_data(
                TensorData::new(cap.tokens.iter().map(|t| *t as i64).collect::<Vec<_>>(), [cap.tokens.len()]), &device))));
            prop_assert!(max_abs_diff(&y, &direct) < 1e-6);
            for (r, t) in cap.tokens.iter().enumerate() {
                for c in 0..8 { sum[t * 8 + c] += w[r] * y[r * 8 + c]; }
            }
        }
        prop_assert!(max_abs_diff(&sum, &vec(out.output)) < 1e-5);
    }
}

#[test]
fn routing_matches_hand_computed_values() {
    let device = device();
    let logits = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 0.0], [1, 4]), &device);
    let z: f32 = [1f32, 2.0, 3.0, 0.0].iter().map(|x| x.exp()).sum();
    let (p3, p2) = (3f32.exp() / z, 2f32.exp() / z);

    let r = route(logits.clone(), None, 2, false);
    assert_eq!(r.experts.clone().into_data().iter::<i64>().collect::<Vec<_>>(), vec![2, 1]);
    let w = vec(r.weights);
    assert!((w[0] - p3).abs() < 1e-6 && (w[1] - p2).abs() < 1e-6, "{w:?}");

    let w = vec(route(logits.clone(), None, 2, true).weights);
    assert!((w[0] - p3 / (p3 + p2)).abs() < 1e-6 && (w[1] - p2 / (p3 + p2)).abs() < 1e-6, "{w:?}");

    // Masking expert 2: softmax over {0, 1, 3}, top-2 = experts 1 and 0.
    let bias = Tensor::<1>::from_data(TensorData::new(vec![0.0f32, 0.0, f32::NEG_INFINITY, 0.0], [4]), &device);
    let r = route(logits, Some(&bias), 2, false);
    assert_eq!(r.experts.into_data().iter::<i64>().collect::<Vec<_>>(), vec![1, 0]);
    let z: f32 = [1f32, 2.0, 0.0].iter().map(|x| x.exp()).sum();
    let w = vec(r.weights);
    assert!((w[0] - 2f32.exp() / z).abs() < 1e-6 && (w[1] - 1f32.exp() / z).abs() < 1e-6, "{w:?}");
}

#[test]
fn masks_are_validated() {
    let device = device();
    let mut b = block(1, 8, 4, 2, true, false, &device);
    assert!(b.set_mask(Some(&[true, false, false, false])).unwrap_err().to_string().contains("fewer than"));
    assert!(b.set_mask(Some(&[true, true])).unwrap_err().to_string().contains("2 entries for 4 experts"));
    b.set_mask(Some(&[true, false, true, false])).unwrap();
    assert_eq!(b.mask(), Some(&[true, false, true, false][..]));
    b.set_mask(None).unwrap();
    assert!(b.mask().is_none());
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn dynamic_skip_drops_exactly_the_slots_below_gamma() {
    use diep_models::DynamicSkip;
    let device = device();
    let (h, e, k, n) = (12, 6, 2, 40);
    let mut rng = Rng(11);
    let x = rng.tensor([n, h], 1.0, &device);
    let plain = block(5, h, e, k, true, false, &device);
    let routing = plain.route(x.clone(), None);
    let (w, ex) = (host(routing.weights.clone()), routing.experts.to_data().iter::<i64>().collect::<Vec<_>>());
    let expected_out = host(plain.forward(x.clone()));

    // γ = 0 never skips: identical output.
    let mut b = plain.clone();
    b.set_dynamic_skip(Some(DynamicSkip::new(vec![0.0; e * e], e).unwrap())).unwrap();
    assert_eq!(host(b.forward(x.clone())), expected_out);
    assert_eq!(b.dynamic_skip().unwrap().counts(), (0, n as u64));

    // A γ that depends on the pair: the output is w0·E_e0(x) plus w1·E_e1(x) only where
    // w1 ≥ γ(e0, e1)·w0, computed by hand per token.
    let gamma: Vec<f32> = (0..e * e).map(|i| 0.4 + 0.1 * (i % 7) as f32).collect();
    let mut b = plain.clone();
    b.set_dynamic_skip(Some(DynamicSkip::new(gamma.clone(), e).unwrap())).unwrap();
    let got = host(b.forward(x.clone()));
    let mut skipped = 0;
    for t in 0..n {
        let row = x.clone().narrow(0, t, 1);
        let (e0, e1) = (ex[t * k] as usize, ex[t * k + 1] as usize);
        let mut want: Vec<f32> = host(plain.expert_forward(e0, row.clone())).iter().map(|v| v * w[t * k]).collect();
        if w[t * k + 1] >= gamma[e0 * e + e1] * w[t * k] {
            for (o, v) in want.iter_mut().zip(host(plain.expert_forward(e1, row))) {
                *o += v * w[t * k + 1];
            }
        } else {
            skipped += 1;
        }
        for c in 0..h {
            assert!((got[t * h + c] - want[c]).abs() < 1e-4, "token {t}");
        }
    }
    assert!(skipped > 0 && skipped < n, "the test must exercise both cases ({skipped})");
    assert_eq!(b.dynamic_skip().unwrap().counts(), (skipped as u64, n as u64));
    assert!(DynamicSkip::new(vec![0.0; 3], e).is_err());
}

fn deepseek_rules() -> Vec<RoutingRule> {
    let v3 = RoutingConfig {
        scoring: Scoring::Sigmoid,
        group_limit: Some(GroupLimit { n_group: 2, topk_group: 1, score: GroupScore::Top2Sum }),
        routed_scaling_factor: 2.5,
        correction_bias: true,
        renorm: Renorm::SumPlusTiny,
        weight_on_input: false,
    };
    let v2 = RoutingConfig {
        scoring: Scoring::Softmax,
        group_limit: Some(GroupLimit { n_group: 4, topk_group: 2, score: GroupScore::Max }),
        routed_scaling_factor: 1.5,
        correction_bias: false,
        renorm: Renorm::Sum,
        weight_on_input: false,
    };
    vec![
        RoutingRule { top_k: 2, norm_topk_prob: true, config: v3 },
        RoutingRule { top_k: 2, norm_topk_prob: false, config: v2 },
    ]
}

/// The rules of the other routers with a selection bias: MiniMax-M2 (sigmoid, no groups, plain
/// sum) and ERNIE-4.5 (softmax, `moe_statics` bias, floored sum).
fn biased_rules() -> Vec<RoutingRule> {
    let minimax = RoutingConfig {
        scoring: Scoring::Sigmoid,
        group_limit: None,
        routed_scaling_factor: 1.0,
        correction_bias: true,
        renorm: Renorm::Sum,
        weight_on_input: false,
    };
    let ernie = RoutingConfig {
        scoring: Scoring::Softmax,
        group_limit: None,
        routed_scaling_factor: 1.0,
        correction_bias: true,
        renorm: Renorm::AtLeast(1e-12),
        weight_on_input: false,
    };
    vec![
        RoutingRule { top_k: 2, norm_topk_prob: true, config: minimax },
        RoutingRule { top_k: 2, norm_topk_prob: true, config: ernie },
    ]
}

/// The device routing of DeepSeek's, MiniMax-M2's and ERNIE-4.5's rules equals the host
/// `route_row` (used by NAEE and the fused engine), with and without a mask, and the group
/// limit holds.
#[test]
fn deepseek_routing_on_device_equals_host_rows() {
    let device = device();
    let (n, e) = (40, 8);
    for (r, rule) in deepseek_rules().into_iter().chain(biased_rules()).enumerate() {
        let mut rng = Rng(77 + r as u64);
        let logits = rng.tensor([n, e], 3.0, &device);
        let correction = rule.config.correction_bias.then(|| rng.tensor([e], 0.3, &device));
        let host_logits = vec(logits.clone());
        let host_corr = correction.clone().map(vec);
        for keep in [vec![true; e], vec![true, false, true, true, false, true, true, true]] {
            let bias: Vec<f32> = keep.iter().map(|k| if *k { 0.0 } else { f32::NEG_INFINITY }).collect();
            let bias = Tensor::<1>::from_data(TensorData::new(bias, [e]), &device);
            let routing = route_with(logits.clone(), Some(&bias), correction.as_ref(), &rule);
            let w = vec(routing.weights);
            let idx: Vec<i64> = routing.experts.into_data().iter::<i64>().collect();
            for t in 0..n {
                let row = rule.route_row(&host_logits[t * e..(t + 1) * e], &keep, host_corr.as_deref());
                for (j, (ex, wt)) in row.iter().enumerate() {
                    assert_eq!(idx[t * 2 + j] as usize, *ex, "rule {r} token {t}");
                    assert!((w[t * 2 + j] - wt).abs() < 1e-5, "rule {r} token {t}: {} vs {wt}", w[t * 2 + j]);
                    assert!(keep[*ex], "masked expert {ex} selected");
                }
                // Group limit: the chosen experts lie in at most topk_group groups.
                if let Some(g) = rule.config.group_limit {
                    let size = e / g.n_group;
                    let mut groups: Vec<usize> = row.iter().map(|(ex, _)| ex / size).collect();
                    groups.sort();
                    groups.dedup();
                    assert!(groups.len() <= g.topk_group, "rule {r} token {t}: groups {groups:?}");
                }
                if rule.norm_topk_prob {
                    let s: f32 = row.iter().map(|(_, w)| w).sum();
                    assert!((s - rule.config.routed_scaling_factor as f32).abs() < 1e-4);
                }
            }
        }
    }
}

/// V3: masking one expert per group equals deleting it (router rows, correction bias) and
/// renumbering, as the surgery does.
#[test]
fn deepseek_v3_mask_equals_removal_on_the_host() {
    for rule in [deepseek_rules().remove(0)].into_iter().chain(biased_rules()) {
        mask_equals_removal(&rule);
    }
}

/// MiniMax-M2 and ERNIE-4.5 too: the selection bias of a masked expert never brings it back.
fn mask_equals_removal(rule: &RoutingRule) {
    let mut rng = Rng(5);
    let (n, e) = (30, 8);
    let keep = [true, false, true, true, true, true, false, true];
    let kept: Vec<usize> = (0..e).filter(|x| keep[*x]).collect();
    let corr: Vec<f32> = (0..e).map(|_| rng.next_f32() * 0.3).collect();
    let corr_kept: Vec<f32> = kept.iter().map(|x| corr[*x]).collect();
    for _ in 0..n {
        let row: Vec<f32> = (0..e).map(|_| rng.next_f32() * 3.0).collect();
        let masked = rule.route_row(&row, &keep, Some(&corr));
        let small: Vec<f32> = kept.iter().map(|x| row[*x]).collect();
        let removed = rule.route_row(&small, &vec![true; kept.len()], Some(&corr_kept));
        let removed: Vec<(usize, f32)> = removed.into_iter().map(|(x, w)| (kept[x], w)).collect();
        assert_eq!(masked, removed);
    }
}
