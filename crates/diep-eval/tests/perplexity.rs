//! Perplexity against transformers' own loss, and hand-computed values.

use std::path::PathBuf;

use diep_eval::{perplexity, read_ids_file};
use diep_models::{DeviceSpec, MoeModel};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn perplexity_equals_exp_of_transformers_loss_for_every_architecture() {
    let device = DeviceSpec::from_test_env().unwrap().device().unwrap();
    for name in [
        "tiny-mixtral",
        "tiny-mixtral-swa",
        "tiny-mixtral-bf16",
        "tiny-qwen2-moe",
        "tiny-qwen3-moe",
        "tiny-qwen3-moe-tf4",
        "tiny-olmoe",
    ] {
        let parity = fixtures().join("parity").join(name);
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(parity.join("reference.json")).unwrap()).unwrap();
        let loss = reference["loss"].as_f64().unwrap();
        let ids = read_ids_file(parity.join("ids.json")).unwrap();
        let model = MoeModel::load(fixtures().join("models").join(name), &device).unwrap();
        // Batch sizes 1 and all: batching must not change the result.
        for max_batch_tokens in [1, 4096] {
            let r = perplexity(&model, &ids, max_batch_tokens, |_, _| {}).unwrap();
            let rel = (r.perplexity - loss.exp()).abs() / loss.exp();
            assert!(
                rel < 1e-4,
                "{name}: perplexity {} vs exp(transformers loss) {} ({rel:.2e})",
                r.perplexity,
                loss.exp()
            );
            assert_eq!(r.tokens, 48);
            assert_eq!(r.predictions, 45);
        }
    }
}

#[test]
fn unequal_lengths_weight_every_prediction_equally() {
    // Perplexity over sequences of different lengths is exp of the mean over all
    // predictions, i.e. the per-sequence NLL sums added, not the per-sequence means averaged.
    let device = DeviceSpec::from_test_env().unwrap().device().unwrap();
    let model = MoeModel::load(fixtures().join("models/tiny-mixtral"), &device).unwrap();
    let a: Vec<u32> = vec![5, 9, 17, 33, 2, 8, 100, 7];
    let b: Vec<u32> = vec![11, 12, 13];
    let ra = perplexity(&model, std::slice::from_ref(&a), 4096, |_, _| {}).unwrap();
    let rb = perplexity(&model, std::slice::from_ref(&b), 4096, |_, _| {}).unwrap();
    let both = perplexity(&model, &[a, b], 4096, |_, _| {}).unwrap();
    let expected = ((ra.mean_nll * 7.0 + rb.mean_nll * 2.0) / 9.0).exp();
    assert!((both.perplexity - expected).abs() / expected < 1e-9);
    assert_eq!(both.predictions, 9);
}

#[test]
fn bad_ids_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ids.json");
    std::fs::write(&p, "[[1, -2]]").unwrap();
    let err = read_ids_file(&p).unwrap_err().to_string();
    assert!(err.contains("ids.json") && err.contains("token-id"), "{err}");
    std::fs::write(&p, "[[1], []]").unwrap();
    assert!(read_ids_file(&p).unwrap_err().to_string().contains("nothing to predict"));
    let device = DeviceSpec::Cpu.device().unwrap();
    let model = MoeModel::load(fixtures().join("models/tiny-mixtral"), &device).unwrap();
    let err = perplexity(&model, &[vec![1, 100_000]], 64, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("100000") && err.contains("vocabulary"), "{err}");
}
