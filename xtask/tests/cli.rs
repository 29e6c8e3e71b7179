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
        .args([
            "eval",
            "--model",
            "fixtures/models/tiny-qwen3-moe",
            "--ids",
            "fixtures/parity/tiny-qwen3-moe/ids.json",
            "--json",
        ])
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
    let p = written["perplexity"]["ids.json"].as_f64().unwrap();
    assert!((p - expected).abs() / expected < 1e-4, "{p} vs {expected}");
    assert_eq!(written["tokens"], 48);
    assert!(written["tokens_per_second"].as_f64().unwrap() > 0.0);
    // No temporary file is left beside the output.
    assert_eq!(std::fs::read_dir(json.parent().unwrap()).unwrap().count(), 1);
}

#[test]
fn errors_exit_nonzero_and_name_the_problem() {
    let out = xtask()
        .args(["eval", "--model", "fixtures/models/does-not-exist", "--ids", "fixtures/parity/tiny-mixtral/ids.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does-not-exist"), "{err}");

    let out = xtask()
        .args([
            "eval",
            "--model",
            "fixtures/models/tiny-mixtral",
            "--ids",
            "fixtures/parity/tiny-mixtral/ids.json",
            "--device",
            "quantum",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("quantum"));
}

fn prune(args: &[&str], out: &std::path::Path) -> std::process::Output {
    xtask().arg("prune").args(args).arg("--out").arg(out).output().unwrap()
}

const CALIB: [&str; 8] = [
    "--calib",
    "fixtures/calib/gpl-3.txt",
    "--calib",
    "fixtures/calib/licenses.jsonl",
    "--samples",
    "16",
    "--seq-len",
    "128",
];

#[test]
fn prune_then_eval_the_output() {
    let dir = tempfile::tempdir().unwrap();
    for (method, allocation, ratio) in
        [("frequency", "uniform", "0.25"), ("reap", "global", "0.5"), ("naee", "uniform", "0.5")]
    {
        let out = dir.path().join(format!("{method}-{allocation}"));
        let mut args = vec![
            "--model",
            "fixtures/models/tiny-olmoe",
            "--method",
            method,
            "--allocation",
            allocation,
            "--ratio",
            ratio,
        ];
        args.extend(CALIB);
        // One run draws the same number of samples from each --calib file.
        let mix = if method == "naee" { "equal" } else { "pooled" };
        if mix == "equal" {
            args.extend(["--calib-mix", "equal"]);
        }
        let o = prune(&args, &out);
        assert!(o.status.success(), "{method}: {}", String::from_utf8_lossy(&o.stderr));
        let summary = String::from_utf8_lossy(&o.stdout);
        assert!(summary.contains("params") && summary.contains("kept experts"), "{summary}");
        let plan = diep_surgery::PruningPlan::read(out.join("pruning.json")).unwrap();
        assert_eq!(plan.method, method);
        assert_eq!(plan.settings["calibration"]["mix"], mix);
        let total: usize = plan.original_experts.values().sum();
        let ratio: f64 = ratio.parse().unwrap();
        assert_eq!(plan.removed(), (ratio * total as f64).round() as usize);
        let e = xtask()
            .args(["eval", "--model"])
            .arg(&out)
            .args(["--ids", "fixtures/parity/tiny-olmoe/ids.json"])
            .output()
            .unwrap();
        assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));

        // Applying the written plan again gives the same checkpoint.
        let again = dir.path().join(format!("{method}-{allocation}-again"));
        let o = xtask()
            .args(["prune", "--model", "fixtures/models/tiny-olmoe", "--plan"])
            .arg(out.join("pruning.json"))
            .arg("--out")
            .arg(&again)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let a = std::fs::read(out.join("model.safetensors")).unwrap();
        let b = std::fs::read(again.join("model.safetensors")).unwrap();
        assert!(a == b, "{method}: re-applying the plan changed the weights");
    }
}

/// Runs a failing prune and checks: non-zero exit, the message, and no output directory.
fn assert_prune_fails(args: &[&str], model: &std::path::Path, expect: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = xtask().arg("prune").arg("--model").arg(model).args(args).arg("--out").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail: {args:?}");
    for e in expect {
        assert!(err.contains(e), "expected `{e}` in: {err}");
    }
    assert!(!out.exists(), "output directory left behind");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary files left behind");
}

fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(root().join("fixtures/models").join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

#[test]
fn prune_bad_inputs_fail_cleanly() {
    let mixtral = root().join("fixtures/models/tiny-mixtral");
    let mut base = vec!["--method", "frequency"];
    base.extend(CALIB);
    for ratio in ["0", "1", "-0.5", "1.5"] {
        let mut a = base.clone();
        a.extend(["--ratio", ratio]);
        assert_prune_fails(&a, &mixtral, &["--ratio", "between 0 and 1"]);
    }
    // An unknown calibration mix.
    let mut a = base.clone();
    a.extend(["--ratio", "0.25", "--calib-mix", "proportional"]);
    assert_prune_fails(&a, &mixtral, &["--calib-mix", "proportional", "pooled or equal"]);
    // top_k greater than the kept experts, through a hand-written plan.
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("pruning.json");
    std::fs::write(
        &plan,
        r#"{"format": "diep-pruning-plan/1", "model_type": "mixtral", "original_experts": {"0": 8, "1": 8},
        "kept_experts": {"0": [0, 1, 2], "1": [5]}, "method": "manual"}"#,
    )
    .unwrap();
    assert_prune_fails(&["--plan", plan.to_str().unwrap()], &mixtral, &["layer 1", "num_experts_per_tok"]);

    // A truncated safetensors file.
    let m = copy_model("tiny-mixtral");
    let f = m.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let mut a = base.clone();
    a.extend(["--ratio", "0.25"]);
    assert_prune_fails(&a, m.path(), &["model.safetensors", "truncated"]);

    // A header length beyond the file.
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&(bytes.len() as u64 * 2).to_le_bytes());
    std::fs::write(&f, &bad).unwrap();
    assert_prune_fails(&a, m.path(), &["model.safetensors", "beyond the end of the file"]);

    // A shard index naming a path outside the model directory.
    let q = copy_model("tiny-qwen2-moe");
    let idx = q.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx).unwrap().replacen(
        "model-00001-of-00005.safetensors",
        "../../etc/model.safetensors",
        1,
    );
    std::fs::write(&idx, text).unwrap();
    assert_prune_fails(&a, q.path(), &["model.safetensors.index.json", "outside the model directory"]);

    // A config/weight shape mismatch.
    let m = copy_model("tiny-mixtral");
    let cfg = m.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"intermediate_size\": 48", "\"intermediate_size\": 40");
    std::fs::write(&cfg, text).unwrap();
    assert_prune_fails(&a, m.path(), &["w1.weight", "[40, 64]"]);

    // NaN in a router: replace the first router value by NaN.
    let m = copy_model("tiny-mixtral");
    let f = m.path().join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["model.layers.1.block_sparse_moe.gate.weight"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + n + start..8 + n + start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    assert_prune_fails(&a, m.path(), &["model.layers.1.block_sparse_moe.gate.weight", "NaN"]);

    // An existing output directory without --force.
    let dir = tempfile::tempdir().unwrap();
    let o =
        prune(&a.iter().copied().chain(["--model", "fixtures/models/tiny-mixtral"]).collect::<Vec<_>>(), dir.path());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
}

#[test]
fn prune_with_diep_saves_state_resumes_and_records_alpha_beta() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("diep");
    let mut args =
        vec!["--model", "fixtures/models/tiny-qwen2-moe", "--method", "diep", "--ratio", "0.5", "--epochs", "2"];
    args.extend(CALIB);
    let o = prune(&args, &out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // One line per epoch with the loss, also when stderr is not a terminal.
    assert!(stderr.contains("epoch   1/2") && stderr.contains("epoch   2/2"), "{stderr}");
    let plan = diep_surgery::PruningPlan::read(out.join("pruning.json")).unwrap();
    assert_eq!(plan.method, "diep");
    assert_eq!(plan.allocation.as_deref(), Some("global"), "DiEP defaults to global allocation");
    let total: usize = plan.original_experts.values().sum();
    assert_eq!(plan.removed(), (0.5 * total as f64).round() as usize);
    let diep = &plan.extra["diep"];
    assert_eq!(diep["relaxation"], "routed-gated");
    assert_eq!(diep["loss_curve"].as_array().unwrap().len(), 2);
    // DiEP's own plan is followed by up to 3 refinement rounds (the global default): its moves
    // take DiEP's per-layer counts to the written plan's.
    assert_eq!(plan.settings["refine"]["rounds"], 3);
    let run = plan.extra["refine"]["rounds"].as_u64().unwrap();
    assert!((1..=3).contains(&run), "{run} rounds");
    let moves = plan.extra["refine"]["moves"].as_array().unwrap();
    let count = |m: &serde_json::Value, key: &str, l: usize| {
        m[key].as_array().unwrap().iter().filter(|x| x[0].as_u64() == Some(l as u64)).count() as i64
    };
    for l in plan.original_experts.keys() {
        assert_eq!(diep["alpha"][l.to_string()].as_array().unwrap().len(), plan.original_experts[l]);
        assert!(diep["beta"][l.to_string()].as_f64().unwrap() > 0.0);
        let before = diep["kept_per_layer"][l.to_string()].as_u64().unwrap() as i64;
        let moved: i64 = moves.iter().map(|m| count(m, "restored", *l) - count(m, "removed", *l)).sum();
        assert_eq!(before + moved, plan.kept_experts[l].len() as i64, "layer {l}: {moves:?}");
    }
    assert_eq!(plan.settings["epochs"], 2);
    assert_eq!(plan.settings["lr"], 0.02);
    assert_eq!(plan.settings["objective"], "kl");
    // The state beside the output; resuming a finished run gives the same plan.
    let state = dir.path().join("diep.diep-state.json");
    assert!(state.exists());
    let again = dir.path().join("again");
    let mut resume = args.clone();
    resume.extend(["--resume", "--state", state.to_str().unwrap()]);
    let o = prune(&resume, &again);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan2 = diep_surgery::PruningPlan::read(again.join("pruning.json")).unwrap();
    assert_eq!(plan2.kept_experts, plan.kept_experts);
    assert_eq!(plan2.extra["diep"]["alpha"], plan.extra["diep"]["alpha"]);
    // Resuming with other settings is refused and names the setting.
    let mut other = resume.clone();
    other.extend(["--lr", "0.1"]);
    let o = prune(&other, &dir.path().join("other"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("lr"), "{stderr}");
    assert!(!dir.path().join("other").exists());
    // Bad DiEP options fail before any work.
    for (flag, value, expect) in [
        ("--alternation", "3-1", "--alternation"),
        ("--relaxation", "nope", "relaxation"),
        ("--objective", "mse", "objective"),
    ] {
        let mut bad = args.clone();
        bad.extend([flag, value]);
        let o = prune(&bad, &dir.path().join("bad"));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && stderr.contains(expect), "{flag}: {stderr}");
    }
}

#[test]
fn prune_with_merge_and_dynamic_skip_then_eval_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let mut args = vec![
        "--model",
        "fixtures/models/tiny-mixtral",
        "--method",
        "reap",
        "--ratio",
        "0.5",
        "--merge",
        "--dynamic-skip",
        "--similarity-tokens",
        "128",
    ];
    args.extend(CALIB);
    let o = prune(&args, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan = diep_surgery::PruningPlan::read(out.join("pruning.json")).unwrap();
    // Every removed expert is folded exactly once, weights sum to 1.
    let removed: usize =
        plan.original_experts.values().sum::<usize>() - plan.kept_experts.values().map(Vec::len).sum::<usize>();
    let folded: usize = plan.merge.values().flat_map(|g| g.values()).map(|m| m.len() - 1).sum();
    assert_eq!(folded, removed);
    for m in plan.merge.values().flat_map(|g| g.values()) {
        assert!((m.iter().map(|x| x.1).sum::<f64>() - 1.0).abs() < 1e-9);
    }
    let tables = plan.extra["dynamic_skip"].as_object().unwrap();
    assert_eq!(tables.len(), plan.kept_experts.len());
    for (l, t) in tables {
        let n = plan.kept_experts[&l.parse::<usize>().unwrap()].len();
        assert_eq!(t["gamma"].as_array().unwrap().len(), n);
    }
    let e = xtask()
        .args(["eval", "--dynamic-skip", "--model"])
        .arg(&out)
        .args(["--ids", "fixtures/parity/tiny-mixtral/ids.json"])
        .output()
        .unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let report: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    let eligible = report["dynamic_skip"]["eligible"].as_u64().unwrap();
    assert_eq!(eligible, 2 * 48, "one second-expert slot per token per MoE layer");
    // Without the tables, --dynamic-skip is a clear error.
    let e = xtask()
        .args(["eval", "--dynamic-skip", "--model", "fixtures/models/tiny-mixtral"])
        .args(["--ids", "fixtures/parity/tiny-mixtral/ids.json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && stderr.contains("pruning.json"), "{stderr}");
}

#[test]
fn prune_gpt_oss_uniformly_then_eval() {
    // DiEP (uniform allocation) on the bf16/f32 fixture, REAP on the MXFP4 one; both outputs load
    // and evaluate. Then global allocation on the bf16/f32 fixture.
    let dir = tempfile::tempdir().unwrap();
    for (name, method) in [("tiny-gpt-oss", "diep"), ("tiny-gpt-oss-mxfp4", "reap")] {
        let model = format!("fixtures/models/{name}");
        let out = dir.path().join(name);
        let mut args = vec!["--model", &model, "--method", method, "--allocation", "uniform", "--ratio", "0.5"];
        if method == "diep" {
            args.extend(["--epochs", "1"]);
        }
        args.extend(CALIB);
        let o = prune(&args, &out);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let plan = diep_surgery::PruningPlan::read(out.join("pruning.json")).unwrap();
        assert!(plan.kept_experts.values().all(|k| k.len() == 4), "{name}: {:?}", plan.kept_experts);
        let ids = format!("fixtures/parity/{name}/ids.json");
        let e = xtask().args(["eval", "--model"]).arg(&out).args(["--ids", &ids]).output().unwrap();
        assert!(e.status.success(), "{name}: {}", String::from_utf8_lossy(&e.stderr));
    }
    // Global allocation (per-layer counts, loaded through the shipped remote code) on bf16/f32 experts.
    let model = "fixtures/models/tiny-gpt-oss";
    let mut args = vec!["--model", model, "--method", "frequency", "--allocation", "global", "--ratio", "0.5"];
    args.extend(CALIB);
    let out = dir.path().join("global");
    let o = prune(&args, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan = diep_surgery::PruningPlan::read(out.join("pruning.json")).unwrap();
    assert_eq!(plan.kept_experts.values().map(Vec::len).sum::<usize>(), 12);
    let e =
        xtask().args(["eval", "--model"]).arg(&out).args(["--ids", "fixtures/parity/tiny-gpt-oss/ids.json"]).output();
    let e = e.unwrap();
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
}

/// DiEP's default refinement round respects its cost cap: narrowed to the experts nearest the
/// cut when that fits, skipped (and recorded) when even that does not, and an explicit
/// `--refine` above the cap is refused with the estimate; uniform DiEP runs no round by default;
/// bad refinement settings fail before any work.
#[test]
fn the_refinement_round_respects_its_cost_cap() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], name: &str| {
        let mut args =
            vec!["--model", "fixtures/models/tiny-qwen2-moe", "--method", "diep", "--ratio", "0.5", "--epochs", "1"];
        args.extend(CALIB);
        args.extend(extra);
        let o = prune(&args, &dir.path().join(name));
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let read = |name: &str| diep_surgery::PruningPlan::read(dir.path().join(name).join("pruning.json")).unwrap();
    // Skipped: a cap no round fits.
    let (ok, stderr) = run(&["--refine-max-passes", "0.5"], "skipped");
    assert!(ok && stderr.contains("refine: skipped") && stderr.contains("forward passes"), "{stderr}");
    let plan = read("skipped");
    assert_eq!(plan.settings["refine"]["skipped"], true);
    assert!(!plan.extra.contains_key("refine"));
    // Refused when asked for explicitly, naming the estimate's limit; nothing written.
    let (ok, stderr) = run(&["--refine", "1", "--refine-max-passes", "0.5"], "refused");
    assert!(!ok && stderr.contains("--refine-max-passes 0.5"), "{stderr}");
    assert!(!dir.path().join("refused").exists());
    // Narrowed: a cap between a one-wide round and a full one.
    let (ok, stderr) = run(&[], "full");
    assert!(ok, "{stderr}");
    let full = read("full").settings["refine"]["estimated_passes_per_round"].as_f64().unwrap();
    let cap = (full - 0.5).max(1.0);
    let (ok, stderr) = run(&["--refine-max-passes", &cap.to_string()], "narrow");
    assert!(ok && stderr.contains("looking at the"), "{stderr}");
    let narrow = read("narrow");
    assert!(narrow.settings["refine"]["width"].as_u64().unwrap() >= 1);
    assert!(narrow.settings["refine"]["estimated_passes_per_round"].as_f64().unwrap() <= cap);
    // Uniform: no round by default.
    let (ok, stderr) = run(&["--allocation", "uniform"], "uniform");
    assert!(ok, "{stderr}");
    assert!(read("uniform").settings.get("refine").is_none_or(|r| r.is_null()));
    // Bad settings name the flag.
    for (flag, value) in [("--refine-gain", "1"), ("--refine-margin", "inf"), ("--refine-confirm", "0")] {
        let (ok, stderr) = run(&[flag, value], "bad");
        assert!(!ok && stderr.contains(flag), "{flag}: {stderr}");
        assert!(!dir.path().join("bad").exists());
    }
}
