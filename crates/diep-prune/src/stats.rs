//! One statistics pass over the calibration set, layer by layer.
//!
//! The pass keeps the residual stream of every calibration batch and advances it one
//! decoder layer at a time, so only one layer's work and the activations are live at once
//! (the shape a streaming loader needs). For every MoE layer and expert it collects:
//! selection count, summed router probability, REAP's `Σ g_j(x)·‖E_j(x)‖₂` and `Σ ‖E_j(x)‖₂`
//! over routed tokens, and, on the first `naee_tokens` tokens, the block's inputs and
//! outputs (for NAEE's reconstruction search). A [`LayerHook`] runs more work on each MoE layer
//! while its weights are resident (NAEE's subset search is one).

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::Tensor;
use diep_models::{LayerOutput, LayerSource, MoeBlock, MoeForwardOptions};

use crate::error::Result;

/// Options of [`collect_statistics`].
#[derive(Debug, Clone)]
pub struct StatsOptions {
    /// Calibration sequences per forward batch.
    pub batch_size: usize,
    /// Tokens whose MoE inputs/outputs are cached per layer ([`LayerStats::cache`]; 0: none).
    pub naee_tokens: usize,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions { batch_size: 8, naee_tokens: 0 }
    }
}

/// Work run on each MoE layer during the statistics pass, after the whole calibration set has
/// gone through it and while its weights are resident (so a streaming model loads each layer
/// once).
pub trait LayerHook {
    /// Called once per MoE layer, in layer order, with the layer's block and its statistics.
    fn on_moe_layer(&mut self, layer: usize, block: &MoeBlock, stats: &LayerStats) -> Result<()>;
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
    /// The block's cached inputs and outputs, if requested ([`StatsOptions::naee_tokens`]).
    pub cache: Option<BlockCache>,
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
        }
    }

    /// Adds one batch's routing (and, up to `naee_tokens`, its block inputs and outputs) from a
    /// layer's output run with expert outputs captured.
    fn add(&mut self, out: &LayerOutput, naee_tokens: usize) {
        let Some(moe) = &out.moe else { return };
        let [rows, hidden] = out.ffn_input.dims();
        self.tokens += rows;
        let probs = host(moe.routing.probs.clone().sum_dim(0));
        for (s, p) in self.soft_activation.iter_mut().zip(probs) {
            *s += p as f64;
        }
        for (e, cap) in moe.expert_outputs.iter().flatten().enumerate() {
            let Some(cap) = cap else { continue };
            self.frequency[e] += cap.tokens.len() as u64;
            for (n, w) in cap.norms_and_weights() {
                self.norm_sum[e] += n as f64;
                self.reap_sum[e] += (n as f64) * (w as f64);
            }
        }
        if naee_tokens > 0 {
            let cache = self.cache.get_or_insert_with(|| BlockCache { hidden, ..Default::default() });
            let take = (naee_tokens - cache.tokens).min(rows);
            if take > 0 {
                cache.inputs.extend(host(out.ffn_input.clone().narrow(0, 0, take)));
                cache.outputs.extend(host(moe.output.clone().narrow(0, 0, take)));
                cache.tokens += take;
            }
        }
    }

    /// The MTP ranking score: routing frequency as a fraction of the tokens (the unit of the
    /// `frequency` criterion's scores), ties broken by summed router probability (the
    /// tie-break stays below one count).
    pub fn frequency_score(&self) -> Vec<f64> {
        let t = self.tokens.max(1) as f64;
        self.frequency.iter().zip(&self.soft_activation).map(|(f, s)| (*f as f64 + s / (t + 1.0)) / t).collect()
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
    /// Per multi-token-prediction layer (`num_hidden_layers + j`), when the model has them and
    /// the source can load them ([`LayerSource::with_mtp`]): the routing of the MTP decoder
    /// layer run as [`diep_models::mtp`] describes, on `T − 1` positions per sequence.
    pub mtp: BTreeMap<usize, LayerStats>,
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
    progress: impl FnMut(usize, usize),
) -> Result<CalibrationStats> {
    collect_statistics_with(model, samples, opts, &mut [], progress)
}

/// [`collect_statistics`], running each of `hooks` on every MoE layer while it is resident.
pub fn collect_statistics_with<S: LayerSource>(
    model: &S,
    samples: &[Vec<u32>],
    opts: &StatsOptions,
    hooks: &mut [&mut dyn LayerHook],
    mut progress: impl FnMut(usize, usize),
) -> Result<CalibrationStats> {
    let start = Instant::now();
    let config = model.config();
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
                if let Some(stats) = stats.as_mut() {
                    stats.add(&out, opts.naee_tokens);
                }
                *h = out.hidden;
            }
            if let (Some(stats), Some(block)) = (stats.as_ref(), layer.moe()) {
                for hook in hooks.iter_mut() {
                    hook.on_moe_layer(i, block, stats)?;
                }
            }
            Ok(stats)
        })??;
        if let Some(stats) = stats {
            layers.insert(i, stats);
        }
        progress(i + 1, total_layers);
    }
    let mtp = mtp_statistics(model, samples, opts, states)?;
    Ok(CalibrationStats { layers, mtp, tokens, seconds: start.elapsed().as_secs_f64() })
}

/// Routing statistics of the MTP layers from the trunk's final residual states of every batch
/// (empty without MTP layers, or where the source cannot load them).
fn mtp_statistics<S: LayerSource>(
    model: &S,
    samples: &[Vec<u32>],
    opts: &StatsOptions,
    states: Vec<(Tensor<2>, diep_models::AttentionContext)>,
) -> Result<BTreeMap<usize, LayerStats>> {
    let config = model.config();
    let mut out = BTreeMap::new();
    if config.mtp_layers == 0 || samples.first().is_none_or(|s| s.len() < 2) {
        return Ok(out);
    }
    let normed: Vec<Tensor<2>> =
        model.with_final_norm(|norm| states.into_iter().map(|(h, _)| norm.forward(h)).collect())?;
    let capture = MoeForwardOptions { capture_expert_outputs: true, ..Default::default() };
    for j in 0..config.mtp_layers {
        let index = config.num_layers + j;
        let stats = model.with_mtp(j, |mtp| -> Result<LayerStats> {
            let n = mtp.layer().moe().map_or(0, MoeBlock::num_experts);
            let mut stats = LayerStats::new(index, n);
            for (ids, h) in samples.chunks(opts.batch_size.max(1)).zip(&normed) {
                let (_, layer_out) = mtp.forward(ids, h.clone(), &config.attention, &capture)?;
                stats.add(&layer_out, 0);
            }
            Ok(stats)
        })?;
        match stats {
            Some(stats) => {
                out.insert(index, stats?);
            }
            None => break,
        }
    }
    Ok(out)
}
