//! Reads tensors from a [`Checkpoint`] (or from a function that supplies them by name) into
//! burn, by their exact on-disk names, and checks that every tensor on disk is used exactly as
//! the config implies.

use std::collections::BTreeSet;

use burn::tensor::{Device, Tensor, TensorData};
use diep_checkpoint::mxfp4::{decode_mxfp4_pair, mxfp4_names};
use diep_checkpoint::quant::{Fp8Format, Fp8Scheme, SCALE_SUFFIX, dequantize_fp8};
use diep_checkpoint::{Checkpoint, CheckpointError, ModelConfig};

use crate::error::{ModelError, Result};
use crate::nn::{Linear, RmsNorm};

/// Tensors that transformers writes for some checkpoints but that are derived buffers, not
/// weights (e.g. RoPE frequencies in old Llama-style checkpoints).
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// A function that supplies a tensor (row-major f32) for an HF name and shape.
pub(crate) type TensorFn<'a> = &'a mut dyn FnMut(&str, &[usize]) -> Vec<f32>;

/// Where a [`Loader`] reads tensors from.
enum Source<'a> {
    /// A checkpoint on disk: only its tensors exist, and every one of them must be used.
    Checkpoint(&'a Checkpoint),
    /// A function asked for each tensor the config implies; nothing else exists.
    Fn(TensorFn<'a>),
}

/// Builds burn tensors from a checkpoint and records which names were consumed.
pub(crate) struct Loader<'a> {
    src: Source<'a>,
    device: Device,
    used: BTreeSet<String>,
    /// The config's FP8 scheme: FP8 tensors are dequantised with their scale tensor.
    fp8: Option<Fp8Scheme>,
    /// Layers whose tensors are never read and need not be (MTP layers).
    ignored_layers: std::ops::Range<usize>,
    /// Added to every RMSNorm weight read by [`Loader::rms_norm`] (1 for Qwen3-Next's
    /// zero-centred norms).
    norm_offset: f32,
}

impl<'a> Loader<'a> {
    /// A loader reading `ckpt`, placing tensors on `device`.
    pub(crate) fn new(ckpt: &'a Checkpoint, device: &Device) -> Self {
        Loader {
            src: Source::Checkpoint(ckpt),
            device: device.clone(),
            used: BTreeSet::new(),
            fp8: None,
            ignored_layers: 0..0,
            norm_offset: 0.0,
        }
    }

    /// A loader reading `ckpt` as `config` describes it: FP8 weights dequantised by the
    /// config's scheme, MTP layers ([`ModelConfig::mtp_layers`]) left unread without complaint.
    pub(crate) fn for_model(ckpt: &'a Checkpoint, config: &ModelConfig, device: &Device) -> Self {
        let mut ld = Self::new(ckpt, device);
        ld.fp8 = config.fp8().cloned();
        ld.ignored_layers = config.mtp_layer_indices();
        ld.norm_offset = if config.zero_centered_norms { 1.0 } else { 0.0 };
        ld
    }

    /// A loader asking `tensor(name, shape)` for every tensor, placing them on `device`.
    pub(crate) fn from_fn(tensor: TensorFn<'a>, device: &Device) -> Self {
        Loader {
            src: Source::Fn(tensor),
            device: device.clone(),
            used: BTreeSet::new(),
            fp8: None,
            ignored_layers: 0..0,
            norm_offset: 0.0,
        }
    }

    /// Whether the checkpoint has a tensor of this name (a function source has none beyond
    /// those asked for).
    pub(crate) fn contains(&self, name: &str) -> bool {
        match &self.src {
            Source::Checkpoint(ckpt) => ckpt.contains(name),
            Source::Fn(_) => false,
        }
    }

    /// Marks a tensor as deliberately unused (e.g. `lm_head.weight` next to tied embeddings).
    pub(crate) fn skip(&mut self, name: &str) {
        self.used.insert(name.to_string());
    }

    /// Reads a tensor as f32 on the host, checking its shape. An FP8 tensor is dequantised
    /// with its scale tensor (which counts as used), by the config's scheme.
    pub(crate) fn host(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let data = match &mut self.src {
            Source::Checkpoint(ckpt) => {
                let t = ckpt.get(name)?;
                t.expect_shape(shape)?;
                match Fp8Format::of(t.dtype) {
                    None => t.to_f32()?,
                    Some(_) => {
                        let Some(scheme) = &self.fp8 else {
                            return Err(CheckpointError::Safetensors {
                                path: t.path.to_path_buf(),
                                reason: format!(
                                    "`{name}` is stored as {:?}, but config.json has no FP8 `quantization_config` \
                                     (quant_method `fp8` with `weight_block_size`, or `compressed-tensors`) to say \
                                     how it is scaled",
                                    t.dtype
                                ),
                            }
                            .into());
                        };
                        let scale_name = scheme.scale_name(name);
                        if !ckpt.contains(&scale_name) {
                            return Err(CheckpointError::MissingTensor {
                                name: scale_name,
                                location: t.path.to_path_buf(),
                            }
                            .into());
                        }
                        let data = dequantize_fp8(&t, &ckpt.get(&scale_name)?, scheme)?;
                        self.used.insert(scale_name);
                        data
                    }
                }
            }
            Source::Fn(f) => {
                let data = f(name, shape);
                let expected = shape.iter().product::<usize>();
                if data.len() != expected {
                    return Err(ModelError::TensorLength {
                        name: name.to_string(),
                        shape: shape.to_vec(),
                        expected,
                        found: data.len(),
                    });
                }
                data
            }
        };
        self.used.insert(name.to_string());
        Ok(data)
    }

    /// Reads a weight as f32 on the host, checking its shape: the tensor `name` itself, or, when
    /// the checkpoint has no such tensor, its MXFP4 pair `{name}_blocks` + `{name}_scales`
    /// (gpt-oss), decoded exactly as transformers dequantises it.
    pub(crate) fn host_or_mxfp4(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (blocks, scales) = mxfp4_names(name);
        let ckpt = match &self.src {
            Source::Checkpoint(ckpt) if !ckpt.contains(name) && ckpt.contains(&blocks) && ckpt.contains(&scales) => {
                *ckpt
            }
            _ => return self.host(name, shape),
        };
        let (b, s) = (ckpt.get(&blocks)?, ckpt.get(&scales)?);
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

    /// Reads a per-expert vector `[n]` onto the device; a checkpoint may store it as `[1, n]`
    /// (ERNIE-4.5's `moe_statics.e_score_correction_bias`).
    pub(crate) fn expert_vector(&mut self, name: &str, n: usize) -> Result<Tensor<1>> {
        let row = match &self.src {
            Source::Checkpoint(ckpt) if ckpt.contains(name) => ckpt.get(name)?.shape == [1, n],
            _ => false,
        };
        let data = if row { self.host(name, &[1, n])? } else { self.host(name, &[n])? };
        Ok(Tensor::from_data(TensorData::new(data, [n]), &self.device))
    }

    /// Reads a tensor onto the device, checking its shape.
    pub(crate) fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let data = self.host(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(data, shape), &self.device))
    }

    /// Reads a `[out, in]` weight transposed to `[in, out]`, the layout `x · W` wants.
    pub(crate) fn weight_t(&mut self, name: &str, out: usize, inp: usize) -> Result<Vec<f32>> {
        let w = self.host(name, &[out, inp])?;
        Ok(transpose(&w, out, inp))
    }

    /// A linear layer `prefix.weight [out, in]` (+ `prefix.bias [out]`).
    pub(crate) fn linear(&mut self, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear> {
        let w = self.weight_t(&format!("{prefix}.weight"), out, inp)?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"), [out])?) } else { None };
        Ok(Linear::new(self.upload(w, [inp, out]), bias))
    }

    /// Several `[out_i, in]` linear layers fused column-wise into one `[in, Σ out_i]` weight, so
    /// one matmul computes all of them (gate and up projections of a SwiGLU); when `bias`, their
    /// biases (`<name minus .weight>.bias [out]`) concatenated in the same order.
    pub(crate) fn fused_linear_biased(&mut self, names: &[&str], inp: usize, out: usize, bias: bool) -> Result<Linear> {
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
        let bias = if bias {
            let mut b = Vec::with_capacity(total);
            for n in names {
                b.extend(self.host(&bias_name(n), &[out])?);
            }
            Some(self.upload(b, [total]))
        } else {
            None
        };
        Ok(Linear::new(self.upload(fused, [inp, total]), bias))
    }

    /// An RMSNorm `name [dim]`.
    pub(crate) fn rms_norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        let mut w = self.host(name, &[dim])?;
        if self.norm_offset != 0.0 {
            w.iter_mut().for_each(|v| *v += self.norm_offset);
        }
        Ok(RmsNorm::new(self.upload(w, [dim]), eps))
    }

    /// Places host data on the device.
    pub(crate) fn upload<const D: usize>(&self, data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(data, shape), &self.device)
    }

    /// Fails if the checkpoint holds tensors that were never read.
    pub(crate) fn finish(self) -> Result<()> {
        let Source::Checkpoint(ckpt) = self.src else {
            return Ok(());
        };
        let unexpected: Vec<_> = ckpt
            .names()
            .filter(|n| !self.used.contains(*n) && !is_ignorable(n))
            .filter(|n| !layer_index(n).is_some_and(|l| self.ignored_layers.contains(&l)))
            // compressed-tensors' static activation scales: evaluation runs full-precision
            // activations on the dequantised weights.
            .filter(|n| {
                !(self.fp8.as_ref().is_some_and(|s| s.scale_suffix == SCALE_SUFFIX) && n.ends_with(".input_scale"))
            })
            .map(|n| {
                let path = ckpt.get(n).map(|t| t.path.to_path_buf()).unwrap_or_default();
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

/// The decoder layer a tensor belongs to (`model.layers.{i}.…`).
fn layer_index(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split_once('.')?.0.parse().ok()
}

/// Row-major `[rows, cols]` to `[cols, rows]`.
pub(crate) fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// The bias beside a weight: `x.weight` → `x.bias`.
pub(crate) fn bias_name(weight: &str) -> String {
    format!("{}.bias", weight.strip_suffix(".weight").unwrap_or(weight))
}
