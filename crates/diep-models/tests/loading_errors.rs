//! Bad checkpoints give errors that name the tensor and the file (or the config field).

use std::path::{Path, PathBuf};

use diep_models::{DeviceSpec, MoeModel};
use safetensors::tensor::TensorView;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models").join(name)
}

/// Copies a fixture into a temporary directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Rewrites a safetensors file through `edit(name, dtype, shape, bytes)`, which returns the
/// tensors to write in place of each one.
fn rewrite(
    path: &Path,
    edit: impl Fn(&str, safetensors::Dtype, &[usize], &[u8]) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        out.extend(edit(&name, view.dtype(), view.shape(), view.data()));
    }
    let views: Vec<(String, TensorView<'_>)> =
        out.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn load_err(dir: &Path) -> String {
    let device = DeviceSpec::Cpu.device().unwrap();
    format!("{}", MoeModel::load(dir, &device).expect_err("loading should fail"))
}

const EXPERT: &str = "model.layers.1.block_sparse_moe.experts.3.w2.weight";

#[test]
fn missing_tensor_names_tensor_and_file() {
    let dir = copy_fixture("tiny-mixtral");
    let file = dir.path().join("model.safetensors");
    rewrite(&file, |n, d, s, b| if n == EXPERT { vec![] } else { vec![(n.into(), d, s.to_vec(), b.to_vec())] });
    let err = load_err(dir.path());
    assert!(err.contains(EXPERT) && err.contains("model.safetensors") && err.contains("missing"), "{err}");
}

#[test]
fn unexpected_tensor_names_tensor_and_file() {
    let dir = copy_fixture("tiny-mixtral");
    let file = dir.path().join("model.safetensors");
    rewrite(&file, |n, d, s, b| {
        let mut v = vec![(n.to_string(), d, s.to_vec(), b.to_vec())];
        if n == EXPERT {
            v.push(("model.layers.1.block_sparse_moe.experts.8.w2.weight".into(), d, s.to_vec(), b.to_vec()));
        }
        v
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("experts.8.w2.weight") && err.contains("model.safetensors") && err.contains("unexpected"),
        "{err}"
    );
}

#[test]
fn misshaped_tensor_names_tensor_file_and_shapes() {
    let dir = copy_fixture("tiny-mixtral");
    let file = dir.path().join("model.safetensors");
    rewrite(&file, |n, d, s, b| {
        let shape = if n == EXPERT { s.iter().rev().copied().collect() } else { s.to_vec() };
        vec![(n.into(), d, shape, b.to_vec())]
    });
    let err = load_err(dir.path());
    assert!(
        err.contains(EXPERT)
            && err.contains("model.safetensors")
            && err.contains("[48, 64]")
            && err.contains("[64, 48]"),
        "{err}"
    );
}

#[test]
fn config_weight_mismatch_names_the_tensor() {
    let dir = copy_fixture("tiny-mixtral");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = 40.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("experts.0.w1.weight") && err.contains("config.json implies [40, 64]"), "{err}");
}

#[test]
fn sharded_missing_tensor_names_the_shard() {
    let dir = copy_fixture("tiny-qwen2-moe");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let victim = "model.layers.3.mlp.experts.5.up_proj.weight";
    let shard = index["weight_map"][victim].as_str().unwrap().to_string();
    rewrite(
        &dir.path().join(&shard),
        |n, d, s, b| if n == victim { vec![] } else { vec![(n.into(), d, s.to_vec(), b.to_vec())] },
    );
    let err = load_err(dir.path());
    assert!(err.contains(victim) && err.contains(&shard), "{err}");
}

#[test]
fn unknown_model_type_lists_supported_ones() {
    let dir = copy_fixture("tiny-mixtral");
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("\"mixtral\"", "\"gpt2\"");
    std::fs::write(&cfg_path, text).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("config.json") && err.contains("`gpt2`") && err.contains("qwen3_moe"), "{err}");
}

#[test]
fn truncated_weights_name_the_file() {
    let dir = copy_fixture("tiny-mixtral");
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn gpt_oss_errors_name_the_fused_or_mxfp4_tensor() {
    // A missing sink, a fused tensor with the wrong shape, MXFP4 blocks of the wrong width,
    // scales that do not match their blocks, and a non-uint8 blocks tensor.
    let keep = |n: &str, d, s: &[usize], b: &[u8]| vec![(n.to_string(), d, s.to_vec(), b.to_vec())];
    let sinks = "model.layers.2.self_attn.sinks";
    let dir = copy_fixture("tiny-gpt-oss");
    rewrite(&dir.path().join("model.safetensors"), |n, d, s, b| if n == sinks { vec![] } else { keep(n, d, s, b) });
    let err = load_err(dir.path());
    assert!(err.contains(sinks) && err.contains("model.safetensors") && err.contains("missing"), "{err}");

    let down = "model.layers.1.mlp.experts.down_proj";
    let dir = copy_fixture("tiny-gpt-oss");
    rewrite(&dir.path().join("model.safetensors"), |n, d, s, b| {
        if n == down { vec![(n.into(), d, vec![8, 64, 16], b.to_vec())] } else { keep(n, d, s, b) }
    });
    let err = load_err(dir.path());
    assert!(err.contains(down) && err.contains("[8, 64, 16]") && err.contains("[8, 16, 64]"), "{err}");

    let blocks = "model.layers.0.mlp.experts.gate_up_proj_blocks";
    let scales = "model.layers.0.mlp.experts.gate_up_proj_scales";
    let dir = copy_fixture("tiny-gpt-oss-mxfp4");
    rewrite(&dir.path().join("model.safetensors"), |n, d, s, b| match n {
        // [8, 64, 2, 16] -> [8, 64, 1, 32]: the same bytes, 64 values a row still, but the
        // scales no longer match.
        _ if n == blocks => vec![(n.into(), d, vec![8, 64, 1, 32], b.to_vec())],
        _ => keep(n, d, s, b),
    });
    let err = load_err(dir.path());
    assert!(err.contains(scales) && err.contains("[8, 64, 1]") && err.contains("[8, 64, 2]"), "{err}");

    let dir = copy_fixture("tiny-gpt-oss-mxfp4");
    rewrite(&dir.path().join("model.safetensors"), |n, d, s, b| match n {
        _ if n == blocks => vec![(n.into(), d, vec![8, 32, 4, 16], b.to_vec())],
        _ if n == scales => vec![(n.into(), d, vec![8, 32, 4], b.to_vec())],
        _ => keep(n, d, s, b),
    });
    let err = load_err(dir.path());
    assert!(err.contains(blocks) && err.contains("[8, 128, 32]") && err.contains("[8, 64, 64]"), "{err}");

    let dir = copy_fixture("tiny-gpt-oss-mxfp4");
    rewrite(&dir.path().join("model.safetensors"), |n, d, s, b| match n {
        _ if n == blocks => vec![(n.into(), safetensors::Dtype::I8, s.to_vec(), b.to_vec())],
        _ => keep(n, d, s, b),
    });
    let err = load_err(dir.path());
    assert!(err.contains(blocks) && err.contains("I8"), "{err}");
}
