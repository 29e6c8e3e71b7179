//! Without a GPU: `--device cuda` is one clear error, and the GPU check reports every GPU step
//! as not run and succeeds.

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

/// Whether `xtask device --device SPEC` brings the device up here.
fn usable(spec: &str) -> bool {
    xtask().args(["device", "--device", spec]).output().unwrap().status.success()
}

#[cfg(feature = "cuda")]
#[test]
fn eval_on_cuda_without_a_gpu_is_one_error_line() {
    if usable("cuda") {
        eprintln!("a CUDA device exists here; nothing to check");
        return;
    }
    for spec in ["cuda", "cuda:3"] {
        let out = xtask()
            .args(["eval", "--device", spec, "--model", "fixtures/models/tiny-mixtral"])
            .args(["--ids", "fixtures/parity/tiny-mixtral/ids.json"])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line expected: {err}");
        assert!(lines[0].starts_with("error: device `cuda:") && lines[0].contains("CUDA"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn device_command_names_the_cpu_and_fails_clearly_for_missing_backends() {
    let out = xtask().args(["device", "--device", "cpu"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["device"], "cpu");
    if !cfg!(feature = "cuda") {
        let out = xtask().args(["device", "--device", "cuda"]).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("error: device `cuda:0`") && err.contains("--features cuda"), "{err}");
    }
}

/// `scripts/gpu-check.sh` on a machine with no GPU: exit 0, every GPU step "not run: <reason>".
/// Skipped where an NVIDIA device node exists (there the script runs the full check, which is
/// not a unit test's job).
#[test]
fn gpu_check_without_a_gpu_reports_not_run() {
    if std::path::Path::new("/dev/nvidia0").exists() || usable("cuda") {
        eprintln!("a GPU exists here; run scripts/gpu-check.sh itself");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_xtask")).parent().unwrap().to_path_buf();
    let out = Command::new("bash")
        .arg(root().join("scripts/gpu-check.sh"))
        .arg("--bin")
        .arg(&bin)
        .arg("--out")
        .arg(dir.path())
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("gpu-check.json")).unwrap()).unwrap();
    assert_eq!(report["failed"], false);
    let steps = report["steps"].as_array().unwrap();
    let status = |name: &str| {
        steps.iter().find(|s| s["step"] == name).unwrap_or_else(|| panic!("no step {name}: {report}"))["status"].clone()
    };
    for name in ["detect/cuda", "prune-diep/trained-moe", "perf-cuda/forward", "perf-cuda/diep-step"] {
        assert_eq!(status(name), "not run", "{name}: {report}");
    }
    // lavapipe (CI's software Vulkan) is an adapter but not a GPU: not run either.
    if status("detect/wgpu") == "not run" {
        for name in ["perf-wgpu/forward", "perf-wgpu/diep-step", "memory/peak"] {
            assert_eq!(status(name), "not run", "{name}: {report}");
        }
    }
    for s in steps.iter().filter(|s| s["step"].as_str().unwrap().starts_with("eval-parity/")) {
        assert_eq!(s["status"], "not run", "{s}");
    }
    assert!(steps.iter().any(|s| s["step"] == "eval-parity/tiny-mixtral"), "{report}");
    assert!(stdout.contains("detect/cuda") && stdout.contains("not run: "), "{stdout}");
    let md = std::fs::read_to_string(dir.path().join("gpu-check.md")).unwrap();
    assert!(md.contains("| perf-cuda/forward | not run: "), "{md}");
}
