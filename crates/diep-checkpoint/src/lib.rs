//! Framework-free access to HuggingFace Mixture-of-Experts checkpoints.
//!
//! This crate is the bottom of the toolkit's stack and deliberately depends on no tensor
//! framework (only `safetensors`, `serde` and `memmap2`), so that checkpoint surgery and any
//! downstream tool can read a model directory without pulling in burn.
//!
//! It provides:
//! - [`ModelConfig`]: `config.json` as written by transformers 4.x **and** 5.x for the supported
//!   architectures ([`Architecture`]), normalised into one description (layer kinds, expert
//!   counts, attention options, RoPE), while keeping the raw JSON for in-place edits;
//! - [`Checkpoint`]: memory-mapped safetensors weights, single-file or sharded through
//!   `model.safetensors.index.json`, with tensors addressed by their exact on-disk names and
//!   decoded from f32, f16 or bf16;
//! - [`hub`]: models named `org/name[@revision]`, found in the HuggingFace hub cache;
//! - [`mxfp4`]: gpt-oss's MXFP4 expert weights (`*_blocks` + `*_scales`) decoded to f32;
//! - [`quant`]: `quantization_config`, and FP8 weights (DeepSeek's `weight_scale_inv` blocks,
//!   compressed-tensors' `weight_scale`) dequantised to f32;
//! - [`CheckpointError`]: every error names the file and the field or tensor at fault.
#![warn(missing_docs)]

pub mod architectures;
mod config;
mod error;
mod fields;
pub mod hub;
pub mod mxfp4;
pub mod quant;
mod weights;

pub use architectures::{Architecture, SUPPORTED_MODEL_TYPES};
pub use config::{
    AttentionConfig, ExpertActivation, GroupLimit, GroupScore, LayerKind, LinearAttention, Llama4Attention, MlaConfig,
    ModelConfig, MoeConfig, PER_LAYER_EXPERTS_KEY, QkNorm, Renorm, RopeScaling, RoutingConfig, Scoring, WRAPPERS,
    Wrapper, YarnConfig, yarn_get_mscale,
};
pub use error::{CheckpointError, Result};
pub use hub::resolve_model;
pub use quant::{Fp8Format, Fp8Scheme, Quantization};
pub use safetensors::Dtype;
pub use weights::{Checkpoint, SHARD_INDEX, SINGLE_FILE, TensorRef, decode_to_f32};
