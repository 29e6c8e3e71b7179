//! End-to-end surgery on the transformers-saved tiny fixtures: structure, bytes, config, shards,
//! and clean failures.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use diep_checkpoint::architectures::{MoeKeys, MoeTensor};
use diep_checkpoint::{Checkpoint, Dtype, ModelConfig, PER_LAYER_EXPERTS_KEY};
use diep_surgery::{
    AUTO_MAP_KEY, PruningPlan, REMOTE_CODE_FILES, SurgeryError, SurgeryOptions, SurgeryProgress, SurgeryReport,
    apply_plan, expert_count_keys, remote_code_auto_map,
};

const FIXTURES: &[&str] =
    &["tiny-mixtral", "tiny-mixtral-bf16", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-qwen3-moe-tf4", "tiny-olmoe"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name)
}

fn plan_from(config: &ModelConfig, kept: impl Fn(usize, usize, usize) -> Vec<usize>) -> PruningPlan {
    let layers = config.moe_layers();
    let original = layers.iter().map(|&l| (l, config.experts_in_layer(l))).collect();
    let kept =
        layers.iter().enumerate().map(|(j, &l)| (l, kept(j, config.experts_in_layer(l), config.moe.top_k))).collect();
    PruningPlan::new(config.architecture.model_type(), original, kept, "test")
}

/// Every MoE layer keeps the same `n/2` experts, not a prefix: odd ids first.
fn uniform_plan(config: &ModelConfig) -> PruningPlan {
    plan_from(config, |_, n, k| {
        let mut ids: Vec<usize> =
            (0..n).filter(|e| e % 2 == 1).chain((0..n).filter(|e| e % 2 == 0)).take((n / 2).max(k)).collect();
        ids.sort();
        ids
    })
}

/// Counts differ per layer (5, 3, 6, ...), ids scattered.
fn non_uniform_plan(config: &ModelConfig) -> PruningPlan {
    plan_from(config, |j, n, k| {
        let count = [5, 3, 6, 2, 7][j % 5].clamp(k, n);
        let mut ids: Vec<usize> = (0..n).map(|e| (e * 3 + j) % n).take(count).collect();
        ids.sort();
        ids.dedup();
        ids
    })
}

fn opts() -> SurgeryOptions<'static> {
    SurgeryOptions::default()
}

fn read_json(path: &Path) -> Map<String, Value> {
    match serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap() {
        Value::Object(m) => m,
        other => panic!("{}: not an object: {other}", path.display()),
    }
}

/// Checks an output against its input and plan, independently of the implementation.
fn verify(input_dir: &Path, out_dir: &Path, plan: &PruningPlan, report: &SurgeryReport) {
    let cin = ModelConfig::from_dir(input_dir).unwrap();
    let input = Checkpoint::open(input_dir).unwrap();
    let output = Checkpoint::open(out_dir).unwrap();
    let keys = MoeKeys::of(cin.architecture);

    // Tensors.
    let mut expected = BTreeSet::new();
    for name in input.names() {
        let t = input.get(name).unwrap();
        // A multimodal wrapper's text tensors: `language_model.` + the text model's names.
        let pre = cin.tensor_prefix();
        let (out_name, rows) = match keys.parse(name.strip_prefix(pre).unwrap_or(name)) {
            Some(MoeTensor::Expert { layer, expert, rest }) => {
                let kept = &plan.kept_experts[&layer];
                let Some(new) = kept.iter().position(|e| *e == expert) else {
                    continue;
                };
                (format!("{pre}{}.experts.{new}.{rest}", keys.block_prefix(layer)), None)
            }
            Some(MoeTensor::Router { layer }) => (name.to_string(), Some(plan.kept_experts[&layer].clone())),
            // gpt-oss's fused `[E, ...]` expert tensors are sliced along the expert axis.
            Some(MoeTensor::FusedExperts { layer, .. }) => (name.to_string(), Some(plan.kept_experts[&layer].clone())),
            // DeepSeek-V3's `e_score_correction_bias` is sliced with the router rows.
            None => match correction_bias_layer(&keys, name) {
                Some(layer) => (name.to_string(), Some(plan.kept_experts[&layer].clone())),
                None => (name.to_string(), None),
            },
        };
        let o = output.get(&out_name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.dtype, t.dtype, "{out_name}");
        match rows {
            None => {
                assert_eq!(o.shape, t.shape, "{out_name}");
                assert!(o.bytes == t.bytes, "{out_name}: bytes differ from `{name}`");
            }
            Some(rows) => {
                let row = t.bytes.len() / t.shape[0];
                let mut shape = t.shape.to_vec();
                shape[0] = rows.len();
                assert_eq!(o.shape, shape.as_slice(), "{out_name}");
                let want: Vec<u8> = rows.iter().flat_map(|r| t.bytes[r * row..(r + 1) * row].iter().copied()).collect();
                assert!(o.bytes == want.as_slice(), "{out_name}: router rows differ");
            }
        }
        assert!(expected.insert(out_name));
    }
    let got: BTreeSet<String> = output.names().map(str::to_string).collect();
    assert_eq!(got, expected, "output tensor set");
    // No pruned expert left: expert ids in each layer are exactly 0..kept (fused layouts have
    // no per-expert names; their slabs were checked above).
    for (layer, kept) in plan.kept_experts.iter().filter(|_| keys.fused_experts.is_none()) {
        let ids: BTreeSet<usize> = output
            .names()
            .filter_map(|n| match keys.parse(n) {
                Some(MoeTensor::Expert { layer: l, expert, .. }) if l == *layer => Some(expert),
                _ => None,
            })
            .collect();
        assert_eq!(ids, (0..kept.len()).collect(), "layer {layer}");
    }

    // config.json (a multimodal wrapper's is checked by its own test).
    let counts = plan.kept_counts();
    if cin.wrapper.is_none() {
        let raw_in = read_json(&input_dir.join("config.json"));
        let raw_out = read_json(&out_dir.join("config.json"));
        let count_keys = expert_count_keys(cin.architecture);
        let special = |k: &str| count_keys.contains(&k) || k == PER_LAYER_EXPERTS_KEY || k == AUTO_MAP_KEY;
        for (k, v) in &raw_in {
            if !special(k) {
                assert_eq!(raw_out.get(k), Some(v), "config key `{k}`");
            }
        }
        let order_in: Vec<&String> = raw_in.keys().filter(|k| raw_out.contains_key(*k)).collect();
        let order_out: Vec<&String> = raw_out.keys().filter(|k| raw_in.contains_key(*k)).collect();
        assert_eq!(order_in, order_out, "config key order");
        let max = *counts.values().max().unwrap();
        for k in count_keys {
            assert_eq!(raw_out[*k], max, "`{k}`");
        }
        let uniform = counts.values().all(|c| *c == max);
        assert_eq!(report.uniform, uniform);
        let py: Vec<_> = REMOTE_CODE_FILES.iter().map(|(n, text)| (out_dir.join(n), text)).collect();
        if uniform {
            assert!(!raw_out.contains_key(PER_LAYER_EXPERTS_KEY));
            // A stale `auto_map` of ours goes; the checkpoint's own (DeepSeek-MoE's remote code) stays.
            let ours = Value::Object(remote_code_auto_map().unwrap());
            match raw_in.get(AUTO_MAP_KEY) {
                Some(v) if *v != ours => assert_eq!(raw_out.get(AUTO_MAP_KEY), Some(v)),
                _ => assert!(!raw_out.contains_key(AUTO_MAP_KEY)),
            }
            for (p, _) in &py {
                assert!(!p.exists(), "{}", p.display());
            }
        } else {
            let per_layer: Vec<usize> = (0..cin.num_layers).map(|l| counts.get(&l).copied().unwrap_or(0)).collect();
            assert_eq!(raw_out[PER_LAYER_EXPERTS_KEY], serde_json::json!(per_layer));
            assert_eq!(raw_out[AUTO_MAP_KEY], Value::Object(remote_code_auto_map().unwrap()));
            for (p, text) in &py {
                assert_eq!(&std::fs::read_to_string(p).unwrap(), *text);
            }
        }
    }
    let cout = ModelConfig::from_dir(out_dir).unwrap();
    assert_eq!(cout.moe_layers(), cin.moe_layers());
    for l in 0..cin.num_layers {
        assert_eq!(cout.experts_in_layer(l), counts.get(&l).copied().unwrap_or(0), "layer {l}");
    }

    // Other files.
    for f in ["tokenizer.json", "generation_config.json"] {
        if input_dir.join(f).exists() {
            assert_eq!(std::fs::read(input_dir.join(f)).unwrap(), std::fs::read(out_dir.join(f)).unwrap(), "{f}");
        }
    }

    // Report.
    let numel = |c: &Checkpoint| c.names().map(|n| c.get(n).unwrap().numel() as u64).sum::<u64>();
    assert_eq!(report.params_before, numel(&input));
    assert_eq!(report.params_after, numel(&output));
    assert_eq!(report.tensors_written, output.names().count());
    assert_eq!(report.tensor_bytes, output.data_bytes() as u64);
    assert_eq!(report.kept_experts, plan.kept_experts);
    let listed: BTreeSet<PathBuf> = report.files_written.iter().cloned().collect();
    let on_disk: BTreeSet<PathBuf> =
        std::fs::read_dir(out_dir).unwrap().map(|e| PathBuf::from(e.unwrap().file_name())).collect();
    assert_eq!(listed, on_disk);
    let size: u64 = on_disk.iter().map(|f| std::fs::metadata(out_dir.join(f)).unwrap().len()).sum();
    assert_eq!(report.bytes_written, size);
}

/// The layer whose router correction bias `name` is, if it is one.
fn correction_bias_layer(keys: &MoeKeys, name: &str) -> Option<usize> {
    let layer: usize = name.strip_prefix("model.layers.")?.split_once('.')?.0.parse().ok()?;
    (keys.router_correction_bias(layer)? == name).then_some(layer)
}

/// Nothing but `allowed` in `dir` (no temp directories left behind).
fn assert_only(dir: &Path, allowed: &[&str]) {
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    for n in &names {
        assert!(allowed.contains(&n.as_str()), "unexpected {n} in {}", dir.display());
    }
}

#[test]
fn uniform_and_non_uniform_plans_on_every_fixture() {
    for name in FIXTURES {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        for (kind, plan) in [("uniform", uniform_plan(&config)), ("non-uniform", non_uniform_plan(&config))] {
            assert_eq!(plan.is_uniform(), kind == "uniform", "{name}");
            let outs = tempfile::tempdir().unwrap();
            let out = outs.path().join("pruned");
            let report = apply_plan(&dir, &plan, &out, &opts()).unwrap_or_else(|e| panic!("{name} {kind}: {e}"));
            verify(&dir, &out, &plan, &report);
            assert_eq!(report.shards, 1);
            assert!(out.join("model.safetensors").is_file() && !out.join("model.safetensors.index.json").exists());
            assert_only(outs.path(), &["pruned"]);
        }
    }
}

#[test]
fn qwen3_writes_both_count_keys() {
    for name in ["tiny-qwen3-moe", "tiny-qwen3-moe-tf4"] {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("o");
        apply_plan(&dir, &uniform_plan(&config), &out, &opts()).unwrap();
        let raw = read_json(&out.join("config.json"));
        assert_eq!(raw["num_experts"], 4, "{name}");
        assert_eq!(raw["num_local_experts"], 4, "{name}");
    }
}

#[test]
fn shards_when_over_the_limit() {
    for name in ["tiny-mixtral", "tiny-qwen2-moe", "tiny-mixtral-bf16"] {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let plan = non_uniform_plan(&config);
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("pruned");
        let max = 100_000u64;
        let report = apply_plan(&dir, &plan, &out, &SurgeryOptions { max_shard_bytes: max, ..opts() }).unwrap();
        verify(&dir, &out, &plan, &report);
        let n = report.shards;
        assert!(n > 2, "{name}: {n} shards");
        assert!(!out.join("model.safetensors").exists());
        let index = read_json(&out.join("model.safetensors.index.json"));
        let ckpt = Checkpoint::open(&out).unwrap();
        assert_eq!(index["metadata"]["total_size"], ckpt.data_bytes() as u64);
        assert_eq!(index["metadata"]["total_parameters"], report.params_after);
        let weight_map = index["weight_map"].as_object().unwrap();
        assert_eq!(weight_map.len(), ckpt.names().count());
        let keys: Vec<&String> = weight_map.keys().collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "weight_map sorted");
        let mut per_shard: HashMap<&str, u64> = HashMap::new();
        let mut largest = 0;
        for (t, f) in weight_map {
            let bytes = ckpt.get(t).unwrap().bytes.len() as u64;
            *per_shard.entry(f.as_str().unwrap()).or_default() += bytes;
            largest = largest.max(bytes);
        }
        assert_eq!(per_shard.len(), n);
        for i in 1..=n {
            let f = format!("model-{i:05}-of-{n:05}.safetensors");
            let size = per_shard[f.as_str()];
            assert!(size <= max.max(largest), "{f}: {size} bytes");
            // transformers' metadata on every shard.
            let bytes = std::fs::read(out.join(&f)).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        }
        assert_only(outs.path(), &["pruned"]);
    }
}

#[test]
fn sharded_input_becomes_single_file_under_the_limit() {
    let dir = fixture("tiny-qwen2-moe");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let plan = uniform_plan(&config);
    let outs = tempfile::tempdir().unwrap();
    let out = outs.path().join("pruned");
    let report = apply_plan(&dir, &plan, &out, &opts()).unwrap();
    verify(&dir, &out, &plan, &report);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    // Dense layer 2 and the shared expert are untouched (checked by verify) and present.
    let ckpt = Checkpoint::open(&out).unwrap();
    assert!(ckpt.contains("model.layers.2.mlp.gate_proj.weight"));
    assert!(ckpt.contains("model.layers.0.mlp.shared_expert_gate.weight"));
}

#[test]
fn re_pruning_a_non_uniform_output() {
    let dir = fixture("tiny-olmoe");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let first = non_uniform_plan(&config);
    let outs = tempfile::tempdir().unwrap();
    let once = outs.path().join("once");
    let r = apply_plan(&dir, &first, &once, &opts()).unwrap();
    verify(&dir, &once, &first, &r);

    // Non-uniform again: the per-layer list defines the input's experts.
    let c1 = ModelConfig::from_dir(&once).unwrap();
    let second = plan_from(&c1, |j, n, k| (0..n).filter(|e| e % 2 == j % 2 || *e < k).collect());
    assert!(!second.is_uniform());
    let twice = outs.path().join("twice");
    let r = apply_plan(&once, &second, &twice, &opts()).unwrap();
    verify(&once, &twice, &second, &r);

    // Uniform: the stale list, auto_map and remote code go.
    let third = plan_from(&c1, |_, _, k| (0..k).collect());
    let thrice = outs.path().join("thrice");
    let r = apply_plan(&once, &third, &thrice, &opts()).unwrap();
    verify(&once, &thrice, &third, &r);
    assert!(!r.files_written.iter().any(|f| f.extension().is_some_and(|e| e == "py")));
    assert_only(outs.path(), &["once", "twice", "thrice"]);
}

#[test]
fn progress_reaches_the_total() {
    let dir = fixture("tiny-qwen2-moe");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let seen: RefCell<Vec<SurgeryProgress>> = RefCell::new(Vec::new());
    let cb = |p: SurgeryProgress| seen.borrow_mut().push(p);
    let outs = tempfile::tempdir().unwrap();
    let out = outs.path().join("o");
    let o = SurgeryOptions { max_shard_bytes: 200_000, progress: Some(&cb), ..opts() };
    let report = apply_plan(&dir, &uniform_plan(&config), &out, &o).unwrap();
    let seen = seen.into_inner();
    let last = *seen.last().unwrap();
    assert_eq!(last.bytes_written, last.total_bytes);
    assert_eq!(last.total_bytes, report.tensor_bytes);
    assert_eq!(last.tensors_written, report.tensors_written);
    assert_eq!(last.total_tensors, report.tensors_written);
    assert_eq!((last.shard, last.shards), (report.shards, report.shards));
    assert!(seen.windows(2).all(|w| w[0].bytes_written <= w[1].bytes_written));
}

// ---------------------------------------------------------------------------------------------
// Generic router slicing and mixed dtypes.

type Owned = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn load_owned(dir: &Path) -> Owned {
    let c = Checkpoint::open(dir).unwrap();
    c.names()
        .map(|n| {
            let t = c.get(n).unwrap();
            (n.to_string(), t.dtype, t.shape.to_vec(), t.bytes.to_vec())
        })
        .collect()
}

fn write_owned(path: &Path, tensors: &Owned) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

/// A copy of a fixture in a fresh temp dir (model in `model/`, outputs go to `outs/`).
struct Scratch {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    outs: PathBuf,
}

fn scratch(name: &str) -> Scratch {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let outs = tmp.path().join("outs");
    std::fs::create_dir(&model).unwrap();
    std::fs::create_dir(&outs).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    Scratch { _tmp: tmp, model, outs }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let mut raw = read_json(&dir.join("config.json"));
    f(&mut raw);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&Value::Object(raw)).unwrap()).unwrap();
}

#[test]
fn router_vectors_are_sliced_and_other_dtypes_copied() {
    let s = scratch("tiny-mixtral");
    let mut tensors = load_owned(&s.model);
    let bias: Vec<u8> = (0..8).flat_map(|i| (i as f32 * 10.0).to_le_bytes()).collect();
    tensors.push(("model.layers.0.block_sparse_moe.gate.bias".into(), Dtype::F32, vec![8], bias));
    let ints: Vec<u8> = [7i64, -1, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    tensors.push(("model.extra_ints".into(), Dtype::I64, vec![3], ints.clone()));
    tensors.push(("model.extra_half".into(), Dtype::F16, vec![2], vec![0, 0x3C, 0, 0x40]));
    write_owned(&s.model.join("model.safetensors"), &tensors);
    std::fs::write(s.model.join("README.md"), "hello").unwrap();
    std::fs::write(s.model.join("pytorch_model.bin"), "not copied").unwrap();
    std::fs::write(s.model.join("pruning.json"), "{}").unwrap();
    std::fs::write(s.model.join(".gitattributes"), "x").unwrap();

    let config = ModelConfig::from_dir(&s.model).unwrap();
    let plan = plan_from(&config, |_, _, _| vec![1, 4, 6]);
    let out = s.outs.join("o");
    apply_plan(&s.model, &plan, &out, &SurgeryOptions { max_shard_bytes: 150_000, ..opts() }).unwrap();
    let c = Checkpoint::open(&out).unwrap();
    let b = c.get("model.layers.0.block_sparse_moe.gate.bias").unwrap();
    assert_eq!(b.shape, &[3]);
    assert_eq!(b.to_f32().unwrap(), vec![10.0, 40.0, 60.0]);
    assert_eq!(c.get("model.extra_ints").unwrap().bytes, ints.as_slice());
    assert_eq!(c.get("model.extra_half").unwrap().bytes, &[0, 0x3C, 0, 0x40]);
    assert_eq!(std::fs::read_to_string(out.join("README.md")).unwrap(), "hello");
    for f in ["pytorch_model.bin", ".gitattributes"] {
        assert!(!out.join(f).exists(), "{f} copied");
    }
    // The input's stale pruning.json is replaced by this plan's.
    let written = diep_surgery::PruningPlan::read(out.join("pruning.json")).unwrap();
    assert_eq!(written.kept_experts, plan.kept_experts);
}

// ---------------------------------------------------------------------------------------------
// Failures: a clear error, and nothing left in the output's parent.

fn fail(s: &Scratch, plan: &PruningPlan) -> String {
    let out = s.outs.join("pruned");
    let err = apply_plan(&s.model, plan, &out, &opts()).expect_err("surgery should fail");
    assert_only(&s.outs, &[]);
    let msg = err.to_string();
    eprintln!("{msg}");
    msg
}

fn plan_for(dir: &Path) -> PruningPlan {
    uniform_plan(&ModelConfig::from_dir(dir).unwrap())
}

#[test]
fn truncated_safetensors() {
    let s = scratch("tiny-mixtral");
    let plan = plan_for(&s.model);
    let path = s.model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = fail(&s, &plan);
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
}

#[test]
fn header_length_beyond_the_file() {
    let s = scratch("tiny-mixtral");
    let plan = plan_for(&s.model);
    let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}      ");
    std::fs::write(s.model.join("model.safetensors"), bytes).unwrap();
    let msg = fail(&s, &plan);
    assert!(msg.contains("model.safetensors") && msg.contains("beyond the end of the file"), "{msg}");
}

#[test]
fn shard_index_pointing_outside() {
    let s = scratch("tiny-qwen2-moe");
    let plan = plan_for(&s.model);
    let path = s.model.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("model-00003-of-00005.safetensors", "../x.safetensors", 1);
    std::fs::write(&path, text).unwrap();
    let msg = fail(&s, &plan);
    assert!(msg.contains("model.safetensors.index.json") && msg.contains("../x.safetensors"), "{msg}");
    assert!(msg.contains("outside the model directory"), "{msg}");
}

#[test]
fn config_says_fewer_experts_than_the_router_has() {
    let s = scratch("tiny-mixtral");
    edit_config(&s.model, |c| {
        c.insert("num_local_experts".into(), 6.into());
    });
    let msg = fail(&s, &plan_for(&s.model));
    assert!(msg.contains("`model.layers.0.block_sparse_moe.gate.weight`"), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("8 rows") && msg.contains("`num_local_experts`"),
        "{msg}"
    );
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn router_has_fewer_rows_than_the_config_says() {
    let s = scratch("tiny-mixtral");
    let plan = plan_for(&s.model);
    let mut tensors = load_owned(&s.model);
    let router = tensors.iter_mut().find(|t| t.0 == "model.layers.1.block_sparse_moe.gate.weight").unwrap();
    router.2[0] = 6;
    router.3.truncate(router.3.len() / 8 * 6);
    write_owned(&s.model.join("model.safetensors"), &tensors);
    let msg = fail(&s, &plan);
    assert!(
        msg.contains("`model.layers.1.block_sparse_moe.gate.weight`") && msg.contains("model.safetensors"),
        "{msg}"
    );
    assert!(msg.contains("6 rows") && msg.contains("8 experts") && msg.contains("num_local_experts"), "{msg}");
}

#[test]
fn missing_expert_tensor() {
    let s = scratch("tiny-qwen3-moe");
    let plan = plan_for(&s.model);
    let mut tensors = load_owned(&s.model);
    tensors.retain(|t| t.0 != "model.layers.3.mlp.experts.5.down_proj.weight");
    write_owned(&s.model.join("model.safetensors"), &tensors);
    let msg = fail(&s, &plan);
    assert!(msg.contains("`model.layers.3.mlp.experts.5.down_proj.weight`") && msg.contains("missing"), "{msg}");
}

#[test]
fn expert_shape_differs_from_config() {
    let s = scratch("tiny-olmoe");
    edit_config(&s.model, |c| {
        c.insert("intermediate_size".into(), 40.into());
    });
    let msg = fail(&s, &plan_for(&s.model));
    assert!(msg.contains("model.layers.0.mlp.experts.0.") && msg.contains("[40, 64]"), "{msg}");
    assert!(msg.contains("config.json") && msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn nan_or_inf_in_a_router() {
    for (fixture_name, dtype_bad, kind) in
        [("tiny-mixtral", f32::NAN.to_le_bytes().to_vec(), "NaN"), ("tiny-mixtral-bf16", vec![0x80, 0xFF], "-inf")]
    {
        let s = scratch(fixture_name);
        let plan = plan_for(&s.model);
        let mut tensors = load_owned(&s.model);
        let router = tensors.iter_mut().find(|t| t.0 == "model.layers.1.block_sparse_moe.gate.weight").unwrap();
        let w = dtype_bad.len();
        let at = (5 * 64 + 7) * w; // row 5, column 7
        router.3[at..at + w].copy_from_slice(&dtype_bad);
        write_owned(&s.model.join("model.safetensors"), &tensors);
        let msg = fail(&s, &plan);
        assert!(
            msg.contains("`model.layers.1.block_sparse_moe.gate.weight`") && msg.contains("model.safetensors"),
            "{msg}"
        );
        assert!(msg.contains(kind) && msg.contains("row 5"), "{msg}");
    }
}

#[test]
fn fewer_kept_than_num_experts_per_tok() {
    let s = scratch("tiny-qwen2-moe");
    let config = ModelConfig::from_dir(&s.model).unwrap();
    let plan = plan_from(&config, |j, _, _| if j == 1 { vec![3] } else { vec![0, 1, 2] });
    let msg = fail(&s, &plan);
    assert!(msg.contains("layer 1") && msg.contains("num_experts_per_tok") && msg.contains("config.json"), "{msg}");
    assert!(matches!(apply_plan(&s.model, &plan, &s.outs.join("x"), &opts()), Err(SurgeryError::InvalidPlan(_))));
}

#[test]
fn plan_for_another_model() {
    let s = scratch("tiny-mixtral");
    let mut plan = plan_for(&s.model);
    plan.model_type = "olmoe".into();
    let msg = fail(&s, &plan);
    assert!(msg.contains("olmoe") && msg.contains("mixtral"), "{msg}");
}

#[test]
fn existing_output_needs_force() {
    let s = scratch("tiny-mixtral");
    let plan = plan_for(&s.model);
    let out = s.outs.join("pruned");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), "old").unwrap();
    let err = apply_plan(&s.model, &plan, &out, &opts()).err().unwrap();
    assert!(matches!(err, SurgeryError::OutputExists { .. }));
    let msg = err.to_string();
    assert!(msg.contains(&out.display().to_string()) && msg.contains("already exists"), "{msg}");
    assert!(out.join("old.txt").exists());
    assert_only(&s.outs, &["pruned"]);

    let report = apply_plan(&s.model, &plan, &out, &SurgeryOptions { force: true, ..opts() }).unwrap();
    verify(&s.model, &out, &plan, &report);
    assert!(!out.join("old.txt").exists());
    assert_only(&s.outs, &["pruned"]);
}

/// A run killed with SIGKILL during surgery leaves its staging directory beside `--out`; the
/// next run on the same `--out` removes it (its owner is gone) and reports it, and leaves a
/// live run's staging alone.
#[test]
fn stale_staging_of_killed_runs_is_removed() {
    let s = scratch("tiny-mixtral");
    let plan = plan_for(&s.model);
    let out = s.outs.join("pruned");
    // What a killed run leaves: a half-written staging directory owned by a finished process.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = s.outs.join(format!(".pruned.diep-staging.{dead}.4242.0"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1000]).unwrap();
    // An older version's name for the same thing, and a live process's (ours) staging.
    let old = s.outs.join(format!(".pruned.tmp-{dead}-0"));
    std::fs::create_dir(&old).unwrap();
    let live = diep_common::Staging::create(&s.outs.join("pruned")).unwrap();
    let report = apply_plan(&s.model, &plan, &out, &opts()).unwrap();
    verify(&s.model, &out, &plan, &report);
    if std::fs::metadata("/proc/self/stat").is_ok() {
        let mut removed: Vec<_> = report.stale_staging_removed.iter().map(|r| r.path.clone()).collect();
        removed.sort();
        let mut expect = vec![stale.clone(), old.clone()];
        expect.sort();
        assert_eq!(removed, expect);
        assert!(report.stale_staging_removed.iter().all(|r| r.pid == dead));
        assert!(live.path().exists());
        drop(live);
        assert_only(&s.outs, &["pruned"]);
    }
}

#[test]
fn output_cannot_replace_the_input() {
    let s = scratch("tiny-mixtral");
    let plan = plan_for(&s.model);
    let err = apply_plan(&s.model, &plan, &s.model, &SurgeryOptions { force: true, ..opts() }).err().unwrap();
    assert!(matches!(err, SurgeryError::OutputIsInput { .. }), "{err}");
    Checkpoint::open(&s.model).unwrap();
}

#[test]
fn missing_parent_directories_are_created_and_cleaned_up() {
    let s = scratch("tiny-mixtral");
    let plan = plan_for(&s.model);
    let out = s.outs.join("a/b/pruned");
    let report = apply_plan(&s.model, &plan, &out, &opts()).unwrap();
    verify(&s.model, &out, &plan, &report);

    // On failure the parents this run created are removed again.
    let mut bad = plan.clone();
    bad.kept_experts.insert(0, vec![0, 1, 9]);
    assert!(apply_plan(&s.model, &bad, &s.outs.join("c/d/pruned"), &opts()).is_err());
    let path = s.model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert!(apply_plan(&s.model, &plan, &s.outs.join("e/f/pruned"), &opts()).is_err());
    assert_only(&s.outs, &["a"]);
}

// ---------------------------------------------------------------------------------------------
// Random plans.

mod random_plans {
    use super::*;
    use proptest::prelude::*;

    fn subset() -> impl Strategy<Value = Vec<usize>> {
        proptest::sample::subsequence((0..8).collect::<Vec<usize>>(), 2..=8)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn random_kept_subsets_on_tiny_mixtral(
            layer0 in subset(),
            layer1 in subset(),
            max_shard in prop_oneof![Just(u64::MAX), 20_000u64..400_000],
        ) {
            let dir = fixture("tiny-mixtral");
            let config = ModelConfig::from_dir(&dir).unwrap();
            let plan = plan_from(&config, |j, _, _| if j == 0 { layer0.clone() } else { layer1.clone() });
            let outs = tempfile::tempdir().unwrap();
            let out = outs.path().join("p");
            let report = apply_plan(&dir, &plan, &out, &SurgeryOptions { max_shard_bytes: max_shard, ..opts() }).unwrap();
            verify(&dir, &out, &plan, &report);
            prop_assert_eq!(report.kept_counts(), BTreeMap::from([(0, layer0.len()), (1, layer1.len())]));
            prop_assert_eq!(report.shards > 1, out.join("model.safetensors.index.json").exists());
            assert_only(outs.path(), &["p"]);
        }
    }
}

#[test]
fn merged_experts_are_the_weighted_sum_of_their_group() {
    for name in ["tiny-mixtral", "tiny-mixtral-bf16"] {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let mut plan = plan_from(&config, |_, _, _| vec![1, 2, 5, 6]);
        // Layer 0: expert 2 absorbs 0 and 3; expert 6 absorbs 7. Layer 1 only drops.
        plan.merge = BTreeMap::from([(
            0,
            BTreeMap::from([(2, vec![(2, 0.5), (0, 0.3), (3, 0.2)]), (6, vec![(6, 0.75), (7, 0.25)])]),
        )]);
        let out = tempfile::tempdir().unwrap();
        let out_dir = out.path().join("merged");
        apply_plan(&dir, &plan, &out_dir, &opts()).unwrap();
        let input = Checkpoint::open(&dir).unwrap();
        let output = Checkpoint::open(&out_dir).unwrap();
        let keys = MoeKeys::of(config.architecture);
        for rest in ["w1.weight", "w2.weight", "w3.weight"] {
            let get = |c: &Checkpoint, l: usize, e: usize| {
                let name = keys.expert_weights(l, e).into_iter().find(|n| n.ends_with(rest)).unwrap();
                let t = c.get(&name).unwrap();
                (t.to_f32().unwrap(), t.dtype)
            };
            // New id 1 is old expert 2 (kept ids 1, 2, 5, 6 renumber to 0..3).
            let (merged, dtype) = get(&output, 0, 1);
            let parts = [(2, 0.5), (0, 0.3), (3, 0.2)].map(|(e, w)| (get(&input, 0, e).0, w));
            let tol = if dtype == Dtype::BF16 { 1e-2 } else { 1e-6 };
            for (i, m) in merged.iter().enumerate() {
                let want: f64 = parts.iter().map(|(v, w)| w * v[i] as f64).sum();
                assert!((*m as f64 - want).abs() <= tol * want.abs().max(1e-3), "{name} {rest}[{i}]: {m} vs {want}");
            }
            assert_eq!(dtype, get(&input, 0, 2).1, "dtype kept");
            // Unmerged kept experts and the other layer are copied bit-exact.
            assert_eq!(get(&output, 0, 0).0, get(&input, 0, 1).0);
            assert_eq!(get(&output, 1, 2).0, get(&input, 1, 5).0);
            let (m6, _) = get(&output, 0, 3);
            let (a, b) = (get(&input, 0, 6).0, get(&input, 0, 7).0);
            assert!(m6.iter().zip(a.iter().zip(&b)).all(|(m, (x, y))| {
                let want = 0.75 * *x as f64 + 0.25 * *y as f64;
                (*m as f64 - want).abs() <= tol * want.abs().max(1e-3)
            }));
        }
        let written = PruningPlan::read(out_dir.join("pruning.json")).unwrap();
        assert_eq!(written.merge, plan.merge);
    }
}

#[test]
fn bad_merge_groups_are_refused() {
    let dir = fixture("tiny-mixtral");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let base = plan_from(&config, |_, _, _| vec![1, 2, 5, 6]);
    for (merge, expect) in [
        (BTreeMap::from([(0, BTreeMap::from([(0, vec![(0, 1.0)])]))]), "not kept"),
        (BTreeMap::from([(0, BTreeMap::from([(2, vec![(3, 0.5), (2, 0.5)])]))]), "first"),
        (BTreeMap::from([(0, BTreeMap::from([(2, vec![(2, 0.5), (5, 0.5)])]))]), "removed expert"),
        (
            BTreeMap::from([(0, BTreeMap::from([(2, vec![(2, 0.5), (3, 0.5)]), (5, vec![(5, 0.5), (3, 0.5)])]))]),
            "folded once",
        ),
        (BTreeMap::from([(0, BTreeMap::from([(2, vec![(2, f64::NAN)])]))]), "weight"),
    ] {
        let plan = PruningPlan { merge, ..base.clone() };
        let err = plan.validate(&config).unwrap_err().to_string();
        assert!(err.contains(expect), "{expect}: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// DeepSeek: correction bias, routing groups.

#[test]
fn deepseek_uniform_plans_slice_the_correction_bias_and_keep_routing_keys() {
    for name in ["tiny-deepseek-v3", "tiny-deepseek-v2"] {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        // V3: groups of 4 -> [1, 3 | 5, 7], two per group; V2: groups of 2 -> one per group.
        let plan = uniform_plan(&config);
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("pruned");
        let report = apply_plan(&dir, &plan, &out, &opts()).unwrap_or_else(|e| panic!("{name}: {e}"));
        verify(&dir, &out, &plan, &report);
        let raw = read_json(&out.join("config.json"));
        assert_eq!(raw["n_routed_experts"], 4, "{name}");
        let raw_in = read_json(&dir.join("config.json"));
        for k in
            ["n_group", "topk_group", "topk_method", "scoring_func", "routed_scaling_factor", "first_k_dense_replace"]
        {
            assert_eq!(raw.get(k), raw_in.get(k), "{name}: `{k}`");
        }
        let cout = ModelConfig::from_dir(&out).unwrap();
        assert_eq!(cout.moe.routing, config.moe.routing, "{name}");
        let c = Checkpoint::open(&out).unwrap();
        let keys = MoeKeys::of(config.architecture);
        for (layer, kept) in &plan.kept_experts {
            if let Some(bias) = keys.router_correction_bias(*layer) {
                let before = Checkpoint::open(&dir).unwrap().get(&bias).unwrap().to_f32().unwrap();
                let after = c.get(&bias).unwrap();
                assert_eq!(after.dtype, Dtype::F32);
                let want: Vec<f32> = kept.iter().map(|e| before[*e]).collect();
                assert_eq!(after.to_f32().unwrap(), want, "{name}: {bias}");
            }
        }
        // Dense layer 0 has no experts and is not in the plan.
        assert!(!plan.kept_experts.contains_key(&0));
    }
}

#[test]
fn deepseek_moe_uniform_plans_keep_the_upstream_auto_map_and_layer_layout() {
    for name in ["tiny-deepseek", "tiny-deepseek-freq2"] {
        let dir = fixture(name);
        let config = ModelConfig::from_dir(&dir).unwrap();
        let plan = uniform_plan(&config);
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("pruned");
        let report = apply_plan(&dir, &plan, &out, &opts()).unwrap_or_else(|e| panic!("{name}: {e}"));
        verify(&dir, &out, &plan, &report);
        let raw = read_json(&out.join("config.json"));
        let raw_in = read_json(&dir.join("config.json"));
        assert_eq!(raw["n_routed_experts"], 4, "{name}");
        // The checkpoint's own remote code stays referenced; no per-layer list is added.
        assert_eq!(raw.get(AUTO_MAP_KEY), raw_in.get(AUTO_MAP_KEY), "{name}");
        assert!(!raw.contains_key(PER_LAYER_EXPERTS_KEY), "{name}");
        for k in ["moe_layer_freq", "first_k_dense_replace", "n_shared_experts", "norm_topk_prob", "scoring_func"] {
            assert_eq!(raw.get(k), raw_in.get(k), "{name}: `{k}`");
        }
        let cout = ModelConfig::from_dir(&out).unwrap();
        assert_eq!(cout.moe_layers(), config.moe_layers(), "{name}");
        assert_eq!(cout.moe.routing, config.moe.routing, "{name}");
        assert_eq!(expert_count_keys(config.architecture), &["n_routed_experts"]);
    }
    // `n_routed_experts` is one count: per-layer counts have no loader.
    let s = scratch("tiny-deepseek");
    let config = ModelConfig::from_dir(&s.model).unwrap();
    let msg = fail(&s, &plan_from(&config, |j, _, _| if j == 0 { vec![0, 1, 4] } else { vec![0, 1, 2, 4, 5, 6] }));
    assert!(msg.contains("uniformly") && msg.contains("`deepseek`"), "{msg}");
}

#[test]
fn deepseek_v3_plans_must_respect_routing_groups() {
    let s = scratch("tiny-deepseek-v3");
    let config = ModelConfig::from_dir(&s.model).unwrap();
    // Unequal groups (3 + 1).
    let msg = fail(&s, &plan_from(&config, |_, _, _| vec![0, 1, 2, 5]));
    assert!(msg.contains("routing groups") && msg.contains("[3, 1]") && msg.contains("config.json"), "{msg}");
    // One per group: V3 scores a group by its two best experts.
    let msg = fail(&s, &plan_from(&config, |_, _, _| vec![0, 4]));
    assert!(msg.contains("at least 2 per group"), "{msg}");
    // Non-uniform plans are checked per layer: layer 2 unbalanced.
    let msg = fail(&s, &plan_from(&config, |j, _, _| if j == 0 { vec![0, 1, 4, 5] } else { vec![0, 1, 2, 4, 5] }));
    assert!(msg.contains("layer 2") && msg.contains("[3, 2]"), "{msg}");
    // ... and one per group in layer 1 only.
    let msg = fail(&s, &plan_from(&config, |j, _, _| if j == 0 { vec![0, 4] } else { vec![0, 1, 2, 4, 5, 6] }));
    assert!(msg.contains("layer 1") && msg.contains("at least 2 per group"), "{msg}");
}

#[test]
fn deepseek_v3_non_uniform_plan_writes_per_layer_counts_and_remote_code() {
    let dir = fixture("tiny-deepseek-v3");
    let config = ModelConfig::from_dir(&dir).unwrap();
    // Layer 1 keeps 2 + 2 (groups of 4), layer 2 keeps 3 + 3.
    let plan = plan_from(&config, |j, _, _| if j == 0 { vec![1, 3, 4, 6] } else { vec![0, 1, 3, 4, 5, 7] });
    assert!(!plan.is_uniform());
    let outs = tempfile::tempdir().unwrap();
    let out = outs.path().join("pruned");
    let report = apply_plan(&dir, &plan, &out, &opts()).unwrap();
    verify(&dir, &out, &plan, &report);
    assert!(!report.uniform);
    let raw = read_json(&out.join("config.json"));
    let raw_in = read_json(&dir.join("config.json"));
    assert_eq!(raw["n_routed_experts"], 6);
    assert_eq!(raw[PER_LAYER_EXPERTS_KEY], serde_json::json!([0, 4, 6]));
    assert_eq!(raw[AUTO_MAP_KEY], Value::Object(remote_code_auto_map().unwrap()));
    for (name, text) in REMOTE_CODE_FILES {
        assert_eq!(&std::fs::read_to_string(out.join(name)).unwrap(), text);
    }
    for k in ["n_group", "topk_group", "topk_method", "scoring_func", "routed_scaling_factor", "norm_topk_prob"] {
        assert_eq!(raw.get(k), raw_in.get(k), "`{k}`");
    }
    // This project's loader reads per-layer counts; groups are E_i / n_group per layer.
    let cout = ModelConfig::from_dir(&out).unwrap();
    assert_eq!((cout.experts_in_layer(1), cout.experts_in_layer(2)), (4, 6));
    assert_eq!(cout.moe.routing, config.moe.routing);
    let c = Checkpoint::open(&out).unwrap();
    let keys = MoeKeys::of(config.architecture);
    let before = Checkpoint::open(&dir).unwrap();
    for (layer, kept) in &plan.kept_experts {
        let bias = keys.router_correction_bias(*layer).unwrap();
        let (a, b) = (before.get(&bias).unwrap().to_f32().unwrap(), c.get(&bias).unwrap().to_f32().unwrap());
        assert_eq!(b, kept.iter().map(|e| a[*e]).collect::<Vec<f32>>(), "{bias}");
        assert_eq!(c.get(&keys.router_weight(*layer)).unwrap().shape, &[kept.len(), 64]);
    }
}

#[test]
fn deepseek_v2_top_k_must_fit_the_kept_groups() {
    let s = scratch("tiny-deepseek-v2");
    // 4 groups of 2, topk_group 2: one expert per group leaves 2 reachable experts per token.
    edit_config(&s.model, |c| {
        c.insert("num_experts_per_tok".into(), Value::from(3));
    });
    let config = ModelConfig::from_dir(&s.model).unwrap();
    let msg = fail(&s, &plan_from(&config, |_, _, _| vec![0, 2, 4, 6]));
    assert!(msg.contains("num_experts_per_tok = 3") && msg.contains("topk_group (2)"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// gpt-oss: fused experts, router bias.

#[test]
fn gpt_oss_mxfp4_plan_slices_blocks_and_scales() {
    let dir = fixture("tiny-gpt-oss-mxfp4");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let plan = plan_from(&config, |j, _, _| if j == 1 { vec![0, 2, 5] } else { vec![1, 6, 7] });
    let outs = tempfile::tempdir().unwrap();
    let out = outs.path().join("pruned");
    let report = apply_plan(&dir, &plan, &out, &opts()).unwrap();
    // verify() checks every `[E, ...]` tensor (blocks and scales included) slab by slab.
    verify(&dir, &out, &plan, &report);
    let c = Checkpoint::open(&out).unwrap();
    let blocks = c.get("model.layers.1.mlp.experts.gate_up_proj_blocks").unwrap();
    assert_eq!((blocks.dtype, blocks.shape), (Dtype::U8, &[3usize, 64, 2, 16][..]));
    assert_eq!(c.get("model.layers.0.mlp.experts.down_proj_scales").unwrap().shape, &[3, 64, 1]);
    assert!(!c.contains("model.layers.0.mlp.experts.gate_up_proj"));
    // A scales tensor missing its blocks is named.
    let s = scratch("tiny-gpt-oss-mxfp4");
    let mut tensors = load_owned(&s.model);
    tensors.retain(|t| t.0 != "model.layers.1.mlp.experts.down_proj_blocks");
    write_owned(&s.model.join("model.safetensors"), &tensors);
    let msg = fail(&s, &plan_for(&s.model));
    assert!(msg.contains("model.layers.1.mlp.experts.down_proj_blocks") && msg.contains("missing"), "{msg}");
}

#[test]
fn gpt_oss_uniform_plan_slices_fused_experts_and_router_bias() {
    let dir = fixture("tiny-gpt-oss");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let plan = plan_from(&config, |j, _, _| if j == 1 { vec![0, 2, 5, 7] } else { vec![1, 3, 4, 6] });
    let outs = tempfile::tempdir().unwrap();
    let out = outs.path().join("pruned");
    let report = apply_plan(&dir, &plan, &out, &opts()).unwrap();
    verify(&dir, &out, &plan, &report);
    let raw = read_json(&out.join("config.json"));
    assert_eq!(raw["num_local_experts"], 4);
    let (cin, cout) = (Checkpoint::open(&dir).unwrap(), Checkpoint::open(&out).unwrap());
    let keys = MoeKeys::of(config.architecture);
    for (layer, kept) in &plan.kept_experts {
        let mut names = keys.fused_expert_tensors(*layer).unwrap().to_vec();
        names.push(keys.router_bias(*layer).unwrap());
        names.push(keys.router_weight(*layer));
        for name in names {
            let (a, b) = (cin.get(&name).unwrap(), cout.get(&name).unwrap());
            assert_eq!(b.shape[0], kept.len(), "{name}");
            assert_eq!(&b.shape[1..], &a.shape[1..], "{name}");
            let (va, vb) = (a.to_f32().unwrap(), b.to_f32().unwrap());
            let slab = va.len() / a.shape[0];
            let want: Vec<f32> = kept.iter().flat_map(|e| va[e * slab..(e + 1) * slab].iter().copied()).collect();
            assert_eq!(vb, want, "{name}");
        }
    }
}

#[test]
fn gpt_oss_non_uniform_plans_need_full_precision_experts() {
    let dir = fixture("tiny-gpt-oss");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let plan = plan_from(&config, |j, _, _| [vec![0, 2, 3, 5, 6], vec![1, 4, 7], vec![0, 1, 2, 3, 4, 5, 6]][j].clone());
    let outs = tempfile::tempdir().unwrap();
    let out = outs.path().join("pruned");
    let report = apply_plan(&dir, &plan, &out, &opts()).unwrap();
    verify(&dir, &out, &plan, &report);
    let raw = read_json(&out.join("config.json"));
    assert_eq!(raw["num_local_experts"], 7);
    assert_eq!(raw[PER_LAYER_EXPERTS_KEY], serde_json::json!([5, 3, 7]));
    assert_eq!(raw[AUTO_MAP_KEY], Value::Object(remote_code_auto_map().unwrap()));
    let c = Checkpoint::open(&out).unwrap();
    assert_eq!(c.get("model.layers.1.mlp.experts.gate_up_proj").unwrap().shape, &[3, 64, 32]);
    assert_eq!(c.get("model.layers.2.mlp.router.bias").unwrap().shape, &[7]);
    // MXFP4 experts: uniform only (by quantization_config, and by the tensors without it).
    let s = scratch("tiny-gpt-oss-mxfp4");
    let config = ModelConfig::from_dir(&s.model).unwrap();
    let non_uniform = plan_from(&config, |j, _, _| if j == 0 { vec![0, 1, 4] } else { vec![0, 1, 2, 4, 5, 6] });
    let msg = fail(&s, &non_uniform);
    assert!(msg.contains("MXFP4") && msg.contains("uniformly"), "{msg}");
    edit_config(&s.model, |c| {
        c.remove("quantization_config");
    });
    let config = ModelConfig::from_dir(&s.model).unwrap();
    let non_uniform = plan_from(&config, |j, _, _| if j == 0 { vec![0, 1, 4] } else { vec![0, 1, 2, 4, 5, 6] });
    let msg = fail(&s, &non_uniform);
    assert!(msg.contains("MXFP4") && msg.contains("_blocks"), "{msg}");
}

#[test]
fn gpt_oss_refuses_merges_and_missing_fused_tensors() {
    let s = scratch("tiny-gpt-oss");
    let config = ModelConfig::from_dir(&s.model).unwrap();
    let mut merged = plan_from(&config, |_, _, _| vec![0, 1, 2, 3]);
    merged.merge.insert(0, [(0usize, vec![(0usize, 0.5f64), (4, 0.5)])].into_iter().collect());
    let msg = fail(&s, &merged);
    assert!(msg.contains("merge") && msg.contains("fused"), "{msg}");
    // A fused tensor with the wrong expert count, then one missing.
    let mut tensors = load_owned(&s.model);
    let victim = "model.layers.2.mlp.experts.down_proj_bias";
    let pos = tensors.iter().position(|t| t.0 == victim).unwrap();
    let (_, _, shape, bytes) = &mut tensors[pos];
    shape[0] = 7;
    bytes.truncate(bytes.len() / 8 * 7);
    write_owned(&s.model.join("model.safetensors"), &tensors);
    let msg = fail(&s, &plan_for(&s.model));
    assert!(msg.contains(victim) && msg.contains("[7, 64]") && msg.contains("[8, 64]"), "{msg}");
    tensors.remove(pos);
    write_owned(&s.model.join("model.safetensors"), &tensors);
    let msg = fail(&s, &plan_for(&s.model));
    assert!(msg.contains(victim) && msg.contains("missing"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Multimodal wrappers: Llama 4's `Llama4ForConditionalGeneration`.

/// Only the text model's MoE tensors change: the vision tower, the projector and every other
/// config key are copied bit for bit, the count key is edited inside `text_config`, and a
/// non-uniform plan puts `num_experts_per_layer` there too (with `auto_map` at the top level).
#[test]
fn llama4_wrapper_keeps_vision_weights_and_edits_text_config() {
    let dir = fixture("tiny-llama4");
    let config = ModelConfig::from_dir(&dir).unwrap();
    assert_eq!(config.tensor_prefix(), "language_model.");
    let raw_in = read_json(&dir.join("config.json"));
    for (plan, uniform) in [(uniform_plan(&config), true), (non_uniform_plan(&config), false)] {
        let outs = tempfile::tempdir().unwrap();
        let out = outs.path().join("pruned");
        let report = apply_plan(&dir, &plan, &out, &opts()).unwrap();
        verify(&dir, &out, &plan, &report);
        let raw = read_json(&out.join("config.json"));
        for (k, v) in &raw_in {
            if k != "text_config" {
                assert_eq!(raw.get(k), Some(v), "`{k}`");
            }
        }
        assert_eq!(raw.contains_key(AUTO_MAP_KEY), !uniform);
        if !uniform {
            let map = raw[AUTO_MAP_KEY].as_object().unwrap();
            assert_eq!(map["AutoModelForImageTextToText"], map["AutoModelForCausalLM"]);
        }
        let (text_in, text) = (raw_in["text_config"].as_object().unwrap(), raw["text_config"].as_object().unwrap());
        let max = plan.kept_experts.values().map(Vec::len).max().unwrap();
        assert_eq!(text["num_local_experts"], max);
        assert_eq!(text.contains_key(PER_LAYER_EXPERTS_KEY), !uniform);
        for (k, v) in text_in {
            if k != "num_local_experts" {
                assert_eq!(text.get(k), Some(v), "text_config.{k}");
            }
        }
        let (cin, cout) = (Checkpoint::open(&dir).unwrap(), Checkpoint::open(&out).unwrap());
        assert_eq!(cin.names().count(), cout.names().count());
        for name in cin.names() {
            let (a, b) = (cin.get(name).unwrap(), cout.get(name).unwrap());
            if !name.contains(".feed_forward.experts.") && !name.contains(".feed_forward.router.") {
                assert_eq!(a.bytes, b.bytes, "{name} must be copied unchanged");
                continue;
            }
            let layer: usize = name.split('.').nth(3).unwrap().parse().unwrap();
            let kept = &plan.kept_experts[&layer];
            assert_eq!(b.shape[0], kept.len(), "{name}");
            let slab = a.bytes.len() / a.shape[0];
            for (new, old) in kept.iter().enumerate() {
                assert_eq!(&b.bytes[new * slab..(new + 1) * slab], &a.bytes[old * slab..(old + 1) * slab], "{name}");
            }
        }
        // Reads back as the same text model.
        let back = ModelConfig::from_dir(&out).unwrap();
        for (l, kept) in &plan.kept_experts {
            assert_eq!(back.experts_in_layer(*l), kept.len());
        }
    }
}
