//! Evaluation of (pruned) MoE checkpoints.
//!
//! Perplexity over pre-tokenised sequences: `exp` of the mean negative log-likelihood over
//! every next-token prediction of every sequence — for equal-length sequences exactly
//! `exp(loss)` of transformers' `model(ids, labels=ids)`.
#![warn(missing_docs)]

mod perplexity;

pub use perplexity::{EvalError, PerplexityReport, perplexity, read_ids_file, sequence_nll};
