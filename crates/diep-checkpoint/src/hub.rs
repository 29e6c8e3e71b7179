//! Models named by their HuggingFace hub id, found in the local hub cache.
//!
//! `huggingface_hub` (and transformers) keep downloaded models in a cache directory:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
//! └── models--{org}--{name}/
//!     ├── refs/main                 # the commit hash a branch or tag points to
//!     ├── snapshots/{commit}/       # the model directory: symlinks into blobs/
//!     └── blobs/
//! ```
//!
//! [`resolve_model`] turns `org/name`, `org/name@revision` (a branch, a tag or a commit hash)
//! or a plain directory into the model directory the rest of the toolkit reads. It only reads
//! the cache (as `HF_HUB_OFFLINE=1` does), and this crate never touches the network: the
//! `diep` command fetches missing files into the same cache first ([`parse_hub_id`],
//! [`snapshot_is_complete`]).

use std::path::{Path, PathBuf};

use crate::error::{CheckpointError, Result};

/// The hub cache directory: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (`$XDG_CACHE_HOME/huggingface/hub` where that is set).
pub fn hub_cache_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| h.join(".cache"))).unwrap_or_default();
    cache.join("huggingface").join("hub")
}

/// A hub id `org/name` with an optional `@revision` (default `main`), if `arg` looks like one:
/// `(org, name, revision)`.
pub fn parse_hub_id(arg: &str) -> Option<(&str, &str, &str)> {
    let (id, revision) = arg.split_once('@').unwrap_or((arg, "main"));
    let (org, name) = id.split_once('/')?;
    let ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    (ok(org) && ok(name) && !org.starts_with('.') && !revision.is_empty() && !revision.contains(['/', '\\']))
        .then_some((org, name, revision))
}

/// The model directory `arg` names: `arg` itself if it is a directory, else the snapshot of a
/// hub id `org/name[@revision]` in the hub cache of [`hub_cache_dir`].
///
/// A hub id that is not in the cache is an error naming the cache path searched.
pub fn resolve_model(arg: &Path) -> Result<PathBuf> {
    resolve_model_in(arg, &hub_cache_dir())
}

/// [`resolve_model`] with an explicit cache directory.
pub fn resolve_model_in(path: &Path, cache: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let arg = path.to_string_lossy();
    let arg = arg.as_ref();
    let Some((org, name, revision)) = parse_hub_id(arg) else {
        return Err(CheckpointError::ModelNotFound {
            model: arg.into(),
            reason: "no such directory, and not a hub id of the form org/name[@revision]".into(),
        });
    };
    let repo = cache.join(format!("models--{org}--{name}"));
    let not_found = |reason: String| CheckpointError::ModelNotFound { model: arg.into(), reason };
    if !repo.is_dir() {
        return Err(not_found(format!(
            "not a directory, and not in the hub cache: {} does not exist (set HF_HUB_CACHE or HF_HOME, or \
             fetch it with `hf download {org}/{name}`, or run without HF_HUB_OFFLINE=1)",
            repo.display()
        )));
    }
    // A branch or tag resolves through refs/; anything else is taken as a commit hash.
    let ref_file = repo.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_file) {
        Ok(s) => s.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(not_found(format!(
            "revision `{revision}` is not in the hub cache: {} does not exist",
            snapshot.display()
        )));
    }
    Ok(snapshot)
}

/// Whether a model directory holds what loading needs: `config.json` and its weights (every
/// shard the index lists, or `model.safetensors`). A hub snapshot can be partial when a download
/// was interrupted or only some files were fetched.
pub fn snapshot_is_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    let index = dir.join(crate::SHARD_INDEX);
    let Ok(text) = std::fs::read_to_string(&index) else {
        return dir.join(crate::SINGLE_FILE).is_file();
    };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else { return false };
    map.values().filter_map(|f| f.as_str()).all(|f| dir.join(f).is_file())
}

#[cfg(test)]
mod tests {
    use super::parse_hub_id;

    #[test]
    fn hub_ids() {
        assert_eq!(parse_hub_id("mistralai/Mixtral-8x7B-v0.1"), Some(("mistralai", "Mixtral-8x7B-v0.1", "main")));
        assert_eq!(parse_hub_id("Qwen/Qwen3-30B-A3B@v1.0"), Some(("Qwen", "Qwen3-30B-A3B", "v1.0")));
        assert_eq!(parse_hub_id("no-slash"), None);
        assert_eq!(parse_hub_id("a/b/c"), None);
        assert_eq!(parse_hub_id("../x"), None);
        assert_eq!(parse_hub_id("org/name@"), None);
    }
}
