//! Applying a plan: checks, the output tensor list, streaming shard writes, atomic commit.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value, json};

use diep_checkpoint::architectures::{FusedExpertKeys, MoeKeys, MoeTensor};
use diep_checkpoint::{Checkpoint, Dtype, ModelConfig, PER_LAYER_EXPERTS_KEY, SHARD_INDEX, SINGLE_FILE, TensorRef};

use crate::config_edit::{
    REMOTE_CODE_FILES, expert_count_keys, kept_counts_per_layer, pruned_config, remote_code_auto_map,
};
use crate::error::SurgeryError;
use diep_common::{Staging, StaleStaging, remove_stale_staging};
use diep_plan::{PLAN_FILE, PlanError, PruningPlan};

/// transformers' default `max_shard_size="5GB"` (5·10⁹ bytes of tensor data per shard).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// How [`apply_plan`] writes its output.
#[derive(Clone, Copy)]
pub struct SurgeryOptions<'a> {
    /// Replace an existing output directory (it is removed just before the new one is moved in).
    pub force: bool,
    /// Tensor bytes per shard; output above this is split into
    /// `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`.
    pub max_shard_bytes: u64,
    /// Called after each tensor (and each 64 MiB of a large tensor) is written.
    pub progress: Option<&'a dyn Fn(SurgeryProgress)>,
}

impl Default for SurgeryOptions<'_> {
    fn default() -> Self {
        SurgeryOptions { force: false, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES, progress: None }
    }
}

impl std::fmt::Debug for SurgeryOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SurgeryOptions")
            .field("force", &self.force)
            .field("max_shard_bytes", &self.max_shard_bytes)
            .field("progress", &self.progress.map(|_| "<callback>"))
            .finish()
    }
}

/// Progress of the tensor writes, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SurgeryProgress {
    /// Tensor bytes written so far.
    pub bytes_written: u64,
    /// Tensor bytes to write in all.
    pub total_bytes: u64,
    /// Tensors completely written so far.
    pub tensors_written: usize,
    /// Tensors to write in all.
    pub total_tensors: usize,
    /// The shard being written (1-based).
    pub shard: usize,
    /// Shards in all.
    pub shards: usize,
}

/// What [`apply_plan`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct SurgeryReport {
    /// The output directory.
    pub out_dir: PathBuf,
    /// Routed experts per MoE layer before pruning.
    pub experts_before: BTreeMap<usize, usize>,
    /// Kept experts per MoE layer (original ids, ascending; they are experts `0..len` now).
    pub kept_experts: BTreeMap<usize, Vec<usize>>,
    /// Whether every MoE layer keeps the same number of experts (else the output carries
    /// `num_experts_per_layer` and remote code).
    pub uniform: bool,
    /// Parameters (elements over all tensors) of the input.
    pub params_before: u64,
    /// Parameters (elements over all tensors) of the output.
    pub params_after: u64,
    /// Tensors written.
    pub tensors_written: usize,
    /// Tensor data bytes written (the index's `total_size`).
    pub tensor_bytes: u64,
    /// Bytes written in all files (headers, JSON and copied files included).
    pub bytes_written: u64,
    /// Safetensors files written (1 when unsharded).
    pub shards: usize,
    /// Files written, relative to `out_dir`.
    pub files_written: Vec<PathBuf>,
    /// Staging directories of `out_dir` left by killed runs, removed before writing.
    pub stale_staging_removed: Vec<StaleStaging>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl SurgeryReport {
    /// Kept experts per MoE layer.
    pub fn kept_counts(&self) -> BTreeMap<usize, usize> {
        self.kept_experts.iter().map(|(l, k)| (*l, k.len())).collect()
    }
}

/// Applies `plan` to the checkpoint in `model_dir` and writes the pruned checkpoint to
/// `out_dir`.
///
/// Before writing anything it checks the config and the plan ([`PruningPlan::validate`]), the
/// output location, and the weights against `config.json` (router rows and expert tensors per
/// MoE layer, shapes, no NaN/inf in any router). Then it streams the output into a temporary
/// directory beside `out_dir` (one shard at a time, bytes copied from the memory-mapped input)
/// and renames it into place; on any error the temporary directory is removed and nothing is
/// left behind.
///
/// - Kept experts are renumbered `0..E'` in ascending original order; the tensors of pruned
///   experts are dropped; router rows (and any `[E, ...]` tensor of the router module) are
///   sliced to the kept experts, on raw bytes, whatever the dtype.
/// - Every other tensor is copied bit-exact with its name, dtype and shape.
/// - `config.json` is edited in place ([`pruned_config`]); non-uniform plans add the remote
///   code of `remote_code/`.
/// - Tokenizer files, `generation_config.json` and other non-weight files at the top of
///   `model_dir` are copied (not dotfiles, weight files, weight indexes, `pruning.json`, nor a
///   stale copy of this crate's remote code).
pub fn apply_plan(
    model_dir: &Path,
    plan: &PruningPlan,
    out_dir: &Path,
    opts: &SurgeryOptions<'_>,
) -> Result<SurgeryReport, SurgeryError> {
    let started = Instant::now();
    let mut config = ModelConfig::from_dir(model_dir)?;
    let ckpt = Checkpoint::open(model_dir)?;
    config.drop_absent_mtp_layers(&ckpt);
    plan.validate(&config).map_err(|e| match e {
        PlanError::Invalid(m) => PlanError::Invalid(format!("{m} (model config: {})", config.path.display())),
        other => other,
    })?;
    check_top_k(&config, plan)?;
    check_output_location(model_dir, out_dir, opts.force)?;
    let counts = kept_counts_per_layer(&config, plan);
    let moe_counts: Vec<usize> = config.moe_layers().iter().map(|&l| counts[l]).collect();
    let uniform = moe_counts.windows(2).all(|w| w[0] == w[1]);
    if !uniform {
        remote_code_auto_map()?;
    }

    let inventory = inspect(&config, &ckpt)?;
    check_routers_finite(&config, &inventory)?;
    if !uniform
        && let Some((t, _)) =
            inventory.iter().find(|(t, _)| t.name.ends_with(diep_checkpoint::architectures::gpt_oss::MXFP4_BLOCKS))
    {
        return Err(PlanError::Invalid(format!(
            "`{}` holds MXFP4-quantised experts (`{}`): such checkpoints can only be pruned uniformly (the same \
             number of experts in every MoE layer); the remote code for per-layer expert counts covers bf16/f32 \
             experts only, got {:?}",
            model_dir.display(),
            t.name,
            plan.kept_counts()
        ))
        .into());
    }
    if plan.merge.values().any(|g| !g.is_empty())
        && let Some((t, _)) = inventory
            .iter()
            .find(|(t, r)| matches!(r, Role::Expert { .. }) && diep_checkpoint::Fp8Format::of(t.dtype).is_some())
    {
        let scheme = config.fp8().map_or_else(|| "its FP8 scheme".to_string(), |s| s.describe());
        return Err(PlanError::Invalid(format!(
            "`merge` folds experts into a weighted sum, but `{}` holds FP8 experts (`{}` is {:?}): the merged \
             weights would have to be re-quantised to {scheme} with new scales, which this toolkit does not do; \
             prune without --merge (kept FP8 experts are copied byte for byte), or dequantise the checkpoint first",
            model_dir.display(),
            t.name,
            t.dtype
        ))
        .into());
    }
    let tensors = output_tensors(plan, &inventory);
    let shards = assign_shards(&tensors, opts.max_shard_bytes);
    let new_config = pruned_config(&config, plan);

    let params_before: u64 = inventory.iter().map(|(t, _)| t.numel() as u64).sum();
    let params_after: u64 = tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    let tensor_bytes: u64 = tensors.iter().map(|t| t.nbytes as u64).sum();

    // Staging directories of this output left by killed runs go first.
    let stale_staging_removed = remove_stale_staging(out_dir).map_err(SurgeryError::io(out_dir))?;
    let staging = Staging::create(out_dir).map_err(SurgeryError::io(out_dir))?;
    let mut files = Vec::new();
    let mut bytes_written = 0u64;
    let mut progress = Progress {
        callback: opts.progress,
        state: SurgeryProgress {
            bytes_written: 0,
            total_bytes: tensor_bytes,
            tensors_written: 0,
            total_tensors: tensors.len(),
            shard: 0,
            shards: shards.len(),
        },
    };

    // Weights.
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, range) in shards.iter().enumerate() {
        let file_name =
            if n == 1 { SINGLE_FILE.to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
        progress.state.shard = i + 1;
        let shard = &tensors[range.clone()];
        bytes_written += write_shard(&staging.path().join(&file_name), shard, &mut progress)?;
        for t in shard {
            weight_map.insert(t.name.clone(), Value::from(file_name.clone()));
        }
        files.push(PathBuf::from(file_name));
    }
    if n > 1 {
        let index = json!({
            "metadata": {"total_parameters": params_after, "total_size": tensor_bytes},
            "weight_map": Value::Object(weight_map.into_iter().collect::<Map<_, _>>()),
        });
        bytes_written += write_json(&staging.path().join(SHARD_INDEX), &index)?;
        files.push(PathBuf::from(SHARD_INDEX));
    }

    // config.json, remote code, other files.
    bytes_written += write_json(&staging.path().join("config.json"), &Value::Object(new_config))?;
    files.push(PathBuf::from("config.json"));
    if !uniform {
        for (name, text) in REMOTE_CODE_FILES {
            let path = staging.path().join(name);
            fs::write(&path, text).map_err(SurgeryError::io(&path))?;
            bytes_written += text.len() as u64;
            files.push(PathBuf::from(name));
        }
    }
    for name in files_to_copy(model_dir)? {
        let (from, to) = (model_dir.join(&name), staging.path().join(&name));
        let copied = fs::copy(&from, &to).map_err(|source| SurgeryError::Io {
            path: from.clone(),
            source: std::io::Error::new(source.kind(), format!("copying to {}: {source}", to.display())),
        })?;
        bytes_written += copied;
        files.push(PathBuf::from(name));
    }

    // The plan that produced this checkpoint travels with it.
    let plan_path = staging.path().join(PLAN_FILE);
    let plan_json = plan.to_json() + "\n";
    fs::write(&plan_path, &plan_json).map_err(SurgeryError::io(&plan_path))?;
    bytes_written += plan_json.len() as u64;
    files.push(PathBuf::from(PLAN_FILE));

    staging.commit(out_dir, opts.force).map_err(|e| match e {
        diep_common::fs::CommitError::Exists(path) => SurgeryError::OutputExists { path },
        diep_common::fs::CommitError::Io(source) => SurgeryError::Io { path: out_dir.to_path_buf(), source },
        other => SurgeryError::Io { path: out_dir.to_path_buf(), source: std::io::Error::other(other.to_string()) },
    })?;
    Ok(SurgeryReport {
        out_dir: out_dir.to_path_buf(),
        experts_before: routed_layers(&config).map(|l| (l, config.experts_in_layer(l))).collect(),
        kept_experts: plan.kept_experts.clone(),
        uniform,
        params_before,
        params_after,
        tensors_written: tensors.len(),
        tensor_bytes,
        bytes_written,
        shards: n,
        files_written: files,
        stale_staging_removed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// `num_experts_per_tok` must not exceed any layer's kept count (also part of
/// `PruningPlan::validate`; repeated here so the rule cannot be lost).
fn check_top_k(config: &ModelConfig, plan: &PruningPlan) -> Result<(), SurgeryError> {
    let top_k = config.moe.top_k;
    for (layer, kept) in &plan.kept_experts {
        if kept.len() < top_k {
            return Err(PlanError::Invalid(format!(
                "layer {layer} keeps {} experts, fewer than num_experts_per_tok = {top_k} (model config: {})",
                kept.len(),
                config.path.display()
            ))
            .into());
        }
    }
    Ok(())
}

fn check_output_location(model_dir: &Path, out_dir: &Path, force: bool) -> Result<(), SurgeryError> {
    if out_dir.file_name().is_none() {
        return Err(SurgeryError::Io {
            path: out_dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the output path has no directory name"),
        });
    }
    if fs::symlink_metadata(out_dir).is_err() {
        return Ok(());
    }
    if !force {
        return Err(SurgeryError::OutputExists { path: out_dir.to_path_buf() });
    }
    let model = fs::canonicalize(model_dir).map_err(SurgeryError::io(model_dir))?;
    // A dangling symlink cannot be canonicalised; it cannot be the model either.
    if let Ok(out) = fs::canonicalize(out_dir)
        && model.starts_with(&out)
    {
        return Err(SurgeryError::OutputIsInput { out: out_dir.to_path_buf(), model: model_dir.to_path_buf() });
    }
    Ok(())
}

/// What a tensor is to surgery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role<'a> {
    /// Copied unchanged.
    Plain,
    /// A routed expert's tensor.
    Expert { layer: usize, expert: usize, rest: &'a str },
    /// The router's weight, or another tensor of the router module (`{block}.{router}.*`),
    /// one row per expert.
    Router { layer: usize },
    /// A fused expert tensor (gpt-oss's `experts.gate_up_proj`, its bias, `down_proj`, its
    /// bias, and their MXFP4 `_blocks` / `_scales`): one slab per expert along axis 0.
    Fused { layer: usize, rest: &'a str },
}

/// Recognises expert and router tensors by name (see [`MoeKeys::parse`]), plus any other tensor
/// of the router module (a bias or correction vector `[E]`).
pub(crate) fn classify<'a>(keys: &MoeKeys, name: &'a str) -> Role<'a> {
    match keys.parse(name) {
        Some(MoeTensor::Expert { layer, expert, rest }) => {
            return Role::Expert { layer, expert, rest };
        }
        Some(MoeTensor::Router { layer }) => return Role::Router { layer },
        Some(MoeTensor::FusedExperts { layer, rest }) => return Role::Fused { layer, rest },
        None => {}
    }
    let attached = || -> Option<usize> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let rest = rest.strip_prefix(keys.block)?.strip_prefix('.')?.strip_prefix(keys.router)?;
        rest.starts_with('.').then_some(layer)
    };
    attached().map_or(Role::Plain, |layer| Role::Router { layer })
}

/// The expert axis of a router-module tensor of a layer with `n` experts: its first, or for a
/// `[1, n]` vector (ERNIE-4.5's `moe_statics.e_score_correction_bias`) its second.
fn expert_axis(shape: &[usize], n: usize) -> usize {
    usize::from(matches!(shape, [1, e] if *e == n && n != 1))
}

/// The number of per-expert rows of such a tensor (its length along [`expert_axis`]).
fn expert_rows(shape: &[usize], n: usize) -> usize {
    shape.get(expert_axis(shape, n)).copied().unwrap_or(0)
}

/// The MoE layers of the trunk, then the MTP layers ([`ModelConfig::mtp_layers`]).
fn routed_layers(config: &ModelConfig) -> impl Iterator<Item = usize> {
    config.moe_layers().into_iter().chain(config.mtp_layer_indices())
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split_once('.')?.0.parse().ok()
}

/// The config field that sets layer `layer`'s expert count, for messages.
fn count_field(config: &ModelConfig) -> String {
    let field = if config.raw.get(PER_LAYER_EXPERTS_KEY).is_some_and(|v| !v.is_null()) {
        PER_LAYER_EXPERTS_KEY
    } else {
        let keys = expert_count_keys(config.architecture);
        keys.iter().copied().find(|k| config.raw.get(*k).is_some_and(|v| !v.is_null())).unwrap_or(keys[0])
    };
    format!("`{field}` in {}", config.path.display())
}

/// Every tensor with its role, after checking the MoE tensors against `config.json`.
fn inspect<'c>(config: &ModelConfig, ckpt: &'c Checkpoint) -> Result<Vec<(TensorRef<'c>, Role<'c>)>, SurgeryError> {
    let keys = MoeKeys::of(config.architecture);
    let field = count_field(config);
    let cfg = config.path.display().to_string();
    let mismatch = |t: &TensorRef<'_>, reason: String| SurgeryError::WeightMismatch {
        tensor: t.name.to_string(),
        path: t.path.to_path_buf(),
        reason,
    };
    let not_moe = |layer: usize| {
        if layer >= config.num_layers {
            format!("{cfg} has only {} layers (`num_hidden_layers`)", config.num_layers)
        } else {
            format!("{cfg} makes layer {layer} a dense layer")
        }
    };

    // A multimodal wrapper's text tensors carry a prefix (`language_model.`); the others are
    // copied unchanged.
    let pre = config.tensor_prefix();
    let text_name = |name: &'c str| -> &'c str { name.strip_prefix(pre).unwrap_or(name) };
    let mut out = Vec::new();
    for name in ckpt.names() {
        let t = ckpt.get(name)?;
        out.push((t, classify(&keys, text_name(t.name))));
    }
    // Routers first (a wrong expert count shows there most plainly), then everything else.
    let routers_first = out
        .iter()
        .filter(|(_, r)| matches!(r, Role::Router { .. }))
        .chain(out.iter().filter(|(_, r)| !matches!(r, Role::Router { .. })));
    // layer -> expert -> rest -> tensor
    let mut experts: BTreeMap<usize, BTreeMap<usize, BTreeMap<&str, TensorRef<'c>>>> = BTreeMap::new();
    for &(t, role) in routers_first {
        match role {
            Role::Expert { layer, expert, rest } => {
                let n = config.experts_in_layer(layer);
                if n == 0 {
                    return Err(mismatch(&t, format!("an expert of layer {layer}, but {}", not_moe(layer))));
                }
                if expert >= n {
                    return Err(mismatch(
                        &t,
                        format!("expert {expert} of layer {layer}, but layer {layer} has {n} experts ({field})"),
                    ));
                }
                if experts.entry(layer).or_default().entry(expert).or_default().insert(rest, t).is_some() {
                    return Err(mismatch(&t, format!("expert {expert}'s `{rest}` of layer {layer} is stored twice")));
                }
            }
            Role::Router { layer } => {
                let n = config.experts_in_layer(layer);
                if n == 0 {
                    return Err(mismatch(&t, format!("a router tensor of layer {layer}, but {}", not_moe(layer))));
                }
                let rows = expert_rows(t.shape, n);
                if t.shape.is_empty() || rows != n {
                    return Err(mismatch(
                        &t,
                        format!(
                            "shape {:?} has {} rows (one per expert), but layer {layer} has {n} experts ({field})",
                            t.shape,
                            if t.shape.is_empty() { "no".to_string() } else { rows.to_string() }
                        ),
                    ));
                }
                if t.bytes.len() % rows != 0 {
                    return Err(mismatch(&t, format!("{} bytes cannot be split into {rows} rows", t.bytes.len())));
                }
            }
            Role::Fused { layer, rest } => {
                let n = config.experts_in_layer(layer);
                if n == 0 {
                    return Err(mismatch(&t, format!("fused experts of layer {layer}, but {}", not_moe(layer))));
                }
                let (h, i) = (config.hidden_size, config.moe.expert_intermediate_size);
                let Some(shape) = keys.fused_experts.and_then(|f| fused_shape(f, rest, n, h, i)) else {
                    return Err(mismatch(&t, format!("`{rest}` is not a known fused expert tensor")));
                };
                if t.shape != shape.as_slice() {
                    return Err(mismatch(
                        &t,
                        format!(
                            "shape {:?}, but {cfg} implies {shape:?} ({n} experts ({field}), hidden_size = {h}, \
                             expert width = {i})",
                            t.shape
                        ),
                    ));
                }
            }
            Role::Plain => {
                let block = format!(".{}.experts.", keys.block);
                if let Some(layer) = layer_of(text_name(t.name)).filter(|l| config.experts_in_layer(*l) > 0)
                    && t.name.contains(&block)
                {
                    let reason = match keys.fused_expert_tensors(layer) {
                        Some(names) => format!(
                            "not a fused expert tensor of `{}` (expected {}{})",
                            config.architecture.model_type(),
                            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                            if config.architecture.model_type() == "gpt_oss" {
                                " or their MXFP4 `_blocks` / `_scales`"
                            } else {
                                ""
                            }
                        ),
                        None => format!(
                            "not a per-expert tensor (expected names like `{}`); fused expert layouts are not supported",
                            keys.expert_weights(layer, 0)[0]
                        ),
                    };
                    return Err(mismatch(&t, reason));
                }
            }
        }
    }

    let dir = ckpt.dir().to_path_buf();
    let (h, i) = (config.hidden_size, config.moe.expert_intermediate_size);
    for layer in routed_layers(config) {
        let n = config.experts_in_layer(layer);
        let router_name = format!("{pre}{}", keys.router_weight(layer));
        let Some((router, _)) = out.iter().find(|(t, _)| t.name == router_name) else {
            return Err(SurgeryError::MissingTensor {
                tensor: router_name,
                location: dir.clone(),
                reason: format!("{cfg} makes layer {layer} an MoE layer"),
            });
        };
        if router.shape != [n, h] {
            return Err(mismatch(
                router,
                format!("shape {:?}, but {cfg} implies [{n}, {h}] (experts, hidden_size)", router.shape),
            ));
        }
    }
    if let Some(fused) = keys.fused_experts {
        // Each fused weight is there in full precision or as an MXFP4 blocks/scales pair.
        for layer in routed_layers(config) {
            let p = format!("{pre}{}.experts", keys.block_prefix(layer));
            for (kind, weight) in fused.kinds() {
                let name = format!("{p}.{kind}");
                let has = |n: &str| out.iter().any(|(t, _)| t.name == n);
                let (blocks, scales) = diep_checkpoint::mxfp4::mxfp4_names(&name);
                if has(&name) || (weight && has(&blocks) && has(&scales)) {
                    continue;
                }
                let missing = if weight && (has(&blocks) || has(&scales)) {
                    if has(&blocks) { scales } else { blocks }
                } else {
                    name
                };
                return Err(SurgeryError::MissingTensor {
                    tensor: missing,
                    location: dir.clone(),
                    reason: format!("{cfg} makes layer {layer} an MoE layer (`{}` fused experts)", fused.gate_up),
                });
            }
        }
        return Ok(out);
    }
    for layer in routed_layers(config) {
        let n = config.experts_in_layer(layer);
        let empty = BTreeMap::new();
        let layer_experts = experts.get(&layer).unwrap_or(&empty);
        let shapes = [[i, h], [i, h], [h, i]];
        for e in 0..n {
            let names = keys.expert_weights(layer, e);
            let Some(tensors) = layer_experts.get(&e) else {
                return Err(SurgeryError::MissingTensor {
                    tensor: names[0].clone(),
                    location: dir.clone(),
                    reason: format!("layer {layer} has {n} experts ({field})"),
                });
            };
            let expert_prefix = format!("{}.experts.{e}.", keys.block_prefix(layer));
            for (name, shape) in names.iter().zip(&shapes) {
                let rest = name.strip_prefix(&expert_prefix).expect("expert names start with the expert prefix");
                let Some(t) = tensors.get(rest) else {
                    return Err(SurgeryError::MissingTensor {
                        tensor: name.clone(),
                        location: dir.clone(),
                        reason: format!("layer {layer} has {n} experts ({field})"),
                    });
                };
                if t.shape != shape {
                    return Err(mismatch(
                        t,
                        format!(
                            "shape {:?}, but {cfg} implies {shape:?} (hidden_size = {h}, expert width = {i})",
                            t.shape
                        ),
                    ));
                }
            }
            // Every expert of a layer has the same tensors, dtypes and shapes as expert 0.
            let first = &layer_experts[&0];
            for (rest, t0) in first {
                match tensors.get(rest) {
                    None => {
                        return Err(SurgeryError::MissingTensor {
                            tensor: format!("{}.experts.{e}.{rest}", keys.block_prefix(layer)),
                            location: dir.clone(),
                            reason: format!("expert 0 of layer {layer} has `{}`", t0.name),
                        });
                    }
                    Some(t) if t.shape != t0.shape || t.dtype != t0.dtype => {
                        return Err(mismatch(
                            t,
                            format!("{:?} {:?}, but `{}` is {:?} {:?}", t.dtype, t.shape, t0.name, t0.dtype, t0.shape),
                        ));
                    }
                    Some(_) => {}
                }
            }
            if let Some((rest, t)) = tensors.iter().find(|(r, _)| !first.contains_key(*r)) {
                return Err(mismatch(t, format!("expert 0 of layer {layer} has no `{rest}`")));
            }
        }
    }
    Ok(out)
}

/// The shape a fused expert tensor must have for `n` experts, hidden size `h` and expert
/// width `i`; MXFP4 pairs are stored transposed, 32 values a block (16 bytes).
fn fused_shape(f: FusedExpertKeys, rest: &str, n: usize, h: usize, i: usize) -> Option<Vec<usize>> {
    let (blocks, scales) =
        (diep_checkpoint::architectures::gpt_oss::MXFP4_BLOCKS, diep_checkpoint::architectures::gpt_oss::MXFP4_SCALES);
    let mx = |base: &str, out: usize, inp: usize| -> Option<Vec<usize>> {
        if rest == format!("{base}{blocks}") {
            Some(vec![n, out, inp / 32, 16])
        } else if rest == format!("{base}{scales}") {
            Some(vec![n, out, inp / 32])
        } else {
            None
        }
    };
    match rest {
        r if r == f.gate_up => Some(vec![n, h, 2 * i]),
        r if Some(r) == f.gate_up_bias => Some(vec![n, 2 * i]),
        r if r == f.down => Some(vec![n, i, h]),
        r if Some(r) == f.down_bias => Some(vec![n, h]),
        _ => mx(f.gate_up, 2 * i, h).or_else(|| mx(f.down, h, i)),
    }
}

fn check_routers_finite(config: &ModelConfig, inventory: &[(TensorRef<'_>, Role<'_>)]) -> Result<(), SurgeryError> {
    for (t, role) in inventory {
        let Role::Router { layer } = role else {
            continue;
        };
        if config.experts_in_layer(*layer) == 0 {
            continue;
        }
        if let Some((index, kind)) = first_non_finite(t.bytes, t.dtype) {
            let per_row = (t.numel() / t.shape[0]).max(1);
            return Err(SurgeryError::NonFinite {
                tensor: t.name.to_string(),
                path: t.path.to_path_buf(),
                index,
                row: index / per_row,
                kind,
            });
        }
    }
    Ok(())
}

/// The first NaN or infinite element of a float tensor (raw little-endian bytes), if any.
/// Integer and sub-byte dtypes are never reported.
pub(crate) fn first_non_finite(bytes: &[u8], dtype: Dtype) -> Option<(usize, &'static str)> {
    fn scan<const N: usize>(bytes: &[u8], f: impl Fn(u64) -> Option<&'static str>) -> Option<(usize, &'static str)> {
        bytes.chunks_exact(N).enumerate().find_map(|(i, c)| {
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(c);
            f(u64::from_le_bytes(b)).map(|k| (i, k))
        })
    }
    // IEEE-style formats: exponent all ones; mantissa zero = inf, else NaN.
    fn ieee(bits: u64, exp_mask: u64, man_mask: u64, sign: u64) -> Option<&'static str> {
        if bits & exp_mask != exp_mask {
            None
        } else if bits & man_mask != 0 {
            Some("NaN")
        } else if bits & sign != 0 {
            Some("-inf")
        } else {
            Some("+inf")
        }
    }
    match dtype {
        Dtype::F64 => scan::<8>(bytes, |b| ieee(b, 0x7FF0_0000_0000_0000, 0x000F_FFFF_FFFF_FFFF, 1 << 63)),
        Dtype::F32 => scan::<4>(bytes, |b| ieee(b, 0x7F80_0000, 0x007F_FFFF, 1 << 31)),
        Dtype::F16 => scan::<2>(bytes, |b| ieee(b, 0x7C00, 0x03FF, 1 << 15)),
        Dtype::BF16 => scan::<2>(bytes, |b| ieee(b, 0x7F80, 0x007F, 1 << 15)),
        Dtype::F8_E5M2 => scan::<1>(bytes, |b| ieee(b, 0x7C, 0x03, 0x80)),
        // E4M3 (fn): no infinities, NaN = S.1111.111.
        Dtype::F8_E4M3 => scan::<1>(bytes, |b| (b & 0x7F == 0x7F).then_some("NaN")),
        // FNUZ formats: the single NaN is 0x80 (negative zero's encoding).
        Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ => scan::<1>(bytes, |b| (b == 0x80).then_some("NaN")),
        Dtype::F8_E8M0 => scan::<1>(bytes, |b| (b == 0xFF).then_some("NaN")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The output tensor list.

/// One tensor of the output: a copy of an input tensor, or a selection of its rows.
struct OutTensor<'c> {
    name: String,
    src: TensorRef<'c>,
    shape: Vec<usize>,
    /// Rows of `src` to write, in order; `None` copies the whole tensor.
    rows: Option<Vec<usize>>,
    /// Write `Σ w·tensor` over these same-shaped tensors instead of `src` (expert merging).
    merge: Option<Vec<(TensorRef<'c>, f64)>>,
    nbytes: usize,
}

fn output_tensors<'c>(plan: &PruningPlan, inventory: &[(TensorRef<'c>, Role<'c>)]) -> Vec<OutTensor<'c>> {
    // layer -> old id -> new id
    let renumber: BTreeMap<usize, BTreeMap<usize, usize>> = plan
        .kept_experts
        .iter()
        .map(|(l, kept)| (*l, kept.iter().enumerate().map(|(new, old)| (*old, new)).collect()))
        .collect();
    // (layer, expert, rest) -> tensor, for merged experts.
    let experts: BTreeMap<(usize, usize, &str), TensorRef<'c>> = inventory
        .iter()
        .filter_map(|(t, role)| match role {
            Role::Expert { layer, expert, rest } => Some(((*layer, *expert, *rest), *t)),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for (t, role) in inventory {
        let copy = |name: String| OutTensor {
            name,
            src: *t,
            shape: t.shape.to_vec(),
            rows: None,
            merge: None,
            nbytes: t.bytes.len(),
        };
        match *role {
            Role::Plain => out.push(copy(t.name.to_string())),
            Role::Expert { layer, expert, rest } => match renumber.get(&layer) {
                None => out.push(copy(t.name.to_string())),
                Some(map) => {
                    if let Some(new) = map.get(&expert) {
                        let mut o = copy(rename_expert(t.name, rest, *new));
                        if let Some(group) = plan.merge.get(&layer).and_then(|g| g.get(&expert)) {
                            o.merge = Some(
                                group
                                    .iter()
                                    .filter_map(|(e, w)| experts.get(&(layer, *e, rest)).map(|src| (*src, *w)))
                                    .collect(),
                            );
                        }
                        out.push(o);
                    }
                }
            },
            Role::Router { layer } | Role::Fused { layer, .. } => match plan.kept_experts.get(&layer) {
                None => out.push(copy(t.name.to_string())),
                Some(kept) => {
                    let n = plan.original_experts.get(&layer).copied().unwrap_or(t.shape[0]);
                    // `[1, E]` (ERNIE-4.5's `moe_statics`) is sliced along its expert axis.
                    let axis = expert_axis(t.shape, n);
                    let row_bytes = t.bytes.len() / t.shape[axis];
                    let mut shape = t.shape.to_vec();
                    shape[axis] = kept.len();
                    out.push(OutTensor {
                        name: t.name.to_string(),
                        src: *t,
                        shape,
                        rows: Some(kept.clone()),
                        merge: None,
                        nbytes: row_bytes * kept.len(),
                    });
                }
            },
        }
    }
    out.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    out
}

/// `prefix.experts.{old}.{rest}` → `prefix.experts.{new}.{rest}`, keeping the prefix verbatim.
fn rename_expert(name: &str, rest: &str, new: usize) -> String {
    let head = &name[..name.len() - rest.len() - 1]; // `...experts.{old}`
    let prefix = head.trim_end_matches(|c: char| c.is_ascii_digit()); // `...experts.`
    format!("{prefix}{new}.{rest}")
}

/// Orders dotted names segment by segment, numeric segments by value (`layers.2` < `layers.10`).
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let mut sa = a.split('.');
    let mut sb = b.split('.');
    loop {
        match (sa.next(), sb.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(u), Ok(v)) => u.cmp(&v).then_with(|| x.cmp(y)),
                    _ => x.cmp(y),
                };
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

/// Splits the (ordered) tensors into shards of at most `max` data bytes, like transformers: a
/// new shard starts when the next tensor would overflow the current one; a tensor larger than
/// `max` gets a shard of its own.
fn assign_shards(tensors: &[OutTensor<'_>], max: u64) -> Vec<std::ops::Range<usize>> {
    let total: u64 = tensors.iter().map(|t| t.nbytes as u64).sum();
    if total <= max || tensors.len() <= 1 {
        return std::iter::once(0..tensors.len()).collect();
    }
    let mut shards = Vec::new();
    let (mut start, mut size) = (0usize, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        let n = t.nbytes as u64;
        if i > start && size + n > max {
            shards.push(start..i);
            start = i;
            size = 0;
        }
        size += n;
    }
    shards.push(start..tensors.len());
    shards
}

// ---------------------------------------------------------------------------------------------
// Writing.

struct Progress<'a> {
    callback: Option<&'a dyn Fn(SurgeryProgress)>,
    state: SurgeryProgress,
}

impl Progress<'_> {
    fn advance(&mut self, bytes: usize) {
        self.state.bytes_written += bytes as u64;
        if let Some(cb) = self.callback {
            cb(self.state);
        }
    }
}

const CHUNK: usize = 64 << 20;

/// Writes one safetensors file: header (tensors ordered by descending dtype alignment, then as
/// given, like the safetensors serializer; `{"format": "pt"}` metadata like transformers), then
/// the bytes, copied from the memory-mapped input. Returns the file size.
fn write_shard(path: &Path, tensors: &[OutTensor<'_>], progress: &mut Progress<'_>) -> Result<u64, SurgeryError> {
    let mut order: Vec<&OutTensor<'_>> = tensors.iter().collect();
    order.sort_by_key(|t| std::cmp::Reverse(t.src.dtype));

    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for t in &order {
        let entry = json!({
            "dtype": serde_json::to_value(t.src.dtype).expect("dtypes serialise"),
            "shape": t.shape,
            "data_offsets": [offset, offset + t.nbytes],
        });
        if header.insert(t.name.clone(), entry).is_some() {
            return Err(SurgeryError::WeightMismatch {
                tensor: t.name.clone(),
                path: t.src.path.to_path_buf(),
                reason: "two output tensors would share this name".into(),
            });
        }
        offset += t.nbytes;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).expect("JSON serialises");
    header.resize(header.len().next_multiple_of(8), b' ');

    let io = SurgeryError::io(path);
    let file = File::create(path).map_err(SurgeryError::io(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let result = (|| -> std::io::Result<()> {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for t in &order {
            if let Some(group) = &t.merge {
                w.write_all(&merged_bytes(t, group)?)?;
                group.iter().for_each(|(src, _)| src.release());
                progress.state.tensors_written += 1;
                progress.advance(t.nbytes);
                continue;
            }
            match &t.rows {
                None => {
                    let bytes = t.src.bytes;
                    if bytes.is_empty() {
                        progress.state.tensors_written += 1;
                        progress.advance(0);
                    }
                    let mut chunks = bytes.chunks(CHUNK).peekable();
                    while let Some(chunk) = chunks.next() {
                        w.write_all(chunk)?;
                        if chunks.peek().is_none() {
                            progress.state.tensors_written += 1;
                        }
                        progress.advance(chunk.len());
                    }
                }
                Some(rows) => {
                    // Bytes per expert (the source's first axis, or the second of a `[1, E]`).
                    let row_bytes = t.nbytes / rows.len().max(1);
                    for &r in rows {
                        w.write_all(&t.src.bytes[r * row_bytes..(r + 1) * row_bytes])?;
                    }
                    progress.state.tensors_written += 1;
                    progress.advance(t.nbytes);
                }
            }
            // Written: drop the source pages, so memory stays at one tensor, not the checkpoint.
            t.src.release();
        }
        w.flush()?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    result.map_err(io)?;
    Ok((8 + header.len() + offset) as u64)
}

/// `Σ w·tensor` over a merge group, computed in f32 and written in the kept tensor's dtype.
fn merged_bytes(t: &OutTensor<'_>, group: &[(TensorRef<'_>, f64)]) -> std::io::Result<Vec<u8>> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("merging into {}: {m}", t.name));
    let mut sum = vec![0f64; t.src.numel()];
    for (src, weight) in group {
        if src.shape != t.src.shape || src.dtype != t.src.dtype {
            return Err(bad(format!("{} has shape {:?} {:?}", src.name, src.shape, src.dtype)));
        }
        let values = src.to_f32().map_err(|e| bad(e.to_string()))?;
        for (s, v) in sum.iter_mut().zip(values) {
            *s += weight * v as f64;
        }
    }
    let bytes: Vec<u8> = match t.src.dtype {
        Dtype::F32 => sum.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
        Dtype::F16 => sum.iter().flat_map(|v| half::f16::from_f64(*v).to_le_bytes()).collect(),
        Dtype::BF16 => sum.iter().flat_map(|v| half::bf16::from_f64(*v).to_le_bytes()).collect(),
        other => return Err(bad(format!("cannot merge {other:?} tensors"))),
    };
    debug_assert_eq!(bytes.len(), t.nbytes);
    Ok(bytes)
}

fn write_json(path: &Path, value: &Value) -> Result<u64, SurgeryError> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON serialises");
    text.push('\n');
    fs::write(path, &text).map_err(SurgeryError::io(path))?;
    Ok(text.len() as u64)
}

/// File extensions of weights in any framework; never copied (surgery writes its own).
const WEIGHT_SUFFIXES: &[&str] =
    &[".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json"];

/// Top-level files of the model directory to copy unchanged, sorted.
fn files_to_copy(model_dir: &Path) -> Result<Vec<String>, SurgeryError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(model_dir).map_err(SurgeryError::io(model_dir))? {
        let entry = entry.map_err(SurgeryError::io(model_dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let lower = name.to_ascii_lowercase();
        if name.starts_with('.')
            || name == "config.json"
            || name == PLAN_FILE
            || WEIGHT_SUFFIXES.iter().any(|s| lower.ends_with(s))
            || REMOTE_CODE_FILES.iter().any(|(n, _)| *n == name)
        {
            continue;
        }
        // Follow symlinks (Hugging Face cache snapshots are symlinks to blobs).
        if fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v =
            vec!["model.layers.10.a", "model.layers.2.b", "lm_head.weight", "model.layers.2.a", "model.norm.weight"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            ["lm_head.weight", "model.layers.2.a", "model.layers.2.b", "model.layers.10.a", "model.norm.weight"]
        );
    }

    #[test]
    fn renames_keep_prefix() {
        assert_eq!(
            rename_expert("model.layers.3.mlp.experts.17.gate_proj.weight", "gate_proj.weight", 4),
            "model.layers.3.mlp.experts.4.gate_proj.weight"
        );
    }

    #[test]
    fn classifies_router_attachments() {
        let k = MoeKeys::of(diep_checkpoint::Architecture::Qwen2Moe);
        assert_eq!(classify(&k, "model.layers.1.mlp.gate.weight"), Role::Router { layer: 1 });
        assert_eq!(classify(&k, "model.layers.1.mlp.gate.e_score_correction_bias"), Role::Router { layer: 1 });
        assert_eq!(classify(&k, "model.layers.1.mlp.gate_proj.weight"), Role::Plain);
        assert_eq!(classify(&k, "model.layers.1.mlp.shared_expert_gate.weight"), Role::Plain);
        assert_eq!(
            classify(&k, "model.layers.1.mlp.experts.3.up_proj.weight"),
            Role::Expert { layer: 1, expert: 3, rest: "up_proj.weight" }
        );
    }

    #[test]
    fn non_finite_detection_per_dtype() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(&f32s, Dtype::F32), Some((1, "NaN")));
        let f32s: Vec<u8> = [1.0f32, 2.0, f32::NEG_INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(&f32s, Dtype::F32), Some((2, "-inf")));
        let f64s: Vec<u8> = [f64::INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(first_non_finite(&f64s, Dtype::F64), Some((0, "+inf")));
        // bf16: 1.0 = 0x3F80, NaN = 0x7FC0; f16: 1.0 = 0x3C00, inf = 0x7C00.
        assert_eq!(first_non_finite(&[0x80, 0x3F, 0xC0, 0x7F], Dtype::BF16), Some((1, "NaN")));
        assert_eq!(first_non_finite(&[0x80, 0x3F, 0x80, 0x3F], Dtype::BF16), None);
        assert_eq!(first_non_finite(&[0x00, 0x3C, 0x00, 0x7C], Dtype::F16), Some((1, "+inf")));
        assert_eq!(first_non_finite(&[0xFF, 0xFF], Dtype::U8), None);
    }
}
