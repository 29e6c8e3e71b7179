//! Pruning plans and expert selection, with no tensor framework (serde only), so that every
//! method — the baselines of `diep-prune`, DiEP's optimiser — and checkpoint surgery agree on
//! which experts go:
//!
//! - [`select()`]: the one selection from per-expert scores to kept experts, for both
//!   [`Allocation`]s, with the budget, the per-layer floor and the router's group constraints
//!   ([`Constraints`]); [`check_feasible`] checks a ratio before any computation;
//! - [`PruningPlan`]: what every method produces and surgery consumes (`pruning.json`), and its
//!   validation against a model's config;
//! - [`PruningPlan::add_mtp_layers`]: the rule for multi-token-prediction layers (DeepSeek-V3's
//!   `num_nextn_predict_layers`), which no method scores: each keeps the count the pruned
//!   config states (`n_routed_experts`, the largest trunk count), ranked by its own routing.
//!
//! ```
//! use std::collections::BTreeMap;
//! use diep_plan::{Allocation, Constraints, select};
//!
//! // Two layers of four experts, top-2 routing: remove half of all experts in one ranking.
//! let scores = BTreeMap::from([(0, vec![0.5, 0.9, 0.6, 0.8]), (1, vec![0.1, 0.3, 0.2, 0.05])]);
//! let kept = select(&scores, 0.5, Allocation::Global, &Constraints::ungrouped(2, 2)).unwrap();
//! assert_eq!(kept[&0], vec![1, 3]);
//! assert_eq!(kept[&1], vec![1, 2]);
//! ```
#![warn(missing_docs)]

mod error;
mod plan;
pub mod select;

pub use error::PlanError;
pub use plan::{MTP_RULE_KEY, PLAN_FILE, PLAN_FORMAT, PruningPlan};
pub use select::{
    Allocation, Constraints, Kept, budget, check_feasible, check_groups, check_ratio, expert_counts, keep_best, select,
    uniform_removals,
};
