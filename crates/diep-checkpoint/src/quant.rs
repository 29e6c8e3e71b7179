//! Quantised weights declared by `config.json`'s `quantization_config`, and FP8 decoding.
//!
//! Two FP8 weight formats are read, both as `F8_E4M3` (or `F8_E5M2`) weights with a separate
//! scale tensor, dequantised blockwise as `w[r][c] = q[r][c] · s[r / bo][c / bi]` in f32:
//!
//! - **DeepSeek's block format** (`quant_method: "fp8"`; DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8,
//!   Qwen3-FP8, MiniMax-M2): `{"fmt": "e4m3", "activation_scheme": "dynamic",
//!   "weight_block_size": [bo, bi]}`; each quantised `<name>` (a linear `*.weight [out, in]`)
//!   has a float32 `<name>_scale_inv` of shape `[⌈out/bo⌉, ⌈in/bi⌉]`. Despite its name the
//!   scale multiplies.
//! - **llm-compressor's compressed-tensors FP8** (`quant_method: "compressed-tensors"`,
//!   `format: "float-quantized"`): a config group whose `weights` are `{"num_bits": 8,
//!   "type": "float"}` with `strategy` `tensor` (scale `[1]` or `[]`), `channel` (`[out, 1]`) or
//!   `block` (`block_structure [bo, bi]`); the scale is `<prefix>.weight_scale` (= `<name>_scale`).
//!   Static activation scales (`input_scale`) are ignored: evaluation runs the dequantised
//!   weights on full-precision activations.
//!
//! Which tensors are quantised is read from the tensors themselves (their dtype): embeddings,
//! norms, routers, correction biases and `lm_head` stay in 16 or 32 bits in real checkpoints.
//! MXFP4 (`quant_method: "mxfp4"`, gpt-oss) is described in [`crate::mxfp4`].

use safetensors::Dtype;
use serde_json::Value;

use crate::error::{CheckpointError, Result};
use crate::fields::Fields;
use crate::weights::{TensorRef, decode_to_f32};

/// How a checkpoint's weights are quantised, from `quantization_config`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Quantization {
    /// gpt-oss's MXFP4 experts (`*_blocks` / `*_scales`), see [`crate::mxfp4`].
    Mxfp4,
    /// FP8 weights with a separate scale tensor.
    Fp8(Fp8Scheme),
}

/// The two FP8 encodings of safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Format {
    /// 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, `S.1111.111` is NaN
    /// (`float8_e4m3fn`, ±448 at most).
    E4M3,
    /// 1 sign, 5 exponent (bias 15), 2 mantissa bits; IEEE-like infinities and NaNs.
    E5M2,
}

impl Fp8Format {
    /// The safetensors dtype of the format.
    pub fn dtype(self) -> Dtype {
        match self {
            Fp8Format::E4M3 => Dtype::F8_E4M3,
            Fp8Format::E5M2 => Dtype::F8_E5M2,
        }
    }

    /// The format of a safetensors dtype, if it is an FP8 one.
    pub fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F8_E4M3 => Some(Fp8Format::E4M3),
            Dtype::F8_E5M2 => Some(Fp8Format::E5M2),
            _ => None,
        }
    }
}

/// The granularity of an FP8 weight's scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLayout {
    /// One scale per `[rows, cols]` block: scale shape `[⌈out/rows⌉, ⌈in/cols⌉]`.
    Block {
        /// Block height (output rows).
        rows: usize,
        /// Block width (input columns).
        cols: usize,
    },
    /// One scale per output row: `[out, 1]` (or `[out]`).
    Channel,
    /// One scale for the whole tensor: `[1]` (or `[]`).
    Tensor,
}

/// An FP8 weight scheme from `quantization_config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Scheme {
    /// The `quant_method` it was read from (`fp8` or `compressed-tensors`).
    pub quant_method: String,
    /// The format the config declares (the tensors' own dtype decides how they are decoded).
    pub format: Fp8Format,
    /// The scale granularity.
    pub scale: ScaleLayout,
    /// The scale tensor of weight `<name>` is `<name><scale_suffix>`: `_scale_inv` (DeepSeek)
    /// or `_scale` (compressed-tensors, i.e. `<prefix>.weight_scale`).
    pub scale_suffix: &'static str,
}

/// Suffix of DeepSeek-format block scales.
pub const SCALE_INV_SUFFIX: &str = "_scale_inv";
/// Suffix of compressed-tensors scales (`<prefix>.weight_scale`).
pub const SCALE_SUFFIX: &str = "_scale";

impl Fp8Scheme {
    /// The scale tensor's name for weight `name`.
    pub fn scale_name(&self, name: &str) -> String {
        format!("{name}{}", self.scale_suffix)
    }

    /// The block of one scale for an `[out, in]` weight.
    pub fn block(&self, out: usize, inp: usize) -> (usize, usize) {
        match self.scale {
            ScaleLayout::Block { rows, cols } => (rows, cols),
            ScaleLayout::Channel => (1, inp.max(1)),
            ScaleLayout::Tensor => (out.max(1), inp.max(1)),
        }
    }

    /// A short description for messages and `pruning.json` (`fp8 e4m3, 128×128 blocks`).
    pub fn describe(&self) -> String {
        let fmt = match self.format {
            Fp8Format::E4M3 => "e4m3",
            Fp8Format::E5M2 => "e5m2",
        };
        let scale = match self.scale {
            ScaleLayout::Block { rows, cols } => format!("{rows}×{cols} blocks"),
            ScaleLayout::Channel => "per-channel scales".to_string(),
            ScaleLayout::Tensor => "per-tensor scales".to_string(),
        };
        format!("{} {fmt}, {scale} (`{}`)", self.quant_method, self.scale_suffix.trim_start_matches('_'))
    }
}

/// Reads `quantization_config`: `None` when absent, else the scheme, or an error naming the
/// field for a method this toolkit cannot read.
pub(crate) fn parse(f: &Fields<'_>) -> Result<Option<Quantization>> {
    const FIELD: &str = "quantization_config";
    let Some(q) = f.get(FIELD) else { return Ok(None) };
    let Value::Object(q) = q else {
        return Err(f.invalid(FIELD, format!("expected an object, found {q}")));
    };
    let sub = Fields { map: q, path: f.path };
    let named = |e: crate::error::CheckpointError| match e {
        CheckpointError::InvalidField { path, field, reason } => {
            CheckpointError::InvalidField { path, field: format!("{FIELD}.{field}"), reason }
        }
        CheckpointError::MissingField { path, field } => {
            CheckpointError::MissingField { path, field: format!("{FIELD}.{field}") }
        }
        other => other,
    };
    let method = sub.req_str("quant_method").map_err(named)?;
    match method.to_ascii_lowercase().as_str() {
        "mxfp4" => Ok(Some(Quantization::Mxfp4)),
        "fp8" => {
            let format = match sub.opt_str("fmt").map_err(named)?.as_deref() {
                None | Some("e4m3") | Some("float8_e4m3fn") => Fp8Format::E4M3,
                Some("e5m2") | Some("float8_e5m2") => Fp8Format::E5M2,
                Some(other) => {
                    return Err(f.invalid(
                        &format!("{FIELD}.fmt"),
                        format!("`{other}` is not an FP8 format this toolkit reads (e4m3 or e5m2)"),
                    ));
                }
            };
            let scale = match sub.opt_usize_list("weight_block_size").map_err(named)? {
                Some(b) if b.len() == 2 && b[0] > 0 && b[1] > 0 => ScaleLayout::Block { rows: b[0], cols: b[1] },
                Some(b) => {
                    return Err(f.invalid(
                        &format!("{FIELD}.weight_block_size"),
                        format!("expected two positive integers [rows, cols], found {b:?}"),
                    ));
                }
                // transformers' FineGrainedFP8Config default.
                None => ScaleLayout::Block { rows: 128, cols: 128 },
            };
            Ok(Some(Quantization::Fp8(Fp8Scheme {
                quant_method: "fp8".into(),
                format,
                scale,
                scale_suffix: SCALE_INV_SUFFIX,
            })))
        }
        "compressed-tensors" => compressed_tensors(f, q).map(|s| Some(Quantization::Fp8(s))),
        _ => Err(f.invalid(
            &format!("{FIELD}.quant_method"),
            format!(
                "`{method}` checkpoints are not supported; this toolkit reads unquantised (f32/f16/bf16), FP8 \
                 (`fp8` block scales, or `compressed-tensors` float-quantized) and MXFP4 (`mxfp4`) weights"
            ),
        )),
    }
}

/// compressed-tensors with 8-bit float weights in every config group.
fn compressed_tensors(f: &Fields<'_>, q: &serde_json::Map<String, Value>) -> Result<Fp8Scheme> {
    const FIELD: &str = "quantization_config";
    let bad = |field: &str, reason: String| f.invalid(&format!("{FIELD}.{field}"), reason);
    if let Some(fmt) = q.get("format").and_then(Value::as_str)
        && fmt != "float-quantized"
        && fmt != "naive-quantized"
    {
        return Err(bad(
            "format",
            format!("`{fmt}` is not supported; only FP8 weights (`float-quantized`) of compressed-tensors are read"),
        ));
    }
    let Some(Value::Object(groups)) = q.get("config_groups") else {
        return Err(bad("config_groups", "expected an object of quantisation groups".into()));
    };
    let mut scheme: Option<Fp8Scheme> = None;
    for (name, g) in groups {
        let w = g.get("weights").filter(|w| !w.is_null());
        let Some(w) = w else { continue };
        let field = format!("config_groups.{name}.weights");
        let num_bits = w.get("num_bits").and_then(Value::as_u64);
        let kind = w.get("type").and_then(Value::as_str);
        if num_bits != Some(8) || kind != Some("float") {
            return Err(bad(
                &field,
                format!(
                    "{} {}-bit weights are not supported; only 8-bit float (FP8) weights are read",
                    kind.unwrap_or("?"),
                    num_bits.map_or("?".to_string(), |b| b.to_string())
                ),
            ));
        }
        let scale = match w.get("strategy").and_then(Value::as_str) {
            Some("tensor") => ScaleLayout::Tensor,
            Some("channel") => ScaleLayout::Channel,
            Some("block") => match w
                .get("block_structure")
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|x| x.as_u64().map(|v| v as usize)).collect::<Option<Vec<_>>>())
            {
                Some(Some(b)) if b.len() == 2 && b[0] > 0 && b[1] > 0 => ScaleLayout::Block { rows: b[0], cols: b[1] },
                _ => return Err(bad(&format!("{field}.block_structure"), "expected [rows, cols]".into())),
            },
            other => {
                return Err(bad(
                    &format!("{field}.strategy"),
                    format!("{other:?} is not supported (tensor, channel or block)"),
                ));
            }
        };
        let s = Fp8Scheme {
            quant_method: "compressed-tensors".into(),
            format: Fp8Format::E4M3,
            scale,
            scale_suffix: SCALE_SUFFIX,
        };
        if let Some(prev) = &scheme
            && *prev != s
        {
            return Err(bad("config_groups", "groups with different FP8 weight strategies are not supported".into()));
        }
        scheme = Some(s);
    }
    scheme.ok_or_else(|| bad("config_groups", "no group quantises weights".into()))
}

/// The 256 values of an FP8 format, indexed by byte.
pub fn fp8_table(format: Fp8Format) -> [f32; 256] {
    let mut t = [0f32; 256];
    for (b, v) in t.iter_mut().enumerate() {
        *v = fp8_to_f32(b as u8, format);
    }
    t
}

/// One FP8 byte as f32 (exact: every FP8 value is an f32).
pub fn fp8_to_f32(b: u8, format: Fp8Format) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let (exp_bits, man_bits, bias) = match format {
        Fp8Format::E4M3 => (4u32, 3u32, 7i32),
        Fp8Format::E5M2 => (5, 2, 15),
    };
    let exp = ((b & 0x7f) >> man_bits) as i32;
    let man = (b & ((1 << man_bits) - 1)) as i32;
    let max_exp = (1 << exp_bits) - 1;
    match format {
        Fp8Format::E4M3 if exp == max_exp && man == (1 << man_bits) - 1 => return f32::NAN,
        Fp8Format::E5M2 if exp == max_exp => return if man == 0 { sign * f32::INFINITY } else { f32::NAN },
        _ => {}
    }
    let scale = (1 << man_bits) as f32;
    if exp == 0 {
        sign * (man as f32 / scale) * 2f32.powi(1 - bias)
    } else {
        sign * (1.0 + man as f32 / scale) * 2f32.powi(exp - bias)
    }
}

/// Dequantises an `[out, in]` FP8 weight with its scale: `q · s` in f32, one scale per block of
/// [`Fp8Scheme::block`]. Checks both dtypes and the scale's shape, naming the tensor at fault.
pub fn dequantize_fp8(weight: &TensorRef<'_>, scale: &TensorRef<'_>, scheme: &Fp8Scheme) -> Result<Vec<f32>> {
    let Some(format) = Fp8Format::of(weight.dtype) else {
        return Err(CheckpointError::UnsupportedDtype {
            name: weight.name.to_string(),
            path: weight.path.to_path_buf(),
            dtype: weight.dtype,
        });
    };
    let (out, inp) = match weight.shape {
        [o, i] => (*o, *i),
        [o] => (*o, 1),
        other => {
            return Err(CheckpointError::Safetensors {
                path: weight.path.to_path_buf(),
                reason: format!("FP8 weight `{}` must be 2-D [out, in], not {other:?}", weight.name),
            });
        }
    };
    let (bo, bi) = scheme.block(out, inp);
    let (so, si) = (out.div_ceil(bo), inp.div_ceil(bi));
    let ok = match scheme.scale {
        ScaleLayout::Block { .. } => scale.shape == [so, si],
        ScaleLayout::Channel => scale.shape == [out, 1] || scale.shape == [out],
        ScaleLayout::Tensor => scale.numel() == 1 && scale.shape.len() <= 1,
    };
    if !ok {
        return Err(CheckpointError::ShapeMismatch {
            name: scale.name.to_string(),
            path: scale.path.to_path_buf(),
            expected: match scheme.scale {
                ScaleLayout::Block { .. } => vec![so, si],
                ScaleLayout::Channel => vec![out, 1],
                ScaleLayout::Tensor => vec![1],
            },
            found: scale.shape.to_vec(),
        });
    }
    let s = decode_to_f32(scale.bytes, scale.dtype).ok_or_else(|| CheckpointError::UnsupportedDtype {
        name: scale.name.to_string(),
        path: scale.path.to_path_buf(),
        dtype: scale.dtype,
    })?;
    let table = fp8_table(format);
    let mut w = vec![0f32; out * inp];
    for r in 0..out {
        let srow = &s[(r / bo) * si..(r / bo) * si + si];
        let q = &weight.bytes[r * inp..(r + 1) * inp];
        for (c, (o, b)) in w[r * inp..(r + 1) * inp].iter_mut().zip(q).enumerate() {
            *o = table[*b as usize] * srow[c / bi];
        }
    }
    weight.release();
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_values_by_hand() {
        let v = |b| fp8_to_f32(b, Fp8Format::E4M3);
        assert_eq!(v(0x00), 0.0);
        assert_eq!(v(0x38), 1.0); // exp 7, man 0
        assert_eq!(v(0x3c), 1.5);
        assert_eq!(v(0x7e), 448.0); // exp 15, man 6: 1.75 · 2^8
        assert!(v(0x7f).is_nan() && v(0xff).is_nan());
        assert_eq!(v(0x01), 2f32.powi(-9)); // smallest subnormal: 1/8 · 2^-6
        assert_eq!(v(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(v(0xb8), -1.0);
    }

    /// compressed-tensors' per-channel and per-tensor scales, and a block scale with partial
    /// edge blocks, on hand-computed values.
    #[test]
    fn dequantizes_channel_tensor_and_block_scales() {
        use safetensors::tensor::TensorView;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        // q = [[1, 1.5, -1], [2, 0.5, 448]] in e4m3.
        let q: Vec<u8> = vec![0x38, 0x3c, 0xb8, 0x40, 0x30, 0x7e];
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (ch, t, blk) = (f32s(&[2.0, 0.5]), f32s(&[0.25]), f32s(&[1.0, 10.0]));
        let tensors = vec![
            ("w".to_string(), TensorView::new(Dtype::F8_E4M3, vec![2, 3], &q).unwrap()),
            ("w_scale".to_string(), TensorView::new(Dtype::F32, vec![2, 1], &ch).unwrap()),
            ("t_scale".to_string(), TensorView::new(Dtype::F32, vec![1], &t).unwrap()),
            ("b_scale_inv".to_string(), TensorView::new(Dtype::F32, vec![1, 2], &blk).unwrap()),
        ];
        safetensors::serialize_to_file(tensors, None, &path).unwrap();
        let c = crate::Checkpoint::open_file(&path).unwrap();
        let w = c.get("w").unwrap();
        let scheme =
            |scale| Fp8Scheme { quant_method: "test".into(), format: Fp8Format::E4M3, scale, scale_suffix: "" };
        let got = dequantize_fp8(&w, &c.get("w_scale").unwrap(), &scheme(ScaleLayout::Channel)).unwrap();
        assert_eq!(got, vec![2.0, 3.0, -2.0, 1.0, 0.25, 224.0]);
        let got = dequantize_fp8(&w, &c.get("t_scale").unwrap(), &scheme(ScaleLayout::Tensor)).unwrap();
        assert_eq!(got, vec![0.25, 0.375, -0.25, 0.5, 0.125, 112.0]);
        // 2 × 2 blocks over [2, 3]: columns 0-1 scale 1, column 2 (a partial block) scale 10.
        let got = dequantize_fp8(&w, &c.get("b_scale_inv").unwrap(), &scheme(ScaleLayout::Block { rows: 2, cols: 2 }))
            .unwrap();
        assert_eq!(got, vec![1.0, 1.5, -10.0, 2.0, 0.5, 4480.0]);
        // A per-channel scale given to a block scheme is a shape error naming the scale.
        let err = dequantize_fp8(&w, &c.get("w_scale").unwrap(), &scheme(ScaleLayout::Block { rows: 2, cols: 2 }))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`w_scale`"), "{err}");
    }

    #[test]
    fn e5m2_values_by_hand() {
        let v = |b| fp8_to_f32(b, Fp8Format::E5M2);
        assert_eq!(v(0x3c), 1.0); // exp 15, man 0
        assert_eq!(v(0x7b), 57344.0); // exp 30, man 3: 1.75 · 2^15
        assert_eq!(v(0x7c), f32::INFINITY);
        assert_eq!(v(0xfc), f32::NEG_INFINITY);
        assert!(v(0x7d).is_nan());
        assert_eq!(v(0x01), 2f32.powi(-16)); // 1/4 · 2^-14
    }
}
