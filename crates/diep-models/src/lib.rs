//! MoE model definitions on burn that load HuggingFace checkpoints as they are on disk.
//!
//! This crate is the toolkit's forward pass. [`MoeModel::load`] reads a model directory
//! (`config.json` from transformers 4.x or 5.x, single or sharded safetensors in f32, f16 or
//! bf16; gpt-oss's MXFP4 experts are decoded at load) for `mixtral`, `qwen2_moe`, `qwen3_moe`,
//! `olmoe`, `deepseek_v3`, `deepseek_v2`, `deepseek` (DeepSeek-MoE, whose reference is its remote
//! code) and `gpt_oss`, and computes what transformers computes, in f32.
//!
//! The [`MoeBlock`] is the shared building block every other crate uses to look inside a
//! layer: router logits and probabilities, the selected experts, per-expert outputs, and an
//! expert mask that behaves exactly as if the masked experts had been removed.
//!
//! Per-row arithmetic lives in [`kernels`], shared with `diep-infer`'s fused CPU engine, which
//! builds from the plain weight buffers of [`export`]. Training code gets named parameters
//! ([`MoeModel::parameters_mut`]), builds models from HF-named tensors ([`MoeModel::from_fn`])
//! and saves them in the HF layout ([`MoeModel::to_hf_tensors`]).
//!
//! FP8 checkpoints (DeepSeek's block scales, compressed-tensors) are dequantised layer by layer
//! as they load; multi-token-prediction layers are skipped by the forward pass and loaded on
//! their own ([`mtp`]) for their routing statistics.
//!
//! The backend is chosen at runtime with [`DeviceSpec`] (`cpu`, `wgpu`, `cuda[:N]`); the
//! `cpu` backend is the default cargo feature, `wgpu` and `cuda` are opt-in.
#![warn(missing_docs)]

mod attention;
mod deltanet;
pub mod device;
mod error;
pub mod export;
pub mod kernels;
mod lm;
mod loader;
mod model;
pub mod moe;
pub mod mtp;
pub mod nn;
mod params;
pub mod tokenizer;

pub use attention::AttentionContext;
pub use burn;
pub use device::DeviceSpec;
pub use diep_checkpoint as checkpoint;
pub use error::{ModelError, Result};
pub use lm::{CausalLm, check_batch};
pub use model::{DecoderLayer, LayerOutput, LayerSource, MoeModel, StreamingModel};
pub use moe::{DynamicSkip, MoeBlock, MoeForwardOptions, MoeOutput, Routing, RoutingRule};
pub use mtp::MtpLayer;
pub use params::{HfTensor, Param, ParamMut};
