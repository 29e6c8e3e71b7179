use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Everything that can go wrong reading a model directory. Each variant names the file and,
/// where there is one, the JSON field or tensor concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// `--model` names neither a directory nor a model in the hub cache.
    #[error("model `{model}`: {reason}")]
    ModelNotFound {
        /// The model as given.
        model: String,
        /// What was searched.
        reason: String,
    },
    /// A file could not be read or mapped.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path}: invalid JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A required field is absent from a JSON file.
    #[error("{path}: missing field `{field}`")]
    MissingField {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
    },
    /// A field is present but its value cannot be used.
    #[error("{path}: field `{field}`: {reason}")]
    InvalidField {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `model_type` names an architecture this toolkit does not implement.
    #[error(
        "{path}: unsupported model_type `{model_type}`; supported model types: {}",
        supported.join(", ")
    )]
    UnsupportedModelType {
        /// The config file.
        path: PathBuf,
        /// The model type found.
        model_type: String,
        /// The supported model types.
        supported: Vec<&'static str>,
    },
    /// The directory holds no weights in a format we read.
    #[error("{dir}: no weights found (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights {
        /// The model directory.
        dir: PathBuf,
    },
    /// A safetensors file is malformed (truncated, header beyond the file, bad offsets, ...).
    #[error("{path}: invalid safetensors file: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser found.
        reason: String,
    },
    /// The shard index is malformed or points outside the model directory.
    #[error("{path}: invalid shard index: {reason}")]
    ShardIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint in {location}")]
    MissingTensor {
        /// The tensor name, as on disk.
        name: String,
        /// The file (or directory for sharded checkpoints) that should hold it.
        location: PathBuf,
    },
    /// Tensors that the architecture does not use are in the checkpoint.
    #[error("{} unexpected tensor(s) in the checkpoint: {}", names.len(), names.iter().map(|(n, p)| format!("`{n}` in {}", p.display())).collect::<Vec<_>>().join(", "))]
    UnexpectedTensors {
        /// Tensor names with the file each is in.
        names: Vec<(String, PathBuf)>,
    },
    /// A tensor's shape differs from what `config.json` implies.
    #[error("tensor `{name}` in {path}: shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape on disk.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype that cannot be decoded to floats here.
    #[error("tensor `{name}` in {path}: unsupported dtype {dtype:?} (supported: F32, F16, BF16)")]
    UnsupportedDtype {
        /// The tensor.
        name: String,
        /// Its file.
        path: PathBuf,
        /// Its dtype.
        dtype: safetensors::Dtype,
    },
}
