//! Calibration data: documents from plain-text or JSONL files, tokenised, cut into
//! non-overlapping windows, and sampled deterministically from a seed.

use std::path::{Path, PathBuf};

use diep_models::tokenizer::{Tokenizer, encode};

use crate::error::{PruneError, Result};
use diep_common::SplitMix64;

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
}

impl Default for CalibrationSpec {
    /// The paper's setting: 128 samples of 2048 tokens.
    fn default() -> Self {
        CalibrationSpec { files: Vec::new(), samples: 128, seq_len: 2048, seed: 0 }
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
/// seeded shuffle. Fails with the token counts found and needed when there is too little text.
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
    let mut stream: Vec<u32> = Vec::new();
    for file in &spec.files {
        for doc in read_documents(file)? {
            stream.extend(encode(tokenizer, &doc)?);
        }
    }
    let windows = stream.len() / spec.seq_len;
    if windows < spec.samples {
        let names: Vec<String> = spec.files.iter().map(|f| f.display().to_string()).collect();
        return Err(PruneError::Config(format!(
            "too little calibration text: {} tokens found in {}, but {} samples × {} tokens = {} are needed \
             (add text with --calib, or lower --samples / --seq-len)",
            stream.len(),
            names.join(", "),
            spec.samples,
            spec.seq_len,
            spec.samples * spec.seq_len
        )));
    }
    let mut order: Vec<usize> = (0..windows).collect();
    SplitMix64::new(spec.seed).shuffle(&mut order);
    let mut picked = order[..spec.samples].to_vec();
    picked.sort_unstable();
    Ok(picked.into_iter().map(|w| stream[w * spec.seq_len..(w + 1) * spec.seq_len].to_vec()).collect())
}
