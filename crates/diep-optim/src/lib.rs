//! DiEP's α/β joint optimiser.
//!
//! Given a model loaded on an autodiff device and calibration token ids, [`optimise()`] learns
//! the intra-layer expert scores α and the inter-layer importances β of a
//! [`diep_relax`] relaxation by alternating gradient descent (α steps with β frozen, then β
//! steps with α frozen, 3:1 by default), with a cosine learning-rate schedule and, for the
//! routed relaxation, a geometrically annealed temperature. The model's weights are never
//! updated — only α and β are tracked by autodiff.
//!
//! Objectives ([`Objective`]):
//! - `ce-norm` (the paper's): `CE(y, F′) + λ·‖F′ − F‖_F` on final logits, `F` the original
//!   model;
//! - `kl`: `KL(F ‖ F′)` on next-token distributions;
//! - `layer-wise`: `Σ_l ‖ŷ_l − y_l‖² / ‖y_l‖²` per MoE block on the original block inputs,
//!   for models too large for an end-to-end pass ([`optimise_layer_wise`] accepts a
//!   streaming model).
//!
//! The [`DiepState`] (α, β, the optimiser's moments, the loss curve) is reported after every
//! epoch so a caller can save it and resume. [`diep_plan`] turns a state into a pruning plan.
#![warn(missing_docs)]

mod error;
pub mod optimise;
pub mod plan;
pub mod reference;
pub mod search;
pub mod settings;
pub mod state;
pub mod stream;

pub use error::{OptimError, Result};
pub use optimise::{
    Event, StepGrads, Stepper, budget, epoch_order, keep_count, next_token_ce, optimise, optimise_keeping_reference,
    optimise_layer_wise, optimise_with,
};
pub use plan::{expert_scores, pruning_plan};
pub use reference::ReferenceStore;
pub use search::{
    Evaluator, Move, SearchOptions, SearchOutcome, changed_layers, greedy_search, refine, refine_from,
    refine_round_cost,
};
pub use settings::{AlphaInit, DiepSettings, Objective, OptimizerKind, RelaxationKind, ThresholdMode};
pub use state::{
    BestEpoch, DiepState, EpochRecord, LayerState, Moments, PlanScore, STATE_FORMAT, clearly_better, fingerprint,
    paired_t,
};
pub use stream::{Offload, Phase, RoutingShares, StreamOptions};
