//! Per-architecture facts: tensor names exactly as on disk. One file per `model_type`.
//!
//! All four architectures share the decoder skeleton (`model.embed_tokens`, `model.layers.{i}`
//! with `self_attn.{q,k,v,o}_proj`, `input_layernorm`, `post_attention_layernorm`,
//! `model.norm`, `lm_head`); they differ in where the MoE block lives and what its expert
//! projections are called, which is what [`MoeKeys`] records.

pub mod mixtral;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;

use diep_checkpoint::Architecture;

/// On-disk names of an architecture's MoE block, relative to `model.layers.{i}.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeKeys {
    /// The block's module name (`block_sparse_moe` for Mixtral, `mlp` elsewhere).
    pub block: &'static str,
    /// The router's module name inside the block (`gate`).
    pub router: &'static str,
    /// Expert gate projection (`w1` / `gate_proj`), `[intermediate, hidden]`.
    pub expert_gate: &'static str,
    /// Expert up projection (`w3` / `up_proj`), `[intermediate, hidden]`.
    pub expert_up: &'static str,
    /// Expert down projection (`w2` / `down_proj`), `[hidden, intermediate]`.
    pub expert_down: &'static str,
    /// Shared expert module and its gate (Qwen2-MoE), if the architecture has one.
    pub shared_expert: Option<(&'static str, &'static str)>,
}

impl MoeKeys {
    /// The keys of an architecture.
    pub fn of(arch: Architecture) -> MoeKeys {
        match arch {
            Architecture::Mixtral => mixtral::MOE_KEYS,
            Architecture::Qwen2Moe => qwen2_moe::MOE_KEYS,
            Architecture::Qwen3Moe => qwen3_moe::MOE_KEYS,
            Architecture::Olmoe => olmoe::MOE_KEYS,
        }
    }

    /// `model.layers.{layer}.{block}`.
    pub fn block_prefix(&self, layer: usize) -> String {
        format!("model.layers.{layer}.{}", self.block)
    }

    /// The router weight's name, `[experts, hidden]`.
    pub fn router_weight(&self, layer: usize) -> String {
        format!("{}.{}.weight", self.block_prefix(layer), self.router)
    }

    /// The names of expert `e`'s gate, up and down weights.
    pub fn expert_weights(&self, layer: usize, e: usize) -> [String; 3] {
        let p = format!("{}.experts.{e}", self.block_prefix(layer));
        [
            format!("{p}.{}.weight", self.expert_gate),
            format!("{p}.{}.weight", self.expert_up),
            format!("{p}.{}.weight", self.expert_down),
        ]
    }
}

/// Dense-MLP names relative to `model.layers.{i}.mlp.` (Qwen's non-MoE layers, shared experts).
pub const DENSE_MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
