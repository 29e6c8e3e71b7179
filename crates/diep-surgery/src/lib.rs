//! Checkpoint surgery: applies an expert-pruning plan to a HuggingFace MoE checkpoint.
//!
//! Every pruning method of the toolkit ends in a [`PruningPlan`] (`pruning.json`): which routed
//! experts of each MoE layer to keep. This crate turns a plan and the original model directory
//! into a new, smaller model directory that transformers (4.x and 5.x) and vLLM load like the
//! original, without any tensor framework: it works on the raw safetensors bytes through
//! [`diep_checkpoint`].
//!
//! [`apply_plan`]:
//! - validates first: the config, the plan against it (model type, layers, expert ids,
//!   `num_experts_per_tok` ≤ kept experts per layer), the weights against the config (router
//!   rows and expert tensors per layer, shapes), routers free of NaN/inf, and the output
//!   location (an existing directory is only replaced with `force`);
//! - keeps the on-disk tensor names and layout: kept experts are renumbered `0..E'` in
//!   ascending original order, pruned experts' tensors are dropped, router rows are sliced on
//!   raw bytes (any dtype), every other tensor is copied bit-exact;
//! - streams the output one shard at a time from the memory-mapped input, sharding like
//!   transformers (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`) above
//!   [`SurgeryOptions::max_shard_bytes`];
//! - edits `config.json` in place ([`pruned_config`]): the expert count key(s), and for
//!   non-uniform plans a per-layer count list plus the remote-code `auto_map` and Python files
//!   of `remote_code/` (no stock runtime takes per-layer expert counts);
//! - copies tokenizer, generation config and other small non-weight files;
//! - is atomic: everything is written to a staging directory beside the output and renamed
//!   into place at the end; on error nothing is left behind, and staging directories that a
//!   killed run left beside the same output are removed first ([`diep_common::fs`]).
#![warn(missing_docs)]

mod config_edit;
mod error;
mod surgery;

pub use config_edit::{
    AUTO_MAP_FILE, AUTO_MAP_JSON, AUTO_MAP_KEY, REMOTE_CODE_FILES, expert_count_keys, kept_counts_per_layer,
    pruned_config, remote_code_auto_map,
};
/// The plan type surgery applies, from `diep-plan` (re-exported so a downstream crate needs
/// only this one to apply a plan).
pub use diep_plan::{PLAN_FILE, PlanError, PruningPlan};
pub use error::SurgeryError;
pub use surgery::{DEFAULT_MAX_SHARD_BYTES, SurgeryOptions, SurgeryProgress, SurgeryReport, apply_plan};
