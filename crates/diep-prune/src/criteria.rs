//! Baseline criteria: per-expert importance scores from routing statistics. Which experts go is
//! decided from the scores by [`diep_plan::select()`], shared with DiEP.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::{PruneError, Result};
use crate::stats::CalibrationStats;
use diep_common::SplitMix64;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
        }
        assert!("magic".parse::<Method>().unwrap_err().to_string().contains("frequency"));
    }
}
