//! Calibration data: documents from plain-text or JSONL files, tokenised, cut into
//! non-overlapping windows, and sampled deterministically from a seed.

use std::path::{Path, PathBuf};

use diep_models::tokenizer::{Tokenizer, encode};

use crate::error::{PruneError, Result};
use diep_common::SplitMix64;

/// How the calibration samples are shared among the files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CalibrationMix {
    /// All files are one token stream, and windows are drawn from it at random: each file
    /// contributes in proportion to its tokens, and a seed's share of each file varies.
    #[default]
    Pooled,
    /// Every file contributes the same number of samples (`samples / files`, the first
    /// `samples % files` files one more), drawn from its own windows: a fixed domain mix,
    /// whatever the files' sizes.
    Equal,
}

impl CalibrationMix {
    /// Every mix, in the order the command line lists them.
    pub const ALL: [CalibrationMix; 2] = [CalibrationMix::Pooled, CalibrationMix::Equal];

    /// The name the command line and `pruning.json` use.
    pub fn name(self) -> &'static str {
        match self {
            CalibrationMix::Pooled => "pooled",
            CalibrationMix::Equal => "equal",
        }
    }
}

impl std::str::FromStr for CalibrationMix {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        CalibrationMix::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown calibration mix `{s}` (expected pooled or equal)"))
    }
}

/// How to draw calibration samples.
#[derive(Debug, Clone)]
pub struct CalibrationSpec {
    /// Text files: `.jsonl` / `.json` files hold one JSON object per line with a `text` field;
    /// any other file is one plain-text document; `.gz` files are decompressed first.
    pub files: Vec<PathBuf>,
    /// Number of sequences.
    pub samples: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Seed of the sampling.
    pub seed: u64,
    /// How the samples are shared among `files`.
    pub mix: CalibrationMix,
}

impl Default for CalibrationSpec {
    /// The paper's setting: 128 samples of 2048 tokens.
    fn default() -> Self {
        CalibrationSpec { files: Vec::new(), samples: 128, seq_len: 2048, seed: 0, mix: CalibrationMix::Pooled }
    }
}

/// Reads the documents of one calibration file. `.jsonl` and `.json` files (C4's shards are
/// JSON lines named `.json`) hold one JSON object per line with a `text` field; any other file
/// is one plain-text document. A `.gz` suffix on any of them is decompressed first
/// (`c4-train.00000-of-01024.json.gz`).
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let io = |source| PruneError::Io { path: path.into(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    let (name, gzip) = match name.strip_suffix(".gz") {
        Some(inner) => (inner.to_string(), true),
        None => (name, false),
    };
    let text = if gzip {
        use std::io::Read as _;
        let file = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)).read_to_string(&mut text).map_err(io)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(io)?
    };
    let is_jsonl = name.ends_with(".jsonl") || name.ends_with(".json");
    if !is_jsonl {
        return Ok(vec![text]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| PruneError::Input { path: path.into(), reason: format!("line {}: {reason}", i + 1) };
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => docs.push(s.clone()),
            Some(_) => return Err(bad("field `text` must be a string".into())),
            None => return Err(bad("missing field `text`".into())),
        }
    }
    Ok(docs)
}

/// Tokenises every document (no special tokens), concatenates them in file order, cuts the
/// stream into non-overlapping windows of `seq_len` tokens and picks `samples` of them with a
/// seeded shuffle ([`CalibrationMix::Pooled`]), or does so for each file's own stream and its
/// equal share of the samples ([`CalibrationMix::Equal`]; with one file both draw the same
/// windows). Fails with the token counts found and needed when there is too little text.
pub fn sample_calibration(tokenizer: &Tokenizer, spec: &CalibrationSpec) -> Result<Vec<Vec<u32>>> {
    if spec.files.is_empty() {
        return Err(PruneError::Config("no calibration text given (use --calib FILE)".into()));
    }
    if spec.samples == 0 || spec.seq_len < 2 {
        return Err(PruneError::Config(format!(
            "calibration needs at least one sample of at least 2 tokens (got {} × {})",
            spec.samples, spec.seq_len
        )));
    }
    let stream_of = |files: &[PathBuf]| -> Result<Vec<u32>> {
        let mut stream: Vec<u32> = Vec::new();
        for file in files {
            for doc in read_documents(file)? {
                stream.extend(encode(tokenizer, &doc)?);
            }
        }
        Ok(stream)
    };
    let mut rng = SplitMix64::new(spec.seed);
    match spec.mix {
        CalibrationMix::Pooled => {
            draw_windows(&stream_of(&spec.files)?, &spec.files, spec.samples, spec.seq_len, &mut rng, "")
        }
        CalibrationMix::Equal => {
            let n = spec.files.len();
            if spec.samples < n {
                return Err(PruneError::Config(format!(
                    "an equal calibration mix of {n} files needs at least {n} samples (got --samples {})",
                    spec.samples
                )));
            }
            let why = format!(" for its equal share of {n} files (--calib-mix equal)");
            let mut picked = Vec::with_capacity(spec.samples);
            for (f, file) in spec.files.iter().enumerate() {
                let share = spec.samples / n + usize::from(f < spec.samples % n);
                let files = std::slice::from_ref(file);
                picked.extend(draw_windows(&stream_of(files)?, files, share, spec.seq_len, &mut rng, &why)?);
            }
            Ok(picked)
        }
    }
}

/// `samples` windows of `seq_len` tokens of `stream` (the text of `files`), picked by `rng`'s
/// shuffle of all windows and returned in stream order; too few windows is an error naming
/// the files and the counts (`why`: what the samples are for, appended to the count).
fn draw_windows(
    stream: &[u32],
    files: &[PathBuf],
    samples: usize,
    seq_len: usize,
    rng: &mut SplitMix64,
    why: &str,
) -> Result<Vec<Vec<u32>>> {
    let windows = stream.len() / seq_len;
    if windows < samples {
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        return Err(PruneError::Config(format!(
            "too little calibration text: {} tokens found in {}, but {} samples × {} tokens = {} are needed{why} \
             (add text with --calib, or lower --samples / --seq-len)",
            stream.len(),
            names.join(", "),
            samples,
            seq_len,
            samples * seq_len
        )));
    }
    let mut order: Vec<usize> = (0..windows).collect();
    rng.shuffle(&mut order);
    let mut picked = order[..samples].to_vec();
    picked.sort_unstable();
    Ok(picked.into_iter().map(|w| stream[w * seq_len..(w + 1) * seq_len].to_vec()).collect())
}
