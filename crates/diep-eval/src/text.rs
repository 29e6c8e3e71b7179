//! Perplexity over text files.

use crate::EvalError;
use crate::tokenize::LmTokenizer;

/// Tokenises `text` with no special tokens and cuts it into consecutive, non-overlapping
/// windows of `seq_len` tokens, dropping the last partial window.
pub fn text_windows(tokenizer: &LmTokenizer, text: &str, seq_len: usize) -> Result<Vec<Vec<u32>>, EvalError> {
    if seq_len < 2 {
        return Err(EvalError::Tokenize { reason: format!("--seq-len must be at least 2, not {seq_len}") });
    }
    let ids = tokenizer.encode_plain(text)?;
    Ok(ids.chunks_exact(seq_len).map(<[u32]>::to_vec).collect())
}
