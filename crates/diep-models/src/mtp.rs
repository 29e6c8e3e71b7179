//! Multi-token-prediction (MTP) layers, for their routing statistics.
//!
//! DeepSeek-V3 stores `num_nextn_predict_layers` MTP modules after the trunk, at
//! `model.layers.{num_hidden_layers + j}`. transformers ignores them, and so does
//! [`MoeModel`](crate::MoeModel)'s forward pass. Runtimes that speculate with them (vLLM,
//! SGLang) run module 0 as vLLM's `DeepSeekMTP` does, which is what [`MtpLayer::forward`]
//! computes: for positions `i = 0..T−2` of a sequence,
//!
//! `x_i = eh_proj([enorm(embed(t_{i+1})), hnorm(h_i)])`, then the MTP decoder layer on
//! `x_0..x_{T−2}` (causal, positions `0..T−2`),
//!
//! where `h_i` is the trunk's last hidden state after the final norm and `embed` is the MTP
//! layer's own `embed_tokens`. Pruning uses the routing of that decoder layer to rank the MTP
//! layer's experts; the shared head (`shared_head.norm`, `shared_head.head`) is not needed for
//! that and is not loaded.

use burn::tensor::{Int, Tensor, TensorData};
use diep_checkpoint::architectures::deepseek_v3::{MTP_EH_PROJ, MTP_EMBED, MTP_ENORM, MTP_HNORM};

use crate::attention::AttentionContext;
use crate::error::{ModelError, Result};
use crate::model::{DecoderLayer, LayerOutput};
use crate::moe::MoeForwardOptions;
use crate::nn::{Linear, RmsNorm};

/// One MTP module: its input projection and its decoder layer.
pub struct MtpLayer {
    /// The decoder-layer index it is stored at (`num_hidden_layers + j`).
    pub index: usize,
    pub(crate) embed_tokens: Tensor<2>,
    pub(crate) enorm: RmsNorm,
    pub(crate) hnorm: RmsNorm,
    pub(crate) eh_proj: Linear,
    pub(crate) layer: DecoderLayer,
}

/// The on-disk names of an MTP layer's input tensors: embeddings, `enorm`, `hnorm`, `eh_proj`.
pub fn mtp_input_names(index: usize) -> [String; 4] {
    let p = format!("model.layers.{index}");
    [
        format!("{p}.{MTP_EMBED}.weight"),
        format!("{p}.{MTP_ENORM}.weight"),
        format!("{p}.{MTP_HNORM}.weight"),
        format!("{p}.{MTP_EH_PROJ}.weight"),
    ]
}

impl MtpLayer {
    /// The decoder layer (its MoE block carries the routing).
    pub fn layer(&self) -> &DecoderLayer {
        &self.layer
    }

    /// Runs the module on a batch: `ids` the batch's token ids (`B` sequences of `T ≥ 2`),
    /// `final_hidden` the trunk's hidden states after the final norm, `[B·T, H]`. Returns the
    /// decoder layer's output on the `B·(T−1)` rows `b·(T−1) + i`, and the projected input
    /// `x` (`[B·(T−1), H]`).
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        final_hidden: Tensor<2>,
        attention: &diep_checkpoint::AttentionConfig,
        opts: &MoeForwardOptions,
    ) -> Result<(Tensor<2>, LayerOutput)> {
        let batch = ids.len();
        let len = ids.first().map_or(0, Vec::len);
        if len < 2 || ids.iter().any(|s| s.len() != len) {
            return Err(ModelError::InvalidInput(format!(
                "the MTP layer needs equal-length sequences of at least 2 tokens, got lengths {:?}",
                ids.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        let device = final_hidden.device();
        let next: Vec<i64> = ids.iter().flat_map(|s| s[1..].iter().map(|&t| t as i64)).collect();
        let rows = batch * (len - 1);
        let e =
            self.embed_tokens.clone().select(0, Tensor::<1, Int>::from_data(TensorData::new(next, [rows]), &device));
        let keep: Vec<i64> = (0..batch).flat_map(|b| (0..len - 1).map(move |i| (b * len + i) as i64)).collect();
        let h = final_hidden.select(0, Tensor::<1, Int>::from_data(TensorData::new(keep, [rows]), &device));
        let x = self.eh_proj.forward(Tensor::cat(vec![self.enorm.forward(e), self.hnorm.forward(h)], 1));
        let ctx = AttentionContext::new(attention, batch, len - 1, &device);
        Ok((x.clone(), self.layer.forward(x, &ctx, opts)))
    }
}
