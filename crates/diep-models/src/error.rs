use std::path::PathBuf;

use diep_checkpoint::CheckpointError;

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Errors of model construction and execution.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading `config.json` or the weights failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A `--device` string could not be parsed or its backend is not compiled in.
    #[error("device `{spec}`: {reason}")]
    Device {
        /// The device string as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// `tokenizer.json` could not be loaded.
    #[error("{path}: cannot load tokenizer: {reason}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizers crate's message.
        reason: String,
    },
    /// Input the model cannot run on (token id out of range, empty batch, bad mask, ...).
    #[error("{0}")]
    InvalidInput(String),
}
