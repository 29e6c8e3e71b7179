//! The expert-pruning pipeline of the baseline criteria.
//!
//! 1. [`calib`]: calibration text (plain or JSONL) tokenised and sampled from a seed;
//! 2. [`stats`]: one layer-by-layer pass collecting per-expert routing statistics (and cached
//!    block inputs/outputs), with [`LayerHook`]s for work that needs a layer's weights;
//! 3. [`criteria`] and [`naee`]: the baseline criteria — random, frequency, soft activation,
//!    REAP (scores), NAEE (a per-layer subset search);
//! 4. the scores become kept experts through [`diep_plan::select()`] (the selection DiEP uses
//!    too), and the result is a [`PruningPlan`] (`pruning.json`) that `diep-surgery` applies.
//!
//! [`run_baseline`] does all of it on a model (streamed from disk or in memory).
#![warn(missing_docs)]

pub mod calib;
pub mod criteria;
mod error;
pub mod naee;
pub mod similarity;
pub mod stats;

use std::collections::BTreeMap;

use diep_checkpoint::ModelConfig;
use diep_models::LayerSource;
use diep_plan::{Allocation, Constraints, PruningPlan};
use serde_json::json;

pub use criteria::Method;
pub use error::{PruneError, Result};
pub use naee::{NaeeResult, NaeeSearch};
pub use stats::{CalibrationStats, LayerHook, StatsOptions, collect_statistics, collect_statistics_with};

/// What a baseline run should produce.
#[derive(Debug, Clone)]
pub struct BaselineSpec {
    /// The criterion.
    pub method: Method,
    /// Uniform or global allocation.
    pub allocation: Allocation,
    /// Fraction of routed experts removed, `0 < ratio < 1`.
    pub ratio: f64,
    /// Minimum experts kept per layer; the floor is `max(num_experts_per_tok, min_experts)`.
    pub min_experts: usize,
    /// Seed (the `random` method's scores).
    pub seed: u64,
    /// NAEE refuses layers with more subsets than this.
    pub naee_max_subsets: u128,
}

impl BaselineSpec {
    /// The selection constraints of this spec on a model.
    pub fn constraints(&self, config: &ModelConfig) -> Constraints {
        Constraints::for_model(config, self.min_experts)
    }
}

fn naee_global_error() -> PruneError {
    PruneError::Config(
        "NAEE searches each layer for a given kept count, so it has no global ranking; use \
         --allocation uniform with --method naee"
            .into(),
    )
}

/// Checks a spec against a model before any computation: the ratio, the budget under the
/// floors and routing groups, and for NAEE the allocation and the size of every layer's search.
/// Returns NAEE's search (to run as a [`LayerHook`] of the statistics pass) for `--method naee`.
pub fn prepare(config: &ModelConfig, spec: &BaselineSpec) -> Result<Option<NaeeSearch>> {
    let counts = diep_plan::expert_counts(config);
    if spec.method != Method::Naee {
        diep_plan::check_feasible(&counts, spec.ratio, spec.allocation, &spec.constraints(config))?;
        return Ok(None);
    }
    if spec.allocation == Allocation::Global {
        return Err(naee_global_error());
    }
    // NAEE searches every subset of a layer; it does not know routing groups.
    let c = spec.constraints(config);
    let removals = diep_plan::uniform_removals(&counts, spec.ratio, &Constraints::ungrouped(c.floor, c.top_k))?;
    let keep = counts.iter().map(|(l, n)| (*l, n - removals[l])).collect();
    Ok(Some(NaeeSearch::new(config, keep, spec.naee_max_subsets)?))
}

/// The statistics options a baseline needs: cached block inputs/outputs for NAEE.
pub fn stats_options(spec: &BaselineSpec, batch_size: usize, naee_tokens: usize) -> StatsOptions {
    StatsOptions { batch_size, naee_tokens: if spec.method == Method::Naee { naee_tokens } else { 0 } }
}

/// A whole baseline run: [`prepare`] (which refuses bad settings before any computation), the
/// statistics pass with NAEE's search where needed, and [`plan_baseline`].
pub fn run_baseline<S: LayerSource>(
    model: &S,
    samples: &[Vec<u32>],
    spec: &BaselineSpec,
    opts: &StatsOptions,
    progress: impl FnMut(usize, usize),
) -> Result<(CalibrationStats, PruningPlan)> {
    let config = model.config();
    let mut naee = prepare(config, spec)?;
    if naee.is_some() && opts.naee_tokens == 0 {
        return Err(PruneError::Config("NAEE needs cached calibration tokens (naee_tokens > 0)".into()));
    }
    let mut hooks: Vec<&mut dyn LayerHook> = naee.iter_mut().map(|n| n as &mut dyn LayerHook).collect();
    let stats = collect_statistics_with(model, samples, opts, &mut hooks, progress)?;
    let plan = plan_baseline(config, &stats, spec, naee.as_ref())?;
    Ok((stats, plan))
}

/// Runs a baseline criterion on collected statistics and returns the plan. `--method naee`
/// needs the search that ran during the statistics pass.
pub fn plan_baseline(
    config: &ModelConfig,
    stats: &CalibrationStats,
    spec: &BaselineSpec,
    naee: Option<&NaeeSearch>,
) -> Result<PruningPlan> {
    diep_plan::check_ratio(spec.ratio)?;
    let c = spec.constraints(config);
    let counts: BTreeMap<usize, usize> = stats.layers.iter().map(|(l, s)| (*l, s.num_experts())).collect();
    let mut settings = json!({
        "min_experts": spec.min_experts,
        "floor": c.floor,
        "seed": spec.seed,
        "calibration_tokens": stats.tokens,
    });
    let (kept, scores) = match (spec.method, spec.allocation) {
        (Method::Naee, Allocation::Global) => return Err(naee_global_error()),
        (Method::Naee, Allocation::Uniform) => {
            let removals = diep_plan::uniform_removals(&counts, spec.ratio, &Constraints::ungrouped(c.floor, c.top_k))?;
            let search = naee.ok_or_else(|| {
                PruneError::Config("statistics were collected without NAEE's search (see run_baseline)".into())
            })?;
            let mut kept = BTreeMap::new();
            let mut errors = BTreeMap::new();
            for (l, s) in &stats.layers {
                let r = search.results.get(l).ok_or_else(|| {
                    PruneError::Config(format!("layer {l}: statistics were collected without NAEE's search"))
                })?;
                if r.kept.len() != s.num_experts() - removals[l] {
                    return Err(PruneError::Config(format!(
                        "layer {l}: NAEE searched for {} kept experts, the budget needs {}",
                        r.kept.len(),
                        s.num_experts() - removals[l]
                    )));
                }
                errors.insert(l.to_string(), json!({"relative_error": r.error, "subsets": r.subsets as f64}));
                kept.insert(*l, r.kept.clone());
            }
            settings["naee"] = json!({"cached_tokens": stats.layers.values().next().and_then(|s| s.cache.as_ref()).map_or(0, |c| c.tokens), "layers": errors});
            (kept, BTreeMap::new())
        }
        (method, allocation) => {
            let scores = criteria::scores(method, stats, spec.seed);
            (diep_plan::select(&scores, spec.ratio, allocation, &c)?, scores)
        }
    };
    let mut plan = PruningPlan::new(config.architecture.model_type(), counts, kept, spec.method.name());
    plan.allocation = Some(spec.allocation.name().to_string());
    plan.ratio = Some(spec.ratio);
    plan.scores = scores;
    plan.settings = settings;
    plan.timings.insert("statistics_s".into(), stats.seconds);
    add_mtp_layers(&mut plan, config, stats, &c)?;
    Ok(plan)
}

/// Adds the model's multi-token-prediction layers to a plan of its trunk by the one MTP rule
/// ([`PruningPlan::add_mtp_layers`]), ranking each by its routing frequency in `stats.mtp`
/// (ties: summed router probability). A no-op where `stats` has no MTP layers.
pub fn add_mtp_layers(
    plan: &mut PruningPlan,
    config: &ModelConfig,
    stats: &CalibrationStats,
    c: &Constraints,
) -> Result<()> {
    if stats.mtp.is_empty() {
        return Ok(());
    }
    let scores: BTreeMap<usize, Vec<f64>> = stats.mtp.iter().map(|(l, s)| (*l, s.frequency_score())).collect();
    plan.add_mtp_layers(config, &scores, c, "routing frequency (ties: summed router probability)")?;
    Ok(())
}
