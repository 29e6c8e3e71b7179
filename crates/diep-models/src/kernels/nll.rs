//! Next-token negative log-likelihoods straight from the logits.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;

use super::{exp_sum, fused_on, into_vec, max_lanes, rows_per_task};

simd_dispatch! {
    /// `out[r] = logsumexp(logits[r]) − logits[r][target[r]]` per row of width `v`.
    pub fn nll_rows(logits: &[f32], targets: &[u32], out: &mut [f32], v: usize) {
        for ((row, &tgt), o) in logits.chunks_exact(v).zip(targets).zip(out.iter_mut()) {
            let max = max_lanes(row);
            let sum = exp_sum(row, max);
            *o = (max as f64 + sum.ln() - row[tgt as usize] as f64) as f32;
        }
    }
}

/// Negative log-likelihoods `[b][t − 1]`: position `p` of sequence `s` scores
/// `targets[s][p]` under `logits[s, p, :]` (`logits` is `[b, t, vocab]`, `targets` holds
/// `t − 1` ids per sequence).
pub fn token_nll(logits: Tensor<3>, targets: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let device = logits.device();
    let [b, t, v] = logits.dims();
    assert_eq!(targets.len(), b, "token_nll: {} target rows for a batch of {b}", targets.len());
    if t < 2 {
        return vec![Vec::new(); b];
    }
    if !fused_on(&device) {
        return token_nll_reference(logits, targets);
    }
    for row in targets {
        assert_eq!(row.len(), t - 1, "token_nll: each target row needs {} ids", t - 1);
        if let Some(bad) = row.iter().find(|&&id| id as usize >= v) {
            panic!("token_nll: target id {bad} is outside the vocabulary of {v}");
        }
    }
    let logits = into_vec(logits);
    // Row `s·t + p` for p < t − 1 is scored; the last position of each sequence is not.
    let mut flat_targets = vec![0u32; b * t];
    for (s, row) in targets.iter().enumerate() {
        flat_targets[s * t..s * t + t - 1].copy_from_slice(row);
    }
    let mut out = vec![0f32; b * t];
    let rows = rows_per_task(v);
    out.par_chunks_mut(rows)
        .zip(logits.par_chunks(rows * v))
        .zip(flat_targets.par_chunks(rows))
        .for_each(|((o, l), tg)| nll_rows(l, tg, o, v));
    out.chunks_exact(t).map(|r| r[..t - 1].to_vec()).collect()
}

/// The reference for [`token_nll`]: `−gather(log_softmax(logits[:, :-1]), targets)`.
pub fn token_nll_reference(logits: Tensor<3>, targets: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let device = logits.device();
    let [b, t, _] = logits.dims();
    if t < 2 {
        return vec![Vec::new(); b];
    }
    let logp = log_softmax(logits.narrow(1, 0, t - 1), 2);
    let flat: Vec<i64> = targets.iter().flat_map(|s| s.iter().map(|x| *x as i64)).collect();
    let idx = Tensor::<3, Int>::from_data(TensorData::new(flat, [b, t - 1, 1]), &device);
    let picked: Vec<f32> = logp.gather(2, idx).into_data().iter::<f32>().collect();
    picked.chunks(t - 1).map(|c| c.iter().map(|x| -x).collect()).collect()
}
