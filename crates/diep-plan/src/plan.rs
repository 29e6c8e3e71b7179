//! The pruning plan: what every method produces and surgery consumes (`pruning.json`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use diep_checkpoint::{Architecture, ModelConfig};

use crate::error::PlanError;
use crate::select::check_groups;

/// The `format` tag of plans this version writes and reads.
pub const PLAN_FORMAT: &str = "diep-pruning-plan/1";

/// The `pruning.json` key recording how MTP layers were pruned.
pub const MTP_RULE_KEY: &str = "mtp";

/// The config key of DeepSeek-V3's MTP layer count.
const MTP_KEY: &str = "num_nextn_predict_layers";

/// The plan's file name beside the pruned weights.
pub const PLAN_FILE: &str = "pruning.json";

/// Which experts of each MoE layer to keep, with how and why they were chosen.
///
/// On disk (`pruning.json`) layer indices are JSON object keys (`"0"`, `"1"`, ...), and
/// expert ids are the original on-disk ids, ascending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruningPlan {
    /// Always [`PLAN_FORMAT`].
    pub format: String,
    /// The `model_type` of the checkpoint the plan was made for.
    pub model_type: String,
    /// Routed experts per MoE layer before pruning.
    pub original_experts: BTreeMap<usize, usize>,
    /// Kept expert ids per MoE layer (original numbering, ascending). Every MoE layer appears.
    pub kept_experts: BTreeMap<usize, Vec<usize>>,
    /// The method that produced the plan (`frequency`, `reap`, `diep`, ...).
    pub method: String,
    /// `uniform` or `global`, where the method has an allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// The requested fraction of routed experts removed, if the plan came from a ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Per-layer, per-original-expert scores of the method (higher = more important).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scores: BTreeMap<usize, Vec<f64>>,
    /// The settings the method ran with (free-form).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub settings: Value,
    /// Expert merging (DiEP's optional step): per layer, per kept expert (original ids), the
    /// experts folded into it with their weights, the kept expert first:
    /// `{"3": {"5": [[5, 0.55], [2, 0.45]]}}`. Surgery writes the weighted sum of the group's
    /// tensors in place of the kept expert's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub merge: BTreeMap<usize, BTreeMap<usize, Vec<(usize, f64)>>>,
    /// Seconds spent per phase.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub timings: BTreeMap<String, f64>,
    /// Anything else a method records (DiEP's α, β and loss curve, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl PruningPlan {
    /// A plan with the given kept experts and no scores, settings or timings.
    pub fn new(
        model_type: &str,
        original_experts: BTreeMap<usize, usize>,
        kept_experts: BTreeMap<usize, Vec<usize>>,
        method: &str,
    ) -> Self {
        PruningPlan {
            format: PLAN_FORMAT.to_string(),
            model_type: model_type.to_string(),
            original_experts,
            kept_experts,
            method: method.to_string(),
            allocation: None,
            ratio: None,
            scores: BTreeMap::new(),
            settings: Value::Null,
            merge: BTreeMap::new(),
            timings: BTreeMap::new(),
            extra: Map::new(),
        }
    }

    /// Kept experts per MoE layer.
    pub fn kept_counts(&self) -> BTreeMap<usize, usize> {
        self.kept_experts.iter().map(|(l, k)| (*l, k.len())).collect()
    }

    /// Whether every MoE layer keeps the same number of experts.
    pub fn is_uniform(&self) -> bool {
        let mut counts = self.kept_experts.values().map(Vec::len);
        let first = counts.next();
        counts.all(|c| Some(c) == first)
    }

    /// Routed experts removed in total.
    pub fn removed(&self) -> usize {
        self.original_experts.values().sum::<usize>() - self.kept_experts.values().map(Vec::len).sum::<usize>()
    }

    /// Checks the plan against a model's config: same `model_type`, every MoE layer listed
    /// (and nothing else), expert ids in range, ascending and unique, and at least
    /// `num_experts_per_tok` experts kept per layer.
    pub fn validate(&self, config: &ModelConfig) -> Result<(), PlanError> {
        let err = |m: String| Err(PlanError::Invalid(m));
        if self.format != PLAN_FORMAT {
            return err(format!("unknown format `{}` (expected `{PLAN_FORMAT}`)", self.format));
        }
        let model_type = config.architecture.model_type();
        if self.model_type != model_type {
            return err(format!("made for model_type `{}`, but the model is `{model_type}`", self.model_type));
        }
        let moe_layers = config.moe_layers();
        let mtp_layers: Vec<usize> = config.mtp_layer_indices().collect();
        for layer in self.kept_experts.keys() {
            if !moe_layers.contains(layer) && !mtp_layers.contains(layer) {
                return err(format!("`kept_experts` lists layer {layer}, which is not an MoE layer of the model"));
            }
        }
        let trunk_max = moe_layers.iter().filter_map(|l| self.kept_experts.get(l).map(Vec::len)).max();
        for &layer in &mtp_layers {
            let Some(kept) = self.kept_experts.get(&layer) else {
                return err(format!(
                    "`kept_experts` has no entry for MTP layer {layer} (`{MTP_KEY}` in {}): every MoE layer, MTP \
                     included, is pruned so that routers, experts and config agree; plans for such models record \
                     it (see `{MTP_RULE_KEY}`)",
                    config.path.display()
                ));
            };
            if let Some(max) = trunk_max
                && kept.len() != max
            {
                return err(format!(
                    "MTP layer {layer} keeps {} experts, but the pruned config states {max} (the largest kept count \
                     of the trunk, which an MTP layer keeps)",
                    kept.len()
                ));
            }
        }
        let top_k = config.moe.top_k;
        for layer in moe_layers.into_iter().chain(mtp_layers) {
            let n = config.experts_in_layer(layer);
            let Some(kept) = self.kept_experts.get(&layer) else {
                return err(format!("`kept_experts` has no entry for MoE layer {layer}"));
            };
            if let Some(orig) = self.original_experts.get(&layer)
                && *orig != n
            {
                return err(format!("layer {layer}: plan made for {orig} experts, the model has {n}"));
            }
            if kept.windows(2).any(|w| w[0] >= w[1]) {
                return err(format!("layer {layer}: kept expert ids must be ascending and unique, got {kept:?}"));
            }
            if let Some(bad) = kept.iter().find(|e| **e >= n) {
                return err(format!("layer {layer}: expert {bad} does not exist (the layer has {n})"));
            }
            if kept.len() < top_k {
                return err(format!(
                    "layer {layer} keeps {} experts, fewer than num_experts_per_tok = {top_k}",
                    kept.len()
                ));
            }
            if let Some(g) = config.moe.routing.group_limit {
                check_groups(layer, n, kept, g, top_k)?;
            }
        }
        if !self.is_uniform() {
            if config.architecture == Architecture::Deepseek {
                return err(format!(
                    "`{model_type}` (DeepSeek-MoE) checkpoints can only be pruned uniformly (the same number of \
                     experts in every MoE layer): they load through the checkpoint's own upstream remote code, \
                     which has one `n_routed_experts` for all layers; got {:?}",
                    self.kept_counts()
                ));
            }
            if config.architecture == Architecture::GptOss && is_mxfp4(config) {
                return err(format!(
                    "MXFP4-quantised `{model_type}` checkpoints can only be pruned uniformly (the same number of \
                     experts in every MoE layer): the remote code for per-layer expert counts covers bf16/f32 \
                     experts only; dequantise first or use a uniform plan, got {:?}",
                    self.kept_counts()
                ));
            }
        }
        let fused = diep_checkpoint::architectures::MoeKeys::of(config.architecture).fused_experts.is_some();
        if fused && self.merge.values().any(|g| !g.is_empty()) {
            return err(format!(
                "`merge` is not supported for `{model_type}` checkpoints (fused expert tensors); \
                 prune without merging"
            ));
        }
        for (layer, groups) in &self.merge {
            let Some(kept) = self.kept_experts.get(layer) else {
                return err(format!("`merge` lists layer {layer}, which has no `kept_experts` entry"));
            };
            let n = config.experts_in_layer(*layer);
            let mut folded = std::collections::BTreeSet::new();
            for (target, members) in groups {
                if !kept.contains(target) {
                    return err(format!(
                        "`merge` layer {layer}: expert {target} is not kept, so nothing can be merged into it"
                    ));
                }
                if members.first().map(|m| m.0) != Some(*target) {
                    return err(format!("`merge` layer {layer}: the group of expert {target} must list it first"));
                }
                for (e, w) in members {
                    if !w.is_finite() {
                        return err(format!("`merge` layer {layer}: weight of expert {e} is {w}"));
                    }
                    if e != target && (kept.contains(e) || *e >= n || !folded.insert(*e)) {
                        return err(format!(
                            "`merge` layer {layer}: expert {e} must be a removed expert of the layer, folded once"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds the multi-token-prediction layers of `config` ([`ModelConfig::mtp_layers`]) to a
    /// plan of its trunk: each keeps the largest trunk count (the routed-expert count the pruned
    /// `config.json` states, which runtimes that speculate with the MTP layer read), chosen by
    /// `scores[layer]` (its own routing statistics, higher = keep) evenly over its routing
    /// groups. Records the rule under `mtp` in the plan. A no-op for models without MTP layers.
    pub fn add_mtp_layers(
        &mut self,
        config: &ModelConfig,
        scores: &BTreeMap<usize, Vec<f64>>,
        c: &crate::Constraints,
        ranked_by: &str,
    ) -> Result<(), PlanError> {
        let layers: Vec<usize> = config.mtp_layer_indices().collect();
        if layers.is_empty() {
            return Ok(());
        }
        let keep = config.moe_layers().iter().filter_map(|l| self.kept_experts.get(l).map(Vec::len)).max();
        let Some(keep) = keep else {
            return Err(PlanError::Invalid("the plan lists no trunk MoE layer".into()));
        };
        for &layer in &layers {
            let n = config.experts_in_layer(layer);
            let s = scores.get(&layer).ok_or_else(|| {
                PlanError::Invalid(format!("no routing statistics for MTP layer {layer} to rank its experts by"))
            })?;
            if s.len() != n {
                return Err(PlanError::Invalid(format!("MTP layer {layer}: {} scores for {n} experts", s.len())));
            }
            let kept = crate::select::keep_best(layer, s, keep, c)?;
            self.original_experts.insert(layer, n);
            self.kept_experts.insert(layer, kept);
            if !self.scores.is_empty() {
                self.scores.insert(layer, s.clone());
            }
        }
        self.extra.insert(
            MTP_RULE_KEY.into(),
            serde_json::json!({
                "layers": layers,
                "kept": keep,
                "rule": "each MTP layer keeps the largest kept count of the trunk (the n_routed_experts of the \
                         pruned config.json), its experts ranked by its own routing on the calibration data \
                         (the MTP module run on the trunk's final hidden states and the next tokens' embeddings)",
                "ranked_by": ranked_by,
            }),
        );
        Ok(())
    }

    /// Reads `pruning.json`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, PlanError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| PlanError::Read { path: path.to_path_buf(), source })?;
        serde_json::from_str(&text).map_err(|e| PlanError::Parse { path: path.to_path_buf(), reason: e.to_string() })
    }

    /// The plan as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plans serialise")
    }
}

/// Whether the config declares MXFP4-quantised experts (`quantization_config.quant_method`).
fn is_mxfp4(config: &ModelConfig) -> bool {
    config
        .raw
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .is_some_and(|m| m.eq_ignore_ascii_case("mxfp4"))
}
