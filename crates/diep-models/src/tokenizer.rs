//! Loading a model directory's `tokenizer.json` with the `tokenizers` crate.

use std::path::Path;

pub use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

/// Loads `tokenizer.json` from a model directory (or the file itself).
pub fn load_tokenizer(dir: impl AsRef<Path>) -> Result<Tokenizer> {
    let dir = dir.as_ref();
    let path = if dir.is_dir() { dir.join("tokenizer.json") } else { dir.to_path_buf() };
    if !path.is_file() {
        return Err(ModelError::Tokenizer { path, reason: "file not found".into() });
    }
    Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer { path, reason: e.to_string() })
}

/// Encodes text to token ids without adding special tokens.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| ModelError::Tokenization { reason: e.to_string() })
}
