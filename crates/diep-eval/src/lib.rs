//! Evaluation of (pruned) MoE checkpoints, with lm-evaluation-harness's conventions.
//!
//! - [`perplexity`]: `exp` of the mean negative log-likelihood over every next-token
//!   prediction of token-id sequences (for equal-length sequences exactly `exp(loss)` of
//!   transformers' `model(ids, labels=ids)`); [`text_windows`] cuts a text file into the
//!   non-overlapping windows it scores.
//! - Multiple choice, scored exactly as lm-evaluation-harness 0.4 does: [`tasks`] renders
//!   lm-eval's zero-shot templates (boolq, rte, openbookqa, arc_easy, arc_challenge,
//!   hellaswag, winogrande, piqa, mmlu) from local JSONL in each dataset's schema;
//!   [`LmTokenizer::encode_pair`] splits context and continuation as lm-eval does;
//!   [`loglikelihoods`] scores continuations; [`score_docs`] computes `acc` and `acc_norm`.
//! - [`report`]: retention tables (pruned / base) and SVG figures.
#![warn(missing_docs)]

mod loglik;
mod mc;
mod perplexity;
pub mod report;
pub mod tasks;
mod text;
mod tokenize;

pub use loglik::{LoglikOptions, Loglikelihood, loglikelihoods};
pub use mc::{DocResult, TaskScores, evaluate_task, evaluate_tasks, np_argmax, score_docs};
pub use perplexity::{EvalError, PerplexityReport, perplexity, read_ids_file, sequence_nll};
pub use tasks::{McDoc, TaskFormat, load_task};
pub use text::text_windows;
pub use tokenize::{EncodedPair, LmTokenizer, SpecialTokens, is_python_whitespace, lm_eval_max_length};
