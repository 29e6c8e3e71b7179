//! `deepseek` (DeepSeek-MoE 16B: `deepseek-ai/deepseek-moe-16b-base` / `-chat`).
//!
//! transformers has no class for this model type; checkpoints ship remote code
//! (`configuration_deepseek.py` / `modeling_deepseek.py`, `auto_map` in `config.json`). The
//! semantics below follow that remote code (read from a vendored copy,
//! `BZX667/CMoE: modeling_deepseek.py`: `MoEGate`, `DeepseekMoE`, `DeepseekAttention`,
//! `DeepseekDecoderLayer`).
//!
//! - Layer `i` is MoE iff `n_routed_experts` is set, `i ≥ first_k_dense_replace` and
//!   `i % moe_layer_freq == 0`; other layers are dense `mlp.{gate,up,down}_proj` of
//!   `intermediate_size`.
//! - Router `mlp.gate.weight [E, H]` (no bias): `softmax(x·Wᵀ)` (`scoring_func: softmax`, the
//!   only one), plain top-k (`torch.topk`), renormalised (`/ (sum + 1e-20)`) only when
//!   `top_k > 1 and norm_topk_prob` (false in the released 16B). No `routed_scaling_factor`.
//! - Experts `mlp.experts.{e}.{gate,up,down}_proj.weight` (SiLU-gated, width
//!   `moe_intermediate_size`); shared experts `mlp.shared_experts.{gate,up,down}_proj.weight`
//!   (one MLP of width `n_shared_experts · moe_intermediate_size`), added without a gate.
//! - Attention: Llama's multi-head attention (`self_attn.{q,k,v,o}_proj`, GQA through
//!   `num_key_value_heads`, biases only with `attention_bias`), rotate-half RoPE (not
//!   interleaved), `rope_scaling` `linear` (positions / factor); `dynamic` is refused.
//! - Defaults: `rms_norm_eps` 1e-6, `rope_theta` 10000, `max_position_embeddings` 2048.
//!
//! The tensor names are those of DeepSeek-V2 ([`super::deepseek_v2::MOE_KEYS`]).

use super::MoeKeys;

/// DeepSeek-MoE's MoE tensor names: the same as DeepSeek-V2's.
pub const MOE_KEYS: MoeKeys = super::deepseek_v2::MOE_KEYS;
