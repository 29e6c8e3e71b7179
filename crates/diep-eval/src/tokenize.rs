//! Tokenisation as lm-evaluation-harness does it with a HuggingFace fast tokenizer.
//!
//! - Text is encoded the way `tokenizer.encode(text)` does in transformers 5.x: special tokens
//!   are added when `tokenizer.json`'s post-processor adds them (transformers 5.x ignores
//!   `add_bos_token`/`add_eos_token` in `tokenizer_config.json` when `tokenizer.json` exists).
//!   A string that already starts with the BOS token's text is encoded without special tokens
//!   (lm-eval's `has_bos_prefix`).
//! - [`LmTokenizer::encode_pair`] is lm-eval's `_encode_pair` for causal models: the context's
//!   trailing whitespace moves to the continuation, the whole string is encoded once, and the
//!   continuation is what follows the separately encoded context's length.
//! - An empty context becomes the prefix token (BOS, else EOS), as in lm-eval's `loglikelihood`.

use std::path::{Path, PathBuf};

use diep_models::tokenizer::Tokenizer;
use serde_json::Value;

use crate::EvalError;

/// How `encode(text)` adds special tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecialTokens {
    /// `tokenizer.json`'s post-processor decides.
    PostProcessor,
    /// BOS and/or EOS around the text, whatever the post-processor says (for tokenizers
    /// configured outside `tokenizer.json`).
    Explicit {
        /// Token prepended, if any.
        bos: Option<u32>,
        /// Token appended, if any.
        eos: Option<u32>,
    },
}

/// A model's tokenizer with the special-token facts lm-eval uses.
pub struct LmTokenizer {
    tokenizer: Tokenizer,
    special: SpecialTokens,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
}

/// A `(context, continuation)` pair as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    /// The context's tokens (never empty).
    pub context: Vec<u32>,
    /// The continuation's tokens, the ones that are scored.
    pub continuation: Vec<u32>,
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, EvalError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: path.into(), source })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| EvalError::Input { path: path.into(), reason: format!("invalid JSON: {e}") })
}

impl LmTokenizer {
    /// Loads `tokenizer.json` and the special tokens of `tokenizer_config.json` (then
    /// `special_tokens_map.json`, then `config.json`'s `bos_token_id`/`eos_token_id`) from a
    /// model directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, EvalError> {
        let dir = dir.as_ref();
        let tokenizer = diep_models::tokenizer::load_tokenizer(dir)?;
        let tok_config_path = dir.join("tokenizer_config.json");
        let tok_config = read_json(&tok_config_path)?.unwrap_or(Value::Null);
        let special_map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);

        let resolve = |field: &str, id_field: &str| -> Result<Option<(u32, String)>, EvalError> {
            let named = tok_config.get(field).filter(|v| !v.is_null()).or_else(|| special_map.get(field));
            if let Some(v) = named.filter(|v| !v.is_null()) {
                let content = token_content(v).ok_or_else(|| EvalError::Input {
                    path: tok_config_path.clone(),
                    reason: format!("`{field}` must be a string or an object with `content`"),
                })?;
                let id = tokenizer.token_to_id(&content).ok_or_else(|| EvalError::Input {
                    path: tok_config_path.clone(),
                    reason: format!("`{field}` {content:?} is not in tokenizer.json's vocabulary"),
                })?;
                return Ok(Some((id, content)));
            }
            let id = model_config.get(id_field).and_then(|v| match v {
                Value::Array(a) => a.first().and_then(Value::as_u64),
                v => v.as_u64(),
            });
            Ok(id.map(|id| (id as u32, tokenizer.id_to_token(id as u32).unwrap_or_default())))
        };
        let bos = resolve("bos_token", "bos_token_id")?;
        let eos = resolve("eos_token", "eos_token_id")?;

        // transformers 5.x drops `add_bos_token`/`add_eos_token` of tokenizer_config.json when a
        // tokenizer.json exists, and replaces a missing post-processor by one that adds nothing:
        // tokenizer.json's post-processor alone decides.
        let special = SpecialTokens::PostProcessor;
        Ok(Self { tokenizer, special, bos, eos })
    }

    /// Wraps a tokenizer with explicit special-token facts (tests, custom setups).
    pub fn new(
        tokenizer: Tokenizer,
        special: SpecialTokens,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
    ) -> Self {
        Self { tokenizer, special, bos, eos }
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// How special tokens are added.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// lm-eval's `prefix_token_id`: BOS if the tokenizer has one, else EOS.
    pub fn prefix_token(&self) -> Option<u32> {
        self.bos.as_ref().or(self.eos.as_ref()).map(|t| t.0)
    }

    /// Encodes text without special tokens.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| EvalError::Tokenize { reason: e.to_string() })
    }

    /// Encodes text as `tokenizer.encode(text)` does in transformers, with lm-eval's rule that a
    /// string starting with the BOS text gets no special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EvalError> {
        let prefix_text = self.bos.as_ref().or(self.eos.as_ref()).map(|t| t.1.as_str());
        if prefix_text.is_some_and(|p| !p.is_empty() && text.starts_with(p)) {
            return self.encode_plain(text);
        }
        match &self.special {
            SpecialTokens::PostProcessor => self
                .tokenizer
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| EvalError::Tokenize { reason: e.to_string() }),
            SpecialTokens::Explicit { bos, eos } => {
                let mut ids: Vec<u32> = bos.iter().copied().collect();
                ids.extend(self.encode_plain(text)?);
                ids.extend(eos.iter().copied());
                Ok(ids)
            }
        }
    }

    /// lm-eval's split of a `(context, continuation)` request into token ids.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<EncodedPair, EvalError> {
        if context.is_empty() {
            let cont = self.encode_plain(continuation)?;
            let prefix = self.prefix_token().ok_or_else(|| EvalError::Tokenize {
                reason: "an empty context needs a BOS or EOS token, and the tokenizer has neither".into(),
            })?;
            return Ok(if cont.first() != Some(&prefix) {
                EncodedPair { context: vec![prefix], continuation: cont }
            } else {
                EncodedPair { context: cont[..1].to_vec(), continuation: cont[1..].to_vec() }
            });
        }
        let trimmed = context.trim_end_matches(is_python_whitespace);
        let (context, continuation) = if trimmed.len() < context.len() {
            (trimmed.to_owned(), format!("{}{continuation}", &context[trimmed.len()..]))
        } else {
            (context.to_owned(), continuation.to_owned())
        };
        let whole = self.encode(&format!("{context}{continuation}"))?;
        let context_enc = self.encode(&context)?;
        let continuation_enc = whole.get(context_enc.len()..).unwrap_or_default().to_vec();
        Ok(EncodedPair { context: context_enc, continuation: continuation_enc })
    }
}

/// Python's `str.isspace()` for one character: Unicode white space plus the ASCII
/// information separators U+001C..U+001F, which Python also strips.
pub fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// lm-eval's `max_length` for a HuggingFace model directory: the first of `n_positions`,
/// `max_position_embeddings`, `n_ctx` in config.json (its `text_config` first), else the
/// tokenizer's `model_max_length` unless it is "infinite", else 2048.
pub fn lm_eval_max_length(dir: impl AsRef<Path>) -> Result<usize, EvalError> {
    let dir = dir.as_ref();
    let config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
    let cfg = config.get("text_config").filter(|v| v.is_object()).unwrap_or(&config);
    for attr in ["n_positions", "max_position_embeddings", "n_ctx"] {
        if let Some(v) = cfg.get(attr).and_then(Value::as_u64) {
            return Ok(v as usize);
        }
    }
    let tok: PathBuf = dir.join("tokenizer_config.json");
    if let Some(v) = read_json(&tok)?.and_then(|t| t.get("model_max_length").and_then(Value::as_f64)) {
        // transformers' VERY_LARGE_INTEGER (int(1e30)) means "unset".
        if v < 1e29 {
            return Ok(v as usize);
        }
    }
    Ok(2048)
}
