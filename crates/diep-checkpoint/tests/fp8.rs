//! FP8 checkpoints: the decoder against torch's FP8 tables, the blockwise dequantisation against
//! the dequantised copy torch wrote (`scripts/gen_parity_fixtures.py`, tiny-deepseek-v3-fp8),
//! and `quantization_config` / `num_nextn_predict_layers` parsing.

use std::path::PathBuf;

use diep_checkpoint::quant::{Fp8Format, ScaleLayout, dequantize_fp8, fp8_table};
use diep_checkpoint::{Checkpoint, Dtype, ModelConfig, Quantization};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn reference_json() -> Value {
    let path = fixtures().join("parity/tiny-deepseek-v3-fp8/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn fp8_tables_equal_torch() {
    let r = reference_json();
    for (key, format) in [("fp8_e4m3_table", Fp8Format::E4M3), ("fp8_e5m2_table", Fp8Format::E5M2)] {
        let want = r[key].as_array().unwrap();
        let got = fp8_table(format);
        assert_eq!(want.len(), 256);
        for (b, (w, g)) in want.iter().zip(got).enumerate() {
            match w {
                Value::String(s) if s == "nan" => assert!(g.is_nan(), "{key}[{b}] = {g}, torch: nan"),
                Value::String(s) if s == "inf" => assert_eq!(g, f32::INFINITY, "{key}[{b}]"),
                Value::String(s) if s == "-inf" => assert_eq!(g, f32::NEG_INFINITY, "{key}[{b}]"),
                w => assert_eq!(g.to_bits(), (w.as_f64().unwrap() as f32).to_bits(), "{key}[{b}]: {g} vs {w}"),
            }
        }
    }
}

/// Every FP8 weight, dequantised with its `_scale_inv` by the config's block size, equals the
/// f32 tensor torch wrote, bit for bit; every other tensor decodes to the same f32 values.
#[test]
fn dequantization_equals_torch_bit_for_bit() {
    let dir = fixtures().join("models/tiny-deepseek-v3-fp8");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let scheme = config.fp8().expect("an FP8 config").clone();
    assert_eq!(scheme.scale, ScaleLayout::Block { rows: 16, cols: 16 });
    assert_eq!(scheme.format, Fp8Format::E4M3);
    assert_eq!(config.mtp_layers, 1);
    assert_eq!(config.mtp_layer_indices(), 3..4);
    assert_eq!(config.experts_in_layer(3), 8);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let deq = Checkpoint::open_file(fixtures().join("parity/tiny-deepseek-v3-fp8/dequantized.safetensors")).unwrap();
    let (mut fp8, mut partial) = (0, 0);
    for name in ckpt.names() {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let t = ckpt.get(name).unwrap();
        let got = if t.dtype == Dtype::F8_E4M3 {
            fp8 += 1;
            if t.shape.iter().any(|d| d % 16 != 0) {
                partial += 1;
            }
            dequantize_fp8(&t, &ckpt.get(&format!("{name}_scale_inv")).unwrap(), &scheme).unwrap()
        } else {
            t.to_f32().unwrap()
        };
        let want = deq.get(name).unwrap().to_f32().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: dequantised values differ from torch's");
    }
    assert_eq!(deq.names().count(), ckpt.names().filter(|n| !n.ends_with("_scale_inv")).count());
    assert!(fp8 > 100 && partial > 50, "the fixture exercises FP8 ({fp8}) and partial blocks ({partial})");
}

#[test]
fn wrong_scale_shape_is_named() {
    let dir = fixtures().join("models/tiny-deepseek-v3-fp8");
    let config = ModelConfig::from_dir(&dir).unwrap();
    let mut scheme = config.fp8().unwrap().clone();
    scheme.scale = ScaleLayout::Block { rows: 8, cols: 8 };
    let ckpt = Checkpoint::open(&dir).unwrap();
    let name = "model.layers.1.mlp.experts.0.up_proj.weight";
    let err = dequantize_fp8(&ckpt.get(name).unwrap(), &ckpt.get(&format!("{name}_scale_inv")).unwrap(), &scheme)
        .unwrap_err()
        .to_string();
    assert!(err.contains("up_proj.weight_scale_inv") && err.contains("model.safetensors"), "{err}");
}

fn config_with(quant: Value) -> Result<ModelConfig, diep_checkpoint::CheckpointError> {
    let dir = fixtures().join("models/tiny-deepseek-v3-fp8");
    let mut raw: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    raw.insert("quantization_config".into(), quant);
    ModelConfig::from_map(raw, PathBuf::from("/m/config.json"))
}

#[test]
fn quantization_configs() {
    let fp8 = |q: Value| match config_with(q).unwrap().quantization {
        Some(Quantization::Fp8(s)) => s,
        other => panic!("{other:?}"),
    };
    let s = fp8(serde_json::json!({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 64]}));
    assert_eq!(
        (s.format, s.scale, s.scale_suffix),
        (Fp8Format::E5M2, ScaleLayout::Block { rows: 128, cols: 64 }, "_scale_inv")
    );
    let ct = |strategy: &str| {
        fp8(serde_json::json!({
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                "strategy": strategy, "block_structure": [128, 128]}, "input_activations": null}},
            "ignore": ["lm_head"]
        }))
    };
    assert_eq!(ct("channel").scale, ScaleLayout::Channel);
    assert_eq!(ct("tensor").scale, ScaleLayout::Tensor);
    assert_eq!(ct("block").scale, ScaleLayout::Block { rows: 128, cols: 128 });
    assert_eq!(ct("channel").scale_suffix, "_scale");
    assert_eq!(
        config_with(serde_json::json!({"quant_method": "mxfp4"})).unwrap().quantization,
        Some(Quantization::Mxfp4)
    );

    for (q, field) in [
        (serde_json::json!({"quant_method": "gptq", "bits": 4}), "quantization_config.quant_method"),
        (
            serde_json::json!({"quant_method": "fp8", "weight_block_size": [128]}),
            "quantization_config.weight_block_size",
        ),
        (serde_json::json!({"quant_method": "fp8", "fmt": "e3m4"}), "quantization_config.fmt"),
        (serde_json::json!({"bits": 4}), "quantization_config.quant_method"),
        (
            serde_json::json!({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}}),
            "quantization_config.format",
        ),
        (
            serde_json::json!({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights":
                {"num_bits": 4, "type": "int", "strategy": "group"}}}}),
            "quantization_config.config_groups.g.weights",
        ),
    ] {
        let err = config_with(q.clone()).unwrap_err().to_string();
        assert!(err.contains("/m/config.json") && err.contains(&format!("`{field}`")), "{q}: {err}");
    }
}
