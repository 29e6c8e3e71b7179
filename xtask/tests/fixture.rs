//! `xtask fixture train`: its errors, and the committed `fixtures/trained-moe` it produced.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(root());
    c
}

/// A missing corpus names the package that provides it, and nothing is left behind.
#[test]
fn missing_corpus_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("trained");
    let out = xtask()
        .args(["fixture", "train", "--steps", "1", "--gcide"])
        .arg(dir.path().join("no-gcide"))
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gcide.index") && err.contains("apt-get install -y dict-gcide"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The committed fixture evaluates to the perplexities recorded when it was built, far below
/// the uniform baseline, and its experts are all used but unevenly.
#[test]
fn committed_trained_fixture_matches_its_summary() {
    let fixture = root().join("fixtures/trained-moe");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("summary.json")).unwrap()).unwrap();
    for domain in ["english", "code"] {
        let out = xtask()
            .args(["eval", "--model", "fixtures/trained-moe", "--ids"])
            .arg(format!("fixtures/trained-moe/heldout/{domain}.ids.json"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ppl = report["perplexity"][format!("{domain}.ids.json")].as_f64().unwrap();
        let recorded = summary["heldout"][domain]["perplexity"].as_f64().unwrap();
        assert!((ppl - recorded).abs() <= 1e-5 * recorded, "{domain}: {ppl} vs recorded {recorded}");
        assert!(ppl < 100.0, "{domain}: perplexity {ppl}");
        for layer in summary["expert_usage"][domain].as_array().unwrap() {
            let shares: Vec<f64> = layer.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(shares.len(), 8);
            assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            let max = shares.iter().cloned().fold(0.0, f64::max);
            assert!(max > 0.15, "{domain}: routing looks uniform: {shares:?}");
        }
    }
}
