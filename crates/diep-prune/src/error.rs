use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = PruneError> = std::result::Result<T, E>;

/// Errors of the pruning pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] diep_models::ModelError),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file has the wrong content.
    #[error("{path}: {reason}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The requested settings cannot be satisfied (ratio out of range, budget below the
    /// per-layer floors, too many NAEE subsets, ...).
    #[error("{0}")]
    Config(String),
}
