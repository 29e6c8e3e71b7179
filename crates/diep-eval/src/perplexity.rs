use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use diep_models::{CausalLm, ModelError};
use serde::Serialize;

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvalError {
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An input file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Text could not be tokenised, or a request is malformed.
    #[error("tokenization: {reason}")]
    Tokenize {
        /// What went wrong.
        reason: String,
    },
    /// An input file has the wrong content.
    #[error("{path}: {reason}")]
    Input {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The result of a perplexity evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    /// `exp(mean NLL)` over all next-token predictions.
    pub perplexity: f64,
    /// Input tokens run through the model.
    pub tokens: usize,
    /// Next-token predictions scored (`Σ (len − 1)`).
    pub predictions: usize,
    /// Mean negative log-likelihood in nats.
    pub mean_nll: f64,
    /// Input tokens per second of forward computation.
    pub tokens_per_second: f64,
    /// Wall-clock seconds spent in forward passes.
    pub seconds: f64,
}

/// Reads a JSON array of token-id sequences, e.g. `[[1, 2, 3], [4, 5]]`.
pub fn read_ids_file(path: impl AsRef<Path>) -> Result<Vec<Vec<u32>>, EvalError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: path.into(), source })?;
    let seqs: Vec<Vec<u32>> = serde_json::from_str(&text).map_err(|e| EvalError::Input {
        path: path.into(),
        reason: format!("expected a JSON array of token-id arrays (non-negative integers): {e}"),
    })?;
    if seqs.iter().all(|s| s.len() < 2) {
        return Err(EvalError::Input {
            path: path.into(),
            reason: "no sequence has two or more tokens, so there is nothing to predict".into(),
        });
    }
    Ok(seqs)
}

/// Per-token negative log-likelihoods of one batch of equal-length sequences:
/// `[batch][len − 1]`, position `t` scoring token `t + 1`.
pub fn sequence_nll(model: &dyn CausalLm, batch: &[Vec<u32>]) -> Result<Vec<Vec<f64>>, ModelError> {
    let nll = model.next_token_nll(batch)?;
    Ok(nll.into_iter().map(|row| row.into_iter().map(f64::from).collect()).collect())
}

/// Perplexity of `model` over `seqs`. Sequences are grouped by length and batched up to
/// `max_batch_tokens` input tokens; `progress(done, total)` is called after every batch with
/// counts of sequences.
pub fn perplexity(
    model: &dyn CausalLm,
    seqs: &[Vec<u32>],
    max_batch_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<PerplexityReport, ModelError> {
    let mut by_len: BTreeMap<usize, Vec<&Vec<u32>>> = BTreeMap::new();
    for s in seqs.iter().filter(|s| s.len() >= 2) {
        by_len.entry(s.len()).or_default().push(s);
    }
    let total: usize = by_len.values().map(Vec::len).sum();
    if total == 0 {
        return Err(ModelError::InvalidInput("no sequence has two or more tokens".into()));
    }
    let (mut nll_sum, mut predictions, mut tokens, mut done) = (0f64, 0usize, 0usize, 0usize);
    let mut seconds = 0f64;
    for (len, group) in by_len {
        let per_batch = (max_batch_tokens / len).max(1);
        for chunk in group.chunks(per_batch) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|s| (*s).clone()).collect();
            let start = Instant::now();
            let nll = sequence_nll(model, &batch)?;
            seconds += start.elapsed().as_secs_f64();
            for row in nll {
                nll_sum += row.iter().sum::<f64>();
                predictions += row.len();
            }
            tokens += batch.len() * len;
            done += batch.len();
            progress(done, total);
        }
    }
    let mean_nll = nll_sum / predictions as f64;
    Ok(PerplexityReport {
        perplexity: mean_nll.exp(),
        tokens,
        predictions,
        mean_nll,
        tokens_per_second: tokens as f64 / seconds.max(1e-9),
        seconds,
    })
}
