//! The command line end to end: `xtask eval` against transformers' loss, help, and errors.

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

#[test]
fn no_arguments_prints_help() {
    let out = xtask().output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("eval") && text.contains("Usage"), "{text}");
}

#[test]
fn eval_ids_matches_transformers_loss_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out/eval.json");
    let out = xtask()
        .args(["eval", "--model", "fixtures/models/tiny-qwen3-moe", "--ids", "fixtures/parity/tiny-qwen3-moe/ids.json", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(written, printed);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/parity/tiny-qwen3-moe/reference.json")).unwrap(),
    )
    .unwrap();
    let expected = reference["loss"].as_f64().unwrap().exp();
    let p = written["perplexity"].as_f64().unwrap();
    assert!((p - expected).abs() / expected < 1e-4, "{p} vs {expected}");
    assert_eq!(written["tokens"], 48);
    assert!(written["tokens_per_second"].as_f64().unwrap() > 0.0);
    // No temporary file is left beside the output.
    assert_eq!(std::fs::read_dir(json.parent().unwrap()).unwrap().count(), 1);
}

#[test]
fn errors_exit_nonzero_and_name_the_problem() {
    let out = xtask().args(["eval", "--model", "fixtures/models/does-not-exist", "--ids", "fixtures/parity/tiny-mixtral/ids.json"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does-not-exist"), "{err}");

    let out = xtask().args(["eval", "--model", "fixtures/models/tiny-mixtral", "--ids", "fixtures/parity/tiny-mixtral/ids.json", "--device", "quantum"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("quantum"));
}
