use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = PruneError> = std::result::Result<T, E>;

/// Errors of the pruning pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The ratio, budget, floors or routing groups cannot be satisfied.
    #[error(transparent)]
    Plan(#[from] diep_plan::PlanError),
    /// The requested settings cannot be satisfied (too many NAEE subsets, no calibration
    /// text, ...).
    #[error("{0}")]
    Config(String),
}
