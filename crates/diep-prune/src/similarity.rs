//! Expert similarity for DiEP's optional steps: expert merging and dynamic skipping.
//!
//! One layer-by-layer pass over (a prefix of) the calibration set, through the model with the
//! plan's experts masked out (the pruned model). At every MoE layer, on up to `max_tokens`
//! block inputs `X`, every expert `j` computes `Y_j = E_j(X)`, and the linear CKA of every
//! pair is
//!
//! `CKA(i, j) = ⟨K̃_i, K̃_j⟩_F / (‖K̃_i‖_F ‖K̃_j‖_F)`, `K̃ = Y_c Y_cᵀ` (`Y_c`: columns centred),
//!
//! the normalised similarity of the two experts' representations (1 for identical outputs up to
//! rotation and scale). The pass also records, for the pruned routing, the median over tokens
//! of `w_{e1} / w_{e0}` (second over first routing weight) — the `γ1` of dynamic skipping.

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use diep_models::{LayerSource, MoeForwardOptions};

use crate::error::{PruneError, Result};

/// What [`expert_similarity`] measured in one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSimilarity {
    /// `cka[i][j]` for every pair of the layer's experts (original numbering); symmetric,
    /// 1 on the diagonal.
    pub cka: Vec<Vec<f64>>,
    /// Median over tokens of `w_{e1} / w_{e0}` under the masked routing (`None` for top-1).
    pub median_weight_ratio: Option<f64>,
    /// Tokens the measurement used.
    pub tokens: usize,
}

/// Measures expert similarity and the routing-weight ratio of every MoE layer. `keep` masks
/// experts (`true` = kept) so the pass runs through the pruned model; layers without an entry
/// run unmasked.
pub fn expert_similarity<S: LayerSource>(
    model: &S,
    samples: &[Vec<u32>],
    keep: &BTreeMap<usize, Vec<bool>>,
    max_tokens: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<BTreeMap<usize, LayerSimilarity>> {
    let seq = samples.first().map(Vec::len).unwrap_or(0);
    if seq == 0 || max_tokens == 0 {
        return Err(PruneError::Config("expert similarity needs calibration tokens".into()));
    }
    let take = max_tokens.div_ceil(seq).min(samples.len());
    let (mut h, ctx) = model.embed(&samples[..take])?;
    let config = model.config().clone();
    let mut out = BTreeMap::new();
    for i in 0..config.num_layers {
        let opts = match keep.get(&i) {
            Some(k) => {
                let bias: Vec<f32> = k.iter().map(|x| if *x { 0.0 } else { f32::NEG_INFINITY }).collect();
                let n = bias.len();
                MoeForwardOptions {
                    router_bias: Some(Tensor::from_data(TensorData::new(bias, [n]), &h.device())),
                    ..Default::default()
                }
            }
            None => MoeForwardOptions::default(),
        };
        let (next, sim) = model.with_layer(i, |layer| {
            let o = layer.forward(h.clone(), &ctx, &opts);
            let sim = match (layer.moe(), &o.moe) {
                (Some(block), Some(moe)) => {
                    let x = o.ffn_input.clone();
                    let rows = x.dims()[0].min(max_tokens);
                    let x = x.narrow(0, 0, rows);
                    let grams: Vec<Tensor<1>> = (0..block.num_experts())
                        .map(|e| {
                            let y = block.expert_forward(e, x.clone());
                            let yc = y.clone() - y.mean_dim(0);
                            let k = yc.clone().matmul(yc.transpose());
                            let flat = k.reshape([rows * rows]);
                            let norm = flat.clone().square().sum().sqrt().add_scalar(1e-30);
                            flat / norm
                        })
                        .collect();
                    let n = grams.len();
                    let stacked = Tensor::stack::<2>(grams, 0);
                    let cka: Vec<f32> = stacked.clone().matmul(stacked.transpose()).into_data().iter::<f32>().collect();
                    let cka: Vec<Vec<f64>> =
                        (0..n).map(|a| (0..n).map(|b| cka[a * n + b].clamp(-1.0, 1.0) as f64).collect()).collect();
                    let ratio = (block.top_k() >= 2).then(|| {
                        let w: Vec<f32> =
                            moe.routing.weights.clone().narrow(0, 0, rows).into_data().iter::<f32>().collect();
                        let k = block.top_k();
                        let mut r: Vec<f64> =
                            (0..rows).map(|t| w[t * k + 1] as f64 / (w[t * k] as f64).max(1e-30)).collect();
                        r.sort_by(f64::total_cmp);
                        r[r.len() / 2]
                    });
                    Some(LayerSimilarity { cka, median_weight_ratio: ratio, tokens: rows })
                }
                _ => None,
            };
            (o.hidden, sim)
        })?;
        h = next;
        if let Some(sim) = sim {
            out.insert(i, sim);
        }
        progress(i + 1, config.num_layers);
    }
    Ok(out)
}

/// Where each removed expert is folded: its most similar kept expert of the same layer, and
/// the merge weights `softmax` over the similarities of the group (the kept expert itself with
/// similarity 1, then each expert folded into it). Returns, per layer, per kept expert that
/// absorbs others, `[(source expert, weight), ...]` with the kept expert first; original ids.
pub fn merge_groups(
    similarity: &BTreeMap<usize, LayerSimilarity>,
    kept: &BTreeMap<usize, Vec<usize>>,
) -> BTreeMap<usize, BTreeMap<usize, Vec<(usize, f64)>>> {
    let mut out = BTreeMap::new();
    for (l, ids) in kept {
        let Some(sim) = similarity.get(l) else { continue };
        let n = sim.cka.len();
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for j in (0..n).filter(|j| !ids.contains(j)) {
            let target = ids
                .iter()
                .copied()
                .max_by(|a, b| sim.cka[j][*a].total_cmp(&sim.cka[j][*b]).then(b.cmp(a)))
                .expect("a layer keeps at least one expert");
            groups.entry(target).or_default().push(j);
        }
        let layer: BTreeMap<usize, Vec<(usize, f64)>> = groups
            .into_iter()
            .map(|(i, sources)| {
                let members: Vec<(usize, f64)> =
                    std::iter::once((i, 1.0)).chain(sources.iter().map(|j| (*j, sim.cka[*j][i]))).collect();
                let max = members.iter().map(|m| m.1).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = members.iter().map(|m| (m.1 - max).exp()).sum();
                (i, members.into_iter().map(|(e, s)| (e, (s - max).exp() / z)).collect())
            })
            .collect();
        out.insert(*l, layer);
    }
    out
}
