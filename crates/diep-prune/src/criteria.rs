//! Baseline criteria and the allocation of a pruning budget across layers.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::{PruneError, Result};
use crate::rng::SplitMix64;
use crate::stats::CalibrationStats;

/// A baseline pruning criterion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Uniformly random scores (from `--seed`).
    Random,
    /// How often an expert is among a token's top-k.
    Frequency,
    /// Summed router probability.
    SoftActivation,
    /// REAP: mean over routed tokens of `g_j(x)·‖E_j(x)‖₂`.
    Reap,
    /// NAEE: per layer, the kept subset with the smallest reconstruction error of the block's
    /// output, by exhaustive search.
    Naee,
}

impl Method {
    /// All baseline methods.
    pub const ALL: [Method; 5] =
        [Method::Random, Method::Frequency, Method::SoftActivation, Method::Reap, Method::Naee];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Random => "random",
            Method::Frequency => "frequency",
            Method::SoftActivation => "soft-activation",
            Method::Reap => "reap",
            Method::Naee => "naee",
        }
    }
}

impl FromStr for Method {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
            PruneError::Config(format!("unknown method `{s}`; expected one of {}", names.join(", ")))
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the removal budget is spread over layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Each MoE layer removes `round(ratio · N_l)` of its experts.
    Uniform,
    /// One ranking over all experts of all layers removes the `round(ratio · Σ N_l)` lowest,
    /// keeping every layer at or above its floor.
    Global,
}

impl Allocation {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Uniform => "uniform",
            Allocation::Global => "global",
        }
    }
}

impl FromStr for Allocation {
    type Err = PruneError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(Allocation::Uniform),
            "global" => Ok(Allocation::Global),
            _ => Err(PruneError::Config(format!("unknown allocation `{s}`; expected `uniform` or `global`"))),
        }
    }
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks `0 < ratio < 1`.
pub fn check_ratio(ratio: f64) -> Result<()> {
    if !(ratio > 0.0 && ratio < 1.0) {
        return Err(PruneError::Config(format!(
            "--ratio must be strictly between 0 and 1 (the fraction of routed experts removed), got {ratio}"
        )));
    }
    Ok(())
}

/// Per-expert importance scores (higher = keep) of a scoring criterion.
pub fn scores(method: Method, stats: &CalibrationStats, seed: u64) -> BTreeMap<usize, Vec<f64>> {
    let mut rng = SplitMix64::new(seed);
    stats
        .layers
        .iter()
        .map(|(l, s)| {
            let tokens = s.tokens.max(1) as f64;
            let v = match method {
                Method::Random => (0..s.num_experts()).map(|_| rng.next_f64()).collect(),
                // Normalised per token so that layers are comparable in a global ranking.
                Method::Frequency => s.frequency.iter().map(|f| *f as f64 / tokens).collect(),
                Method::SoftActivation => s.soft_activation.iter().map(|p| p / tokens).collect(),
                Method::Reap => s.reap(),
                Method::Naee => vec![0.0; s.num_experts()],
            };
            (*l, v)
        })
        .collect()
}

/// Experts to remove per layer under a uniform allocation: `round(ratio · N_l)`, checked
/// against the floor.
pub fn uniform_removals(counts: &BTreeMap<usize, usize>, ratio: f64, floor: usize) -> Result<BTreeMap<usize, usize>> {
    check_ratio(ratio)?;
    counts
        .iter()
        .map(|(l, n)| {
            let remove = (ratio * *n as f64).round() as usize;
            if n - remove.min(*n) < floor {
                return Err(PruneError::Config(format!(
                    "layer {l}: removing {remove} of {n} experts leaves fewer than the floor of {floor} \
                     (max(num_experts_per_tok, --min-experts)); lower --ratio"
                )));
            }
            Ok((*l, remove))
        })
        .collect()
}

/// Keeps the highest-scoring experts of each layer, removing `removals[l]` of them. Ties are
/// broken towards keeping the lower expert id. Kept ids are returned ascending.
pub fn select_uniform(
    scores: &BTreeMap<usize, Vec<f64>>,
    removals: &BTreeMap<usize, usize>,
) -> BTreeMap<usize, Vec<usize>> {
    scores
        .iter()
        .map(|(l, s)| {
            let mut order: Vec<usize> = (0..s.len()).collect();
            // Ascending importance; among equals the higher id goes first (is removed first).
            order.sort_by(|a, b| s[*a].total_cmp(&s[*b]).then(b.cmp(a)));
            let mut kept = order[removals[l]..].to_vec();
            kept.sort_unstable();
            (*l, kept)
        })
        .collect()
}

/// One ranking over all layers: removes the `round(ratio · Σ N_l)` lowest-scoring experts,
/// skipping any whose layer is already at `floor`. Kept ids ascending.
pub fn select_global(
    scores: &BTreeMap<usize, Vec<f64>>,
    ratio: f64,
    floor: usize,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    check_ratio(ratio)?;
    let total: usize = scores.values().map(Vec::len).sum();
    let budget = (ratio * total as f64).round() as usize;
    let removable: usize = scores.values().map(|s| s.len().saturating_sub(floor)).sum();
    if budget > removable {
        return Err(PruneError::Config(format!(
            "removing {budget} of {total} experts is impossible while every layer keeps at least {floor} \
             (at most {removable} can go); lower --ratio or --min-experts"
        )));
    }
    let mut all: Vec<(usize, usize, f64)> =
        scores.iter().flat_map(|(l, s)| s.iter().enumerate().map(move |(e, v)| (*l, e, *v))).collect();
    all.sort_by(|a, b| a.2.total_cmp(&b.2).then(b.0.cmp(&a.0)).then(b.1.cmp(&a.1)));
    let mut left: BTreeMap<usize, usize> = scores.iter().map(|(l, s)| (*l, s.len())).collect();
    let mut removed: BTreeMap<usize, Vec<bool>> = scores.iter().map(|(l, s)| (*l, vec![false; s.len()])).collect();
    let mut count = 0;
    for (l, e, _) in all {
        if count == budget {
            break;
        }
        if left[&l] > floor {
            *left.get_mut(&l).expect("layer") -= 1;
            removed.get_mut(&l).expect("layer")[e] = true;
            count += 1;
        }
    }
    Ok(removed
        .into_iter()
        .map(|(l, r)| (l, r.iter().enumerate().filter(|(_, x)| !**x).map(|(e, _)| e).collect()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores_of(v: &[&[f64]]) -> BTreeMap<usize, Vec<f64>> {
        v.iter().enumerate().map(|(l, s)| (l, s.to_vec())).collect()
    }

    #[test]
    fn uniform_keeps_the_top_scores_per_layer() {
        let s = scores_of(&[&[0.1, 0.9, 0.5, 0.2], &[0.4, 0.3, 0.2, 0.1]]);
        let counts = s.iter().map(|(l, v)| (*l, v.len())).collect();
        let removals = uniform_removals(&counts, 0.5, 2).unwrap();
        let kept = select_uniform(&s, &removals);
        assert_eq!(kept[&0], vec![1, 2]);
        assert_eq!(kept[&1], vec![0, 1]);
        assert!(uniform_removals(&counts, 0.75, 2).unwrap_err().to_string().contains("floor"));
    }

    #[test]
    fn global_ranks_across_layers_and_respects_floors() {
        // Layer 1's experts all score below layer 0's: a global ranking takes them first,
        // down to the floor of 2, then continues in layer 0.
        let s = scores_of(&[&[0.5, 0.9, 0.6, 0.8], &[0.1, 0.3, 0.2, 0.05]]);
        let kept = select_global(&s, 0.5, 2).unwrap();
        assert_eq!(kept[&1], vec![1, 2]);
        assert_eq!(kept[&0], vec![1, 3]);
        let total_kept: usize = kept.values().map(Vec::len).sum();
        assert_eq!(total_kept, 4);
        assert!(select_global(&s, 0.9, 2).unwrap_err().to_string().contains("impossible"));
    }

    #[test]
    fn ratio_bounds() {
        for r in [0.0, 1.0, -0.1, 1.5, f64::NAN] {
            assert!(check_ratio(r).is_err(), "{r}");
        }
        assert!(check_ratio(0.5).is_ok());
    }

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
        }
        assert!("magic".parse::<Method>().unwrap_err().to_string().contains("frequency"));
    }
}
