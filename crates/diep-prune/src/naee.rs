//! NAEE (Lu et al. 2024, "Not All Experts are Equal"): per layer, try every subset of
//! experts to keep and choose the one whose block output is closest to the full block's on
//! cached calibration inputs.
//!
//! Every expert's output on the cached tokens is computed once; a subset's output is then
//! re-routed on the host (softmax over the subset's router logits, top-k, optional
//! renormalisation — the same rule as [`diep_models::moe::route`] with the others masked; for
//! DeepSeek's sigmoid / group-limited rules [`diep_models::RoutingRule::route_row`]) and
//! compared with the full routed output in Frobenius norm. The shared expert, identical in
//! both, cancels.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use diep_checkpoint::ModelConfig;
use diep_models::{MoeBlock, RoutingRule};

use crate::error::{PruneError, Result};
use crate::stats::{BlockCache, LayerHook, LayerStats};

/// Number of `k`-subsets of `n`, saturating.
pub fn binomial(n: usize, k: usize) -> u128 {
    let k = k.min(n - k.min(n));
    (0..k).fold(1u128, |acc, i| acc.saturating_mul((n - i) as u128) / (i as u128 + 1))
}

/// The result of a search over one layer.
#[derive(Debug, Clone)]
pub struct NaeeResult {
    /// Kept experts, ascending.
    pub kept: Vec<usize>,
    /// Relative reconstruction error `‖y − y_S‖ / ‖y‖` of the chosen subset.
    pub error: f64,
    /// Subsets tried.
    pub subsets: u128,
}

/// NAEE's search as a [`LayerHook`] of the statistics pass: each MoE layer's best subset of
/// the requested size, searched on the layer's cached block inputs while its weights are
/// resident. The statistics pass must cache tokens ([`crate::StatsOptions::naee_tokens`]).
#[derive(Debug, Clone)]
pub struct NaeeSearch {
    keep: BTreeMap<usize, usize>,
    max_subsets: u128,
    /// The result of each layer searched so far.
    pub results: BTreeMap<usize, NaeeResult>,
}

impl NaeeSearch {
    /// A search keeping `keep[l]` experts in MoE layer `l`. Refuses, before any computation,
    /// a layer with more than `max_subsets` subsets or without a kept count.
    pub fn new(config: &ModelConfig, keep: BTreeMap<usize, usize>, max_subsets: u128) -> Result<Self> {
        for layer in config.moe_layers() {
            let n = config.experts_in_layer(layer);
            let k = *keep
                .get(&layer)
                .ok_or_else(|| PruneError::Config(format!("NAEE: no kept count for layer {layer}")))?;
            check_subsets(layer, n, k, max_subsets)?;
        }
        Ok(NaeeSearch { keep, max_subsets, results: BTreeMap::new() })
    }
}

impl LayerHook for NaeeSearch {
    fn on_moe_layer(&mut self, layer: usize, block: &MoeBlock, stats: &LayerStats) -> Result<()> {
        let cache = stats
            .cache
            .as_ref()
            .ok_or_else(|| PruneError::Config("NAEE needs cached calibration tokens (naee_tokens > 0)".into()))?;
        let keep = *self
            .keep
            .get(&layer)
            .ok_or_else(|| PruneError::Config(format!("NAEE: no kept count for layer {layer}")))?;
        self.results.insert(layer, search_layer(block, cache, keep, self.max_subsets, layer)?);
        Ok(())
    }
}

fn check_subsets(layer: usize, n: usize, keep: usize, max_subsets: u128) -> Result<u128> {
    let subsets = binomial(n, keep);
    if subsets > max_subsets {
        return Err(PruneError::Config(format!(
            "NAEE on layer {layer} would try C({n}, {keep}) = {subsets} expert subsets, more than the limit of \
             {max_subsets} (--naee-max-subsets); NAEE's exhaustive search does not scale to this many experts — \
             use another method"
        )));
    }
    Ok(subsets)
}

/// Router logits and every expert's output on the cached inputs, on the host.
struct Precomputed {
    tokens: usize,
    hidden: usize,
    logits: Vec<f32>,
    /// `[expert][token * hidden]`.
    outputs: Vec<Vec<f32>>,
    /// The block's routing rule.
    rule: RoutingRule,
    /// DeepSeek-V3's selection bias, on the host.
    correction: Option<Vec<f32>>,
}

fn precompute(block: &MoeBlock, cache: &BlockCache) -> Precomputed {
    let device = block.device();
    let x = Tensor::<2>::from_data(TensorData::new(cache.inputs.clone(), [cache.tokens, cache.hidden]), &device);
    let logits = block.router_logits(x.clone()).into_data().iter::<f32>().collect();
    let outputs = (0..block.num_experts())
        .map(|e| block.expert_forward(e, x.clone()).into_data().iter::<f32>().collect())
        .collect();
    let correction = block.correction_bias().map(|b| b.to_data().iter::<f32>().collect());
    Precomputed { tokens: cache.tokens, hidden: cache.hidden, logits, outputs, rule: block.rule(), correction }
}

/// The routed output of the block restricted to `subset` (ascending expert ids).
fn routed_output(p: &Precomputed, subset: &[usize], top_k: usize, norm: bool, out: &mut [f32]) {
    let n = p.outputs.len();
    out.iter_mut().for_each(|v| *v = 0.0);
    if !p.rule.is_plain_softmax() {
        let mut allowed = vec![false; n];
        for &e in subset {
            allowed[e] = true;
        }
        for t in 0..p.tokens {
            let row = &p.logits[t * n..(t + 1) * n];
            for (e, w) in p.rule.route_row(row, &allowed, p.correction.as_deref()) {
                let src = &p.outputs[e][t * p.hidden..(t + 1) * p.hidden];
                for (o, s) in out[t * p.hidden..(t + 1) * p.hidden].iter_mut().zip(src) {
                    *o += w * s;
                }
            }
        }
        return;
    }
    let mut probs: Vec<(f32, usize)> = Vec::with_capacity(subset.len());
    for t in 0..p.tokens {
        let row = &p.logits[t * n..(t + 1) * n];
        let max = subset.iter().map(|e| row[*e]).fold(f32::NEG_INFINITY, f32::max);
        probs.clear();
        let mut z = 0f32;
        for &e in subset {
            let v = (row[e] - max).exp();
            z += v;
            probs.push((v, e));
        }
        // Descending probability; ties to the lower id, as top-k does.
        probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let chosen = &probs[..top_k.min(probs.len())];
        let denom = if norm { chosen.iter().map(|(v, _)| v / z).sum::<f32>() } else { 1.0 };
        for &(v, e) in chosen {
            let w = v / z / denom;
            let src = &p.outputs[e][t * p.hidden..(t + 1) * p.hidden];
            for (o, s) in out[t * p.hidden..(t + 1) * p.hidden].iter_mut().zip(src) {
                *o += w * s;
            }
        }
    }
}

/// Exhaustive search for the best `keep`-subset of one layer. Refuses when there are more
/// than `max_subsets` subsets.
pub fn search_layer(
    block: &MoeBlock,
    cache: &BlockCache,
    keep: usize,
    max_subsets: u128,
    layer: usize,
) -> Result<NaeeResult> {
    let n = block.num_experts();
    let subsets = check_subsets(layer, n, keep, max_subsets)?;
    if cache.tokens == 0 {
        return Err(PruneError::Config(format!("NAEE: no cached calibration tokens for layer {layer}")));
    }
    let p = precompute(block, cache);
    let all: Vec<usize> = (0..n).collect();
    let mut full = vec![0f32; p.tokens * p.hidden];
    routed_output(&p, &all, block.top_k(), block.norm_topk_prob(), &mut full);
    let full_norm = full.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
    let mut buf = vec![0f32; full.len()];
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut subset: Vec<usize> = (0..keep).collect();
    loop {
        routed_output(&p, &subset, block.top_k(), block.norm_topk_prob(), &mut buf);
        let err = full.iter().zip(&buf).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        if best.as_ref().is_none_or(|(e, _)| err < *e) {
            best = Some((err, subset.clone()));
        }
        if !next_combination(&mut subset, n) {
            break;
        }
    }
    let (err, kept) = best.expect("at least one subset");
    Ok(NaeeResult { kept, error: err / full_norm, subsets })
}

/// Advances an ascending `k`-combination of `0..n` in lexicographic order.
fn next_combination(c: &mut [usize], n: usize) -> bool {
    let k = c.len();
    for i in (0..k).rev() {
        if c[i] < n - k + i {
            c[i] += 1;
            for j in i + 1..k {
                c[j] = c[j - 1] + 1;
            }
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_enumerate_all() {
        let mut c = vec![0, 1];
        let mut count = 1;
        while next_combination(&mut c, 5) {
            count += 1;
        }
        assert_eq!(count, 10);
        assert_eq!(binomial(5, 2), 10);
        assert_eq!(binomial(8, 4), 70);
        assert_eq!(binomial(64, 32), 1_832_624_140_942_590_534);
    }
}
