//! Continuation log-likelihoods, computed as lm-evaluation-harness's HF backend does.
//!
//! The model input is `(context + continuation)[-(max_length + 1):][:-1]`; the continuation's
//! tokens are scored by the log-softmax of the logits at the positions that predict them, and
//! `is_greedy` says whether every one of them is the argmax. Requests are sorted by input
//! length (longest first) and batched with right padding, which a causal model ignores.
//!
//! With `logits_cache` (lm-eval's default, its `logits_cache=True` model argument), requests
//! whose `context + continuation[:-1]` tokens are equal share one forward pass: the one with
//! the longest continuation is run, and every other member of the group is scored against its
//! continuation positions exactly as lm-eval does: log-probabilities from the *first*
//! `len(continuation)` of those positions, greedy check against the *last* ones. For the usual
//! case (one shared context, one-token choices such as MMLU's " A".." D") this is exact; when
//! equal token sequences are split at different points it reproduces lm-eval's numbers, which
//! then differ from a plain forward pass (see `docs/EVALUATION.md`).

use std::collections::BTreeMap;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use diep_models::CausalLm;

use crate::EvalError;
use crate::tokenize::EncodedPair;

/// The score of one request.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Loglikelihood {
    /// Sum of the continuation tokens' log-probabilities (nats).
    pub loglikelihood: f64,
    /// Whether greedy decoding would produce the continuation.
    pub is_greedy: bool,
}

/// How to compute log-likelihoods.
#[derive(Debug, Clone, Copy)]
pub struct LoglikOptions {
    /// The model's maximum length; longer inputs are truncated from the left.
    pub max_length: usize,
    /// Largest number of padded input tokens in one forward batch.
    pub max_batch_tokens: usize,
    /// lm-eval's one-forward-per-`context + continuation[:-1]` sharing (its default).
    pub logits_cache: bool,
}

/// One forward row: the representative's input and the members scored from it.
struct Row {
    input: Vec<u32>,
    /// Where the representative's continuation starts in `input`.
    first: usize,
    /// The representative's continuation length.
    rep_len: usize,
    /// Members: (request index, continuation tokens).
    members: Vec<(usize, Vec<u32>)>,
}

/// Log-likelihoods of `pairs`. `progress(done, total)` is called after each batch with counts
/// of requests.
pub fn loglikelihoods(
    model: &dyn CausalLm,
    pairs: &[EncodedPair],
    opts: LoglikOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Loglikelihood>, EvalError> {
    let max_length = opts.max_length;
    for (i, p) in pairs.iter().enumerate() {
        if p.context.is_empty() || p.continuation.is_empty() {
            return Err(EvalError::Tokenize {
                reason: format!("request {i}: the context and the continuation must each have at least one token"),
            });
        }
        if p.continuation.len() > max_length {
            return Err(EvalError::Tokenize {
                reason: format!(
                    "request {i}: the continuation has {} tokens, more than the model's maximum length {max_length}",
                    p.continuation.len()
                ),
            });
        }
    }
    // Groups in request order; lm-eval's representative is the first member with the longest
    // continuation.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    if opts.logits_cache {
        let mut by_key: BTreeMap<Vec<u32>, usize> = BTreeMap::new();
        for (i, p) in pairs.iter().enumerate() {
            let key: Vec<u32> = p.context.iter().chain(&p.continuation[..p.continuation.len() - 1]).copied().collect();
            let g = *by_key.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
    } else {
        groups = (0..pairs.len()).map(|i| vec![i]).collect();
    }
    let mut rows: Vec<Row> = groups
        .iter()
        .map(|members| {
            let mut rep = members[0];
            for &m in members {
                if pairs[m].continuation.len() > pairs[rep].continuation.len() {
                    rep = m;
                }
            }
            let p = &pairs[rep];
            let whole: Vec<u32> = p.context.iter().chain(&p.continuation).copied().collect();
            let start = whole.len().saturating_sub(max_length + 1);
            let input = whole[start..whole.len() - 1].to_vec();
            Row {
                first: input.len() - p.continuation.len(),
                rep_len: p.continuation.len(),
                input,
                members: members.iter().map(|&m| (m, pairs[m].continuation.clone())).collect(),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.input.len().cmp(&a.input.len()).then_with(|| a.input.cmp(&b.input)));

    let mut out = vec![Loglikelihood { loglikelihood: 0.0, is_greedy: false }; pairs.len()];
    let mut done = 0;
    let mut i = 0;
    while i < rows.len() {
        // Longest first: the first row of a batch sets its padded length.
        let padded = rows[i].input.len();
        let per_batch = (opts.max_batch_tokens / padded.max(1)).max(1);
        let batch = &rows[i..(i + per_batch).min(rows.len())];
        i += batch.len();
        for (r, s) in score_batch(model, batch, padded)? {
            out[r] = s;
            done += 1;
        }
        progress(done, pairs.len());
    }
    Ok(out)
}

fn score_batch(model: &dyn CausalLm, rows: &[Row], padded: usize) -> Result<Vec<(usize, Loglikelihood)>, EvalError> {
    let ids: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let mut v = r.input.clone();
            v.resize(padded, 0);
            v
        })
        .collect();
    let logits = model.logits(&ids)?;
    let [b, t, _] = logits.dims();
    let logp = log_softmax(logits, 2);
    // One gather slot per group member: member k of a row reads its j-th token at the
    // representative's j-th continuation position.
    let k = rows.iter().map(|r| r.members.len()).max().unwrap_or(1);
    let mut targets = vec![0i64; b * t * k];
    for (row, r) in rows.iter().enumerate() {
        for (slot, (_, cont)) in r.members.iter().enumerate() {
            for (j, tok) in cont.iter().enumerate() {
                targets[(row * t + r.first + j) * k + slot] = *tok as i64;
            }
        }
    }
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t, k]), model.device());
    let picked: Vec<f32> = logp.clone().gather(2, targets).into_data().iter::<f32>().collect();
    let argmax: Vec<i64> = logp.argmax(2).into_data().iter::<i64>().collect();
    let mut out = Vec::new();
    for (row, r) in rows.iter().enumerate() {
        for (slot, (req, cont)) in r.members.iter().enumerate() {
            // lm-eval sums the float32 log-probabilities in float32.
            let ll: f32 = (0..cont.len()).map(|j| picked[(row * t + r.first + j) * k + slot]).sum();
            let greedy_start = row * t + r.first + r.rep_len - cont.len();
            let is_greedy = cont.iter().enumerate().all(|(j, c)| argmax[greedy_start + j] == *c as i64);
            out.push((*req, Loglikelihood { loglikelihood: ll as f64, is_greedy }));
        }
    }
    Ok(out)
}
