use std::path::PathBuf;

use diep_checkpoint::CheckpointError;

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Errors of model construction and execution.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The tokenizer failed on a text.
    #[error("tokenization failed: {reason}")]
    Tokenization {
        /// The tokenizers crate's message.
        reason: String,
    },
    /// A batch without sequences, or with empty ones.
    #[error("empty batch")]
    EmptyBatch,
    /// Sequences of different lengths in one batch.
    #[error("sequence {sequence} has {len} tokens but sequence 0 has {expected}; a batch needs equal lengths")]
    RaggedBatch {
        /// The offending sequence.
        sequence: usize,
        /// Its length.
        len: usize,
        /// The length of sequence 0.
        expected: usize,
    },
    /// A token id the embeddings do not have.
    #[error("token id {id} (sequence {sequence}, position {position}) is outside the vocabulary of {vocab}")]
    TokenOutOfVocabulary {
        /// The id.
        id: u32,
        /// Its sequence.
        sequence: usize,
        /// Its position in the sequence.
        position: usize,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A decoder layer index past the last layer.
    #[error("layer {layer} does not exist ({layers} layers)")]
    NoSuchLayer {
        /// The index asked for.
        layer: usize,
        /// The model's number of layers.
        layers: usize,
    },
    /// An MoE operation on a layer without an MoE block.
    #[error("layer {layer} is not an MoE layer")]
    NotMoeLayer {
        /// The layer.
        layer: usize,
    },
    /// An expert mask of the wrong length.
    #[error("expert mask has {found} entries for {experts} experts")]
    ExpertMaskLength {
        /// Its length.
        found: usize,
        /// The layer's routed experts.
        experts: usize,
    },
    /// A dynamic-skip `γ` matrix that is not `[experts, experts]`.
    #[error("dynamic skip: γ has {found} entries, a layer of {experts} experts needs {}", .experts * .experts)]
    GammaLength {
        /// Its length.
        found: usize,
        /// The layer's routed experts.
        experts: usize,
    },
    /// An expert mask that keeps fewer experts than a token is routed to.
    #[error("expert mask keeps {kept} experts, fewer than the {top_k} each token is routed to")]
    TooFewExperts {
        /// Experts kept.
        kept: usize,
        /// Experts per token.
        top_k: usize,
    },
    /// A tensor supplied in memory with the wrong number of values for its shape.
    #[error("tensor `{name}` has {found} values, its shape {shape:?} needs {expected}")]
    TensorLength {
        /// The HF name.
        name: String,
        /// The shape the config implies.
        shape: Vec<usize>,
        /// `shape`'s element count.
        expected: usize,
        /// Values supplied.
        found: usize,
    },
    /// A model feature an engine or operation does not support.
    #[error("{operation} does not support {feature}")]
    Unsupported {
        /// What was attempted (e.g. `the fused CPU engine`).
        operation: String,
        /// What it does not support (e.g. `layer 3: dynamic expert skipping`).
        feature: String,
    },
    /// Other input the model cannot run on.
    #[error("{0}")]
    InvalidInput(String),
}
