//! An FP8 DeepSeek-V3 with an MTP layer, pruned as a user would: FP8 experts and their scales
//! stay FP8 byte for byte, the MTP layer is pruned with the trunk, and the result equals pruning
//! the dequantised copy (which torch wrote) with the same `pruning.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use diep_checkpoint::quant::dequantize_fp8;
use diep_checkpoint::{Checkpoint, Dtype, ModelConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn diep(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diep")).args(args).output().expect("diep runs")
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `diep prune --method frequency --ratio 0.5` of `model` into `out`, on the shipped calibration
/// text, with `extra` arguments.
fn prune_frequency(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let calib = fixtures().join("calib/gpl-3.txt");
    let mut args = vec![
        "prune",
        "--model",
        model.to_str().unwrap(),
        "--method",
        "frequency",
        "--ratio",
        "0.5",
        "--calib",
        calib.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    diep(&args)
}

/// The dequantised copy: torch's f32 tensors, the config without `quantization_config`.
fn dequantized_copy(dir: &Path) {
    let src = fixtures().join("models/tiny-deepseek-v3-fp8");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        fixtures().join("parity/tiny-deepseek-v3-fp8/dequantized.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut config: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config.remove("quantization_config");
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// Every tensor of a checkpoint as f32, FP8 weights dequantised with their scales.
fn dequantized(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let config = ModelConfig::from_dir(dir).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for name in ckpt.names().filter(|n| !n.ends_with("_scale_inv")) {
        let t = ckpt.get(name).unwrap();
        let v = if t.dtype == Dtype::F8_E4M3 {
            let scheme = config.fp8().expect("FP8 tensors come with an FP8 config");
            dequantize_fp8(&t, &ckpt.get(&format!("{name}_scale_inv")).unwrap(), scheme).unwrap()
        } else {
            t.to_f32().unwrap()
        };
        out.insert(name.to_string(), v);
    }
    out
}

#[test]
fn fp8_prune_keeps_fp8_and_equals_pruning_the_dequantized_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-deepseek-v3-fp8");
    let out = tmp.path().join("pruned");
    let o = prune_frequency(&model, &out, &["--samples", "8", "--seq-len", "32"]);
    ok(&o, "prune the FP8 model");

    // Config: 4 routed experts everywhere, quantization and MTP settings kept.
    let config = ModelConfig::from_dir(&out).unwrap();
    assert_eq!(config.moe.num_experts, 4);
    assert_eq!(config.mtp_layers, 1);
    assert_eq!(config.fp8().unwrap().describe(), ModelConfig::from_dir(&model).unwrap().fp8().unwrap().describe());
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(raw["quantization_config"]["weight_block_size"], serde_json::json!([16, 16]));

    // Weights: FP8 experts with their scales; every MoE layer, MTP included, agrees with the config.
    let ckpt = Checkpoint::open(&out).unwrap();
    for layer in [1, 2, 3] {
        let p = format!("model.layers.{layer}.mlp");
        assert_eq!(ckpt.get(&format!("{p}.gate.weight")).unwrap().shape, &[4, 64], "layer {layer} router");
        assert_eq!(ckpt.get(&format!("{p}.gate.e_score_correction_bias")).unwrap().shape, &[4]);
        for e in 0..4 {
            let w = ckpt.get(&format!("{p}.experts.{e}.down_proj.weight")).unwrap();
            assert_eq!(w.dtype, Dtype::F8_E4M3);
            assert_eq!(ckpt.get(&format!("{p}.experts.{e}.down_proj.weight_scale_inv")).unwrap().shape, &[4, 2]);
        }
        assert!(!ckpt.contains(&format!("{p}.experts.4.up_proj.weight")));
        assert!(!ckpt.contains(&format!("{p}.experts.4.up_proj.weight_scale_inv")));
    }
    for name in
        ["model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight", "model.layers.3.shared_head.head.weight"]
    {
        assert!(ckpt.contains(name), "{name} kept");
    }
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(out.join("pruning.json")).unwrap()).unwrap();
    assert_eq!(plan["mtp"]["layers"], serde_json::json!([3]));
    assert_eq!(plan["kept_experts"]["3"].as_array().unwrap().len(), 4);

    // The pruned FP8 model loads and evaluates.
    let ids = fixtures().join("parity/tiny-deepseek-v3-fp8/ids.json");
    ok(&diep(&["eval", "--model", out.to_str().unwrap(), "--ids", ids.to_str().unwrap()]), "eval the pruned model");

    // Kept FP8 experts are the input's bytes.
    let input = Checkpoint::open(&model).unwrap();
    let kept: Vec<usize> = serde_json::from_value(plan["kept_experts"]["3"].clone()).unwrap();
    for (new, old) in kept.iter().enumerate() {
        for rest in ["gate_proj.weight", "gate_proj.weight_scale_inv"] {
            let a = ckpt.get(&format!("model.layers.3.mlp.experts.{new}.{rest}")).unwrap();
            let b = input.get(&format!("model.layers.3.mlp.experts.{old}.{rest}")).unwrap();
            assert_eq!((a.dtype, a.bytes), (b.dtype, b.bytes), "MTP expert {old} -> {new}: {rest}");
        }
    }

    // Pruning the dequantised copy with the same plan gives the dequantised output, bit for bit.
    let copy = tmp.path().join("dequantized");
    dequantized_copy(&copy);
    let out2 = tmp.path().join("pruned-dequantized");
    let o = diep(&[
        "prune",
        "--model",
        copy.to_str().unwrap(),
        "--plan",
        out.join("pruning.json").to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    ok(&o, "prune the dequantised copy with the plan");
    let (a, b) = (dequantized(&out), dequantized(&out2));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, va) in &a {
        let same = va.iter().zip(&b[name]).all(|(x, y)| x.to_bits() == y.to_bits()) && va.len() == b[name].len();
        assert!(same, "{name} differs after dequantisation");
    }
}

#[test]
fn merging_fp8_experts_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-deepseek-v3-fp8");
    let out = tmp.path().join("merged");
    let o = prune_frequency(&model, &out, &["--merge"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--merge") && err.contains("fp8 e4m3, 16×16 blocks") && err.contains("re-quantised"), "{err}");
    assert!(!out.exists());
}

/// Conversions often strip the MTP weights but keep `num_nextn_predict_layers`: such a
/// checkpoint is pruned as one without MTP layers.
#[test]
fn a_config_with_mtp_but_no_mtp_weights_is_pruned_without_them() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("models/tiny-deepseek-v3-fp8");
    let model = tmp.path().join("stripped");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| !n.starts_with("model.layers.3.")).collect();
    safetensors::serialize_to_file(kept, None, &model.join("model.safetensors")).unwrap();

    let out = tmp.path().join("pruned");
    let o = prune_frequency(&model, &out, &["--samples", "4", "--seq-len", "16"]);
    ok(&o, "prune a checkpoint without its MTP weights");
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(out.join("pruning.json")).unwrap()).unwrap();
    assert!(plan.get("mtp").is_none() && plan["kept_experts"].get("3").is_none(), "{plan}");
    let ids = fixtures().join("parity/tiny-deepseek-v3-fp8/ids.json");
    ok(&diep(&["eval", "--model", out.to_str().unwrap(), "--ids", ids.to_str().unwrap()]), "eval it");
}
