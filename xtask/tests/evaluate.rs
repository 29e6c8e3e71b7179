//! `xtask eval --text --task` and `xtask compare` end to end, against numbers lm-evaluation-harness
//! and transformers produced (`fixtures/eval/loglik-trained-moe.json`).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xtask() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(root());
    c
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/eval/loglik-trained-moe.json")).unwrap())
        .unwrap()
}

fn task_args(g: &Value) -> Vec<String> {
    g["task_metrics"]
        .as_object()
        .unwrap()
        .keys()
        .flat_map(|t| ["--task".to_owned(), format!("{t}=fixtures/eval/docs/{t}.jsonl")])
        .collect()
}

#[test]
fn eval_text_and_tasks_match_transformers_and_lm_eval() {
    // The fused CPU engine (the default) and the burn model must both reproduce them.
    for (engine, name) in [("auto", "fused-cpu"), ("burn", "burn")] {
        eval_text_and_tasks(engine, name);
    }
}

fn eval_text_and_tasks(engine: &str, engine_name: &str) {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("eval.json");
    let samples = dir.path().join("samples.jsonl");
    let out = xtask()
        .args(["eval", "--model", "fixtures/trained-moe", "--text", "fixtures/trained-moe/heldout/english.txt"])
        .args(["--seq-len", "256", "--batch-tokens", "1024", "--engine", engine, "--json"])
        .arg(&json)
        .arg("--log-samples")
        .arg(&samples)
        .args(task_args(&g))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["engine"], engine_name);
    let want = g["text_perplexity"]["perplexity"].as_f64().unwrap();
    let got = r["perplexity"]["english.txt"].as_f64().unwrap();
    assert!((got - want).abs() / want < 1e-4, "text perplexity {got} vs transformers {want}");
    assert_eq!(
        r["details"]["english.txt"]["tokens"].as_u64().unwrap(),
        256 * g["text_perplexity"]["windows"].as_u64().unwrap()
    );
    for (task, m) in g["task_metrics"].as_object().unwrap() {
        for metric in ["acc", "acc_norm"] {
            assert_eq!(r["tasks"][task][metric].as_f64().unwrap(), m[metric].as_f64().unwrap(), "{task} {metric}");
        }
    }
    let lines = std::fs::read_to_string(&samples).unwrap();
    let n: u64 = g["task_metrics"].as_object().unwrap().keys().map(|t| r["tasks"][t]["n"].as_u64().unwrap()).sum();
    assert_eq!(lines.lines().count() as u64, n);
}

#[test]
fn eval_engine_choice_is_explained() {
    let ids = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ids.path(), "[[1, 2, 3, 4, 5, 6, 7, 8]]").unwrap();
    let run = |model: &str, engine: &str| {
        xtask().args(["eval", "--model", model, "--engine", engine, "--ids"]).arg(ids.path()).output().unwrap()
    };
    // The fused engine is CPU-only: asked for on another device, it refuses and says why.
    let out = xtask()
        .args(["eval", "--model", "fixtures/models/tiny-deepseek-v3", "--engine", "fused", "--device", "wgpu", "--ids"])
        .arg(ids.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("CPU only"), "{stderr}");
    // Both engines give the same perplexity on a covered model.
    let ppl = |engine: &str| {
        let out = run("fixtures/models/tiny-qwen2-moe", engine);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["perplexity"].as_object().unwrap().values().next().unwrap().as_f64().unwrap()
    };
    let (fused, burn) = (ppl("fused"), ppl("burn"));
    assert!((fused - burn).abs() / burn < 1e-5, "fused {fused} vs burn {burn}");
    // And `auto` picks the fused engine for DeepSeek-V3 too.
    let out = run("fixtures/models/tiny-deepseek-v3", "auto");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("engine: fused-cpu"), "{stderr}");
}

#[test]
fn eval_input_errors_name_the_problem() {
    let cases: [(&[&str], &str); 5] = [
        (&["--task", "nonsense=fixtures/eval/docs/boolq.jsonl"], "NAME:FORMAT"),
        (&["--task", "boolq=fixtures/eval/docs/missing.jsonl"], "missing.jsonl"),
        (&["--task", "boolq:arc_easy=fixtures/eval/docs/boolq.jsonl"], "choices.text"),
        (&["--text", "fixtures/eval/docs/boolq.jsonl", "--seq-len", "100000"], "fewer than one window"),
        (&[], "nothing to evaluate"),
    ];
    for (args, needle) in cases {
        let out = xtask().args(["eval", "--model", "fixtures/trained-moe"]).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn compare_writes_retention_table_and_figures() {
    let dir = tempfile::tempdir().unwrap();
    let pruned = dir.path().join("pruned");
    let out = xtask()
        .args(["prune", "--model", "fixtures/trained-moe", "--method", "frequency", "--ratio", "0.25"])
        .args(["--calib", "fixtures/trained-moe/calib.txt", "--samples", "4", "--seq-len", "64", "--out"])
        .arg(&pruned)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report_dir = dir.path().join("report");
    let out = xtask()
        .args(["compare", "--base", "fixtures/trained-moe", "--pruned"])
        .arg(&pruned)
        .args(["--text", "fixtures/trained-moe/heldout/code.txt", "--seq-len", "256"])
        .args(["--task", "arc_easy=fixtures/eval/docs/arc_easy.jsonl"])
        .args(["--task", "hellaswag=fixtures/eval/docs/hellaswag.jsonl", "--out"])
        .arg(&report_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(report_dir.join("compare.json")).unwrap()).unwrap();
    let rows = r["retention"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 2 * 2, "one perplexity and acc/acc_norm of two tasks");
    let (b, p) = (&r["base"], &r["pruned"]);
    let ppl = |x: &Value| x["perplexity"]["code.txt"].as_f64().unwrap();
    assert_eq!(rows[0]["ratio"].as_f64().unwrap(), ppl(p) / ppl(b));
    assert_eq!(rows[0]["retention"].as_f64().unwrap(), ppl(b) / ppl(p));
    assert!(ppl(p) > ppl(b), "pruning a quarter of the experts costs perplexity");
    let md = std::fs::read_to_string(report_dir.join("compare.md")).unwrap();
    assert!(md.contains("| perplexity | code.txt |") && md.contains("| acc_norm | hellaswag |"), "{md}");
    let svg = std::fs::read_to_string(report_dir.join("kept-experts.svg")).unwrap();
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(pruned.join("pruning.json")).unwrap()).unwrap();
    let kept: usize = plan["kept_experts"].as_object().unwrap().values().map(|v| v.as_array().unwrap().len()).sum();
    assert_eq!(svg.matches(": kept</title>").count(), kept);
    assert_eq!(svg.matches(": removed</title>").count(), 32 - kept);
    assert!(std::fs::read_to_string(report_dir.join("retention.svg")).unwrap().starts_with("<svg"));
}
