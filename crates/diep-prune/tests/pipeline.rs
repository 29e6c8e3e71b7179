//! The pipeline on the shipped fixtures: calibration sampling, statistics invariants, NAEE
//! against the real masked block, baselines' budgets, and — through surgery — pruned
//! checkpoints computing exactly what the masked original computes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_models::StreamingModel;
use diep_models::burn::tensor::{Device, Tensor, TensorData};
use diep_models::{DeviceSpec, MoeModel};
use diep_plan::{Allocation, PruningPlan};
use diep_prune::calib::{CalibrationMix, CalibrationSpec, read_documents, sample_calibration};
use diep_prune::{BaselineSpec, Method, StatsOptions, collect_statistics, plan_baseline, run_baseline, stats_options};
use proptest::prelude::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap()
}

fn model(name: &str) -> MoeModel {
    MoeModel::load(root().join("fixtures/models").join(name), &device()).unwrap()
}

fn calib(name: &str, samples: usize, seq_len: usize, seed: u64) -> Vec<Vec<u32>> {
    let tok = diep_models::tokenizer::load_tokenizer(root().join("fixtures/models").join(name)).unwrap();
    let spec = CalibrationSpec {
        files: vec![root().join("fixtures/calib/gpl-3.txt"), root().join("fixtures/calib/licenses.jsonl")],
        samples,
        seq_len,
        seed,
        mix: CalibrationMix::Pooled,
    };
    sample_calibration(&tok, &spec).unwrap()
}

#[test]
fn calibration_is_deterministic_and_checks_its_budget() {
    let a = calib("tiny-mixtral", 8, 64, 7);
    assert_eq!(a, calib("tiny-mixtral", 8, 64, 7));
    assert_ne!(a, calib("tiny-mixtral", 8, 64, 8));
    assert!(a.iter().all(|s| s.len() == 64));
    let tok = diep_models::tokenizer::load_tokenizer(root().join("fixtures/models/tiny-mixtral")).unwrap();
    let spec = CalibrationSpec {
        files: vec![root().join("fixtures/calib/gpl-3.txt")],
        samples: 128,
        seq_len: 2048,
        seed: 0,
        mix: CalibrationMix::Pooled,
    };
    let err = sample_calibration(&tok, &spec).unwrap_err().to_string();
    assert!(err.contains("tokens found") && err.contains("262144") && err.contains("gpl-3.txt"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"body\": \"no text\"}\n").unwrap();
    let spec = CalibrationSpec { files: vec![bad], samples: 1, seq_len: 2, seed: 0, mix: CalibrationMix::Pooled };
    let err = sample_calibration(&tok, &spec).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl") && err.contains("line 2") && err.contains("`text`"), "{err}");
}

#[test]
fn an_equal_mix_draws_each_files_share_from_its_own_text() {
    let tok = diep_models::tokenizer::load_tokenizer(root().join("fixtures/models/tiny-mixtral")).unwrap();
    let files = [root().join("fixtures/calib/gpl-3.txt"), root().join("fixtures/calib/licenses.jsonl")];
    // Each file's own token stream, as the sampler reads it.
    let stream = |f: &PathBuf| -> Vec<u32> {
        read_documents(f).unwrap().iter().flat_map(|d| diep_models::tokenizer::encode(&tok, d).unwrap()).collect()
    };
    let streams: Vec<Vec<u32>> = files.iter().map(stream).collect();
    let spec = |files: Vec<PathBuf>, samples: usize, mix: CalibrationMix| CalibrationSpec {
        files,
        samples,
        seq_len: 64,
        seed: 3,
        mix,
    };
    // The window index of `w` in `s` (windows start at multiples of 64).
    let window_of =
        |s: &[u32], w: &[u32]| (0..s.len() / 64).find(|i| &s[i * 64..(i + 1) * 64] == w).map(|i| i as isize);
    for samples in [2, 5, 8] {
        let got = sample_calibration(&tok, &spec(files.to_vec(), samples, CalibrationMix::Equal)).unwrap();
        assert_eq!(got.len(), samples);
        // The first file gets the odd sample: ⌈samples / 2⌉ windows of its own text, in its
        // order, then ⌊samples / 2⌋ of the second's.
        let first = samples.div_ceil(2);
        for (part, (windows, s)) in [(&got[..first], &streams[0]), (&got[first..], &streams[1])].into_iter().enumerate()
        {
            let idx: Vec<isize> = windows.iter().map(|w| window_of(s, w).unwrap_or(-1)).collect();
            assert!(idx.iter().all(|i| *i >= 0), "file {part}, {samples} samples: a window not from the file");
            assert!(idx.windows(2).all(|p| p[0] < p[1]), "file {part}: windows repeat or leave stream order: {idx:?}");
        }
    }
    // With one file both mixes draw the same windows.
    let one = vec![files[0].clone()];
    assert_eq!(
        sample_calibration(&tok, &spec(one.clone(), 6, CalibrationMix::Equal)).unwrap(),
        sample_calibration(&tok, &spec(one, 6, CalibrationMix::Pooled)).unwrap()
    );
    // Fewer samples than files, and a file too small for its share, are refused by name.
    let err = sample_calibration(&tok, &spec(files.to_vec(), 1, CalibrationMix::Equal)).unwrap_err().to_string();
    assert!(err.contains("at least 2 samples") && err.contains("--samples 1"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "a few words of text").unwrap();
    let err = sample_calibration(&tok, &spec(vec![files[0].clone(), small], 4, CalibrationMix::Equal))
        .unwrap_err()
        .to_string();
    assert!(err.contains("small.txt") && !err.contains("gpl-3.txt") && err.contains("equal share"), "{err}");
}

#[test]
fn statistics_are_consistent() {
    let m = model("tiny-qwen2-moe");
    let samples = calib("tiny-qwen2-moe", 6, 32, 1);
    let stats = collect_statistics(&m, &samples, &StatsOptions { batch_size: 4, naee_tokens: 50 }, |_, _| {}).unwrap();
    assert_eq!(stats.layers.keys().copied().collect::<Vec<_>>(), m.moe_layers());
    for s in stats.layers.values() {
        assert_eq!(s.tokens, 6 * 32);
        // Every token picks top_k experts; probabilities sum to one per token.
        assert_eq!(s.frequency.iter().sum::<u64>(), (6 * 32 * m.config().moe.top_k) as u64);
        assert!((s.soft_activation.iter().sum::<f64>() - (6 * 32) as f64).abs() < 1e-3);
        for (e, f) in s.frequency.iter().enumerate() {
            assert_eq!(*f == 0, s.norm_sum[e] == 0.0);
            // g ≤ 1, so REAP ≤ mean norm.
            assert!(s.reap()[e] <= s.mean_activation_norm()[e] + 1e-9);
        }
        let cache = s.cache.as_ref().unwrap();
        assert_eq!(cache.tokens, 50);
        assert_eq!(cache.inputs.len(), 50 * m.config().hidden_size);
    }
}

#[test]
fn naee_error_matches_the_real_masked_block() {
    let mut m = model("tiny-mixtral");
    let samples = calib("tiny-mixtral", 4, 32, 3);
    let stats = collect_statistics(&m, &samples, &StatsOptions { batch_size: 4, naee_tokens: 64 }, |_, _| {}).unwrap();
    for (layer, s) in &stats.layers {
        let cache = s.cache.as_ref().unwrap();
        let block = m.moe_block(*layer).unwrap().clone();
        let all = diep_prune::naee::search_layer(&block, cache, 8, 1000, *layer).unwrap();
        assert!(all.error < 1e-6 && all.kept == (0..8).collect::<Vec<_>>());
        let r = diep_prune::naee::search_layer(&block, cache, 5, 1000, *layer).unwrap();
        assert_eq!(r.subsets, 56);
        // Recompute the chosen subset's error with the real block and its mask.
        let x = Tensor::<2>::from_data(TensorData::new(cache.inputs.clone(), [cache.tokens, cache.hidden]), &device());
        let full: Vec<f32> = block.forward(x.clone()).into_data().iter::<f32>().collect();
        assert!(full.iter().zip(&cache.outputs).all(|(a, b)| (a - b).abs() < 1e-5), "cache holds block outputs");
        let keep: Vec<bool> = (0..8).map(|e| r.kept.contains(&e)).collect();
        m.set_expert_mask(*layer, Some(&keep)).unwrap();
        let masked: Vec<f32> = m.moe_block(*layer).unwrap().forward(x).into_data().iter::<f32>().collect();
        m.set_expert_mask(*layer, None).unwrap();
        // Shared experts cancel; Mixtral has none, so the full output is the routed output.
        let diff = full.iter().zip(&masked).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm = full.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        assert!((diff / norm - r.error).abs() < 1e-4, "layer {layer}: {} vs {}", diff / norm, r.error);
    }
    let big =
        diep_prune::naee::search_layer(m.moe_block(0).unwrap(), stats.layers[&0].cache.as_ref().unwrap(), 4, 10, 0);
    assert!(big.unwrap_err().to_string().contains("C(8, 4) = 70"));
    // The pass refuses an oversized search before computing anything.
    let mut spec = spec(Method::Naee, Allocation::Uniform, 0.5);
    spec.naee_max_subsets = 10;
    let opts = stats_options(&spec, 4, 64);
    let err = run_baseline(&m, &samples, &spec, &opts, |_, _| panic!("no layer may run")).unwrap_err();
    assert!(err.to_string().contains("C(8, 4) = 70") && err.to_string().contains("--naee-max-subsets"), "{err}");
}

#[test]
fn streaming_statistics_equal_in_memory_statistics() {
    let m = model("tiny-qwen2-moe");
    let streaming = StreamingModel::open(root().join("fixtures/models/tiny-qwen2-moe"), &device()).unwrap();
    let samples = calib("tiny-qwen2-moe", 4, 32, 9);
    let opts = StatsOptions { batch_size: 3, naee_tokens: 16 };
    let a = collect_statistics(&m, &samples, &opts, |_, _| {}).unwrap();
    let b = collect_statistics(&streaming, &samples, &opts, |_, _| {}).unwrap();
    for (l, sa) in &a.layers {
        let sb = &b.layers[l];
        assert_eq!(sa.frequency, sb.frequency);
        assert_eq!(sa.soft_activation, sb.soft_activation);
        assert_eq!(sa.reap_sum, sb.reap_sum);
        assert_eq!(sa.cache.as_ref().unwrap().outputs, sb.cache.as_ref().unwrap().outputs);
    }
}

fn spec(method: Method, allocation: Allocation, ratio: f64) -> BaselineSpec {
    BaselineSpec { method, allocation, ratio, min_experts: 0, seed: 5, naee_max_subsets: 10_000 }
}

#[test]
fn every_baseline_meets_its_budget_and_floors() {
    let m = model("tiny-qwen2-moe");
    let samples = calib("tiny-qwen2-moe", 4, 32, 2);
    let stats = collect_statistics(&m, &samples, &StatsOptions { batch_size: 4, naee_tokens: 64 }, |_, _| {}).unwrap();
    let total: usize = 3 * 8;
    for method in Method::ALL {
        for allocation in [Allocation::Uniform, Allocation::Global] {
            for ratio in [0.25, 0.5] {
                let spec = spec(method, allocation, ratio);
                let plan = if method == Method::Naee {
                    run_baseline(&m, &samples, &spec, &stats_options(&spec, 4, 64), |_, _| {}).map(|(_, p)| p)
                } else {
                    plan_baseline(m.config(), &stats, &spec, None)
                };
                if method == Method::Naee && allocation == Allocation::Global {
                    assert!(plan.unwrap_err().to_string().contains("uniform"));
                    continue;
                }
                let plan = plan.unwrap();
                plan.validate(m.config()).unwrap();
                let kept: usize = plan.kept_experts.values().map(Vec::len).sum();
                assert_eq!(total - kept, (ratio * total as f64).round() as usize, "{method} {allocation} {ratio}");
                assert!(plan.kept_experts.values().all(|k| k.len() >= 2));
                if allocation == Allocation::Uniform {
                    assert!(plan.is_uniform());
                }
            }
        }
    }
    let err = plan_baseline(m.config(), &stats, &spec(Method::Frequency, Allocation::Global, 1.0), None).unwrap_err();
    assert!(err.to_string().contains("between 0 and 1"));
    let err = plan_baseline(m.config(), &stats, &spec(Method::Frequency, Allocation::Uniform, 0.9), None).unwrap_err();
    assert!(err.to_string().contains("floor"));
}

#[test]
fn frequency_keeps_the_most_selected_experts() {
    let m = model("tiny-mixtral");
    let samples = calib("tiny-mixtral", 4, 32, 4);
    let stats = collect_statistics(&m, &samples, &StatsOptions::default(), |_, _| {}).unwrap();
    let plan = plan_baseline(m.config(), &stats, &spec(Method::Frequency, Allocation::Uniform, 0.5), None).unwrap();
    for (l, kept) in &plan.kept_experts {
        let f = &stats.layers[l].frequency;
        let min_kept = kept.iter().map(|e| f[*e]).min().unwrap();
        let max_removed = (0..8).filter(|e| !kept.contains(e)).map(|e| f[e]).max().unwrap();
        assert!(min_kept >= max_removed, "layer {l}: {f:?} kept {kept:?}");
    }
}

/// Logits of `model` with the plan's pruned experts masked.
fn masked_logits(name: &str, plan: &PruningPlan, ids: &[Vec<u32>]) -> Vec<f32> {
    let mut m = model(name);
    for (l, kept) in &plan.kept_experts {
        let n = plan.original_experts[l];
        let keep: Vec<bool> = (0..n).map(|e| kept.contains(&e)).collect();
        m.set_expert_mask(*l, Some(&keep)).unwrap();
    }
    m.forward(ids).unwrap().into_data().iter::<f32>().collect()
}

fn ids(name: &str) -> Vec<Vec<u32>> {
    diep_eval_ids(&root().join("fixtures/parity").join(name).join("ids.json"))
}

fn diep_eval_ids(path: &std::path::Path) -> Vec<Vec<u32>> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// For random plans (uniform and not), the pruned checkpoint's logits equal the original
    /// model's with those experts masked.
    #[test]
    fn pruned_checkpoint_equals_masked_model(
        name in prop::sample::select(vec!["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe"]),
        masks in prop::collection::vec(any::<u8>(), 4),
    ) {
        let m = model(name);
        let mut kept = BTreeMap::new();
        let mut original = BTreeMap::new();
        for (i, l) in m.moe_layers().into_iter().enumerate() {
            // Keep at least top_k = 2 experts: experts 0 and 1 unless the bits keep others.
            let bits = masks[i % masks.len()];
            let mut k: Vec<usize> = (0..8).filter(|e| bits >> e & 1 == 1).collect();
            if k.len() < 2 { k = vec![(bits % 4) as usize, 4 + (bits % 4) as usize]; }
            kept.insert(l, k);
            original.insert(l, 8);
        }
        let plan = PruningPlan::new(m.config().architecture.model_type(), original, kept, "test");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pruned");
        diep_surgery::apply_plan(&root().join("fixtures/models").join(name), &plan, &out, &Default::default()).unwrap();
        let pruned = MoeModel::load(&out, &device()).unwrap();
        for (l, k) in &plan.kept_experts {
            prop_assert_eq!(pruned.moe_block(*l).unwrap().num_experts(), k.len());
        }
        let ids = ids(name);
        let got: Vec<f32> = pruned.forward(&ids).unwrap().into_data().iter::<f32>().collect();
        let expected = masked_logits(name, &plan, &ids);
        let err = got.iter().zip(&expected).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0, f32::max);
        prop_assert!(err <= 1e-5, "{}: pruned vs masked logits differ by {:e}", name, err);
    }
}

/// gpt-oss: a uniformly pruned checkpoint (fused experts, MXFP4 blocks/scales and router bias
/// sliced) equals the original model with those experts masked.
#[test]
fn gpt_oss_pruned_checkpoint_equals_masked_model() {
    for name in ["tiny-gpt-oss", "tiny-gpt-oss-mxfp4"] {
        gpt_oss_pruned_equals_masked(name);
    }
}

fn gpt_oss_pruned_equals_masked(name: &str) {
    let m = model(name);
    let kept: BTreeMap<usize, Vec<usize>> =
        m.moe_layers().into_iter().map(|l| (l, if l == 1 { vec![0, 2, 5, 7] } else { vec![1, 3, 4, 6] })).collect();
    let original = kept.keys().map(|l| (*l, 8)).collect();
    let plan = PruningPlan::new("gpt_oss", original, kept, "test");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pruned");
    diep_surgery::apply_plan(&root().join("fixtures/models").join(name), &plan, &out, &Default::default()).unwrap();
    let pruned = MoeModel::load(&out, &device()).unwrap();
    let ids = ids(name);
    let got: Vec<f32> = pruned.forward(&ids).unwrap().into_data().iter::<f32>().collect();
    let expected = masked_logits(name, &plan, &ids);
    let err = got.iter().zip(&expected).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0, f32::max);
    assert!(err <= 1e-5, "{name}: pruned vs masked logits differ by {err:e}");
}

/// DeepSeek-V2/V3, GLM-4.5, MiniMax-M2, ERNIE-4.5 and gpt-oss: non-uniformly pruned checkpoints (per-layer counts; DeepSeek
/// groups of `E_i / n_group` with `e_score_correction_bias` of length `E_i`) load in this
/// project's model and equal the original with those experts masked.
#[test]
fn non_uniform_deepseek_and_gpt_oss_checkpoints_equal_masked_model() {
    type Case = (&'static str, &'static str, Vec<(usize, Vec<usize>)>);
    let cases: [Case; 9] = [
        // n_group 2 (groups of 4): layer 1 keeps 2 + 2, layer 2 keeps 3 + 3.
        ("tiny-deepseek-v3", "deepseek_v3", vec![(1, vec![1, 3, 4, 6]), (2, vec![0, 1, 3, 4, 5, 7])]),
        // GLM-4.5: the same groups; MiniMax-M2's block-level and ERNIE's `[1, E]` selection biases.
        ("tiny-glm4-moe", "glm4_moe", vec![(1, vec![1, 3, 4, 6]), (2, vec![0, 1, 3, 4, 5, 7])]),
        ("tiny-minimax-m2", "minimax_m2", vec![(0, vec![0, 2, 3, 5, 6]), (1, vec![1, 4, 7]), (2, (0..7).collect())]),
        (
            "tiny-ernie4-5-moe",
            "ernie4_5_moe",
            vec![(1, vec![0, 2, 3, 5, 6]), (2, vec![1, 4, 7]), (3, (1..8).collect())],
        ),
        // Llama 4's fused experts (gate then up), alone and inside the multimodal wrapper.
        ("tiny-llama4-text", "llama4_text", vec![(1, vec![0, 2, 3, 5, 6]), (3, vec![1, 4, 7])]),
        ("tiny-llama4", "llama4_text", vec![(1, vec![1, 2, 6]), (3, vec![0, 3, 4, 5, 7])]),
        // Qwen3-Next: DeltaNet and gated-attention layers around Qwen2-MoE blocks.
        (
            "tiny-qwen3-next",
            "qwen3_next",
            vec![(0, vec![0, 1, 5]), (1, (0..8).collect()), (2, vec![2, 3, 4, 6, 7]), (3, vec![1, 6])],
        ),
        // n_group 4 (groups of 2): layer 1 keeps all 8, layer 2 one per group.
        ("tiny-deepseek-v2", "deepseek_v2", vec![(1, (0..8).collect()), (2, vec![1, 2, 5, 7])]),
        ("tiny-gpt-oss", "gpt_oss", vec![(0, vec![0, 2, 3, 5, 6]), (1, vec![1, 4, 7]), (2, (0..7).collect())]),
    ];
    for (name, model_type, kept) in cases {
        let kept: BTreeMap<usize, Vec<usize>> = kept.into_iter().collect();
        let original = kept.keys().map(|l| (*l, 8)).collect();
        let plan = PruningPlan::new(model_type, original, kept, "test");
        assert!(!plan.is_uniform());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pruned");
        diep_surgery::apply_plan(&root().join("fixtures/models").join(name), &plan, &out, &Default::default()).unwrap();
        let pruned = MoeModel::load(&out, &device()).unwrap();
        for (l, k) in &plan.kept_experts {
            assert_eq!(pruned.moe_block(*l).unwrap().num_experts(), k.len(), "{name} layer {l}");
        }
        let ids = ids(name);
        let got: Vec<f32> = pruned.forward(&ids).unwrap().into_data().iter::<f32>().collect();
        let expected = masked_logits(name, &plan, &ids);
        let err = got.iter().zip(&expected).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0.0, f32::max);
        eprintln!("{name}: non-uniform pruned vs masked original, max rel logit diff {err:e}");
        assert!(err <= 1e-5, "{name}: pruned vs masked logits differ by {err:e}");
    }
}

/// Group-limited routers: both allocations of every score-based baseline keep equal routing
/// groups (the top experts of each group), so surgery accepts the plans.
#[test]
fn baselines_respect_routing_groups() {
    for name in ["tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-glm4-moe"] {
        let m = model(name);
        let g = m.config().moe.routing.group_limit.unwrap();
        let samples = calib(name, 4, 32, 3);
        let stats = collect_statistics(&m, &samples, &StatsOptions::default(), |_, _| {}).unwrap();
        for method in [Method::Frequency, Method::Reap, Method::Random] {
            for allocation in [Allocation::Uniform, Allocation::Global] {
                let plan = plan_baseline(m.config(), &stats, &spec(method, allocation, 0.5), None)
                    .unwrap_or_else(|e| panic!("{name} {method} {allocation}: {e}"));
                plan.validate(m.config()).unwrap_or_else(|e| panic!("{name} {method} {allocation}: {e}"));
                for (l, kept) in &plan.kept_experts {
                    assert_eq!(kept.len() % g.n_group, 0, "{name} {method} {allocation} layer {l}");
                    // Within each group the kept experts outscore the removed ones.
                    let s = &plan.scores[l];
                    let size = 8 / g.n_group;
                    for gi in 0..g.n_group {
                        let members = gi * size..(gi + 1) * size;
                        let min_kept =
                            members.clone().filter(|e| kept.contains(e)).map(|e| s[e]).fold(f64::MAX, f64::min);
                        let max_removed = members.filter(|e| !kept.contains(e)).map(|e| s[e]).fold(f64::MIN, f64::max);
                        assert!(min_kept >= max_removed, "{name} {method} {allocation} layer {l} group {gi}");
                    }
                }
            }
        }
    }
}

/// Gzipped JSON lines (C4's `c4-train.*.json.gz`) read as the same documents as the plain file.
#[test]
fn gzipped_json_lines_read_like_the_plain_file() {
    use std::io::Write as _;
    let plain = root().join("fixtures/calib/licenses.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("c4-train.00000-of-01024.json.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    enc.write_all(&std::fs::read(&plain).unwrap()).unwrap();
    enc.finish().unwrap();
    let expected = diep_prune::calib::read_documents(&plain).unwrap();
    assert!(expected.len() > 1);
    assert_eq!(diep_prune::calib::read_documents(&gz).unwrap(), expected);
    // A gzipped plain-text file is one document.
    let txt = dir.path().join("notes.txt.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&txt).unwrap(), flate2::Compression::fast());
    enc.write_all(b"one document\nover two lines").unwrap();
    enc.finish().unwrap();
    assert_eq!(diep_prune::calib::read_documents(&txt).unwrap(), vec!["one document\nover two lines".to_string()]);
    // A truncated archive is an error naming the file.
    let bytes = std::fs::read(&gz).unwrap();
    let cut = dir.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = diep_prune::calib::read_documents(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.jsonl.gz"), "{err}");
}
