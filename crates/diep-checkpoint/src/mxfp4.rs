//! MXFP4 weights (gpt-oss): decoding `{name}_blocks` + `{name}_scales` to f32, as transformers'
//! `integrations/mxfp4.py::convert_moe_packed_tensors`.
//!
//! - `blocks [..., rows, G, 16]` uint8: 32 FP4 (E2M1) values per group, two a byte, the low
//!   nibble first; a nibble is a sign bit and an index into ±{0, .5, 1, 1.5, 2, 3, 4, 6}.
//! - `scales [..., rows, G]` uint8: the group's exponent, the values are multiplied by
//!   `2^(s − 127)`.
//! - The decoded `[..., rows, 32·G]` is transposed over its last two axes: gpt-oss stores
//!   `gate_up_proj_blocks [E, 2I, H/32, 16]` for the `gate_up_proj [E, H, 2I]` it replaces.

use safetensors::Dtype;

use crate::error::{CheckpointError, Result};
use crate::weights::TensorRef;

/// The 16 FP4 E2M1 values, indexed by nibble.
pub const FP4_VALUES: [f32; 16] =
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// The shape of the dequantised tensor for `blocks` of shape `[..., rows, G, B]`:
/// `[..., 2·B·G, rows]`.
pub fn mxfp4_dequantized_shape(blocks_shape: &[usize]) -> Option<Vec<usize>> {
    let n = blocks_shape.len();
    if n < 3 {
        return None;
    }
    let mut out = blocks_shape[..n - 3].to_vec();
    out.push(2 * blocks_shape[n - 2] * blocks_shape[n - 1]);
    out.push(blocks_shape[n - 3]);
    Some(out)
}

/// Decodes raw MXFP4 bytes: `blocks` `[prefix, rows, G, B]`, `scales` `[prefix, rows, G]`
/// (`prefix` = product of the leading axes), to f32 `[prefix, 2·B·G, rows]`.
pub fn dequantize_mxfp4(blocks: &[u8], scales: &[u8], prefix: usize, rows: usize, groups: usize, b: usize) -> Vec<f32> {
    let cols = 2 * b * groups;
    let mut out = vec![0f32; prefix * cols * rows];
    for p in 0..prefix {
        for r in 0..rows {
            for g in 0..groups {
                let s = scales[(p * rows + r) * groups + g] as i32 - 127;
                let scale = 2f32.powi(s);
                let base = ((p * rows + r) * groups + g) * b;
                for k in 0..b {
                    let byte = blocks[base + k];
                    let c = g * 2 * b + 2 * k;
                    out[(p * cols + c) * rows + r] = FP4_VALUES[(byte & 0x0f) as usize] * scale;
                    out[(p * cols + c + 1) * rows + r] = FP4_VALUES[(byte >> 4) as usize] * scale;
                }
            }
        }
    }
    out
}

/// Decodes an MXFP4 pair of tensors to f32, checking dtypes and shapes; returns the values
/// and their shape `[..., 2·B·G, rows]`.
pub fn decode_mxfp4_pair(blocks: &TensorRef<'_>, scales: &TensorRef<'_>) -> Result<(Vec<f32>, Vec<usize>)> {
    let bad = |t: &TensorRef<'_>, reason: String| CheckpointError::Safetensors { path: t.path.to_path_buf(), reason };
    for t in [blocks, scales] {
        if t.dtype != Dtype::U8 {
            return Err(CheckpointError::UnsupportedDtype {
                name: t.name.to_string(),
                path: t.path.to_path_buf(),
                dtype: t.dtype,
            });
        }
    }
    let n = blocks.shape.len();
    let Some(shape) = mxfp4_dequantized_shape(blocks.shape) else {
        return Err(bad(
            blocks,
            format!("MXFP4 blocks `{}` must have at least 3 axes, not {:?}", blocks.name, blocks.shape),
        ));
    };
    if scales.shape != &blocks.shape[..n - 1] {
        return Err(CheckpointError::ShapeMismatch {
            name: scales.name.to_string(),
            path: scales.path.to_path_buf(),
            expected: blocks.shape[..n - 1].to_vec(),
            found: scales.shape.to_vec(),
        });
    }
    let prefix: usize = blocks.shape[..n - 3].iter().product();
    let (rows, groups, b) = (blocks.shape[n - 3], blocks.shape[n - 2], blocks.shape[n - 1]);
    Ok((dequantize_mxfp4(blocks.bytes, scales.bytes, prefix, rows, groups, b), shape))
}

/// `{name}_blocks` / `{name}_scales` for a tensor name.
pub fn mxfp4_names(name: &str) -> (String, String) {
    (
        format!("{name}{}", crate::architectures::gpt_oss::MXFP4_BLOCKS),
        format!("{name}{}", crate::architectures::gpt_oss::MXFP4_SCALES),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_nibbles_low_first_with_exponent_and_transposes() {
        // prefix 1, rows 2, one group of B = 1 byte: 2 values per row.
        // row 0: byte 0x21 -> lo 1 (0.5), hi 2 (1.0); scale 128 -> ×2.
        // row 1: byte 0x9f -> lo 15 (−6), hi 9 (−0.5); scale 126 -> ×0.5.
        let out = dequantize_mxfp4(&[0x21, 0x9f], &[128, 126], 1, 2, 1, 1);
        // [cols = 2, rows = 2], column-major in rows: out[c * rows + r].
        assert_eq!(out, vec![1.0, -3.0, 2.0, -0.25]);
        assert_eq!(mxfp4_dequantized_shape(&[4, 6, 2, 16]), Some(vec![4, 64, 6]));
    }
}
