//! What the optimiser runs with. Defaults follow the paper (cosine schedule, 10 epochs,
//! batch 16, α:β = 3:1, λ = 0.01) except for three measured departures: the objective is `kl`
//! (the paper's is `ce-norm`) and the peak learning rate 0.02 (the paper's 5e-3), which on the
//! trained fixture raise retention at 50% pruning from 0.458 to 0.652; and α (and, under a
//! global allocation, β) starts at half the log of a routing statistic instead of 0 — REAP's
//! score, the router probability or the selection count, whichever plan has the lowest
//! calibration objective — with that start's own plan the first candidate of the epoch selection
//! (docs/METHOD.md, docs/RESULTS.md).
//! [`DiepSettings::paper`] gives the paper's settings.

use std::fmt;
use std::str::FromStr;

use diep_plan::Allocation;
use serde::{Deserialize, Serialize};

macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every variant.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The command-line (and `pruning.json`) name.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    let names: Vec<&str> = $name::ALL.iter().map(|v| v.name()).collect();
                    format!("unknown {} `{s}`; expected one of {}", stringify!($name).to_lowercase(), names.join(", "))
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum!(
    /// Which relaxation of the expert-combination space is optimised.
    RelaxationKind {
        /// The paper's: routed contributions scaled by `β·N·softmax(α)`.
        Paper => "paper",
        /// The router sees `z + log p`, `p = σ((s − θ)/τ)`; exact at hard masks.
        Routed => "routed",
        /// `routed`, and each routed contribution is also gated by `p`; exact at hard masks.
        RoutedGated => "routed-gated",
    }
);

named_enum!(
    /// What the optimiser minimises.
    Objective {
        /// The paper's `CE(y, F′) + λ·‖F′ − F‖_F` on final logits (the norm is not squared).
        CeNorm => "ce-norm",
        /// `KL(F ‖ F′)` on next-token distributions, averaged over positions.
        Kl => "kl",
        /// `Σ_l ‖ŷ_l − y_l‖² / ‖y_l‖²` per MoE block on the original model's block inputs: no
        /// end-to-end pass, so the model can be streamed one layer at a time.
        LayerWise => "layer-wise",
    }
);

named_enum!(
    /// How the routed relaxation's global threshold θ enters the gradient.
    ThresholdMode {
        /// θ is a constant of each step (set by bisection, no gradient).
        Fixed => "fixed",
        /// θ(s) carries the budget's implicit gradient `∂θ/∂s_i = σ'_i / Σ σ'_j`, so the
        /// keep budget is zero-sum across all experts of all layers.
        Implicit => "implicit",
    }
);

named_enum!(
    /// How α starts.
    AlphaInit {
        /// α = 0: every expert of a layer equally likely to be kept.
        Zero => "zero",
        /// `α_i = scale · ln(share_i)` with `share_i` the expert's mean router probability on
        /// the calibration set (soft activation), measured in the pass that computes the
        /// reference: the relaxation starts at the soft-activation ranking.
        SoftActivation => "soft-activation",
        /// The same with the share of top-k selections (frequency).
        Frequency => "frequency",
        /// The same with REAP's score (mean over routed tokens of `g_j(x)·‖E_j(x)‖₂`), measured
        /// in the same pass with expert outputs captured.
        Reap => "reap",
        /// Each of `reap`, `soft-activation` and `frequency` is scored by the epoch selection's
        /// objective (the plan it starts at, with hard masks), and the run starts from the
        /// lowest. Without that objective (`ce-norm`, `--select-epoch last`): `reap`.
        Auto => "auto",
    }
);

named_enum!(
    /// The update rule.
    OptimizerKind {
        /// Adam (β1 0.9, β2 0.999, ε 1e-8).
        Adam => "adam",
        /// Plain gradient descent.
        Sgd => "sgd",
    }
);

/// The optimiser's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiepSettings {
    /// The relaxation.
    pub relaxation: RelaxationKind,
    /// The objective.
    pub objective: Objective,
    /// How the routed relaxation's threshold enters the gradient.
    pub threshold: ThresholdMode,
    /// λ of the `ce-norm` objective.
    pub lambda: f64,
    /// Fraction of routed experts removed; the routed relaxation's threshold keeps
    /// `Σ N − round(ratio·Σ N)` in expectation.
    pub ratio: f64,
    /// Passes over the calibration set.
    pub epochs: usize,
    /// Calibration sequences per step.
    pub batch_size: usize,
    /// Peak learning rate (cosine-decayed to 0 over all steps).
    pub lr: f64,
    /// The update rule.
    pub optimizer: OptimizerKind,
    /// Consecutive α steps (β frozen) in each alternation cycle.
    pub alpha_steps: usize,
    /// Consecutive β steps (α frozen) in each alternation cycle.
    pub beta_steps: usize,
    /// Temperature of the routed relaxation at the first step.
    pub tau_start: f64,
    /// Temperature at the last step (annealed geometrically).
    pub tau_end: f64,
    /// Seed of the per-epoch order of calibration sequences.
    pub seed: u64,
    /// Tokens per position kept of the original model's distribution for the `kl` objective
    /// (the rest is one "other" outcome; 0: the whole vocabulary, exact). See
    /// [`crate::reference`].
    #[serde(default = "default_top_k")]
    pub reference_top_k: usize,
    /// The allocation the plan will be cut with. The routed relaxation trains under the same
    /// budget: one threshold over all layers for `global`, one per layer (per routing group,
    /// for group-limited routers) for `uniform`, so the optimiser sees the per-layer counts that
    /// will be cut.
    #[serde(default = "default_allocation")]
    pub allocation: Allocation,
    /// How α starts (and, under a global allocation, β; see
    /// [`crate::optimise::initial_alpha`]). A statistics-based start's own plan is scored as
    /// "epoch 0" of the epoch selection. The `layer-wise` objective always starts at α = 0.
    #[serde(default = "default_alpha_init")]
    pub alpha_init: AlphaInit,
    /// The scale of a statistics-based α start.
    #[serde(default = "default_alpha_init_scale")]
    pub alpha_init_scale: f64,
    /// Minimum experts kept per layer (the floor is `max(num_experts_per_tok, min_experts)`).
    #[serde(default)]
    pub min_experts: usize,
    /// Score each epoch's plan — the experts its scores select under the allocation — by the
    /// `kl` objective with hard masks, and make the best epoch's plan the result (the relaxed
    /// optimum and the discrete plan can drift apart as τ anneals). Off: the last epoch's.
    #[serde(default = "default_select_epoch")]
    pub select_epoch: bool,
    /// Calibration sequences the epochs' plans are scored on (the first ones; 0: all).
    #[serde(default)]
    pub select_samples: usize,
    /// How clearly an epoch's plan must beat the best plan so far to replace it, in standard
    /// errors of their paired per-sequence difference: the candidate replaces the incumbent only
    /// if its mean `kl` is lower and `mean(d) / (sd(d)/√n) ≤ −margin`, where `d_i` is the
    /// difference of the two plans' `kl` on calibration sequence `i`. 0: any lower mean wins.
    /// A guard against choosing among many plans by differences the calibration sample cannot
    /// resolve (the start's statistics-based plan is the first incumbent).
    #[serde(default = "default_select_margin")]
    pub select_margin: f64,
    /// A plan whose mean `kl` is lower than the best plan so far by at least this fraction of
    /// it replaces that plan whatever the t statistic of [`DiepSettings::select_margin`]: a
    /// large gain concentrated in a few calibration sequences (one domain's) is a real gain, but
    /// those sequences' spread can keep its t above `−margin`. 0: only the margin decides.
    #[serde(default = "default_select_gain")]
    pub select_gain: f64,
    /// Early stopping: the run ends once this many epochs in a row have not replaced the
    /// selected plan (the schedules of `lr` and `τ` stay those of the whole run, so every epoch
    /// run is the same as in a run without stopping). 0 (the default): every epoch runs; on the
    /// fixture a late epoch's plan can follow five epochs without a better one. Only where
    /// epochs are selected by their plan (the `kl` objective with `select_epoch`); elsewhere
    /// every epoch runs.
    #[serde(default = "default_patience")]
    pub patience: usize,
    /// Concrete temperature `t` of sampled masks (routed relaxations): each step draws
    /// logistic noise per expert and the forward pass runs on `m = σ(((s − θ)/τ + L)/t)`
    /// instead of `p` ([`diep_relax::sampled_layer_options`]). 0: the deterministic relaxation.
    /// Only for the routed relaxations under the `kl` or `ce-norm` objective.
    #[serde(default)]
    pub mask_noise: f64,
}

fn default_patience() -> usize {
    DiepSettings::default().patience
}

fn default_select_margin() -> f64 {
    DiepSettings::default().select_margin
}

fn default_select_gain() -> f64 {
    DiepSettings::default().select_gain
}

fn default_select_epoch() -> bool {
    DiepSettings::default().select_epoch
}

/// States saved before `alpha_init` existed started at α = 0.
fn default_alpha_init() -> AlphaInit {
    AlphaInit::Zero
}

fn default_alpha_init_scale() -> f64 {
    1.0
}

fn default_allocation() -> Allocation {
    Allocation::Global
}

fn default_top_k() -> usize {
    DiepSettings::default().reference_top_k
}

impl Default for DiepSettings {
    fn default() -> Self {
        DiepSettings {
            relaxation: RelaxationKind::RoutedGated,
            objective: Objective::Kl,
            threshold: ThresholdMode::Implicit,
            lambda: 0.01,
            ratio: 0.5,
            epochs: 10,
            batch_size: 16,
            lr: 0.02,
            optimizer: OptimizerKind::Adam,
            alpha_steps: 3,
            beta_steps: 1,
            tau_start: 0.1,
            tau_end: 0.01,
            seed: 0,
            reference_top_k: 64,
            allocation: Allocation::Global,
            alpha_init: AlphaInit::Auto,
            alpha_init_scale: 0.5,
            min_experts: 0,
            select_epoch: true,
            select_samples: 0,
            select_margin: 2.0,
            select_gain: 0.1,
            patience: 0,
            mask_noise: 0.0,
        }
    }
}

impl DiepSettings {
    /// The paper's settings: the `ce-norm` objective, peak learning rate 5e-3 and α = 0 at the
    /// start (the rest as [`Default`]).
    pub fn paper() -> Self {
        DiepSettings {
            objective: Objective::CeNorm,
            lr: 5e-3,
            alpha_init: AlphaInit::Zero,
            alpha_init_scale: 1.0,
            ..Default::default()
        }
    }

    /// Checks ranges; the message names the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |v: f64, name: &str| {
            if v.is_finite() && v > 0.0 { Ok(()) } else { Err(format!("{name} must be a positive number, got {v}")) }
        };
        if !(self.ratio > 0.0 && self.ratio < 1.0) {
            return Err(format!("ratio must be strictly between 0 and 1, got {}", self.ratio));
        }
        if self.epochs == 0 {
            return Err("epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return Err("batch size must be at least 1".into());
        }
        if self.alpha_steps + self.beta_steps == 0 {
            return Err("the α:β alternation needs at least one step".into());
        }
        positive(self.lr, "lr")?;
        positive(self.tau_start, "tau_start")?;
        positive(self.tau_end, "tau_end")?;
        if !(self.alpha_init_scale.is_finite() && self.alpha_init_scale >= 0.0) {
            return Err(format!("alpha_init_scale must be a non-negative number, got {}", self.alpha_init_scale));
        }
        if !(self.select_margin.is_finite() && self.select_margin >= 0.0) {
            return Err(format!("select_margin must be a non-negative number, got {}", self.select_margin));
        }
        if !(self.select_gain.is_finite() && (0.0..1.0).contains(&self.select_gain)) {
            return Err(format!("select_gain must be at least 0 and below 1, got {}", self.select_gain));
        }
        if !(self.mask_noise.is_finite() && self.mask_noise >= 0.0) {
            return Err(format!("mask_noise must be a non-negative number, got {}", self.mask_noise));
        }
        if self.mask_noise > 0.0 && (self.relaxation == RelaxationKind::Paper || self.objective == Objective::LayerWise)
        {
            return Err(format!(
                "mask_noise samples the keep masks of the routed relaxations under the kl or ce-norm objective; \
                 it has no effect with relaxation {} and objective {}",
                self.relaxation, self.objective
            ));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(format!("lambda must be a non-negative number, got {}", self.lambda));
        }
        Ok(())
    }

    /// Whether a run in `state` stops before its next epoch: `patience` epochs have passed
    /// since the selected plan's epoch (the start's plan is epoch 0).
    pub fn stops_early(&self, state: &crate::DiepState) -> bool {
        let Some(best) = &state.best else { return false };
        self.patience > 0 && state.epochs_done.saturating_sub(best.epoch) >= self.patience
    }

    /// Learning rate at `step` of `total`: `lr · ½(1 + cos(π·step/total))`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let t = step as f64 / total.max(1) as f64;
        self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// Temperature at `step` of `total`: geometric from `tau_start` to `tau_end`.
    pub fn tau_at(&self, step: usize, total: usize) -> f64 {
        let t = if total <= 1 { 1.0 } else { step as f64 / (total - 1) as f64 };
        self.tau_start * (self.tau_end / self.tau_start).powf(t)
    }

    /// Whether `step` updates α (else β): cycles of `alpha_steps` α steps then `beta_steps`
    /// β steps. Under a uniform allocation the routed relaxations have one threshold per layer,
    /// which absorbs any change of `log β_l` (every score of the layer moves with it), so β has
    /// no effect and every step updates α.
    pub fn is_alpha_step(&self, step: usize) -> bool {
        if self.allocation == Allocation::Uniform && self.relaxation != RelaxationKind::Paper {
            return true;
        }
        step % (self.alpha_steps + self.beta_steps) < self.alpha_steps
    }
}
