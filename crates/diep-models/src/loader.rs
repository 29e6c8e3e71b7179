//! Reads tensors from a [`Checkpoint`] into burn, by their exact on-disk names, and checks
//! that every tensor on disk is used exactly as the config implies.

use std::collections::BTreeSet;

use burn::tensor::{Device, Tensor, TensorData};
use diep_checkpoint::mxfp4::{decode_mxfp4_pair, mxfp4_names};
use diep_checkpoint::{Checkpoint, CheckpointError};

use crate::error::Result;
use crate::nn::{Linear, RmsNorm};

/// Tensors that transformers writes for some checkpoints but that are derived buffers, not
/// weights (e.g. RoPE frequencies in old Llama-style checkpoints).
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Builds burn tensors from a checkpoint and records which names were consumed.
pub struct Loader<'a> {
    ckpt: &'a Checkpoint,
    device: Device,
    used: BTreeSet<String>,
}

impl<'a> Loader<'a> {
    /// A loader placing tensors on `device`.
    pub fn new(ckpt: &'a Checkpoint, device: &Device) -> Self {
        Loader { ckpt, device: device.clone(), used: BTreeSet::new() }
    }

    /// The target device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }

    /// Marks a tensor as deliberately unused (e.g. `lm_head.weight` next to tied embeddings).
    pub fn skip(&mut self, name: &str) {
        self.used.insert(name.to_string());
    }

    /// Reads a tensor as f32 on the host, checking its shape.
    pub fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.ckpt.get(name)?;
        t.expect_shape(shape)?;
        self.used.insert(name.to_string());
        Ok(t.to_f32()?)
    }

    /// Reads a weight as f32 on the host, checking its shape: the tensor `name` itself, or, when
    /// the checkpoint has no such tensor, its MXFP4 pair `{name}_blocks` + `{name}_scales`
    /// (gpt-oss), decoded exactly as transformers dequantises it.
    pub fn host_or_mxfp4(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (blocks, scales) = mxfp4_names(name);
        if self.ckpt.contains(name) || !(self.ckpt.contains(&blocks) && self.ckpt.contains(&scales)) {
            return self.host(name, shape);
        }
        let (b, s) = (self.ckpt.get(&blocks)?, self.ckpt.get(&scales)?);
        let (data, found) = decode_mxfp4_pair(&b, &s)?;
        if found != shape {
            return Err(CheckpointError::ShapeMismatch {
                name: blocks,
                path: b.path.to_path_buf(),
                expected: shape.to_vec(),
                found,
            }
            .into());
        }
        self.used.insert(blocks);
        self.used.insert(scales);
        Ok(data)
    }

    /// Reads a tensor onto the device, checking its shape.
    pub fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let data = self.host(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(data, shape), &self.device))
    }

    /// Reads a `[out, in]` weight transposed to `[in, out]`, the layout `x · W` wants.
    pub fn weight_t(&mut self, name: &str, out: usize, inp: usize) -> Result<Vec<f32>> {
        let w = self.host(name, &[out, inp])?;
        Ok(transpose(&w, out, inp))
    }

    /// A linear layer `prefix.weight [out, in]` (+ `prefix.bias [out]`).
    pub fn linear(&mut self, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear> {
        let w = self.weight_t(&format!("{prefix}.weight"), out, inp)?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), [out])?) } else { None };
        Ok(Linear { weight: self.from_host(w, [inp, out]), bias })
    }

    /// Several `[out_i, in]` linear layers without bias fused column-wise into one `[in, Σ out_i]`
    /// weight, so one matmul computes all of them (gate and up projections of a SwiGLU).
    pub fn fused_linear(&mut self, names: &[&str], inp: usize, out: usize) -> Result<Linear> {
        let parts = names.iter().map(|n| self.host(n, &[out, inp])).collect::<Result<Vec<_>>>()?;
        let total = out * names.len();
        let mut fused = vec![0f32; inp * total];
        for (p, w) in parts.iter().enumerate() {
            for o in 0..out {
                for i in 0..inp {
                    fused[i * total + p * out + o] = w[o * inp + i];
                }
            }
        }
        Ok(Linear { weight: self.from_host(fused, [inp, total]), bias: None })
    }

    /// An RMSNorm `name [dim]`.
    pub fn rms_norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm { weight: self.tensor(name, [dim])?, eps })
    }

    /// Places host data on the device.
    pub fn from_host<const D: usize>(&self, data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(data, shape), &self.device)
    }

    /// Fails if the checkpoint holds tensors that were never read.
    pub fn finish(self) -> Result<()> {
        let unexpected: Vec<_> = self
            .ckpt
            .names()
            .filter(|n| !self.used.contains(*n) && !is_ignorable(n))
            .map(|n| {
                let path = self.ckpt.get(n).map(|t| t.path.to_path_buf()).unwrap_or_default();
                (n.to_string(), path)
            })
            .collect();
        if unexpected.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::UnexpectedTensors { names: unexpected }.into())
        }
    }
}

/// Row-major `[rows, cols]` to `[cols, rows]`.
pub fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}
