//! The errors of checkpoint surgery.

use std::path::PathBuf;

use diep_checkpoint::CheckpointError;

use diep_plan::PlanError;

/// Everything that can go wrong applying a pruning plan. Each variant names the file and, where
/// there is one, the tensor or JSON field concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SurgeryError {
    /// A file or directory could not be read, written, copied or renamed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The plan cannot be read, or does not fit the model (wrong model type, layers, expert
    /// ids, too few experts kept for `num_experts_per_tok`, ...).
    #[error(transparent)]
    InvalidPlan(#[from] PlanError),
    /// The input model directory cannot be read (config.json, safetensors, shard index).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The output directory exists and `force` was not given.
    #[error("{} already exists (use --force to replace it)", path.display())]
    OutputExists {
        /// The output directory.
        path: PathBuf,
    },
    /// The output directory is, or contains, the input model directory.
    #[error("output directory {} would replace the input model directory {}", out.display(), model.display())]
    OutputIsInput {
        /// The output directory.
        out: PathBuf,
        /// The input model directory.
        model: PathBuf,
    },
    /// A tensor's name, shape or dtype contradicts `config.json` or the other experts.
    #[error("tensor `{tensor}` in {}: {reason}", path.display())]
    WeightMismatch {
        /// The tensor, as named on disk.
        tensor: String,
        /// The file holding it.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor that `config.json` implies is absent from the checkpoint.
    #[error("tensor `{tensor}` is missing from the checkpoint in {}: {reason}", location.display())]
    MissingTensor {
        /// The tensor name that was expected.
        tensor: String,
        /// The model directory (or file) that should hold it.
        location: PathBuf,
        /// Why it is expected.
        reason: String,
    },
    /// A router tensor holds NaN or ±inf.
    #[error("tensor `{tensor}` in {}: element {index} (row {row}) is {kind}; refusing to prune from a corrupt router", path.display())]
    NonFinite {
        /// The router tensor.
        tensor: String,
        /// The file holding it.
        path: PathBuf,
        /// Flat index of the first bad element.
        index: usize,
        /// The row (expert) it belongs to.
        row: usize,
        /// `NaN`, `+inf` or `-inf`.
        kind: &'static str,
    },
    /// The embedded remote-code assets (`remote_code/auto_map.json`) are unusable.
    #[error("remote code asset {file}: {reason}")]
    RemoteCode {
        /// The asset's file name.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl SurgeryError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SurgeryError {
        let path = path.into();
        move |source| SurgeryError::Io { path, source }
    }
}
