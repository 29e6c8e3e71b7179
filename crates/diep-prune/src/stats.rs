//! One statistics pass over the calibration set, layer by layer.
//!
//! The pass keeps the residual stream of every calibration batch and advances it one
//! decoder layer at a time, so only one layer's work and the activations are live at once
//! (the shape a streaming loader needs). For every MoE layer and expert it collects:
//! selection count, summed router probability, REAP's `Σ g_j(x)·‖E_j(x)‖₂` and `Σ ‖E_j(x)‖₂`
//! over routed tokens, and, on the first `naee_tokens` tokens, the block's inputs and
//! outputs for NAEE's reconstruction search.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::Tensor;
use diep_models::{LayerSource, MoeForwardOptions};

use crate::error::{PruneError, Result};
use crate::naee::{NaeeResult, binomial, search_layer};

/// Options of [`collect_statistics`].
#[derive(Debug, Clone)]
pub struct StatsOptions {
    /// Calibration sequences per forward batch.
    pub batch_size: usize,
    /// Tokens whose MoE inputs/outputs are cached for NAEE (0: none).
    pub naee_tokens: usize,
    /// Run NAEE's subset search on each layer while its weights are loaded.
    pub naee: Option<NaeeSpec>,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions { batch_size: 8, naee_tokens: 0, naee: None }
    }
}

/// NAEE's search, run during the statistics pass.
#[derive(Debug, Clone)]
pub struct NaeeSpec {
    /// Experts to keep per MoE layer.
    pub keep: BTreeMap<usize, usize>,
    /// Refuse layers with more subsets than this (checked before any computation).
    pub max_subsets: u128,
}

/// Cached MoE-block inputs and outputs of one layer, row-major `[tokens, hidden]`.
#[derive(Debug, Clone, Default)]
pub struct BlockCache {
    /// Rows cached.
    pub tokens: usize,
    /// Width.
    pub hidden: usize,
    /// Block inputs (`post_attention_layernorm` outputs).
    pub inputs: Vec<f32>,
    /// Block outputs (routed experts plus any shared expert).
    pub outputs: Vec<f32>,
}

/// Routing statistics of one MoE layer.
#[derive(Debug, Clone)]
pub struct LayerStats {
    /// Decoder layer index.
    pub layer: usize,
    /// Calibration tokens seen.
    pub tokens: usize,
    /// Times each expert was among a token's top-k.
    pub frequency: Vec<u64>,
    /// Summed router probability of each expert over all tokens.
    pub soft_activation: Vec<f64>,
    /// `Σ g_j(x)·‖E_j(x)‖₂` over the tokens routed to each expert.
    pub reap_sum: Vec<f64>,
    /// `Σ ‖E_j(x)‖₂` over the tokens routed to each expert.
    pub norm_sum: Vec<f64>,
    /// NAEE's cache, if requested.
    pub cache: Option<BlockCache>,
    /// NAEE's search result, if requested.
    pub naee: Option<NaeeResult>,
}

impl LayerStats {
    fn new(layer: usize, experts: usize) -> Self {
        LayerStats {
            layer,
            tokens: 0,
            frequency: vec![0; experts],
            soft_activation: vec![0.0; experts],
            reap_sum: vec![0.0; experts],
            norm_sum: vec![0.0; experts],
            cache: None,
            naee: None,
        }
    }

    /// Experts in the layer.
    pub fn num_experts(&self) -> usize {
        self.frequency.len()
    }

    /// REAP: mean over routed tokens of `g_j(x)·‖E_j(x)‖₂` (0 for an expert never routed to).
    pub fn reap(&self) -> Vec<f64> {
        self.reap_sum.iter().zip(&self.frequency).map(|(s, f)| if *f == 0 { 0.0 } else { s / *f as f64 }).collect()
    }

    /// Mean `‖E_j(x)‖₂` over routed tokens (0 for an expert never routed to).
    pub fn mean_activation_norm(&self) -> Vec<f64> {
        self.norm_sum.iter().zip(&self.frequency).map(|(s, f)| if *f == 0 { 0.0 } else { s / *f as f64 }).collect()
    }
}

/// Statistics of every MoE layer.
#[derive(Debug, Clone)]
pub struct CalibrationStats {
    /// Per MoE layer, by decoder-layer index.
    pub layers: BTreeMap<usize, LayerStats>,
    /// Calibration tokens.
    pub tokens: usize,
    /// Seconds the pass took.
    pub seconds: f64,
}

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Runs the calibration set through the model layer by layer and collects routing
/// statistics. With a [`diep_models::StreamingModel`] only one layer's weights are resident at
/// a time. `progress(done, total)` counts decoder layers.
pub fn collect_statistics<S: LayerSource>(
    model: &S,
    samples: &[Vec<u32>],
    opts: &StatsOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<CalibrationStats> {
    let start = Instant::now();
    let config = model.config();
    if let Some(naee) = &opts.naee {
        if opts.naee_tokens == 0 {
            return Err(PruneError::Config("NAEE needs cached calibration tokens (naee_tokens > 0)".into()));
        }
        // Refuse before any computation.
        for layer in config.moe_layers() {
            let n = config.experts_in_layer(layer);
            let keep = *naee
                .keep
                .get(&layer)
                .ok_or_else(|| PruneError::Config(format!("NAEE: no kept count for layer {layer}")))?;
            let subsets = binomial(n, keep);
            if subsets > naee.max_subsets {
                return Err(PruneError::Config(format!(
                    "NAEE on layer {layer} would try C({n}, {keep}) = {subsets} expert subsets, more than the limit of \
                     {} (--naee-max-subsets); NAEE's exhaustive search does not scale to this many experts — \
                     use another method",
                    naee.max_subsets
                )));
            }
        }
    }
    let mut states =
        samples.chunks(opts.batch_size.max(1)).map(|b| model.embed(b)).collect::<std::result::Result<Vec<_>, _>>()?;
    let tokens: usize = samples.iter().map(Vec::len).sum();
    let capture = MoeForwardOptions { capture_expert_outputs: true, ..Default::default() };
    let mut layers = BTreeMap::new();
    let total_layers = config.num_layers;
    for i in 0..total_layers {
        let stats = model.with_layer(i, |layer| -> Result<Option<LayerStats>> {
            let mut stats = layer.moe().map(|m| LayerStats::new(i, m.num_experts()));
            for (h, ctx) in states.iter_mut() {
                let out = layer.forward(h.clone(), ctx, &capture);
                if let (Some(stats), Some(moe)) = (stats.as_mut(), out.moe) {
                    let [rows, hidden] = out.ffn_input.dims();
                    stats.tokens += rows;
                    let probs = host(moe.routing.probs.clone().sum_dim(0));
                    for (s, p) in stats.soft_activation.iter_mut().zip(probs) {
                        *s += p as f64;
                    }
                    for (e, cap) in moe.expert_outputs.into_iter().flatten().enumerate() {
                        let Some(cap) = cap else { continue };
                        let norms: Vec<f32> = cap.output.square().sum_dim(1).sqrt().into_data().iter::<f32>().collect();
                        let weights: Vec<f32> = cap.weights.into_data().iter::<f32>().collect();
                        stats.frequency[e] += cap.tokens.len() as u64;
                        for (n, w) in norms.iter().zip(&weights) {
                            stats.norm_sum[e] += *n as f64;
                            stats.reap_sum[e] += (*n as f64) * (*w as f64);
                        }
                    }
                    if opts.naee_tokens > 0 {
                        let cache = stats.cache.get_or_insert_with(|| BlockCache { hidden, ..Default::default() });
                        let take = (opts.naee_tokens - cache.tokens).min(rows);
                        if take > 0 {
                            cache.inputs.extend(host(out.ffn_input.narrow(0, 0, take)));
                            cache.outputs.extend(host(moe.output.narrow(0, 0, take)));
                            cache.tokens += take;
                        }
                    }
                }
                *h = out.hidden;
            }
            if let (Some(stats), Some(naee), Some(block)) = (stats.as_mut(), &opts.naee, layer.moe()) {
                let cache = stats.cache.take().unwrap_or_default();
                stats.naee = Some(search_layer(block, &cache, naee.keep[&i], naee.max_subsets, i)?);
                stats.cache = Some(cache);
            }
            Ok(stats)
        })??;
        if let Some(stats) = stats {
            layers.insert(i, stats);
        }
        progress(i + 1, total_layers);
    }
    Ok(CalibrationStats { layers, tokens, seconds: start.elapsed().as_secs_f64() })
}
