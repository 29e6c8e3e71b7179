//! The optimiser's resumable state: α, β, the update rule's moments, the loss curve. Saved
//! as JSON after every epoch (numbers round-trip exactly), so `--resume` continues the same
//! run bit for bit.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use diep_relax::LayerParams;
use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};
use crate::settings::{DiepSettings, OptimizerKind};

/// The format tag of a state file.
pub const STATE_FORMAT: &str = "diep-optim-state/1";

/// Moments of one parameter vector under Adam (unused by SGD).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// First moment.
    pub m: Vec<f64>,
    /// Second moment.
    pub v: Vec<f64>,
    /// Updates applied so far (for bias correction).
    pub t: u64,
}

impl Moments {
    fn new(n: usize) -> Self {
        Moments { m: vec![0.0; n], v: vec![0.0; n], t: 0 }
    }

    /// Applies one update to `params` with gradient `grad`.
    pub fn update(&mut self, kind: OptimizerKind, params: &mut [f32], grad: &[f32], lr: f64) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        const EPS: f64 = 1e-8;
        self.t += 1;
        match kind {
            OptimizerKind::Sgd => {
                for (p, g) in params.iter_mut().zip(grad) {
                    *p = (*p as f64 - lr * *g as f64) as f32;
                }
            }
            OptimizerKind::Adam => {
                let (c1, c2) = (1.0 - B1.powi(self.t as i32), 1.0 - B2.powi(self.t as i32));
                for i in 0..params.len() {
                    let g = grad[i] as f64;
                    self.m[i] = B1 * self.m[i] + (1.0 - B1) * g;
                    self.v[i] = B2 * self.v[i] + (1.0 - B2) * g * g;
                    let step = lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + EPS);
                    params[i] = (params[i] as f64 - step) as f32;
                }
            }
        }
    }
}

/// α, β and their moments for one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerState {
    /// `α_l`.
    pub alpha: Vec<f32>,
    /// `log β_l`.
    pub log_beta: f32,
    /// Moments of α.
    pub alpha_moments: Moments,
    /// Moments of `log β`.
    pub beta_moments: Moments,
}

impl LayerState {
    /// α = 0, β = 1.
    pub fn init(num_experts: usize) -> Self {
        LayerState {
            alpha: vec![0.0; num_experts],
            log_beta: 0.0,
            alpha_moments: Moments::new(num_experts),
            beta_moments: Moments::new(1),
        }
    }

    /// β.
    pub fn beta(&self) -> f64 {
        (self.log_beta as f64).exp()
    }

    /// The layer's parameters as tensors; `grad_alpha` / `grad_beta` choose which ones are
    /// tracked by autodiff.
    pub fn params(&self, device: &Device, grad_alpha: bool, grad_beta: bool) -> LayerParams {
        let n = self.alpha.len();
        let alpha = Tensor::from_data(TensorData::new(self.alpha.clone(), [n]), device);
        let log_beta = Tensor::from_data(TensorData::new(vec![self.log_beta], [1]), device);
        LayerParams {
            alpha: if grad_alpha { alpha.require_grad() } else { alpha },
            log_beta: if grad_beta { log_beta.require_grad() } else { log_beta },
        }
    }
}

/// One epoch of the loss curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean objective over the epoch's steps.
    pub loss: f64,
    /// Mean cross-entropy part (`ce-norm`), or 0.
    pub ce: f64,
    /// Mean regulariser / divergence / reconstruction part.
    pub reg: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
    /// Temperature at the epoch's last step (routed relaxation).
    pub tau: f64,
    /// Wall time of the epoch.
    pub seconds: f64,
    /// The calibration objective of the plan the epoch's scores select (hard masks), where it
    /// was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discrete: Option<f64>,
}

/// The epoch whose discretised plan scored best on the calibration objective, and its α/β.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestEpoch {
    /// 1-based epoch; 0 for a statistics-based start that no epoch improved on.
    pub epoch: usize,
    /// Its plan's calibration objective.
    pub discrete: f64,
    /// `(α_l, log β_l)` per MoE layer after that epoch.
    pub params: BTreeMap<usize, (Vec<f32>, f32)>,
    /// Its plan's objective on each scored calibration sequence (empty in states saved before
    /// the selection compared plans sequence by sequence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_sequence: Vec<f64>,
}

impl BestEpoch {
    /// `state`'s α/β as the plan of `epoch` (0: the warm start), scored `score`.
    pub fn of(state: &DiepState, epoch: usize, score: &PlanScore) -> Self {
        BestEpoch {
            epoch,
            discrete: score.loss,
            params: state.layers.iter().map(|(l, s)| (*l, (s.alpha.clone(), s.log_beta))).collect(),
            per_sequence: score.per_sequence.clone(),
        }
    }

    /// Whether a plan scored `candidate` replaces this one under a selection margin of
    /// `margin` standard errors ([`crate::DiepSettings::select_margin`]) and a selection gain of
    /// `gain` ([`crate::DiepSettings::select_gain`]): its mean must be lower, and either lower by
    /// at least the fraction `gain` of this plan's mean (`gain > 0`), or, when both plans were
    /// scored on the same sequences, with the paired differences' t statistic at most `−margin`.
    pub fn is_beaten_by(&self, candidate: &PlanScore, margin: f64, gain: f64) -> bool {
        clearly_better(
            candidate,
            &PlanScore { loss: self.discrete, per_sequence: self.per_sequence.clone() },
            margin,
            gain,
        )
    }
}

/// Whether a plan scored `candidate` is clearly better than one scored `current`, the rule of
/// the epoch selection ([`BestEpoch::is_beaten_by`]) and of the refinement's acceptance: its mean
/// must be lower, and either lower by at least the fraction `gain` of `current`'s mean
/// (`gain > 0`), or, when both were scored on the same sequences, with the paired differences' t
/// statistic at most `−margin` (`margin = 0`: any lower mean).
pub fn clearly_better(candidate: &PlanScore, current: &PlanScore, margin: f64, gain: f64) -> bool {
    if candidate.loss.total_cmp(&current.loss).is_ge() {
        return false;
    }
    if gain > 0.0 && candidate.loss <= (1.0 - gain) * current.loss {
        return true;
    }
    let (a, b) = (&candidate.per_sequence, &current.per_sequence);
    if margin == 0.0 || a.len() != b.len() || a.len() < 2 {
        return true;
    }
    paired_t(a, b).is_none_or(|t| t <= -margin)
}

/// A discrete plan's calibration objective: the mean, and its value on each scored sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanScore {
    /// Mean `kl` per position.
    pub loss: f64,
    /// Mean `kl` per position of each sequence.
    pub per_sequence: Vec<f64>,
}

/// The t statistic `mean(d) / (sd(d)/√n)` of the paired differences `d_i = a_i − b_i`
/// (sample standard deviation); `None` when every difference is equal (no spread).
pub fn paired_t(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len().min(b.len());
    if n < 2 {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (var > 0.0).then(|| mean / (var / n as f64).sqrt())
}

/// Everything needed to continue an optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiepState {
    /// Always [`STATE_FORMAT`].
    pub format: String,
    /// The settings the run started with; a resume must use the same.
    pub settings: DiepSettings,
    /// Fingerprint of the calibration token ids; a resume must use the same data.
    pub calibration: String,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Steps completed.
    pub steps_done: usize,
    /// Per MoE layer.
    pub layers: BTreeMap<usize, LayerState>,
    /// The loss curve so far.
    pub history: Vec<EpochRecord>,
    /// The epoch whose plan scored best so far, when epochs are selected by their plan
    /// ([`crate::DiepSettings::select_epoch`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestEpoch>,
    /// The statistic α started from (`None`: α = 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_start: Option<crate::settings::AlphaInit>,
}

impl DiepState {
    /// A fresh state for the given experts per MoE layer.
    pub fn new(settings: DiepSettings, calibration: String, experts: &BTreeMap<usize, usize>) -> Self {
        DiepState {
            format: STATE_FORMAT.into(),
            settings,
            calibration,
            epochs_done: 0,
            steps_done: 0,
            layers: experts.iter().map(|(l, n)| (*l, LayerState::init(*n))).collect(),
            history: Vec::new(),
            best: None,
            warm_start: None,
        }
    }

    /// Reads a state file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| OptimError::io(path, e))?;
        let state: DiepState = serde_json::from_str(&text)
            .map_err(|e| OptimError::State(format!("{}: not a DiEP optimiser state: {e}", path.display())))?;
        if state.format != STATE_FORMAT {
            return Err(OptimError::State(format!(
                "{}: field `format` is `{}`, expected `{STATE_FORMAT}`",
                path.display(),
                state.format
            )));
        }
        Ok(state)
    }

    /// Writes the state atomically (a temporary file beside `path`, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).expect("state serialises");
        diep_common::write_atomic(path, text.as_bytes()).map_err(|e| OptimError::io(path, e))
    }

    /// The state whose α/β the plan is made from: the best epoch's where one was selected,
    /// else this one.
    pub fn for_plan(&self) -> DiepState {
        let mut st = self.clone();
        if let Some(best) = &self.best {
            for (l, (alpha, log_beta)) in &best.params {
                if let Some(layer) = st.layers.get_mut(l) {
                    layer.alpha = alpha.clone();
                    layer.log_beta = *log_beta;
                }
            }
        }
        st
    }

    /// The parameters as (untracked) tensors.
    pub fn params(&self, device: &Device) -> BTreeMap<usize, LayerParams> {
        self.layers.iter().map(|(l, s)| (*l, s.params(device, false, false))).collect()
    }

    /// Checks that `other` (a state read for `--resume`) belongs to the same run as this
    /// fresh state: same settings, calibration data and layers.
    pub fn check_resumable(&self, other: &DiepState) -> Result<()> {
        if other.settings != self.settings {
            let a = serde_json::to_value(&self.settings).expect("settings serialise");
            let b = serde_json::to_value(&other.settings).expect("settings serialise");
            let fields: Vec<String> = a
                .as_object()
                .expect("object")
                .iter()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k} (saved {}, now {v})", b.get(k.as_str()).cloned().unwrap_or_default()))
                .collect();
            return Err(OptimError::State(format!(
                "the saved state was made with other settings: {}",
                fields.join(", ")
            )));
        }
        if other.calibration != self.calibration {
            return Err(OptimError::State(
                "the saved state was made on other calibration data (token fingerprint differs)".into(),
            ));
        }
        let shape = |s: &DiepState| s.layers.iter().map(|(l, x)| (*l, x.alpha.len())).collect::<Vec<_>>();
        if shape(other) != shape(self) {
            return Err(OptimError::State(format!(
                "the saved state has MoE layers/experts {:?}, the model has {:?}",
                shape(other),
                shape(self)
            )));
        }
        Ok(())
    }
}

/// A stable fingerprint of token-id sequences (FNV-1a 64 over lengths and ids, each as 8
/// little-endian bytes).
pub fn fingerprint(ids: &[Vec<u32>]) -> String {
    let mut h = diep_common::Fnv1a::new();
    h.write_u64(ids.len() as u64);
    for s in ids {
        h.write_u64(s.len() as u64);
        for &t in s {
            h.write_u64(u64::from(t));
        }
    }
    format!("fnv1a64:{:016x}", h.finish())
}
