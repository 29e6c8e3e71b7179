//! `cargo xtask fixture train`: builds `fixtures/trained-moe`, a small Mixtral-architecture MoE
//! trained from scratch on two text domains this machine can install, with the project's own
//! model code ([`crate::train`]).
//!
//! Pipeline (everything deterministic from `--seed` and the installed packages):
//!
//! 1. corpus: domain `english` = the entries of the 1913 Webster dictionary (Debian's
//!    `dict-gcide`, `/usr/share/dictd/gcide.{index,dict.dz}`), domain `code` = the `.py` files
//!    of the Python standard library (`/usr/lib/python3.N`, tests and vendored packages left
//!    out). A document is held out when `fnv1a64(key) % 20 == 0` (key = GCIDE entry offset or
//!    path relative to the library); held-out text never reaches the tokenizer or the model;
//! 2. a byte-level BPE tokenizer (`tokenizers` crate) trained on training documents;
//! 3. a Mixtral model ([`random_model`]) trained with AdamW on random 256-token windows of
//!    both domains (half a batch each), next-token cross-entropy plus the load-balancing loss;
//! 4. the output directory, written beside the target and renamed into place: HF checkpoint,
//!    tokenizer, held-out text and token ids per domain, calibration text (training split), a
//!    multiple-choice task from held-out text, the training log and a README with the numbers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use diep_models::checkpoint::ModelConfig;
use diep_models::{DeviceSpec, MoeForwardOptions, MoeModel};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::train::{
    AdamW, AdamWConfig, InitOptions, SplitMix64, fnv1a64, grad_norm, num_parameters, random_model, require_grad,
    save_safetensors, training_loss,
};
use crate::util::workspace_root;

/// The special token between documents (id 0).
const EOS: &str = "<|endoftext|>";
/// One document in this many is held out (by hash of its key).
const HELDOUT_MODULUS: u64 = 20;
/// Where Debian's `dict-gcide` puts the dictionary.
const GCIDE_DIR: &str = "/usr/share/dictd";
/// Names of directories left out of the Python standard library corpus.
const PY_SKIP_DIRS: [&str; 7] =
    ["test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages", "pydoc_data"];
/// Python files larger than this are generated tables, not code people write.
const PY_MAX_FILE_BYTES: u64 = 256 * 1024;

/// Arguments of `cargo xtask fixture`.
#[derive(Args)]
pub struct FixtureArgs {
    #[command(subcommand)]
    command: FixtureCommand,
}

#[derive(Subcommand)]
enum FixtureCommand {
    /// Train the `fixtures/trained-moe` model from scratch on English (GCIDE) and Python
    /// (standard library) text, and write it with its tokenizer, held-out data and a README.
    Train(TrainArgs),
    /// Generate a Mixtral-shaped checkpoint of any size with random weights (bf16 by default,
    /// ~3 GB with the defaults), sharded like transformers; for memory and speed measurements.
    Generate(crate::generate::GenerateArgs),
}

/// Arguments of `cargo xtask fixture train`.
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    /// Output directory (replaced atomically). Default: `fixtures/trained-moe` in the workspace.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of initialisation and data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    /// Sequences per step (half English, half code).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence (training, held-out ids and the calibration sample size).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Peak learning rate (linear warm-up, cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Clip the global gradient norm to this.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Weight of the load-balancing loss (Mixtral's `router_aux_loss_coef`).
    #[arg(long, default_value_t = 0.01)]
    aux_coef: f64,
    /// Tokenizer vocabulary size (including the end-of-text token).
    #[arg(long, default_value_t = 2048)]
    vocab: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Decoder layers (all MoE).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads (GQA).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Experts per MoE layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Expert intermediate size.
    #[arg(long, default_value_t = 192)]
    intermediate: usize,
    /// Held-out sequences per domain in `heldout/<domain>.ids.json`.
    #[arg(long, default_value_t = 64)]
    heldout_seqs: usize,
    /// Multiple-choice items per domain in `mc.jsonl`.
    #[arg(long, default_value_t = 100)]
    mc_items: usize,
    /// Tokens of calibration text per domain in `calib.txt`.
    #[arg(long, default_value_t = 16384)]
    calib_tokens: usize,
    /// Megabytes of training text per domain the tokenizer is trained on.
    #[arg(long, default_value_t = 4.0)]
    tokenizer_mb: f64,
    /// Megabytes of training text per domain the model's training windows are drawn from.
    #[arg(long, default_value_t = 12.0)]
    pool_mb: f64,
    /// Directory with GCIDE's `gcide.index` and `gcide.dict.dz`.
    #[arg(long, default_value = GCIDE_DIR)]
    gcide: PathBuf,
    /// The Python standard library directory (default: the newest `/usr/lib/python3.N`).
    #[arg(long)]
    python_lib: Option<PathBuf>,
    /// Compute device for training and evaluation.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
}

pub fn run(args: FixtureArgs) -> Result<()> {
    match args.command {
        FixtureCommand::Train(a) => train(a),
        FixtureCommand::Generate(a) => crate::generate::generate(a),
    }
}

/// One document of a domain.
struct Doc {
    /// Stable key: what the held-out split and orderings hash.
    key: String,
    text: String,
}

impl Doc {
    fn hash(&self) -> u64 {
        fnv1a64(self.key.as_bytes())
    }
    fn held_out(&self) -> bool {
        self.hash().is_multiple_of(HELDOUT_MODULUS)
    }
    /// A second, independent hash that orders documents (a deterministic shuffle).
    fn order(&self) -> u64 {
        fnv1a64(format!("order:{}", self.key).as_bytes())
    }
}

/// A domain's documents, split.
struct Domain {
    name: &'static str,
    source: String,
    train: Vec<Doc>,
    heldout: Vec<Doc>,
}

impl Domain {
    fn new(name: &'static str, source: String, docs: Vec<Doc>) -> Self {
        let (mut heldout, mut train): (Vec<Doc>, Vec<Doc>) = docs.into_iter().partition(Doc::held_out);
        train.sort_by_key(|d| (d.order(), d.key.clone()));
        heldout.sort_by_key(|d| (d.order(), d.key.clone()));
        Domain { name, source, train, heldout }
    }

    /// Training documents in shuffled order, up to `mb` megabytes.
    fn train_prefix(&self, mb: f64) -> Vec<&str> {
        let budget = (mb * 1e6) as usize;
        let mut used = 0;
        self.train
            .iter()
            .take_while(|d| {
                let take = used < budget;
                used += d.text.len();
                take
            })
            .map(|d| d.text.as_str())
            .collect()
    }

    fn bytes(docs: &[Doc]) -> usize {
        docs.iter().map(|d| d.text.len()).sum()
    }
}

/// Decodes the dictd base64 numbers of `gcide.index`.
fn dictd_number(s: &str) -> Option<usize> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    s.bytes().try_fold(0usize, |acc, c| Some(acc * 64 + ALPHABET.iter().position(|a| *a == c)?))
}

/// Joins an entry's wrapped lines into paragraphs and drops source tags like `[1913 Webster]`.
fn clean_gcide_entry(raw: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in raw.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') && !line[1..].contains('[') {
            continue;
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(line);
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    let mut text = paragraphs.join("\n");
    text.push('\n');
    text
}

/// The English domain: every GCIDE entry, in index order.
fn load_english(dir: &Path) -> Result<Domain> {
    let (index_path, dict_path) = (dir.join("gcide.index"), dir.join("gcide.dict.dz"));
    for p in [&index_path, &dict_path] {
        if !p.is_file() {
            bail!(
                "{} not found: the English corpus is Debian's GCIDE dictionary; install it with \
                 `apt-get install -y dict-gcide` (or pass --gcide DIR)",
                p.display()
            );
        }
    }
    let index = std::fs::read_to_string(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
    let compressed = std::fs::File::open(&dict_path).with_context(|| format!("opening {}", dict_path.display()))?;
    let mut data = Vec::new();
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(compressed))
        .read_to_end(&mut data)
        .with_context(|| format!("decompressing {}", dict_path.display()))?;
    let mut spans = std::collections::BTreeSet::new();
    for (n, line) in index.lines().enumerate() {
        let mut f = line.split('\t');
        let (Some(word), Some(off), Some(len)) = (f.next(), f.next(), f.next()) else {
            bail!("{}:{}: expected `word<TAB>offset<TAB>length`", index_path.display(), n + 1);
        };
        if word.starts_with("00-database") {
            continue;
        }
        let (Some(off), Some(len)) = (dictd_number(off), dictd_number(len)) else {
            bail!("{}:{}: bad dictd offset or length", index_path.display(), n + 1);
        };
        ensure!(off + len <= data.len(), "{}:{}: entry past the end of the dictionary", index_path.display(), n + 1);
        spans.insert((off, len));
    }
    let docs: Vec<Doc> = spans
        .into_iter()
        .map(|(off, len)| Doc {
            key: format!("gcide:{off}"),
            text: clean_gcide_entry(&String::from_utf8_lossy(&data[off..off + len])),
        })
        .filter(|d| d.text.trim().len() > 1)
        .collect();
    ensure!(!docs.is_empty(), "{} holds no entries", index_path.display());
    Ok(Domain::new("english", format!("GCIDE ({} entries, {})", docs.len(), dict_path.display()), docs))
}

/// The newest `/usr/lib/python3.N` that holds `os.py`.
fn find_python_lib() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let minor: u32 = name.strip_prefix("python3.")?.parse().ok()?;
                    e.path().join("os.py").is_file().then(|| (minor, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.pop() {
        Some((_, p)) => Ok(p),
        None => bail!(
            "no Python standard library found (looked for /usr/lib/python3.N/os.py): the code corpus is its \
             source; install it with `apt-get install -y libpython3-stdlib` (or pass --python-lib DIR)"
        ),
    }
}

fn collect_py(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let meta = std::fs::symlink_metadata(&p).with_context(|| format!("reading {}", p.display()))?;
        if meta.is_dir() {
            if !PY_SKIP_DIRS.contains(&name.as_str()) {
                collect_py(&p, out)?;
            }
        } else if meta.is_file() && name.ends_with(".py") && meta.len() <= PY_MAX_FILE_BYTES {
            out.push(p);
        }
    }
    Ok(())
}

/// The code domain: the Python standard library's `.py` files, sorted by path.
fn load_code(lib: Option<&Path>) -> Result<Domain> {
    let lib = match lib {
        Some(p) => {
            ensure!(p.join("os.py").is_file(), "{} is not a Python standard library (no os.py)", p.display());
            p.to_path_buf()
        }
        None => find_python_lib()?,
    };
    let mut files = Vec::new();
    collect_py(&lib, &mut files)?;
    let mut docs = Vec::new();
    let mut skipped = 0;
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        match String::from_utf8(bytes) {
            Ok(text) if !text.trim().is_empty() && !text.contains(EOS) => {
                let rel = f.strip_prefix(&lib).unwrap_or(f).to_string_lossy().into_owned();
                docs.push(Doc { key: format!("python:{rel}"), text });
            }
            _ => skipped += 1,
        }
    }
    ensure!(!docs.is_empty(), "no .py files under {}", lib.display());
    let source = format!("Python standard library {} ({} files, {skipped} skipped)", lib.display(), docs.len());
    Ok(Domain::new("code", source, docs))
}

/// Trains the byte-level BPE tokenizer on training text only.
fn train_tokenizer(texts: &[&str], vocab: usize) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::models::{ModelWrapper, TrainerWrapper};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper};

    let mut tokenizer = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    let byte_level = ByteLevel::new(false, false, true);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer.train(&mut trainer, texts.iter()).map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    ensure!(tokenizer.token_to_id(EOS) == Some(0), "{EOS} must be token 0");
    Ok(tokenizer)
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
}

/// Documents tokenized (in parallel) and joined with the end-of-text token.
fn token_stream(tokenizer: &Tokenizer, docs: &[&str]) -> Result<Vec<u32>> {
    let encodings = tokenizer.encode_batch(docs.to_vec(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let mut out = Vec::new();
    for e in encodings {
        out.extend_from_slice(e.get_ids());
        out.push(0);
    }
    Ok(out)
}

/// Held-out evaluation data of one domain.
struct Heldout {
    /// Documents joined by the end-of-text token.
    text: String,
    /// The first `n·seq_len` tokens of `encode(text)`, cut into sequences.
    ids: Vec<Vec<u32>>,
    /// How many held-out documents were used (the rest feed the multiple-choice task).
    docs_used: usize,
}

fn build_heldout(tokenizer: &Tokenizer, domain: &Domain, seqs: usize, seq_len: usize) -> Result<Heldout> {
    let need = seqs * seq_len;
    let (mut text, mut tokens, mut docs_used) = (String::new(), 0usize, 0usize);
    for d in &domain.heldout {
        if tokens >= need {
            break;
        }
        text.push_str(&d.text);
        text.push_str(EOS);
        tokens += encode(tokenizer, &d.text)?.len() + 1;
        docs_used += 1;
    }
    let all = encode(tokenizer, &text)?;
    ensure!(
        all.len() >= need,
        "domain {}: only {} held-out tokens for {seqs} sequences of {seq_len}",
        domain.name,
        all.len()
    );
    let ids = all[..need].chunks(seq_len).map(<[u32]>::to_vec).collect();
    Ok(Heldout { text, ids, docs_used })
}

/// `(context, true continuation)` pairs from held-out documents: the context is up to ~600
/// bytes ending before a space, the continuation the next ~50–120 bytes up to a word end; long
/// documents give one pair per ~1000 bytes (at most 12).
fn mc_pairs(docs: &[Doc], max: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for d in docs {
        let t = d.text.as_str();
        let mut target = (t.len() / 2).clamp(120, 600);
        for _ in 0..12 {
            if out.len() >= max {
                return out;
            }
            let Some(p) =
                (target..t.len().saturating_sub(60)).find(|&i| t.is_char_boundary(i) && t.as_bytes()[i] == b' ')
            else {
                break;
            };
            let mut start = p.saturating_sub(600);
            while !t.is_char_boundary(start) {
                start += 1;
            }
            if start > 0 {
                start = t[start..p].find('\n').map_or(start, |n| start + n + 1);
            }
            let end = (p + 50..t.len().min(p + 120))
                .find(|&i| t.is_char_boundary(i) && t.as_bytes()[i].is_ascii_whitespace())
                .unwrap_or_else(|| (p + 50..=t.len().min(p + 120)).rev().find(|&i| t.is_char_boundary(i)).unwrap_or(p));
            let (context, cont) = (&t[start..p], &t[p..end]);
            if context.trim().len() >= 80 && cont.trim().len() >= 20 {
                out.push((context.to_string(), cont.to_string()));
            }
            target = end + 1000;
            if target + 60 >= t.len() {
                break;
            }
        }
    }
    out
}

/// Multiple-choice items: each context with its true continuation and three continuations
/// from other items of the same domain, in a seeded order.
fn mc_items(domain: &str, pairs: &[(String, String)], rng: &mut SplitMix64) -> Vec<Value> {
    let mut items = Vec::new();
    if pairs.len() < 4 {
        return items;
    }
    for (i, (context, truth)) in pairs.iter().enumerate() {
        let mut choices = vec![truth.clone()];
        while choices.len() < 4 {
            let j = rng.below(pairs.len());
            if j != i && !choices.contains(&pairs[j].1) {
                choices.push(pairs[j].1.clone());
            }
        }
        let label = rng.below(4);
        choices.swap(0, label);
        items.push(json!({"domain": domain, "context": context, "choices": choices, "label": label}));
    }
    items
}

/// Calibration text: training documents of both domains, alternating, until each domain
/// contributed `tokens` tokens.
fn build_calib(tokenizer: &Tokenizer, domains: &[Domain], tokens: usize) -> Result<String> {
    let mut text = String::new();
    let mut counts = vec![0usize; domains.len()];
    let mut next = vec![0usize; domains.len()];
    while counts.iter().any(|c| *c < tokens) {
        for (k, d) in domains.iter().enumerate() {
            if counts[k] >= tokens {
                continue;
            }
            // Take from the end of the shuffled order: the start feeds the tokenizer.
            let Some(doc) = d.train.iter().rev().nth(next[k]) else {
                bail!("domain {}: not enough training text for the calibration file", d.name);
            };
            next[k] += 1;
            text.push_str(&doc.text);
            text.push_str(EOS);
            counts[k] += encode(tokenizer, &doc.text)?.len() + 1;
        }
    }
    Ok(text)
}

/// The Mixtral `config.json`.
fn model_config(a: &TrainArgs) -> Value {
    json!({
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "head_dim": a.hidden / a.heads,
        "hidden_act": "silu",
        "hidden_size": a.hidden,
        "initializer_range": 0.02,
        "intermediate_size": a.intermediate,
        "max_position_embeddings": a.seq_len.max(512),
        "model_type": "mixtral",
        "num_attention_heads": a.heads,
        "num_experts_per_tok": a.top_k,
        "num_hidden_layers": a.layers,
        "num_key_value_heads": a.kv_heads,
        "num_local_experts": a.experts,
        "output_router_logits": false,
        "pad_token_id": null,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "rope_theta": 10000.0,
        "router_aux_loss_coef": a.aux_coef,
        "router_jitter_noise": 0.0,
        "sliding_window": null,
        "tie_word_embeddings": false,
        "dtype": "float32",
        "transformers_version": "5.24.0",
        "use_cache": true,
        "vocab_size": a.vocab
    })
}

/// Learning rate at step `s` (0-based): linear warm-up, cosine decay to `lr / 10`.
fn learning_rate(a: &TrainArgs, s: usize) -> f64 {
    if s < a.warmup {
        return a.lr * (s + 1) as f64 / a.warmup as f64;
    }
    let progress = (s - a.warmup) as f64 / (a.steps - a.warmup).max(1) as f64;
    let min = a.lr * 0.1;
    min + (a.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

fn scalar(t: diep_models::burn::tensor::Tensor<1>) -> f64 {
    t.into_data().iter::<f32>().next().unwrap_or(f32::NAN) as f64
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> Result<()> {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
}

fn ids_json(ids: &[Vec<u32>]) -> String {
    let rows: Vec<String> = ids.iter().map(|s| serde_json::to_string(s).expect("ids serialise")).collect();
    format!("[\n{}\n]\n", rows.join(",\n"))
}

/// Per MoE layer, the fraction of top-k slots each expert received on `ids`.
fn expert_usage(model: &MoeModel, ids: &[Vec<u32>]) -> Result<Vec<Vec<f64>>> {
    let mut counts: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for batch in ids.chunks(16) {
        model.forward_with(batch, &MoeForwardOptions::default(), |layer, _, out| {
            let n = out.routing.probs.dims()[1];
            let c = counts.entry(layer).or_insert_with(|| vec![0.0; n]);
            for e in out.routing.experts.into_data().iter::<i64>() {
                c[e as usize] += 1.0;
            }
        })?;
    }
    Ok(counts
        .into_values()
        .map(|c| {
            let total: f64 = c.iter().sum();
            c.into_iter().map(|x| x / total).collect()
        })
        .collect())
}

fn train(a: TrainArgs) -> Result<()> {
    ensure!(a.steps > 0 && a.batch >= 2 && a.seq_len >= 16, "need --steps ≥ 1, --batch ≥ 2, --seq-len ≥ 16");
    ensure!(
        a.hidden.is_multiple_of(a.heads) && a.heads.is_multiple_of(a.kv_heads),
        "--hidden must divide into --heads, --heads into --kv-heads"
    );
    ensure!((a.hidden / a.heads).is_multiple_of(2), "the head size must be even (RoPE)");
    ensure!(a.top_k >= 1 && a.top_k <= a.experts, "--top-k must be in 1..=--experts");
    ensure!(a.vocab >= 300, "--vocab must be at least 300 (256 bytes, the end-of-text token and merges)");
    let started = Instant::now();
    let out = a.out.clone().unwrap_or_else(|| workspace_root().join("fixtures/trained-moe"));
    diep_common::remove_stale_staging(&out)?;
    let staging = diep_common::Staging::create(&out)?;
    // On error the staging directory removes itself.
    build(&a, staging.path(), started)?;
    staging.commit(&out, true)?;
    eprintln!("wrote {} in {:.0}s", out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Everything but the final rename: writes the fixture into `stage`.
fn build(a: &TrainArgs, stage: &Path, started: Instant) -> Result<()> {
    // 1. Corpus.
    let t0 = Instant::now();
    let english = load_english(&a.gcide)?;
    let code = load_code(a.python_lib.as_deref())?;
    let domains = [english, code];
    for d in &domains {
        eprintln!(
            "{:>8}: {} — train {} docs / {:.1} MB, held out {} docs / {:.1} MB",
            d.name,
            d.source,
            d.train.len(),
            Domain::bytes(&d.train) as f64 / 1e6,
            d.heldout.len(),
            Domain::bytes(&d.heldout) as f64 / 1e6
        );
    }
    eprintln!("corpus read in {:.1}s", t0.elapsed().as_secs_f64());

    // 2. Tokenizer (training text only).
    let t0 = Instant::now();
    let tok_texts: Vec<&str> = domains.iter().flat_map(|d| d.train_prefix(a.tokenizer_mb)).collect();
    let tokenizer = train_tokenizer(&tok_texts, a.vocab)?;
    let vocab = tokenizer.get_vocab_size(true);
    ensure!(vocab == a.vocab, "the tokenizer learned {vocab} tokens, not {} (too little text?)", a.vocab);
    tokenizer.save(stage.join("tokenizer.json"), true).map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS, "eos_token": EOS, "unk_token": null, "pad_token": null,
        "add_bos_token": false, "add_eos_token": false, "clean_up_tokenization_spaces": false,
        "model_max_length": a.seq_len.max(512),
    });
    write(stage, "tokenizer_config.json", format!("{}\n", serde_json::to_string_pretty(&tokenizer_config)?))?;
    eprintln!("tokenizer: {vocab} tokens, trained in {:.1}s", t0.elapsed().as_secs_f64());

    // 3. Token streams, held-out data, calibration text, multiple choice.
    let t0 = Instant::now();
    let mut streams = Vec::new();
    let mut heldouts = Vec::new();
    let mut mc = Vec::new();
    let mut mc_rng = SplitMix64::for_stream(a.seed, "mc");
    for d in &domains {
        let stream = token_stream(&tokenizer, &d.train_prefix(a.pool_mb))?;
        ensure!(stream.len() > 4 * a.seq_len, "domain {}: training text too short", d.name);
        let h = build_heldout(&tokenizer, d, a.heldout_seqs, a.seq_len)?;
        write(stage, &format!("heldout/{}.txt", d.name), &h.text)?;
        write(stage, &format!("heldout/{}.ids.json", d.name), ids_json(&h.ids))?;
        let pairs = mc_pairs(&d.heldout[h.docs_used..], a.mc_items);
        ensure!(
            pairs.len() >= 4.min(a.mc_items),
            "domain {}: too few held-out documents for the multiple-choice task",
            d.name
        );
        mc.extend(mc_items(d.name, &pairs, &mut mc_rng));
        eprintln!(
            "{:>8}: {} training tokens ({:.2} bytes/token), {} held-out sequences, {} multiple-choice items",
            d.name,
            stream.len(),
            d.train_prefix(a.pool_mb).iter().map(|t| t.len()).sum::<usize>() as f64 / stream.len() as f64,
            h.ids.len(),
            pairs.len()
        );
        streams.push(stream);
        heldouts.push(h);
    }
    let calib = build_calib(&tokenizer, &domains, a.calib_tokens)?;
    write(stage, "calib.txt", &calib)?;
    let mc_text: String = mc.iter().map(|v| format!("{v}\n")).collect();
    write(stage, "mc.jsonl", mc_text)?;
    eprintln!("data prepared in {:.1}s", t0.elapsed().as_secs_f64());

    // 4. Model.
    let config_json = model_config(a);
    let config_text = format!("{}\n", serde_json::to_string_pretty(&config_json)?);
    write(stage, "config.json", &config_text)?;
    let config = ModelConfig::from_json_str(&config_text, stage.join("config.json"))?;
    let device = a.device.device()?.autodiff();
    let mut model = random_model(config, InitOptions { seed: a.seed, std: 0.02 }, &device)?;
    require_grad(&mut model);
    let params = num_parameters(&mut model);
    let active = params - a.layers * (a.experts - a.top_k) * 3 * a.hidden * a.intermediate;
    eprintln!(
        "model: mixtral, {} layers, hidden {}, {} heads ({} kv), {} experts × {} (top-{}), vocab {}: {} parameters ({} active per token)",
        a.layers, a.hidden, a.heads, a.kv_heads, a.experts, a.intermediate, a.top_k, a.vocab, params, active
    );

    // 5. Training.
    let mut opt = AdamW::new(AdamWConfig { weight_decay: a.weight_decay, ..AdamWConfig::default() });
    let mut data_rng = SplitMix64::for_stream(a.seed, "data");
    let pb = ProgressBar::new(a.steps as u64);
    pb.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    // Written as training goes, so a long run can be followed with `tail -f`.
    let log_path = stage.join("train-log.jsonl");
    let mut log = std::io::BufWriter::new(
        std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?,
    );
    let train_start = Instant::now();
    let (mut last_lm, mut last_aux) = (f64::NAN, f64::NAN);
    let mut ema: Option<f64> = None;
    for step in 0..a.steps {
        let batch: Vec<Vec<u32>> = (0..a.batch)
            .map(|i| {
                let s = &streams[i % streams.len()];
                let start = data_rng.below(s.len() - a.seq_len);
                s[start..start + a.seq_len].to_vec()
            })
            .collect();
        let loss = training_loss(&model, &batch, a.aux_coef)?;
        let grads = loss.total.backward();
        let (lm, aux) = (scalar(loss.lm), scalar(loss.aux));
        ensure!(lm.is_finite() && aux.is_finite(), "step {step}: the loss is not finite ({lm}, {aux})");
        let params = model.parameters_mut();
        let norm = grad_norm(&params, &grads);
        let scale = if norm > a.grad_clip { a.grad_clip / norm } else { 1.0 };
        let lr = learning_rate(a, step);
        opt.step(params, &grads, lr, scale);
        let seconds = train_start.elapsed().as_secs_f64();
        (last_lm, last_aux) = (lm, aux);
        ema = Some(ema.map_or(lm, |e| 0.95 * e + 0.05 * lm));
        let line = json!({
            "step": step + 1, "loss": lm + a.aux_coef * aux, "lm_loss": lm, "aux_loss": aux,
            "grad_norm": norm, "lr": lr, "seconds": (seconds * 1000.0).round() / 1000.0,
        });
        writeln!(log, "{line}").and_then(|_| log.flush()).with_context(|| format!("writing {}", log_path.display()))?;
        pb.set_message(format!("loss {:.3} (avg {:.3}) aux {:.3}", lm, ema.unwrap_or(lm), aux));
        pb.inc(1);
        if pb.is_hidden() && ((step + 1) % 100 == 0 || step + 1 == a.steps) {
            eprintln!(
                "step {}/{}: loss {lm:.4} (avg {:.4}) aux {aux:.4} lr {lr:.2e} {seconds:.0}s",
                step + 1,
                a.steps,
                ema.unwrap_or(lm)
            );
        }
    }
    pb.finish_and_clear();
    let train_seconds = train_start.elapsed().as_secs_f64();
    drop(log);
    eprintln!(
        "trained {} steps in {:.0}s ({:.2}s/step); last loss {:.4}, aux {:.4}",
        a.steps,
        train_seconds,
        train_seconds / a.steps as f64,
        last_lm,
        last_aux
    );

    // 6. Export, then evaluate the exported checkpoint as `cargo xtask eval` would.
    save_safetensors(&model.to_hf_tensors(), stage.join("model.safetensors")).context("writing model.safetensors")?;
    drop(model);
    let eval_device = a.device.device()?;
    let loaded = MoeModel::load(stage, &eval_device).context("reloading the exported checkpoint")?;
    let mut domain_reports = serde_json::Map::new();
    let mut usage_all = BTreeMap::new();
    for (d, h) in domains.iter().zip(&heldouts) {
        let report = diep_eval::perplexity(&loaded, &h.ids, 4096, |_, _| {})?;
        let usage = expert_usage(&loaded, &h.ids)?;
        eprintln!(
            "{:>8}: held-out perplexity {:.3} (mean NLL {:.4} nats) over {} predictions",
            d.name, report.perplexity, report.mean_nll, report.predictions
        );
        domain_reports.insert(
            d.name.to_string(),
            json!({
                "perplexity": report.perplexity, "mean_nll": report.mean_nll, "predictions": report.predictions,
                "uniform_perplexity": a.vocab, "source": d.source,
                "train_docs": d.train.len(), "heldout_docs": d.heldout.len(),
            }),
        );
        usage_all.insert(d.name, usage);
    }
    let total_seconds = started.elapsed().as_secs_f64();
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let summary = json!({
        "command": format!("cargo xtask {command}"),
        "seed": a.seed, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len,
        "parameters": params, "active_parameters": active,
        "final_lm_loss": last_lm, "final_aux_loss": last_aux,
        "train_seconds": train_seconds, "total_seconds": total_seconds,
        "tokens_seen": a.steps * a.batch * a.seq_len,
        "heldout": domain_reports,
        "expert_usage": usage_all,
    });
    write(stage, "summary.json", format!("{}\n", serde_json::to_string_pretty(&summary)?))?;
    write(stage, "README.md", readme(a, &summary, &usage_all))?;
    eprintln!("fixture built in {total_seconds:.0}s");
    Ok(())
}

fn readme(a: &TrainArgs, s: &Value, usage: &BTreeMap<&str, Vec<Vec<f64>>>) -> String {
    let mut r = String::new();
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(r, "# trained-moe: a small Mixtral MoE trained by this project\n");
    let _ = writeln!(
        r,
        "Built from scratch by `cargo xtask fixture train` (`xtask/src/fixture.rs`, model code \
         `xtask/src/train.rs`) on a CPU. Regenerate with:\n\n```sh\n\
         apt-get install -y dict-gcide   # English domain; the Python standard library is the code domain\n{}\n```\n",
        s["command"].as_str().unwrap_or_default()
    );
    let _ = writeln!(r, "## Model\n");
    let _ = writeln!(
        r,
        "`MixtralForCausalLM` (transformers loads it unchanged): {} layers, hidden {}, {} attention heads ({} key/value), \
         {} experts of intermediate size {} per layer, top-{}, vocabulary {} (byte-level BPE), untied head, f32. \
         {} parameters, {} active per token.\n",
        a.layers,
        a.hidden,
        a.heads,
        a.kv_heads,
        a.experts,
        a.intermediate,
        a.top_k,
        a.vocab,
        s["parameters"],
        s["active_parameters"]
    );
    let _ = writeln!(r, "## Data\n");
    let _ = writeln!(
        r,
        "- `english`: {}.\n- `code`: {}.\n\nA document (GCIDE entry, Python file) is held out when \
         `fnv1a64(key) % {HELDOUT_MODULUS} == 0`; held-out text reaches neither the tokenizer nor the model. Documents \
         are separated by `{EOS}` (token 0). The tokenizer was trained on {} MB of training text per domain; training \
         windows are drawn from {} MB per domain.\n",
        s["heldout"]["english"]["source"].as_str().unwrap_or_default(),
        s["heldout"]["code"]["source"].as_str().unwrap_or_default(),
        a.tokenizer_mb,
        a.pool_mb
    );
    let _ = writeln!(r, "## Training\n");
    let _ = writeln!(
        r,
        "AdamW (β = 0.9, 0.95, weight decay {} on matrices), peak learning rate {} with {} warm-up steps and cosine decay \
         to a tenth, gradient norm clipped to {}, {} steps of {} sequences × {} tokens ({} tokens), half English and \
         half code, random windows. Loss = next-token cross-entropy + {} × load-balancing loss (per layer \
         `E · Σ_e f_e · P_e`, averaged over layers). Seed {}. Training took {:.0} s ({:.0} s in all); final batch \
         cross-entropy {:.4}, load-balancing loss {:.4} (2 = balanced). Per-step log: `train-log.jsonl`.\n",
        a.weight_decay,
        a.lr,
        a.warmup,
        a.grad_clip,
        a.steps,
        a.batch,
        a.seq_len,
        s["tokens_seen"],
        a.aux_coef,
        a.seed,
        f(&s["train_seconds"]),
        f(&s["total_seconds"]),
        f(&s["final_lm_loss"]),
        f(&s["final_aux_loss"])
    );
    let _ = writeln!(r, "## Held-out perplexity\n");
    let _ = writeln!(
        r,
        "| domain | perplexity | mean NLL (nats) | predictions | uniform baseline |\n|---|---|---|---|---|"
    );
    for d in ["english", "code"] {
        let h = &s["heldout"][d];
        let _ = writeln!(
            r,
            "| {d} | {:.3} | {:.4} | {} | {} |",
            f(&h["perplexity"]),
            f(&h["mean_nll"]),
            h["predictions"],
            a.vocab
        );
    }
    let _ = writeln!(
        r,
        "\nAs `cargo xtask eval --model fixtures/trained-moe --ids fixtures/trained-moe/heldout/english.ids.json` computes \
         it; `scripts/check_trained_fixture.py` checks transformers agrees.\n"
    );
    let _ = writeln!(r, "## Expert usage on held-out text\n");
    let _ = writeln!(
        r,
        "Share of the top-{} routing slots each expert receives (uniform = {:.3}).\n",
        a.top_k,
        1.0 / a.experts as f64
    );
    let header: String = (0..a.experts).map(|e| format!(" e{e} |")).collect();
    let _ = writeln!(r, "| domain | layer |{header}\n|---|---|{}", "---|".repeat(a.experts));
    for (d, layers) in usage {
        for (l, u) in layers.iter().enumerate() {
            let cells: String = u.iter().map(|x| format!(" {x:.3} |")).collect();
            let _ = writeln!(r, "| {d} | {l} |{cells}");
        }
    }
    let _ = writeln!(r, "\n## Files\n");
    let _ = writeln!(
        r,
        "- `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`: the HF checkpoint.\n\
         - `heldout/{{english,code}}.txt`: held-out documents joined by `{EOS}`; `heldout/{{english,code}}.ids.json`: \
         the first {} × {} tokens of their encoding, as `cargo xtask eval --ids` reads them.\n\
         - `calib.txt`: {} tokens per domain of training text for calibration (`cargo xtask prune --calib`).\n\
         - `mc.jsonl`: multiple choice from other held-out documents: `{{\"domain\", \"context\", \"choices\" (4), \
         \"label\"}}`, the true continuation and three continuations of other items of the same domain.\n\
         - `train-log.jsonl` (step, loss, lm_loss, aux_loss, grad_norm, lr, seconds), `summary.json` (the numbers above).",
        a.heldout_seqs, a.seq_len, a.calib_tokens
    );
    r
}
