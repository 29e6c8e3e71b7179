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
