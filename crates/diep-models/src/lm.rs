//! The one interface evaluation needs from a model: logits for a batch of sequences.

use burn::tensor::{Device, Tensor};

use crate::kernels;
use crate::model::MoeModel;
use crate::{ModelError, Result};

/// A causal language model: next-token logits for batches of equal-length sequences.
///
/// [`MoeModel`] implements it on any burn device; `diep-infer`'s fused CPU engine implements
/// it too, so evaluation code takes `&dyn CausalLm` and runs on either.
pub trait CausalLm: Sync {
    /// Logits `[batch, len, vocab]`.
    fn logits(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>>;

    /// The device the returned tensors live on.
    fn device(&self) -> &Device;

    /// Per-position negative log-likelihoods `[batch][len − 1]`: position `p` scores token
    /// `p + 1` of the same sequence.
    fn next_token_nll(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let logits = self.logits(ids)?;
        let targets: Vec<Vec<u32>> = ids.iter().map(|s| s.get(1..).unwrap_or_default().to_vec()).collect();
        Ok(kernels::token_nll(logits, &targets))
    }
}

impl CausalLm for MoeModel {
    fn logits(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        self.forward(ids)
    }

    fn device(&self) -> &Device {
        MoeModel::device(self)
    }
}

/// Checks a batch of token ids: at least one sequence, all non-empty and of equal length, every
/// id below `vocab`. Returns `(batch, len)`.
pub fn check_batch(ids: &[Vec<u32>], vocab: usize) -> Result<(usize, usize)> {
    let batch = ids.len();
    let len = ids.first().map(Vec::len).unwrap_or(0);
    if batch == 0 || len == 0 {
        return Err(ModelError::EmptyBatch);
    }
    for (sequence, seq) in ids.iter().enumerate() {
        if seq.len() != len {
            return Err(ModelError::RaggedBatch { sequence, len: seq.len(), expected: len });
        }
        if let Some((position, &id)) = seq.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
            return Err(ModelError::TokenOutOfVocabulary { id, sequence, position, vocab });
        }
    }
    Ok((batch, len))
}
