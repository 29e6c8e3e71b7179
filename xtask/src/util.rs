//! Shared helpers of the command line.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (where `.ci/run` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub use diep_cli::util::progress_bar;

/// `cargo xtask ci`: runs `.ci/run` from the workspace root.
pub fn run_ci() -> Result<()> {
    let root = workspace_root();
    let status =
        Command::new("bash").arg(root.join(".ci/run")).current_dir(&root).status().context("running .ci/run")?;
    if !status.success() {
        bail!(".ci/run failed ({status})");
    }
    Ok(())
}
