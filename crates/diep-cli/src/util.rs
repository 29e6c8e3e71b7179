//! Helpers shared by the subcommands.

use std::path::{Path, PathBuf};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

/// Writes `contents` to `path` atomically (a temporary sibling, then a rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    Ok(diep_common::write_atomic(path, contents)?)
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The model directory a `--model` argument names: a directory, or a hub id
/// `org/name[@revision]` found in the HuggingFace hub cache (`HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
pub fn model_dir(arg: &Path) -> Result<PathBuf> {
    Ok(diep_checkpoint::resolve_model(arg)?)
}
