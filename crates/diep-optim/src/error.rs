//! Errors of the optimiser.

use std::path::{Path, PathBuf};

/// What can go wrong while optimising α and β.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptimError {
    /// The model could not run (bad input ids, a layer failed to load, ...).
    #[error(transparent)]
    Model(#[from] diep_models::ModelError),
    /// The ratio, budget, floors or routing groups cannot be satisfied.
    #[error(transparent)]
    Plan(#[from] diep_plan::PlanError),
    /// Settings out of range or inconsistent with the model or data.
    #[error("{0}")]
    Config(String),
    /// A saved state that cannot be used.
    #[error("{0}")]
    State(String),
    /// The loss became NaN or infinite.
    #[error("{0}")]
    Diverged(String),
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl OptimError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        OptimError::Io { path: path.to_path_buf(), source }
    }
}

/// The optimiser's result type.
pub type Result<T> = std::result::Result<T, OptimError>;
