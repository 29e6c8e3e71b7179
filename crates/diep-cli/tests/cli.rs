//! The installed `diep` binary: help, subcommands and errors, as a user meets them.

use std::process::Command;

fn diep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diep"))
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = diep().args(args).output().expect("diep runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn alone_it_lists_the_commands() {
    let (ok, stdout, _) = run(&[]);
    assert!(ok);
    for cmd in ["prune", "eval", "compare"] {
        assert!(stdout.contains(cmd), "{stdout}");
    }
    // The project's own commands stay in xtask.
    assert!(!stdout.contains("bench-methods") && !stdout.contains("fixture"), "{stdout}");
}

#[test]
fn every_subcommand_has_help() {
    for (cmd, option) in [("prune", "--ratio"), ("eval", "--ids"), ("compare", "--pruned")] {
        let (ok, stdout, stderr) = run(&[cmd, "--help"]);
        assert!(ok, "diep {cmd} --help: {stderr}");
        assert!(stdout.contains("Usage: diep"), "{stdout}");
        assert!(stdout.contains(option), "diep {cmd} --help lacks {option}: {stdout}");
    }
}

#[test]
fn a_missing_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let out = dir.path().join("out");
    let (ok, _, stderr) = run(&[
        "prune",
        "--model",
        missing.to_str().unwrap(),
        "--method",
        "frequency",
        "--ratio",
        "0.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.starts_with("error: ") && stderr.contains("no-such-model"), "{stderr}");
    assert!(!out.exists());
}

/// `docs/CLI.md` documents every option of every `diep` command.
#[test]
fn docs_cli_names_every_option() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CLI.md")).unwrap();
    for cmd in ["prune", "eval", "compare"] {
        let (ok, help, _) = run(&[cmd, "--help"]);
        assert!(ok);
        // Option names are `--` followed by lowercase letters, digits and dashes.
        let mut options: Vec<&str> = help
            .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2 && *w != "--help")
            .collect();
        options.sort_unstable();
        options.dedup();
        assert!(options.len() > 3, "{help}");
        let missing: Vec<&&str> =
            options.iter().filter(|o| !doc.contains(&format!("`{o}")) && !doc.contains(&format!(" {o}"))).collect();
        assert!(missing.is_empty(), "docs/CLI.md lacks these options of `diep {cmd}`: {missing:?}");
    }
}

/// The `kl` reference is exact while it fits in 1 GiB, else the top 64 tokens per position.
#[test]
fn reference_form_follows_its_size() {
    use diep_cli::prune::default_reference_top_k;
    // The fixture's calibration: 32 × 256 positions × 2048 tokens × 4 B = 64 MiB.
    assert_eq!(default_reference_top_k(32 * 256, 2048), 0);
    // Exactly 1 GiB still fits; one position more does not.
    assert_eq!(default_reference_top_k(1 << 16, 1 << 12), 0);
    assert_eq!(default_reference_top_k((1 << 16) + 1, 1 << 12), 64);
    // Mixtral's default calibration: 128 × 2048 positions × 32000 tokens × 4 B = 33.6 GB.
    assert_eq!(default_reference_top_k(128 * 2048, 32000), 64);
}

/// A hub id resolves through a HuggingFace hub-layout cache (snapshots of symlinks into
/// blobs), offline; an id that is not cached names the cache path searched.
#[test]
fn hub_ids_resolve_in_the_hub_cache() {
    let fixture = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/models/tiny-mixtral"));
    let ids = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity/tiny-mixtral/ids.json");
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--acme--tiny-mixtral");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(fixture).unwrap() {
        let entry = entry.unwrap();
        let blob = repo.join("blobs").join(format!("blob-{}", entry.file_name().to_string_lossy()));
        std::fs::copy(entry.path(), &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).unwrap();
    }
    let eval = |model: &str| {
        diep()
            .args(["eval", "--model", model, "--ids", ids])
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let direct = diep().args(["eval", "--model", fixture.to_str().unwrap(), "--ids", ids]).output().unwrap();
    assert!(direct.status.success());
    let ppl = |out: &std::process::Output| -> f64 {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["perplexity"]["ids.json"].as_f64().unwrap()
    };
    for model in ["acme/tiny-mixtral", &format!("acme/tiny-mixtral@{commit}")] {
        let out = eval(model);
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(ppl(&out), ppl(&direct), "{model}");
    }
    let out = eval("acme/not-cached");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("models--acme--not-cached") && err.contains("hub cache"), "{err}");
    let out = eval("acme/tiny-mixtral@v9");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revision `v9`"));
}

/// Online (no `HF_HUB_OFFLINE`), a hub id missing from the cache is fetched with `hf-hub`; when
/// the hub cannot be reached the error names the cache path searched and the failed fetch.
#[test]
fn a_hub_id_not_cached_is_fetched_and_a_failed_fetch_is_named() {
    let home = tempfile::tempdir().unwrap();
    let ids = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/parity/tiny-mixtral/ids.json");
    let out = diep()
        .args(["eval", "--model", "acme/not-cached", "--ids", ids])
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        // Nothing listens on port 9 (discard) here: the fetch fails at once.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("models--acme--not-cached") && err.contains("fetching `acme/not-cached`"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE=1"), "{err}");
}
