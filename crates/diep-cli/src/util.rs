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
///
/// A hub id that is missing from the cache, or whose snapshot lacks `config.json` or weights,
/// is fetched into the cache with the `hf-hub` crate (honouring `HF_TOKEN` and `HF_ENDPOINT`),
/// unless `HF_HUB_OFFLINE` is set or the `hub-download` feature is off. Errors name the cache
/// path searched.
pub fn model_dir(arg: &Path) -> Result<PathBuf> {
    if arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    let cached = diep_checkpoint::resolve_model(arg);
    if let Ok(dir) = &cached
        && diep_checkpoint::hub::snapshot_is_complete(dir)
    {
        return Ok(dir.clone());
    }
    let text = arg.to_string_lossy();
    let Some((org, name, revision)) = diep_checkpoint::hub::parse_hub_id(&text) else {
        return Ok(cached?);
    };
    if hub_offline() {
        return match cached {
            Ok(dir) => Ok(dir),
            Err(e) => Err(anyhow::Error::new(e).context("HF_HUB_OFFLINE is set: only the hub cache is read")),
        };
    }
    fetch(org, name, revision, cached)
}

/// `HF_HUB_OFFLINE` set to a true value (`1`, `true`, `yes`, `on`), as `huggingface_hub` reads it.
fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

#[cfg(feature = "hub-download")]
fn fetch(
    org: &str,
    name: &str,
    revision: &str,
    cached: std::result::Result<PathBuf, diep_checkpoint::CheckpointError>,
) -> Result<PathBuf> {
    use anyhow::Context;
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    let cache = diep_checkpoint::hub::hub_cache_dir();
    let id = format!("{org}/{name}");
    let describe_cached = match &cached {
        Ok(dir) => format!("the cached snapshot {} is incomplete", dir.display()),
        Err(e) => e.to_string(),
    };
    let mut builder = ApiBuilder::from_env().with_cache_dir(cache.clone()).with_progress(true);
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().context("cannot set up the hub client")?;
    let repo = api.repo(Repo::with_revision(id.clone(), RepoType::Model, revision.to_string()));
    let info = repo.info().with_context(|| {
        format!("{describe_cached}; fetching `{id}` (revision `{revision}`) from the hub failed (set HF_HUB_OFFLINE=1 to use the cache only)")
    })?;
    let wanted: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).filter(|f| is_model_file(f)).collect();
    if !wanted.iter().any(|f| f == "config.json") {
        anyhow::bail!("`{id}` (revision `{revision}`) on the hub has no config.json");
    }
    eprintln!("fetching {} file(s) of {id}@{revision} into {}", wanted.len(), cache.display());
    for file in &wanted {
        repo.get(file).with_context(|| format!("fetching `{file}` of `{id}` from the hub"))?;
    }
    let dir = diep_checkpoint::resolve_model(Path::new(&format!("{id}@{}", info.sha)))?;
    if !diep_checkpoint::hub::snapshot_is_complete(&dir) {
        anyhow::bail!("`{id}`: {} still lacks config.json or weights after fetching", dir.display());
    }
    Ok(dir)
}

#[cfg(not(feature = "hub-download"))]
fn fetch(
    _org: &str,
    _name: &str,
    _revision: &str,
    cached: std::result::Result<PathBuf, diep_checkpoint::CheckpointError>,
) -> Result<PathBuf> {
    Ok(cached?)
}

/// The files of a hub repository that loading, evaluation and surgery read (config, weights,
/// tokenizer, remote code); not other formats' weights or assets.
#[cfg_attr(not(feature = "hub-download"), allow(dead_code))]
fn is_model_file(f: &str) -> bool {
    if f.contains('/') {
        return false;
    }
    f.ends_with(".safetensors")
        || f.ends_with(".json") && !f.starts_with('.')
        || f.ends_with(".py")
        || f == "tokenizer.model"
        || f.ends_with(".jinja")
        || f.ends_with(".tiktoken")
}
