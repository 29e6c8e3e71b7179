//! `xtask bench-methods` end to end on the trained fixture, with its numbers checked against
//! independent recomputations.

use std::path::PathBuf;
use std::process::Command;

use diep_models::burn::tensor::activation::log_softmax;
use diep_models::{DeviceSpec, MoeModel};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(root());
    c
}

/// Summed log-probability of `choice`'s tokens after `context`, with the model's forward pass
/// on one unpadded sequence and a log-softmax over its logits.
fn choice_loglik(model: &MoeModel, tok: &diep_models::tokenizer::Tokenizer, context: &str, choice: &str) -> f64 {
    let ctx = diep_models::tokenizer::encode(tok, context).unwrap();
    let ch = diep_models::tokenizer::encode(tok, choice).unwrap();
    let ids: Vec<u32> = ctx.iter().chain(&ch).copied().collect();
    let logits = model.forward(std::slice::from_ref(&ids)).unwrap();
    let [_, t, v] = logits.dims();
    let logp: Vec<f32> = log_softmax(logits, 2).into_data().iter::<f32>().collect();
    assert_eq!(logp.len(), t * v);
    // Token at index i is predicted at position i − 1.
    (ctx.len()..ids.len()).map(|i| logp[(i - 1) * v + ids[i] as usize] as f64).sum()
}

#[test]
fn bench_methods_writes_consistent_results() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let mc_items = 3;
    let run = xtask()
        .args(["bench-methods", "--methods", "frequency,reap", "--ratios", "0.5", "--seeds", "0,1", "--out"])
        .arg(&out)
        .args(["--samples", "8", "--heldout-limit", "4", "--mc-limit", &mc_items.to_string()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for f in ["results.json", "RESULTS.md", "retention.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // Nothing but the output directory is left beside it (no temporary directory).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let results: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let base = &results["base"];
    let base_ppl = |d: &str| base["perplexity"][d].as_f64().unwrap();
    assert!(base_ppl("english") > 1.0 && base_ppl("code") > 1.0);

    let runs = results["runs"].as_array().unwrap();
    // frequency and reap, each uniform and global, each with calibration seeds 0 and 1.
    assert_eq!(runs.len(), 8);
    let mut configs: Vec<(String, String, u64)> = runs
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().into(),
                r["allocation"].as_str().unwrap().into(),
                r["seed"].as_u64().unwrap(),
            )
        })
        .collect();
    configs.sort();
    let expected: Vec<(String, String, u64)> =
        [("frequency", "global"), ("frequency", "uniform"), ("reap", "global"), ("reap", "uniform")]
            .iter()
            .flat_map(|(m, a)| [0, 1].map(|s| (m.to_string(), a.to_string(), s)))
            .collect();
    assert_eq!(configs, expected);
    for r in runs {
        assert_eq!(r["ratio"].as_f64(), Some(0.5));
        assert!(r.get("variant").is_none(), "baselines have no variant: {r}");
        let ppl = |d: &str| r["perplexity"][d].as_f64().unwrap();
        let retention = (base_ppl("english") / ppl("english") + base_ppl("code") / ppl("code")) / 2.0;
        let got = r["retention"].as_f64().unwrap();
        assert!((got - retention).abs() < 1e-12, "{got} vs {retention}");
        // 4 MoE layers × 8 experts, half removed.
        let kept: usize = r["kept_per_layer"].as_array().unwrap().iter().map(|k| k.as_u64().unwrap() as usize).sum();
        assert_eq!(kept, 16, "{r}");
        if r["allocation"] == "uniform" {
            assert!(r["kept_per_layer"].as_array().unwrap().iter().all(|k| k == 4));
        }
        assert!(r["seconds"].as_f64().unwrap() > 0.0);
        if cfg!(target_os = "linux") {
            assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
        }
        for k in ["acc", "acc_norm"] {
            let a = r["mc"][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&a));
        }
    }

    // Base MC accuracy, recomputed by hand on the first items.
    let model_dir = root().join("fixtures/trained-moe");
    let device = DeviceSpec::Cpu.device().unwrap();
    let model = MoeModel::load(&model_dir, &device).unwrap();
    let tok = diep_models::tokenizer::load_tokenizer(&model_dir).unwrap();
    let text = std::fs::read_to_string(model_dir.join("mc.jsonl")).unwrap();
    let (mut correct, mut correct_norm) = (0, 0);
    let logliks = base["mc"]["loglik"].as_array().unwrap();
    assert_eq!(logliks.len(), mc_items);
    for (line, written) in text.lines().take(mc_items).zip(logliks) {
        let item: Value = serde_json::from_str(line).unwrap();
        let context = item["context"].as_str().unwrap();
        let choices: Vec<&str> = item["choices"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        let ll: Vec<f64> = choices.iter().map(|c| choice_loglik(&model, &tok, context, c)).collect();
        for (a, b) in ll.iter().zip(written.as_array().unwrap()) {
            let b = b.as_f64().unwrap();
            assert!((a - b).abs() < 1e-3 * (1.0 + a.abs()), "log-likelihood {a} (by hand) vs {b} (bench)");
        }
        let argmax = |v: &[f64]| (0..v.len()).max_by(|i, j| v[*i].total_cmp(&v[*j])).unwrap();
        let label = item["label"].as_u64().unwrap() as usize;
        correct += usize::from(argmax(&ll) == label);
        let norm: Vec<f64> = ll.iter().zip(&choices).map(|(l, c)| l / c.len() as f64).collect();
        correct_norm += usize::from(argmax(&norm) == label);
    }
    let acc = correct as f64 / mc_items as f64;
    let acc_norm = correct_norm as f64 / mc_items as f64;
    assert_eq!(base["mc"]["acc"].as_f64(), Some(acc));
    assert_eq!(base["mc"]["acc_norm"].as_f64(), Some(acc_norm));

    let md = std::fs::read_to_string(out.join("RESULTS.md")).unwrap();
    assert!(md.contains("bench-methods") && md.contains("retention.svg") && md.contains("| reap |"), "{md}");
    // Rows aggregate the two seeds: mean ± sd.
    assert!(md.contains("(S = 0, 1)") && md.contains(" ± "), "{md}");
    let svg = std::fs::read_to_string(out.join("retention.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));

    // An existing output directory is refused without --force.
    let again = xtask().args(["bench-methods", "--methods", "frequency", "--out"]).arg(&out).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn unknown_method_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let run = xtask().args(["bench-methods", "--methods", "reap,magic-pruner", "--out"]).arg(&out).output().unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("magic-pruner"), "{err}");
    assert!(!out.exists());
}
