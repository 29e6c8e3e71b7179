//! Multiple-choice accuracy as lm-evaluation-harness computes it.
//!
//! `acc` is 1 when the argmax of the continuation log-likelihoods is the gold choice;
//! `acc_norm` divides each log-likelihood by its choice's length in characters (Unicode code
//! points, Python's `len`) first. Ties and NaNs resolve as `numpy.argmax` does: the first
//! NaN, else the first maximum.

use diep_models::CausalLm;
use serde::Serialize;

use crate::EvalError;
use crate::loglik::{LoglikOptions, Loglikelihood, loglikelihoods};
use crate::tasks::McDoc;
use crate::tokenize::{EncodedPair, LmTokenizer};

/// One document's result.
#[derive(Debug, Clone, Serialize)]
pub struct DocResult {
    /// The document's index in the task file (non-blank lines, from 0).
    pub doc: usize,
    /// Each choice's continuation log-likelihood.
    pub loglikelihoods: Vec<f64>,
    /// Whether each continuation is the greedy decoding.
    pub is_greedy: Vec<bool>,
    /// The gold index.
    pub gold: usize,
    /// argmax of the log-likelihoods.
    pub pred: usize,
    /// argmax of the log-likelihoods divided by the choices' lengths in characters.
    pub pred_norm: usize,
}

/// A task's scores.
#[derive(Debug, Clone, Serialize)]
pub struct TaskScores {
    /// Mean accuracy.
    pub acc: f64,
    /// Mean length-normalised accuracy.
    pub acc_norm: f64,
    /// Number of documents.
    pub n: usize,
    /// Per-document results.
    #[serde(skip)]
    pub docs: Vec<DocResult>,
}

/// `numpy.argmax`: the first NaN if there is one, else the first maximum.
pub fn np_argmax(xs: &[f64]) -> usize {
    if let Some(i) = xs.iter().position(|x| x.is_nan()) {
        return i;
    }
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best
}

/// Scores documents from their requests' log-likelihoods (in document, then choice order).
pub fn score_docs(docs: &[McDoc], lls: &[Loglikelihood]) -> TaskScores {
    let mut k = 0;
    let mut results = Vec::with_capacity(docs.len());
    for (i, d) in docs.iter().enumerate() {
        let these = &lls[k..k + d.requests.len()];
        k += d.requests.len();
        let ll: Vec<f64> = these.iter().map(|l| l.loglikelihood).collect();
        let norm: Vec<f64> = ll.iter().zip(&d.choices).map(|(l, c)| l / c.chars().count() as f64).collect();
        results.push(DocResult {
            doc: i,
            is_greedy: these.iter().map(|l| l.is_greedy).collect(),
            gold: d.gold,
            pred: np_argmax(&ll),
            pred_norm: np_argmax(&norm),
            loglikelihoods: ll,
        });
    }
    let n = results.len();
    let mean = |f: &dyn Fn(&DocResult) -> bool| results.iter().filter(|r| f(r)).count() as f64 / n.max(1) as f64;
    TaskScores { acc: mean(&|r| r.pred == r.gold), acc_norm: mean(&|r| r.pred_norm == r.gold), n, docs: results }
}

/// Tokenises every request of `docs` and scores the task on `model`.
pub fn evaluate_task(
    model: &dyn CausalLm,
    tokenizer: &LmTokenizer,
    docs: &[McDoc],
    opts: LoglikOptions,
    progress: impl FnMut(usize, usize),
) -> Result<TaskScores, EvalError> {
    Ok(evaluate_tasks(model, tokenizer, &[docs], opts, progress)?.remove(0))
}

/// Scores several tasks with one pass over all their requests, as lm-eval's evaluator does
/// (with `logits_cache`, requests of different tasks can share a forward pass there too).
pub fn evaluate_tasks(
    model: &dyn CausalLm,
    tokenizer: &LmTokenizer,
    tasks: &[&[McDoc]],
    opts: LoglikOptions,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<TaskScores>, EvalError> {
    let pairs: Vec<EncodedPair> = tasks
        .iter()
        .flat_map(|docs| docs.iter())
        .flat_map(|d| d.requests.iter())
        .map(|(c, x)| tokenizer.encode_pair(c, x))
        .collect::<Result<_, _>>()?;
    let lls = loglikelihoods(model, &pairs, opts, progress)?;
    let mut k = 0;
    Ok(tasks
        .iter()
        .map(|docs| {
            let n: usize = docs.iter().map(|d| d.requests.len()).sum();
            let scores = score_docs(docs, &lls[k..k + n]);
            k += n;
            scores
        })
        .collect())
}
