//! The pruned `config.json`, and the remote code that makes non-uniform checkpoints loadable.

use serde_json::{Map, Value};

use diep_checkpoint::{Architecture, LayerKind, ModelConfig, PER_LAYER_EXPERTS_KEY};

use crate::error::SurgeryError;
use diep_plan::PruningPlan;

/// The Python files of `remote_code/` written beside non-uniformly pruned checkpoints, as
/// `(file name, contents)`; generated at build time from every `remote_code/*.py`.
pub const REMOTE_CODE_FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/remote_code.rs"));

/// The file name of the embedded `auto_map` asset.
pub const AUTO_MAP_FILE: &str = "auto_map.json";

/// `remote_code/auto_map.json`: the `auto_map` object inserted into the `config.json` of
/// non-uniformly pruned checkpoints.
pub const AUTO_MAP_JSON: &str = include_str!("../remote_code/auto_map.json");

/// The auto class a multimodal wrapper's non-uniform output also maps to the remote code.
pub const WRAPPER_AUTO_CLASS: &str = "AutoModelForImageTextToText";

/// The `config.json` key that `auto_map` is stored under.
pub const AUTO_MAP_KEY: &str = "auto_map";

/// The `config.json` key(s) holding the routed-expert count of an architecture, as declared
/// by its file in `diep_checkpoint::architectures` ([`Architecture::expert_count_keys`]).
/// Qwen3-MoE has two: transformers 4.x reads `num_experts`, 5.x writes `num_local_experts`;
/// surgery writes both.
pub fn expert_count_keys(architecture: Architecture) -> &'static [&'static str] {
    architecture.expert_count_keys()
}

/// The parsed `auto_map` asset.
pub fn remote_code_auto_map() -> Result<Map<String, Value>, SurgeryError> {
    let bad = |reason: String| SurgeryError::RemoteCode { file: AUTO_MAP_FILE, reason };
    match serde_json::from_str::<Value>(AUTO_MAP_JSON) {
        Ok(Value::Object(map)) if !map.is_empty() => Ok(map),
        Ok(Value::Object(_)) => Err(bad("the `auto_map` object is empty".into())),
        Ok(other) => Err(bad(format!("must hold a JSON object, found {other}"))),
        Err(e) => Err(bad(format!("invalid JSON: {e}"))),
    }
}

/// Routed experts per decoder layer after applying `plan` (0 for dense layers). MoE layers the
/// plan does not list keep their current count.
pub fn kept_counts_per_layer(config: &ModelConfig, plan: &PruningPlan) -> Vec<usize> {
    config
        .layers
        .iter()
        .enumerate()
        .map(|(i, kind)| match kind {
            LayerKind::Moe { num_experts } => plan.kept_experts.get(&i).map_or(*num_experts, Vec::len),
            LayerKind::Dense => 0,
        })
        .collect()
}

/// The `config.json` of the pruned model: the input's raw JSON edited in place (every other key
/// and the key order are kept).
///
/// - The expert-count key(s) of the architecture ([`expert_count_keys`]) are set to the kept
///   count (the largest one when layers differ).
/// - Non-uniform plans add `num_experts_per_layer` (one entry per decoder layer, 0 for dense
///   layers) and the remote-code `auto_map` ([`AUTO_MAP_JSON`]).
/// - Uniform plans remove a stale `num_experts_per_layer` and a stale `auto_map` that points
///   at this crate's remote code (left by an earlier non-uniform pruning).
///
/// The plan should have been validated against `config` ([`PruningPlan::validate`]).
///
/// # Panics
/// If the embedded `remote_code/auto_map.json` is not a JSON object (a build defect that
/// [`remote_code_auto_map`] reports as an error, and that `apply_plan` checks first).
pub fn pruned_config(config: &ModelConfig, plan: &PruningPlan) -> Map<String, Value> {
    let mut raw = config.raw.clone();
    let counts = kept_counts_per_layer(config, plan);
    let moe_counts: Vec<usize> = config.moe_layers().iter().map(|&l| counts[l]).collect();
    let max = moe_counts.iter().copied().max().unwrap_or(config.moe.num_experts);
    let uniform = moe_counts.windows(2).all(|w| w[0] == w[1]);

    let keys = expert_count_keys(config.architecture);
    for (i, key) in keys.iter().enumerate() {
        // A missing sibling key (Qwen3-MoE) goes right next to the one that is there.
        let anchor = keys.iter().enumerate().find(|(j, k)| *j != i && raw.contains_key(**k)).map(|(_, k)| *k);
        set_key(&mut raw, key, Value::from(max), anchor, anchor.is_some_and(|a| a > *key));
    }
    let last_count_key = keys.iter().copied().filter(|k| raw.contains_key(*k)).max_by_key(|k| key_index(&raw, k));

    if uniform {
        raw.shift_remove(PER_LAYER_EXPERTS_KEY);
    } else {
        let per_layer = Value::from(counts);
        set_key(&mut raw, PER_LAYER_EXPERTS_KEY, per_layer, last_count_key, false);
    }
    // A multimodal wrapper: the edited text config goes back under its key; `auto_map` is the
    // whole file's.
    let mut top = match &config.wrapper {
        Some(w) => {
            let mut full = w.raw.clone();
            full.insert(w.text_key.to_string(), Value::Object(raw));
            full
        }
        None => raw,
    };
    if uniform {
        if top.get(AUTO_MAP_KEY).is_some_and(is_our_auto_map) {
            top.shift_remove(AUTO_MAP_KEY);
        }
    } else {
        let mut auto_map = remote_code_auto_map().expect("remote_code/auto_map.json is a JSON object");
        // A multimodal wrapper is usually loaded with `AutoModelForImageTextToText`: the same
        // remote class serves it (it builds the wrapper around the per-layer text model).
        if config.wrapper.is_some()
            && let Some(class) = auto_map.get("AutoModelForCausalLM").cloned()
        {
            auto_map.insert(WRAPPER_AUTO_CLASS.to_string(), class);
        }
        let anchor = top.contains_key("architectures").then_some("architectures");
        if anchor.is_some() {
            set_key(&mut top, AUTO_MAP_KEY, Value::Object(auto_map), anchor, false);
        } else if let Some(v) = top.get_mut(AUTO_MAP_KEY) {
            *v = Value::Object(auto_map);
        } else {
            top.shift_insert(0, AUTO_MAP_KEY.to_string(), Value::Object(auto_map));
        }
    }
    top
}

fn key_index(map: &Map<String, Value>, key: &str) -> usize {
    map.keys().position(|k| k == key).unwrap_or(usize::MAX)
}

/// Sets `key` in place if present; else inserts it right after (or before) `anchor`, or at the
/// end.
fn set_key(map: &mut Map<String, Value>, key: &str, value: Value, anchor: Option<&str>, before: bool) {
    if let Some(v) = map.get_mut(key) {
        *v = value;
        return;
    }
    let pos = anchor
        .map(|a| key_index(map, a))
        .filter(|p| *p != usize::MAX)
        .map_or(map.len(), |p| if before { p } else { p + 1 });
    map.shift_insert(pos, key.to_string(), value);
}

/// Whether an `auto_map` value points at one of this crate's remote-code modules.
fn is_our_auto_map(value: &Value) -> bool {
    let mut ours: Vec<String> =
        REMOTE_CODE_FILES.iter().filter_map(|(name, _)| name.strip_suffix(".py")).map(str::to_string).collect();
    if let Ok(map) = remote_code_auto_map() {
        let map = Value::Object(map);
        let mut refs = Vec::new();
        collect_strings(&map, &mut refs);
        ours.extend(refs.iter().filter_map(|r| module_of(r)).map(str::to_string));
    }
    let mut refs = Vec::new();
    collect_strings(value, &mut refs);
    refs.iter().filter_map(|r| module_of(r)).any(|m| ours.iter().any(|o| o == m))
}

/// `"org/repo--modeling_x.Class"` → `modeling_x`.
fn module_of(reference: &str) -> Option<&str> {
    let local = reference.rsplit_once("--").map_or(reference, |(_, r)| r);
    local.split_once('.').map(|(m, _)| m)
}

fn collect_strings<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn embedded_assets_are_usable() {
        let map = remote_code_auto_map().unwrap();
        assert!(!map.is_empty());
        assert!(!REMOTE_CODE_FILES.is_empty(), "remote_code/ holds no .py file");
        assert!(REMOTE_CODE_FILES.iter().any(|(n, _)| *n == "modeling_diep_moe.py"));
        assert!(is_our_auto_map(&Value::Object(map)));
        assert!(!is_our_auto_map(&serde_json::json!({"AutoModelForCausalLM": "modeling_other.Foo"})));
        assert_eq!(module_of("org/repo--modeling_diep_moe.X"), Some("modeling_diep_moe"));
    }

    const QWEN3_4X: &str = r#"{"zeta":1,"model_type":"qwen3_moe","vocab_size":100,"hidden_size":64,
        "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":24,
        "intermediate_size":96,"moe_intermediate_size":32,"num_experts":8,"num_experts_per_tok":2,
        "decoder_sparse_step":2,"mlp_only_layers":[],"norm_topk_prob":true,"alpha":[1,2]}"#;

    fn plan(kept: &[(usize, Vec<usize>)]) -> PruningPlan {
        let kept: BTreeMap<usize, Vec<usize>> = kept.iter().cloned().collect();
        let orig = kept.keys().map(|l| (*l, 8)).collect();
        PruningPlan::new("qwen3_moe", orig, kept, "test")
    }

    #[test]
    fn qwen3_gets_both_keys_next_to_each_other_and_order_is_kept() {
        let c = ModelConfig::from_json_str(QWEN3_4X, "x/config.json").unwrap();
        let out = pruned_config(&c, &plan(&[(1, vec![0, 2, 5]), (3, vec![1, 2, 7])]));
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        let before: Vec<&str> = c.raw.keys().map(String::as_str).collect();
        let i = keys.iter().position(|k| *k == "num_experts").unwrap();
        assert_eq!(keys[i + 1], "num_local_experts");
        assert_eq!(keys.iter().filter(|k| **k != "num_local_experts").copied().collect::<Vec<_>>(), before);
        assert_eq!(out["num_experts"], 3);
        assert_eq!(out["num_local_experts"], 3);
        assert!(!out.contains_key(PER_LAYER_EXPERTS_KEY) && !out.contains_key(AUTO_MAP_KEY));
        assert_eq!(out["alpha"], serde_json::json!([1, 2]));
    }

    #[test]
    fn non_uniform_adds_list_and_auto_map_then_uniform_removes_them() {
        let c = ModelConfig::from_json_str(QWEN3_4X, "x/config.json").unwrap();
        let out = pruned_config(&c, &plan(&[(1, vec![0, 2, 5, 6]), (3, vec![1, 2])]));
        assert_eq!(out["num_experts"], 4);
        assert_eq!(out[PER_LAYER_EXPERTS_KEY], serde_json::json!([0, 4, 0, 2]));
        assert_eq!(out[AUTO_MAP_KEY], Value::Object(remote_code_auto_map().unwrap()));
        // Re-read and re-prune uniformly: stale keys go.
        let c2 = ModelConfig::from_map(out, "y/config.json".into()).unwrap();
        assert_eq!(c2.experts_in_layer(1), 4);
        assert_eq!(c2.experts_in_layer(3), 2);
        let mut p = plan(&[(1, vec![0, 3]), (3, vec![0, 1])]);
        p.original_experts = [(1, 4), (3, 2)].into_iter().collect();
        p.validate(&c2).unwrap();
        let out2 = pruned_config(&c2, &p);
        assert!(!out2.contains_key(PER_LAYER_EXPERTS_KEY) && !out2.contains_key(AUTO_MAP_KEY));
        assert_eq!(out2["num_experts"], 2);
    }
}
