//! The original model's next-token distributions, computed once per calibration set and kept
//! compact: the `kl` objective's reference.
//!
//! For every position the store keeps the `k` most likely tokens of the original model with
//! their log-probabilities, and the log of the probability mass left to all other tokens (the
//! tail). The `kl` objective then compares the relaxed model with the original on `k + 1`
//! outcomes — the top-k tokens and "any other token":
//!
//! `KL_k(p ‖ q) = Σ_{i∈top-k} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)`,
//!
//! with `q_tail = 1 − Σ_{i∈top-k} q_i`. This is the exact KL divergence of the two
//! distributions coarsened to those outcomes, so it never exceeds the exact one, and equals it
//! when `k` covers the vocabulary (`k = 0` asks for that). It needs `k·8 + 4` bytes per
//! position instead of `4·V` (Mixtral: 516 bytes against 128 KB at `k = 64`), so the whole
//! calibration set's reference fits in memory at any vocabulary size; `docs/PERFORMANCE.md`
//! records its measured effect on the objective and on the kept experts.

use burn::tensor::{Int, Tensor, TensorData};

/// The top-k log-probabilities and tail mass of every position of every calibration sequence.
#[derive(Debug, Clone)]
pub struct ReferenceStore {
    /// Tokens kept per position (the vocabulary size when exact).
    k: usize,
    /// Vocabulary size.
    vocab: usize,
    /// Positions per sequence.
    seq_len: usize,
    /// `[sequence][position·k + j]`: token ids, most likely first (empty when exact: then
    /// `logp` is in vocabulary order).
    ids: Vec<Vec<u32>>,
    /// Their log-probabilities under the original model (exact: of every token, in vocabulary
    /// order, so a step reads them without a scatter).
    logp: Vec<Vec<f32>>,
    /// `[sequence][position]`: log of the probability of every other token (−∞ when none).
    log_tail: Vec<Vec<f32>>,
}

impl ReferenceStore {
    /// An empty store for `sequences` sequences of `seq_len` tokens, keeping `k` tokens per
    /// position (`0` or `k ≥ vocab`: every token, exact).
    pub fn new(sequences: usize, seq_len: usize, vocab: usize, k: usize) -> Self {
        let k = if k == 0 { vocab } else { k.min(vocab) };
        ReferenceStore {
            k,
            vocab,
            seq_len,
            ids: vec![Vec::new(); sequences],
            logp: vec![Vec::new(); sequences],
            log_tail: vec![Vec::new(); sequences],
        }
    }

    /// Tokens kept per position.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether the store holds the whole distribution.
    pub fn is_exact(&self) -> bool {
        self.k >= self.vocab
    }

    /// The store of the sequences `seqs` of this one, in that order (sequence `i` of the result
    /// is sequence `seqs[i]` here). Panics on an index out of range.
    pub fn subset(&self, seqs: &[usize]) -> Self {
        self.prefixes(seqs, self.seq_len)
    }

    /// [`ReferenceStore::subset`] cut to the first `len` positions of each sequence: the
    /// reference of those sequences' first `len` tokens (a causal model's distribution at a
    /// position depends only on the tokens up to it). `len` above the stored length keeps all.
    pub fn prefixes(&self, seqs: &[usize], len: usize) -> Self {
        let len = len.min(self.seq_len);
        let cut = |rows: &[Vec<f32>], per: usize| -> Vec<Vec<f32>> {
            seqs.iter().map(|i| rows[*i][..(len * per).min(rows[*i].len())].to_vec()).collect()
        };
        let k_ids = if self.is_exact() { 0 } else { self.k };
        ReferenceStore {
            k: self.k,
            vocab: self.vocab,
            seq_len: len,
            ids: seqs.iter().map(|i| self.ids[*i][..(len * k_ids).min(self.ids[*i].len())].to_vec()).collect(),
            logp: cut(&self.logp, self.k),
            log_tail: cut(&self.log_tail, 1),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let ids: usize = self.ids.iter().map(|v| v.len() * 4).sum();
        let logp: usize = self.logp.iter().map(|v| v.len() * 4).sum();
        let tails: usize = self.log_tail.iter().map(|v| v.len() * 4).sum();
        ids + logp + tails
    }

    /// Records sequence `seq`'s logits `[seq_len, vocab]` (row-major, host).
    pub fn insert(&mut self, seq: usize, logits: &[f32]) {
        let (v, k) = (self.vocab, self.k);
        let mut ids = Vec::with_capacity(if k < v { self.seq_len * k } else { 0 });
        let mut logp = Vec::with_capacity(self.seq_len * k);
        let mut tails = Vec::with_capacity(self.seq_len);
        let mut order: Vec<u32> = Vec::with_capacity(v);
        for row in logits.chunks_exact(v) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|z| (*z as f64 - max).exp()).sum::<f64>().ln();
            if k >= v {
                // Exact: every token, in vocabulary order.
                logp.extend(row.iter().map(|z| (*z as f64 - lse) as f32));
                tails.push(f32::NEG_INFINITY);
                continue;
            }
            order.clear();
            order.extend(0..v as u32);
            // Most likely first; ties to the lower id.
            let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            order.select_nth_unstable_by(k - 1, by_logit);
            order[..k].sort_unstable_by(by_logit);
            let tail: f64 = order[k..].iter().map(|i| (row[*i as usize] as f64 - lse).exp()).sum();
            tails.push(if tail > 0.0 { tail.ln() as f32 } else { f32::NEG_INFINITY });
            for &i in &order[..k] {
                ids.push(i);
                logp.push((row[i as usize] as f64 - lse) as f32);
            }
        }
        self.ids[seq] = ids;
        self.logp[seq] = logp;
        self.log_tail[seq] = tails;
    }

    /// `KL_k(p ‖ q)` summed over the positions of each sequence of `seqs` (one value per
    /// sequence, in `seqs`' order), for logits `[seqs.len()·seq_len, vocab]`: the per-sequence
    /// terms of [`ReferenceStore::kl_sum`], which the epoch selection compares plan against plan.
    pub fn kl_per_sequence(&self, seqs: &[usize], logits: Tensor<2>) -> Vec<f64> {
        let device = logits.device();
        if self.on_host(&device) {
            let mut z = host_values(logits);
            let per_row = self.exact_rows(seqs, &mut z, None);
            return per_row.chunks_exact(self.seq_len).map(|r| r.iter().sum()).collect();
        }
        let (n, rows, k) = (seqs.len(), seqs.len() * self.seq_len, self.k);
        let logp: Vec<f32> = seqs.iter().flat_map(|s| self.logp[*s].iter().copied()).collect();
        let log_q = burn::tensor::activation::log_softmax(logits, 1);
        let per_row: Tensor<2> = if self.is_exact() {
            let (p, lp) = self.exact_inputs(logp, rows, &device);
            (p * (lp - log_q)).sum_dim(1)
        } else {
            // Σ p log p of the stored outcomes, per position, less Σ p log q of the same outcomes.
            let tails = self.tails(seqs);
            let plogp = |l: f32| if l.is_finite() { f64::from(l).exp() * f64::from(l) } else { 0.0 };
            let entropy: Vec<f32> = logp
                .chunks_exact(k)
                .zip(&tails)
                .map(|(row, t)| (row.iter().map(|l| plogp(*l)).sum::<f64>() + plogp(*t)) as f32)
                .collect();
            let (idx, p) = self.top_k_inputs(seqs, &logp, &device);
            let cross_top = (p * log_q.clone().gather(1, idx.clone())).sum_dim(1);
            // log q_tail: the log of the mass left outside the top-k.
            let log_q_tail = (log_q + self.outside_top_k(idx)).exp().sum_dim(1).log();
            let p_tail: Vec<f32> = tails.iter().map(|t| if t.is_finite() { t.exp() } else { 0.0 }).collect();
            let p_tail = Tensor::<2>::from_data(TensorData::new(p_tail, [rows, 1]), &device);
            let entropy = Tensor::<2>::from_data(TensorData::new(entropy, [rows, 1]), &device);
            // A tail with no mass contributes nothing (0 · log 0 = 0).
            let tail_term = (p_tail.clone() * log_q_tail).mask_fill(p_tail.equal_elem(0.0), 0.0);
            entropy - cross_top - tail_term
        };
        let per_seq = per_row.reshape([n, self.seq_len]).sum_dim(1);
        per_seq.into_data().iter::<f32>().map(f64::from).collect()
    }

    /// `KL_k(p ‖ q)` summed over the positions of sequences `seqs`, for the relaxed model's
    /// logits `[seqs.len()·seq_len, vocab]` (tracked by autodiff if they are).
    pub fn kl_sum(&self, seqs: &[usize], logits: Tensor<2>) -> Tensor<1> {
        let device = logits.device();
        let rows = seqs.len() * self.seq_len;
        let logp: Vec<f32> = seqs.iter().flat_map(|s| self.logp[*s].iter().copied()).collect();
        if self.is_exact() {
            // Every token stored, in vocabulary order: the exact KL, summed in that order.
            let (p, lp) = self.exact_inputs(logp, rows, &device);
            let log_q = burn::tensor::activation::log_softmax(logits, 1);
            return (p * (lp - log_q)).sum();
        }
        // Σ p log p of the stored outcomes: a constant of the step.
        let mut entropy_part = 0f64;
        for lp in &logp {
            entropy_part += (*lp as f64).exp() * *lp as f64;
        }
        let tails = self.tails(seqs);
        for lt in &tails {
            if lt.is_finite() {
                entropy_part += (*lt as f64).exp() * *lt as f64;
            }
        }
        let (idx, p) = self.top_k_inputs(seqs, &logp, &device);
        // log q = z − logsumexp(z), with the row maximum (a constant) subtracted for stability.
        let max = logits.clone().detach().max_dim(1);
        let shifted = logits - max;
        let lse = shifted.clone().exp().sum_dim(1).log();
        let log_q_top = shifted.clone().gather(1, idx.clone()) - lse.clone();
        let mut cross = (p * log_q_top).sum();
        if !self.is_exact() {
            // log q_tail = logsumexp over the tokens outside the top-k.
            let log_q_tail = (shifted + self.outside_top_k(idx)).exp().sum_dim(1).log() - lse;
            let p_tail: Vec<f32> = tails.iter().map(|t| if t.is_finite() { t.exp() } else { 0.0 }).collect();
            let p_tail = Tensor::<2>::from_data(TensorData::new(p_tail, [rows, 1]), &device);
            cross = cross + (p_tail * log_q_tail).sum();
        }
        cross.neg() + entropy_part
    }

    /// [`ReferenceStore::kl_sum`] and its gradient on the host, where the logits live in host
    /// memory ([`diep_models::kernels::host_rows_on`]) and the store is exact: `Σ KL(p ‖ q)` over
    /// the positions of `seqs` and `∂(scale · Σ KL)/∂logits = scale · (q − p)`, `[rows, vocab]`,
    /// a constant on the logits' device (a step pulls it back with `(logits · grad).sum()`).
    /// Summed in `f64`, one pass over each row instead of burn's `log_softmax` and its
    /// backward. `None` where [`ReferenceStore::kl_sum`] applies.
    pub fn kl_sum_and_grad(&self, seqs: &[usize], logits: &Tensor<2>, scale: f64) -> Option<(f64, Tensor<2>)> {
        let device = logits.device();
        if !self.on_host(&device) {
            return None;
        }
        let dims = logits.dims();
        let mut z = host_values(logits.clone());
        let sum: f64 = self.exact_rows(seqs, &mut z, Some(scale as f32)).iter().sum();
        Some((sum, Tensor::from_data(TensorData::new(z, dims), &device)))
    }

    /// Whether logits on `device` are scored by the host pass ([`ReferenceStore::exact_rows`]):
    /// an exact store and logits in host memory.
    fn on_host(&self, device: &burn::tensor::Device) -> bool {
        self.is_exact() && diep_models::kernels::host_rows_on(device)
    }

    /// The exact KL of every position of `seqs` for host logits `z` (`[rows, vocab]`, row-major),
    /// accumulated in `f64`; with `grad_scale`, `z` is overwritten by `grad_scale · (q − p)`.
    /// Tokens the reference gives no mass (`p = 0`) add nothing.
    fn exact_rows(&self, seqs: &[usize], z: &mut [f32], grad_scale: Option<f32>) -> Vec<f64> {
        use rayon::prelude::*;
        let (v, t) = (self.vocab, self.seq_len);
        assert_eq!(z.len(), seqs.len() * t * v, "exact_rows: logits for {} positions", seqs.len() * t);
        z.par_chunks_mut(v)
            .enumerate()
            .map_init(
                || vec![0f32; v],
                |e, (r, row)| {
                    let lp = &self.logp[seqs[r / t]][(r % t) * v..(r % t + 1) * v];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f64;
                    for (e, z) in e.iter_mut().zip(row.iter()) {
                        *e = (*z - max).exp();
                        sum += f64::from(*e);
                    }
                    let lse = f64::from(max) + sum.ln();
                    let inv = (1.0 / sum) as f32;
                    let mut kl = 0f64;
                    // One pass: each token's p is computed once, for its KL term and its gradient.
                    for ((z, e), l) in row.iter_mut().zip(e.iter()).zip(lp) {
                        let p = l.exp();
                        if p > 0.0 {
                            kl += f64::from(p) * (f64::from(*l) - (f64::from(*z) - lse));
                        }
                        if let Some(scale) = grad_scale {
                            *z = (e * inv - p) * scale;
                        }
                    }
                    kl
                },
            )
            .collect()
    }

    /// The exact path's `p` and `log p`, `[rows, vocab]`, from `logp` (vocabulary order).
    fn exact_inputs(&self, logp: Vec<f32>, rows: usize, device: &burn::tensor::Device) -> (Tensor<2>, Tensor<2>) {
        let p: Vec<f32> = logp.iter().map(|l| l.exp()).collect();
        let p = Tensor::<2>::from_data(TensorData::new(p, [rows, self.vocab]), device);
        let lp = Tensor::<2>::from_data(TensorData::new(logp, [rows, self.vocab]), device);
        (p, lp)
    }

    /// The log tail of every position of `seqs`.
    fn tails(&self, seqs: &[usize]) -> Vec<f32> {
        seqs.iter().flat_map(|s| self.log_tail[*s].iter().copied()).collect()
    }

    /// The top-k path's token ids and their probabilities `p`, `[rows, k]`, for `seqs`
    /// (`logp`: their stored log-probabilities).
    fn top_k_inputs(&self, seqs: &[usize], logp: &[f32], device: &burn::tensor::Device) -> (Tensor<2, Int>, Tensor<2>) {
        let rows = logp.len() / self.k;
        let ids: Vec<i64> = seqs.iter().flat_map(|s| self.ids[*s].iter().map(|i| i64::from(*i))).collect();
        let idx = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, self.k]), device);
        let p = Tensor::<2>::from_data(
            TensorData::new(logp.iter().map(|l| l.exp()).collect::<Vec<f32>>(), [rows, self.k]),
            device,
        );
        (idx, p)
    }

    /// `[rows, vocab]`: −∞ at each row's stored top-k tokens `idx`, 0 elsewhere (added to log q,
    /// it leaves the tail's outcomes).
    fn outside_top_k(&self, idx: Tensor<2, Int>) -> Tensor<2> {
        let (device, [rows, k]) = (idx.device(), idx.dims());
        Tensor::<2>::zeros([rows, self.vocab], &device).scatter(
            1,
            idx,
            Tensor::full([rows, k], f32::NEG_INFINITY, &device),
            burn::tensor::IndexingUpdateOp::Add,
        )
    }
}

/// A float tensor's values on the host (without its autodiff association).
fn host_values(t: Tensor<2>) -> Vec<f32> {
    t.inner().into_data().try_into_vec::<f32>().expect("f32 logits")
}
