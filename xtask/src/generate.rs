//! `cargo xtask fixture generate`: a Mixtral-shaped checkpoint of any size with random
//! weights, written tensor by tensor (never more than one tensor in memory), in bf16, f16, f32
//! or FP8 (DeepSeek's block format: linear weights `F8_E4M3` with an f32 `weight_scale_inv` per
//! 128 × 128 block, embeddings, norms, routers and the head in bf16), sharded like transformers' `save_pretrained` (`model-0000i-of-0000n.safetensors` and
//! `model.safetensors.index.json`). For memory and speed measurements at scale; the weights
//! are random, so the model computes nothing meaningful.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::util::{progress_bar, workspace_root};
use diep_common::SplitMix64;

/// Arguments of `cargo xtask fixture generate`.
#[derive(Args, Clone, Debug)]
pub struct GenerateArgs {
    /// Output directory (must not exist unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// Decoder layers (all MoE).
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 1536)]
    hidden: usize,
    /// Expert width (`intermediate_size`).
    #[arg(long, default_value_t = 4608)]
    intermediate: usize,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// Vocabulary size (the tokenizer copied from fixtures/trained-moe uses the first 2048 ids).
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Weight dtype on disk: bf16, f16, f32, or fp8 (linear weights in DeepSeek's FP8 block
    /// format, the rest bf16).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Largest shard in MB (transformers' default is 5000; 0 = one file).
    #[arg(long, default_value_t = 1000)]
    shard_mb: u64,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    /// Standard deviation of the values (norm weights are 1 ± std).
    std: f32,
    norm: bool,
    /// A linear weight of a decoder layer: FP8-quantised under `--dtype fp8`.
    linear: bool,
}

/// FP8 block size of `--dtype fp8` (the DeepSeek-V3 release's).
const FP8_BLOCK: usize = 128;

impl TensorSpec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn fp8(&self, dtype: &str) -> bool {
        dtype == "fp8" && self.linear
    }

    /// The block-scale shape of an FP8 weight.
    fn scale_shape(&self) -> [usize; 2] {
        [self.shape[0].div_ceil(FP8_BLOCK), self.shape[1].div_ceil(FP8_BLOCK)]
    }

    /// Bytes on disk, the FP8 scale included.
    fn bytes(&self, dtype: &str) -> usize {
        if self.fp8(dtype) {
            let [a, b] = self.scale_shape();
            return self.numel() + 4 * a * b;
        }
        self.numel() * if dtype == "f32" { 4 } else { 2 }
    }
}

/// Weight values from the toolkit's seeded generator: uniform with the requested std.
struct Rng(SplitMix64);
impl Rng {
    /// Uniform on [−√3·std, √3·std] (variance std²).
    fn fill(&mut self, out: &mut [f32], std: f32) {
        let scale = std * 3f32.sqrt() * 2.0 / (1u64 << 24) as f32;
        let shift = std * 3f32.sqrt();
        for pair in out.chunks_mut(2) {
            let r = self.0.next_u64();
            for (i, x) in pair.iter_mut().enumerate() {
                *x = ((r >> (32 * i + 8)) & 0xFF_FFFF) as f32 * scale - shift;
            }
        }
    }
}

fn specs(a: &GenerateArgs) -> Vec<TensorSpec> {
    let (h, i, hd) = (a.hidden, a.intermediate, a.hidden / a.heads);
    let t = |name: String, shape: Vec<usize>, std: f32| TensorSpec { name, shape, std, norm: false, linear: true };
    let n = |name: String| TensorSpec { name, shape: vec![h], std: 0.05, norm: true, linear: false };
    let plain = |name: String, shape: Vec<usize>, std: f32| TensorSpec { name, shape, std, norm: false, linear: false };
    let std = 0.02;
    let mut v = vec![plain("model.embed_tokens.weight".into(), vec![a.vocab, h], std)];
    for l in 0..a.layers {
        let p = format!("model.layers.{l}");
        v.push(n(format!("{p}.input_layernorm.weight")));
        v.push(t(format!("{p}.self_attn.q_proj.weight"), vec![a.heads * hd, h], std));
        v.push(t(format!("{p}.self_attn.k_proj.weight"), vec![a.kv_heads * hd, h], std));
        v.push(t(format!("{p}.self_attn.v_proj.weight"), vec![a.kv_heads * hd, h], std));
        v.push(t(format!("{p}.self_attn.o_proj.weight"), vec![h, a.heads * hd], std));
        v.push(n(format!("{p}.post_attention_layernorm.weight")));
        v.push(plain(format!("{p}.block_sparse_moe.gate.weight"), vec![a.experts, h], 0.1));
        for e in 0..a.experts {
            let q = format!("{p}.block_sparse_moe.experts.{e}");
            v.push(t(format!("{q}.w1.weight"), vec![i, h], std));
            v.push(t(format!("{q}.w2.weight"), vec![h, i], std));
            v.push(t(format!("{q}.w3.weight"), vec![i, h], std));
        }
    }
    v.push(n("model.norm.weight".into()));
    v.push(plain("lm_head.weight".into(), vec![a.vocab, h], std));
    v
}

/// The nearest e4m3 byte of `x` (saturating at ±448), by search over the code table.
fn to_e4m3(x: f32, table: &[(f32, u8)]) -> u8 {
    let a = x.abs().min(448.0);
    let i = table.partition_point(|(v, _)| *v < a);
    let best = match (table.get(i.wrapping_sub(1)), table.get(i)) {
        (Some(lo), Some(hi)) => {
            if a - lo.0 <= hi.0 - a {
                lo.1
            } else {
                hi.1
            }
        }
        (Some(lo), None) => lo.1,
        (None, Some(hi)) => hi.1,
        (None, None) => 0,
    };
    if x.is_sign_negative() && best != 0 { best | 0x80 } else { best }
}

/// DeepSeek's block quantisation of an `[rows, cols]` weight: per 128 × 128 block
/// `s = amax / 448`, `q = e4m3(w / s)`; returns the codes and the row-major scales.
fn quantize_fp8(values: &[f32], rows: usize, cols: usize, table: &[(f32, u8)]) -> (Vec<u8>, Vec<f32>) {
    let (sr, sc) = (rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK));
    let mut scales = vec![0f32; sr * sc];
    for r in 0..rows {
        for c in 0..cols {
            let s = &mut scales[(r / FP8_BLOCK) * sc + c / FP8_BLOCK];
            *s = s.max(values[r * cols + c].abs());
        }
    }
    scales.iter_mut().for_each(|s| *s = if *s > 0.0 { *s / 448.0 } else { 1.0 });
    let q = (0..rows * cols)
        .map(|k| to_e4m3(values[k] / scales[(k / cols / FP8_BLOCK) * sc + (k % cols) / FP8_BLOCK], table))
        .collect();
    (q, scales)
}

fn encode(values: &[f32], dtype: &str, out: &mut Vec<u8>) {
    out.clear();
    match dtype {
        "bf16" | "fp8" => out.extend(values.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())),
        "f16" => out.extend(values.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes())),
        _ => out.extend(values.iter().flat_map(|x| x.to_le_bytes())),
    }
}

/// Writes one safetensors file from `specs`, generating each tensor as it is written.
fn write_shard(
    path: &Path,
    specs: &[&TensorSpec],
    dtype: &str,
    rng: &mut Rng,
    pb: &indicatif::ProgressBar,
) -> Result<()> {
    let st_dtype = match dtype {
        "bf16" | "fp8" => "BF16",
        "f16" => "F16",
        _ => "F32",
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs {
        if s.fp8(dtype) {
            let n = s.numel();
            header.insert(
                s.name.clone(),
                json!({"dtype": "F8_E4M3", "shape": s.shape, "data_offsets": [offset, offset + n]}),
            );
            let end = offset + s.bytes(dtype);
            header.insert(
                format!("{}_scale_inv", s.name),
                json!({"dtype": "F32", "shape": s.scale_shape(), "data_offsets": [offset + n, end]}),
            );
            offset = end;
            continue;
        }
        let bytes = s.bytes(dtype);
        header.insert(
            s.name.clone(),
            json!({"dtype": st_dtype, "shape": s.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let table: Vec<(f32, u8)> = {
        let mut t: Vec<(f32, u8)> =
            (0u8..0x7f).map(|b| (diep_checkpoint::quant::fp8_to_f32(b, diep_checkpoint::Fp8Format::E4M3), b)).collect();
        t.sort_by(|a, b| a.0.total_cmp(&b.0));
        t
    };
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    let mut values = Vec::new();
    let mut buf = Vec::new();
    for s in specs {
        values.resize(s.shape.iter().product(), 0.0);
        rng.fill(&mut values, s.std);
        if s.norm {
            values.iter_mut().for_each(|x| *x += 1.0);
        }
        if s.fp8(dtype) {
            let (q, scales) = quantize_fp8(&values, s.shape[0], s.shape[1], &table);
            buf.clear();
            buf.extend_from_slice(&q);
            buf.extend(scales.iter().flat_map(|x| x.to_le_bytes()));
        } else {
            encode(&values, dtype, &mut buf);
        }
        w.write_all(&buf)?;
        pb.inc(buf.len() as u64);
    }
    w.flush()?;
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if !["bf16", "f16", "f32", "fp8"].contains(&a.dtype.as_str()) {
        bail!("--dtype must be bf16, f16, f32 or fp8, not {:?}", a.dtype);
    }
    if !a.hidden.is_multiple_of(a.heads) || !a.heads.is_multiple_of(a.kv_heads) || a.top_k > a.experts || a.top_k == 0 {
        bail!("inconsistent shape: hidden % heads, heads % kv_heads must be 0 and 1 ≤ top_k ≤ experts");
    }
    if a.out.exists() && !a.force {
        bail!("{} exists; pass --force to replace it", a.out.display());
    }
    let specs = specs(&a);
    let total: usize = specs.iter().map(|s| s.bytes(&a.dtype)).sum();
    // Shards as transformers cuts them: in order, a new shard when the next tensor would overflow.
    let limit = if a.shard_mb == 0 { usize::MAX } else { (a.shard_mb * 1_000_000) as usize };
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut size = 0;
    for s in &specs {
        let b = s.bytes(&a.dtype);
        if size + b > limit && !shards.last().expect("one").is_empty() {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one").push(s);
        size += b;
    }
    diep_common::remove_stale_staging(&a.out)?;
    let staging = diep_common::Staging::create(&a.out)?;
    let tmp = staging.path().to_path_buf();
    eprintln!(
        "generating {} ({} layers, hidden {}, {} experts × {}, vocab {}, {}): {:.2} GB in {} shard(s)",
        a.out.display(),
        a.layers,
        a.hidden,
        a.experts,
        a.intermediate,
        a.vocab,
        a.dtype,
        total as f64 / 1e9,
        shards.len()
    );
    let start = Instant::now();
    let pb = progress_bar(total as u64, "bytes");
    let mut rng = Rng(SplitMix64::new(a.seed ^ 0xD1E9_5EED));
    let mut weight_map = BTreeMap::new();
    let n = shards.len();
    for (k, shard) in shards.iter().enumerate() {
        let file =
            if n == 1 { "model.safetensors".to_owned() } else { format!("model-{:05}-of-{n:05}.safetensors", k + 1) };
        write_shard(&tmp.join(&file), shard, &a.dtype, &mut rng, &pb)?;
        for s in shard {
            weight_map.insert(s.name.clone(), file.clone());
            if s.fp8(&a.dtype) {
                weight_map.insert(format!("{}_scale_inv", s.name), file.clone());
            }
        }
    }
    pb.finish_and_clear();
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(tmp.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    }
    let torch_dtype = match a.dtype.as_str() {
        "bf16" | "fp8" => "bfloat16",
        "f16" => "float16",
        _ => "float32",
    };
    let config = json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": a.hidden / a.heads,
        "num_local_experts": a.experts, "num_experts_per_tok": a.top_k, "vocab_size": a.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": null,
        "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 0,
        "router_aux_loss_coef": 0.0, "dtype": torch_dtype, "torch_dtype": torch_dtype,
        "transformers_version": "5.24.0"
    });
    let mut config = config;
    if a.dtype == "fp8" {
        config["quantization_config"] = json!({"quant_method": "fp8", "fmt": "e4m3",
            "activation_scheme": "dynamic", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]});
    }
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    let tok_dir = workspace_root().join("fixtures/trained-moe");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok_dir.join(f), tmp.join(f))
            .with_context(|| format!("copying {f} from {}", tok_dir.display()))?;
    }
    staging.commit(&a.out, true)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {}: {:.2} GB ({} tensors, {n} shard(s)) in {secs:.1}s ({:.0} MB/s)",
        a.out.display(),
        total as f64 / 1e9,
        specs.len(),
        total as f64 / 1e6 / secs
    );
    Ok(())
}
