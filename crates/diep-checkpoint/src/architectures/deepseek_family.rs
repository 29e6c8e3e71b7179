//! Config pieces shared by the DeepSeek family (`deepseek`, `deepseek_v2`, `deepseek_v3`).

use crate::config::{GroupLimit, GroupScore, MlaConfig, check_groups};
use crate::error::Result;
use crate::fields::Fields;

/// The routed-expert count key of every DeepSeek model. `topk_method`, `scoring_func`,
/// `n_group`, `topk_group` stay as they are when surgery rewrites it.
pub(crate) const EXPERT_COUNT_KEYS: &[&str] = &["n_routed_experts"];

/// The routed expert width key.
pub(crate) const EXPERT_INTERMEDIATE_SIZE_KEY: &str = "moe_intermediate_size";

/// `n_shared_experts` (absent: `default`; 0: none) fused into one MLP of
/// `n · moe_intermediate_size`.
pub(crate) fn shared_experts(f: &Fields<'_>, default: usize, expert_intermediate_size: usize) -> Result<Option<usize>> {
    Ok(match f.opt_usize("n_shared_experts")?.unwrap_or(default) {
        0 => None,
        n => Some(n * expert_intermediate_size),
    })
}

/// `first_k_dense_replace` (default 0): layers before it are dense.
pub(crate) fn first_k_dense(f: &Fields<'_>) -> Result<usize> {
    Ok(f.opt_usize("first_k_dense_replace")?.unwrap_or(0))
}

/// DeepSeek-V2/V3: layer `i` is MoE iff `i ≥ first_k_dense_replace`. transformers 5.x ignores
/// `moe_layer_freq` (every layer from `first_k_dense_replace` on is MoE) while DeepSeek's remote
/// code honours it: a value other than 1 is refused rather than guessed.
pub(crate) fn mla_moe_layers(f: &Fields<'_>, num_layers: usize) -> Result<Vec<bool>> {
    let first_k_dense = first_k_dense(f)?;
    if let Some(freq) = f.opt_usize("moe_layer_freq")?
        && freq != 1
    {
        return Err(f.invalid(
            "moe_layer_freq",
            format!("{freq} is not supported (transformers ignores it; only 1 is unambiguous)"),
        ));
    }
    Ok((0..num_layers).map(|i| i >= first_k_dense).collect())
}

/// Refuses a `scoring_func` other than `only`.
pub(crate) fn check_scoring_func(f: &Fields<'_>, model_type: &str, only: &str) -> Result<()> {
    if let Some(s) = f.opt_str("scoring_func")?
        && s != only
    {
        return Err(f.invalid("scoring_func", format!("`{s}` is not supported for {model_type} (only `{only}`)")));
    }
    Ok(())
}

/// `routed_scaling_factor` (absent: `default`), finite.
pub(crate) fn routed_scaling_factor(f: &Fields<'_>, default: f64) -> Result<f64> {
    let s = f.opt_f64("routed_scaling_factor")?.unwrap_or(default);
    if !s.is_finite() {
        return Err(f.invalid("routed_scaling_factor", format!("{s} is not finite")));
    }
    Ok(s)
}

/// Group-limited selection from `n_group` and `topk_group` (both required), checked against
/// the unpruned expert count.
pub(crate) fn group_limit(f: &Fields<'_>, score: GroupScore, num_experts: usize, top_k: usize) -> Result<GroupLimit> {
    let n_group = f.opt_usize("n_group")?.ok_or_else(|| f.missing("n_group"))?;
    let topk_group = f.opt_usize("topk_group")?.ok_or_else(|| f.missing("topk_group"))?;
    if n_group == 0 {
        return Err(f.invalid("n_group", "must be positive".into()));
    }
    if topk_group == 0 || topk_group > n_group {
        return Err(f.invalid("topk_group", format!("{topk_group} is not in 1..={n_group} (n_group)")));
    }
    let g = GroupLimit { n_group, topk_group, score };
    check_groups(f, g, num_experts, top_k, usize::MAX)?;
    Ok(g)
}

/// DeepSeek-V2/V3's MLA dimensions. `always_interleaved`: the rotary dimensions are
/// interleaved whatever `rope_interleave` says (V2's complex-number RoPE); otherwise
/// `rope_interleave` decides (default true).
pub(crate) fn mla_config(f: &Fields<'_>, always_interleaved: bool) -> Result<MlaConfig> {
    let q_lora_rank = f.opt_usize("q_lora_rank")?;
    if q_lora_rank == Some(0) {
        return Err(f.invalid("q_lora_rank", "must be positive or null".into()));
    }
    let positive = |field: &str| -> Result<usize> {
        let v = f.req_usize(field)?;
        if v == 0 {
            return Err(f.invalid(field, "must be positive".into()));
        }
        Ok(v)
    };
    Ok(MlaConfig {
        q_lora_rank,
        kv_lora_rank: positive("kv_lora_rank")?,
        qk_nope_head_dim: f.req_usize("qk_nope_head_dim")?,
        qk_rope_head_dim: positive("qk_rope_head_dim")?,
        v_head_dim: positive("v_head_dim")?,
        bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        rope_interleave: always_interleaved || f.opt_bool("rope_interleave")?.unwrap_or(true),
    })
}
