//! Training support for small models the project builds itself (`cargo xtask fixture train`),
//! on the same [`MoeModel`] the rest of the toolkit evaluates, so a model trained here is exactly
//! the model that is later pruned and scored:
//!
//! - [`random_model`]: a model with freshly initialised weights (normal `N(0, std²)` for every
//!   projection and the embeddings, ones for RMSNorm weights, zeros for biases), drawn from a
//!   [`SplitMix64`] stream per tensor, so the initialisation depends only on the seed and the
//!   tensor's name; built with [`MoeModel::from_fn`];
//! - [`require_grad`] / [`num_parameters`] over [`MoeModel::parameters_mut`], every trainable
//!   tensor by name;
//! - [`save_safetensors`] of [`MoeModel::to_hf_tensors`]: the weights in the HuggingFace
//!   on-disk layout, which [`MoeModel::load`] reads back to the identical model;
//! - [`training_loss`]: next-token cross-entropy plus Mixtral's load-balancing auxiliary loss;
//! - [`AdamW`]: decoupled weight decay Adam over those parameters (burn's optimisers need the
//!   `Module` derive, which the model's structs deliberately do not have).
//!
//! Gradients need a model on an autodiff device (`device.autodiff()`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail, ensure};
use diep_models::burn::tensor::activation::log_softmax;
use diep_models::burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use diep_models::checkpoint::{Architecture, ModelConfig};
use diep_models::{HfTensor, MoeForwardOptions, MoeModel, Param, ParamMut};

pub use diep_common::{SplitMix64, fnv1a64};

/// How [`random_model`] initialises weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InitOptions {
    /// Seed of every tensor's random stream.
    pub seed: u64,
    /// Standard deviation of projections and embeddings (transformers' `initializer_range`).
    pub std: f64,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { seed: 0, std: 0.02 }
    }
}

/// The embeddings are drawn in their on-disk layout; every other matrix is drawn in the `[in,
/// out]` layout the model computes with and transposed to the on-disk `[out, in]`.
const EMBEDDINGS: &str = "model.embed_tokens.weight";

/// The initial value of one HF tensor: zeros for biases, ones for the other vectors (RMSNorm
/// weights), `N(0, std²)` from the stream named after the tensor for matrices.
fn init_tensor(opts: InitOptions, name: &str, shape: &[usize]) -> Vec<f32> {
    match *shape {
        [n] if name.ends_with(".bias") => vec![0.0; n],
        [n] => vec![1.0; n],
        [rows, cols] => {
            let mut g = SplitMix64::for_stream(opts.seed, name);
            let draw: Vec<f32> = (0..rows * cols).map(|_| (g.normal() * opts.std) as f32).collect();
            if name == EMBEDDINGS {
                return draw;
            }
            // `draw` is `[cols, rows]` (in, out): transpose to `[rows, cols]`.
            let mut t = vec![0f32; rows * cols];
            for i in 0..cols {
                for o in 0..rows {
                    t[o * cols + i] = draw[i * rows + o];
                }
            }
            t
        }
        _ => unreachable!("random_model refuses configs with tensors of rank 3 (gpt-oss experts)"),
    }
}

/// A model with randomly initialised weights for `config` (see [`InitOptions`]); the device
/// decides whether it can be trained (`device.autodiff()`).
///
/// With `tie_word_embeddings` the head starts as the transposed embeddings, but the two are
/// separate tensors afterwards: training keeps them tied only if the caller does.
pub fn random_model(config: ModelConfig, opts: InitOptions, device: &Device) -> Result<MoeModel> {
    let c = &config;
    ensure!(c.layers.len() == c.num_layers, "config has {} layer kinds for {} layers", c.layers.len(), c.num_layers);
    if c.architecture == Architecture::GptOss {
        bail!("random initialisation of `gpt_oss` (fused experts, attention sinks) is not supported");
    }
    if c.attention.mla.is_some() {
        bail!(
            "random initialisation of `{}` (multi-head latent attention) is not supported",
            c.architecture.model_type()
        );
    }
    Ok(MoeModel::from_fn(config, device, |name, shape| init_tensor(opts, name, shape))?)
}

/// Marks every parameter as requiring gradients. The model must live on an autodiff device
/// (`device.autodiff()`); panics otherwise.
pub fn require_grad(model: &mut MoeModel) {
    for p in model.parameters_mut() {
        match p.tensor {
            ParamMut::Vector(t) => *t = t.clone().require_grad(),
            ParamMut::Matrix(t) => *t = t.clone().require_grad(),
        }
    }
}

/// Number of trainable values (as [`MoeModel::parameters_mut`] lists them).
pub fn num_parameters(model: &mut MoeModel) -> usize {
    model.parameters_mut().iter().map(|p| p.tensor.numel()).sum()
}

/// Writes tensors to one safetensors file in f32, with transformers' `{"format": "pt"}`
/// metadata. The file is written in place; write to a temporary path and rename for atomicity.
pub fn save_safetensors(tensors: &[HfTensor], path: impl AsRef<Path>) -> std::io::Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| std::io::Error::other(format!("tensor {}: {e}", t.name)))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path.as_ref()).map_err(std::io::Error::other)
}

/// The parts of [`training_loss`].
#[derive(Debug, Clone)]
pub struct TrainingLoss {
    /// `lm + aux_coef · aux`, what is differentiated, `[1]`.
    pub total: Tensor<1>,
    /// Mean next-token cross-entropy (nats), `[1]`.
    pub lm: Tensor<1>,
    /// Load-balancing loss averaged over MoE layers (`top_k` when perfectly balanced), `[1]`.
    pub aux: Tensor<1>,
    /// Per MoE layer (in layer order), how many top-k slots each expert received.
    // Training reads the losses only; the tests check the counts.
    #[cfg_attr(not(test), allow(dead_code))]
    pub expert_counts: Vec<Vec<usize>>,
}

/// Next-token cross-entropy over a batch of equal-length sequences (every position but the
/// last predicts the next token) plus `aux_coef` times Mixtral's load-balancing loss.
///
/// The auxiliary loss of one MoE layer over its `n` tokens is `E · Σ_e f_e · P_e`, with `f_e`
/// the fraction of tokens whose top-k includes expert `e` (no gradient) and `P_e` the mean
/// router probability of `e`; it is `top_k` when routing is uniform. It is computed per layer
/// and averaged over layers (transformers' `load_balancing_loss_func` pools the tokens of all
/// layers before the product, which only balances the layers' aggregate).
pub fn training_loss(model: &MoeModel, ids: &[Vec<u32>], aux_coef: f64) -> Result<TrainingLoss> {
    let mut aux_terms: Vec<Tensor<1>> = Vec::new();
    let mut expert_counts = Vec::new();
    let logits = model.forward_with(ids, &MoeForwardOptions::default(), |_, _, out| {
        let probs = out.routing.probs;
        let [n, e] = probs.dims();
        let mut counts = vec![0usize; e];
        for s in out.routing.experts.into_data().iter::<i64>() {
            counts[s as usize] += 1;
        }
        let f: Vec<f32> = counts.iter().map(|&c| c as f32 / n as f32).collect();
        let f = Tensor::<1>::from_data(TensorData::new(f, [e]), &probs.device());
        let p_mean = probs.mean_dim(0).reshape([e]);
        aux_terms.push((p_mean * f).sum() * e as f64);
        expert_counts.push(counts);
    })?;
    let [b, t, _] = logits.dims();
    ensure!(t >= 2, "training sequences need at least two tokens");
    let logp = log_softmax(logits.narrow(1, 0, t - 1), 2);
    let targets: Vec<i64> = ids.iter().flat_map(|s| s[1..].iter().map(|x| *x as i64)).collect();
    let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [b, t - 1, 1]), &logp.device());
    let lm = logp.gather(2, targets).mean().neg().reshape([1]);
    let aux = match aux_terms.len() {
        0 => Tensor::zeros([1], model.device()),
        n => Tensor::cat(aux_terms, 0).sum().reshape([1]) / n as f64,
    };
    let total = if aux_coef == 0.0 { lm.clone() } else { lm.clone() + aux.clone() * aux_coef };
    Ok(TrainingLoss { total, lm, aux, expert_counts })
}

/// Hyper-parameters of [`AdamW`] (the learning rate is given per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to `sqrt(v̂)`.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms and biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// One AdamW update (PyTorch's `torch.optim.AdamW` arithmetic) of a tensor without autodiff:
/// `p ← p·(1 − lr·wd)`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `p ← p − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + ε)`, with `t ≥ 1` the step number.
/// Returns the new `(p, m, v)`.
pub fn adamw_update<const D: usize>(
    p: Tensor<D>,
    g: Tensor<D>,
    m: Tensor<D>,
    v: Tensor<D>,
    step: u64,
    lr: f64,
    weight_decay: f64,
    cfg: &AdamWConfig,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let t = step.max(1) as i32;
    let p = if weight_decay != 0.0 { p * (1.0 - lr * weight_decay) } else { p };
    let m = m * cfg.beta1 + g.clone() * (1.0 - cfg.beta1);
    let v = v * cfg.beta2 + g.square() * (1.0 - cfg.beta2);
    let bc1 = 1.0 - cfg.beta1.powi(t);
    let bc2 = 1.0 - cfg.beta2.powi(t);
    let update = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + cfg.eps);
    (p - update * lr, m, v)
}

/// First and second moments of one parameter.
#[derive(Debug, Clone)]
enum Moments {
    Vector(Tensor<1>, Tensor<1>),
    Matrix(Tensor<2>, Tensor<2>),
}

/// AdamW over a model's [`MoeModel::parameters_mut`]; the moments live on the inner
/// (non-autodiff) device.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    step: u64,
    moments: Vec<Option<Moments>>,
}

impl AdamW {
    /// A fresh optimiser (step 0, zero moments).
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, step: 0, moments: Vec::new() }
    }

    /// Updates taken so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn steps(&self) -> u64 {
        self.step
    }
}

/// The global L2 norm of the gradients of `params` (missing gradients count as zero).
pub fn grad_norm(params: &[Param<'_>], grads: &Gradients) -> f64 {
    let mut total: Option<Tensor<1>> = None;
    for p in params {
        let sq = match &p.tensor {
            ParamMut::Vector(t) => t.grad(grads).map(|g| g.square().sum()),
            ParamMut::Matrix(t) => t.grad(grads).map(|g| g.square().sum()),
        };
        if let Some(sq) = sq {
            total = Some(match total {
                Some(acc) => acc + sq,
                None => sq,
            });
        }
    }
    total.map(|t| t.into_data().iter::<f32>().next().unwrap_or(0.0) as f64).unwrap_or(0.0).sqrt()
}

impl AdamW {
    /// One update of every parameter with a gradient in `grads`, each gradient multiplied
    /// by `grad_scale` first (for clipping: `min(1, max_norm / grad_norm)`). Parameters
    /// without a gradient (e.g. an expert no token was routed to) keep their value and
    /// moments. `params` must list the same tensors in the same order at every call; the
    /// updated tensors are fresh autodiff leaves that require gradients.
    pub fn step(&mut self, params: Vec<Param<'_>>, grads: &Gradients, lr: f64, grad_scale: f64) {
        self.step += 1;
        if self.moments.len() < params.len() {
            self.moments.resize(params.len(), None);
        }
        let cfg = self.config;
        for (i, p) in params.into_iter().enumerate() {
            match p.tensor {
                ParamMut::Vector(t) => {
                    let Some(g) = t.grad(grads) else { continue };
                    let g = if grad_scale != 1.0 { g * grad_scale } else { g };
                    let (m, v) = match self.moments[i].take() {
                        Some(Moments::Vector(m, v)) => (m, v),
                        _ => (g.zeros_like(), g.zeros_like()),
                    };
                    let (np, m, v) = adamw_update(t.clone().inner(), g, m, v, self.step, lr, 0.0, &cfg);
                    *t = np.autodiff().require_grad();
                    self.moments[i] = Some(Moments::Vector(m, v));
                }
                ParamMut::Matrix(t) => {
                    let Some(g) = t.grad(grads) else { continue };
                    let g = if grad_scale != 1.0 { g * grad_scale } else { g };
                    let (m, v) = match self.moments[i].take() {
                        Some(Moments::Matrix(m, v)) => (m, v),
                        _ => (g.zeros_like(), g.zeros_like()),
                    };
                    let wd = cfg.weight_decay;
                    let (np, m, v) = adamw_update(t.clone().inner(), g, m, v, self.step, lr, wd, &cfg);
                    *t = np.autodiff().require_grad();
                    self.moments[i] = Some(Moments::Matrix(m, v));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use diep_models::DeviceSpec;
    use diep_models::checkpoint::Checkpoint;

    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
    }

    fn tiny() -> PathBuf {
        fixtures().join("models/tiny-mixtral")
    }

    fn ids() -> Vec<Vec<u32>> {
        let text = std::fs::read_to_string(fixtures().join("parity/tiny-mixtral/ids.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn device() -> Device {
        DeviceSpec::from_test_env().unwrap().device().unwrap()
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    /// Loading a checkpoint and exporting it gives back every tensor bit for bit.
    #[test]
    fn export_is_the_inverse_of_load() {
        let model = MoeModel::load(tiny(), &device()).unwrap();
        let ckpt = Checkpoint::open(tiny()).unwrap();
        let exported = model.to_hf_tensors();
        let mut names: Vec<&str> = exported.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        let mut on_disk: Vec<&str> = ckpt.names().collect();
        on_disk.sort_unstable();
        assert_eq!(names, on_disk);
        for t in &exported {
            let disk = ckpt.get(&t.name).unwrap();
            assert_eq!(disk.shape, t.shape.as_slice(), "{}", t.name);
            assert!(disk.to_f32().unwrap() == t.data, "{} differs", t.name);
        }
    }

    /// A random model has the names and shapes of a real checkpoint of the same config, and its
    /// exported checkpoint loads back to the identical model (same logits, bit for bit).
    #[test]
    fn random_model_round_trips_through_safetensors() {
        let config = ModelConfig::from_dir(tiny()).unwrap();
        let device = device();
        let model = random_model(config.clone(), InitOptions { seed: 3, std: 0.2 }, &device).unwrap();
        let exported = model.to_hf_tensors();
        let ckpt = Checkpoint::open(tiny()).unwrap();
        for t in &exported {
            assert_eq!(ckpt.get(&t.name).unwrap().shape, t.shape.as_slice(), "{}", t.name);
        }
        assert_eq!(exported.len(), ckpt.names().count());

        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(tiny().join("config.json"), dir.path().join("config.json")).unwrap();
        save_safetensors(&exported, dir.path().join("model.safetensors")).unwrap();
        let reloaded = MoeModel::load(dir.path(), &device).unwrap();
        let a = values(model.forward(&ids()).unwrap());
        let b = values(reloaded.forward(&ids()).unwrap());
        assert!(a == b, "logits of the reloaded model differ");
        assert!(a.iter().any(|x| x.abs() > 1e-3), "a random model should not be all zeros");

        // The same seed gives the same weights; another seed does not.
        let again = random_model(config.clone(), InitOptions { seed: 3, std: 0.2 }, &device).unwrap();
        assert!(again.to_hf_tensors() == exported);
        let other = random_model(config, InitOptions { seed: 4, std: 0.2 }, &device).unwrap();
        assert!(other.to_hf_tensors() != exported);
    }

    /// Two AdamW steps on a scalar, against the formulas evaluated by hand in f64.
    #[test]
    fn adamw_matches_the_hand_computed_update() {
        let device = device();
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let (lr, wd) = (0.01, 0.1);
        let s = |x: f64| Tensor::<1>::from_data(TensorData::new(vec![x as f32], [1]), &device);
        let (mut p, mut m, mut v) = (s(0.5), s(0.0), s(0.0));
        let (mut hp, mut hm, mut hv) = (0.5f64, 0.0f64, 0.0f64);
        for (step, g) in [(1u64, 0.2f64), (2, -0.3)] {
            (p, m, v) = adamw_update(p, s(g), m, v, step, lr, wd, &cfg);
            hp *= 1.0 - lr * wd;
            hm = 0.9 * hm + 0.1 * g;
            hv = 0.95 * hv + 0.05 * g * g;
            let (mh, vh) = (hm / (1.0 - 0.9f64.powi(step as i32)), hv / (1.0 - 0.95f64.powi(step as i32)));
            hp -= lr * mh / (vh.sqrt() + 1e-8);
            let got = values(p.clone())[0] as f64;
            assert!((got - hp).abs() < 1e-6, "step {step}: {got} vs {hp}");
        }
        // After step 1 the update is lr·sign(g) (bias-corrected Adam), plus the decay.
        let (p1, _, _) = adamw_update(s(0.5), s(0.2), s(0.0), s(0.0), 1, lr, 0.0, &cfg);
        assert!((values(p1)[0] as f64 - (0.5 - lr)).abs() < 1e-6);
    }

    fn scalar(t: Tensor<1>) -> f64 {
        values(t)[0] as f64
    }

    /// The auxiliary loss is `E · Σ_e f_e · P_e` per layer, averaged over layers.
    #[test]
    fn load_balancing_loss_follows_its_formula() {
        let model = MoeModel::load(tiny(), &device()).unwrap();
        let ids = ids();
        let loss = training_loss(&model, &ids, 0.5).unwrap();
        let mut per_layer = Vec::new();
        model
            .forward_with(&ids, &MoeForwardOptions::default(), |_, _, out| {
                let [n, e] = out.routing.probs.dims();
                let probs = values(out.routing.probs);
                let mut f = vec![0f64; e];
                for x in out.routing.experts.into_data().iter::<i64>() {
                    f[x as usize] += 1.0 / n as f64;
                }
                let p: Vec<f64> =
                    (0..e).map(|j| (0..n).map(|t| probs[t * e + j] as f64).sum::<f64>() / n as f64).collect();
                per_layer.push(e as f64 * (0..e).map(|j| f[j] * p[j]).sum::<f64>());
            })
            .unwrap();
        let expected = per_layer.iter().sum::<f64>() / per_layer.len() as f64;
        let (aux, lm, total) = (scalar(loss.aux), scalar(loss.lm), scalar(loss.total));
        assert!((aux - expected).abs() < 1e-5, "{aux} vs {expected}");
        assert!((total - (lm + 0.5 * aux)).abs() < 1e-5);
        assert_eq!(loss.expert_counts.len(), 2);
        let slots: usize = loss.expert_counts[0].iter().sum();
        assert_eq!(slots, ids.len() * ids[0].len() * 2);
    }

    /// One AdamW step on the tiny fixture lowers the training loss, touches every parameter
    /// that got a gradient, and the updated tensors still require gradients.
    #[test]
    fn one_adamw_step_lowers_the_loss() {
        let device = device().autodiff();
        let mut model = MoeModel::load(tiny(), &device).unwrap();
        require_grad(&mut model);
        let before = model.to_hf_tensors();
        let ids = ids();
        let loss = training_loss(&model, &ids, 0.01).unwrap();
        let l0 = scalar(loss.total.clone());
        let grads = loss.total.backward();
        let params = model.parameters_mut();
        assert_eq!(params.len(), 1 + 2 * (1 + 4 + 1 + 1 + 8 * 2) + 2);
        let norm = grad_norm(&params, &grads);
        assert!(norm.is_finite() && norm > 0.0);
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(params, &grads, 1e-3, 1.0);
        assert_eq!(opt.steps(), 1);
        let after = model.to_hf_tensors();
        let changed = before.iter().zip(&after).filter(|(a, b)| a.data != b.data).count();
        assert!(changed * 10 >= before.len() * 9, "only {changed} of {} tensors changed", before.len());
        let loss = training_loss(&model, &ids, 0.01).unwrap();
        let l1 = scalar(loss.total.clone());
        assert!(l1 < l0, "loss went from {l0} to {l1}");
        // The updated parameters are leaves that take part in the next backward pass.
        let grads = loss.total.backward();
        assert!(model.lm_head().weight().grad(&grads).is_some());
    }
}
