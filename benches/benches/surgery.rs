//! Surgery throughput: applying a pruning plan (a quarter of the experts removed) to a
//! generated Mixtral-shaped bf16 checkpoint of ~260 MB, against a plain copy of the same files
//! (`std::fs::copy`). Throughput is bytes of the source checkpoint per second.
//!
//! Run: `cargo bench -p diep-benches --bench surgery`.

use std::collections::BTreeMap;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diep_surgery::{PruningPlan, SurgeryOptions, apply_plan};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const LAYERS: usize = 4;
const EXPERTS: usize = 8;
const HIDDEN: usize = 1024;
const INTER: usize = 2048;

/// `n` bytes of bf16 values uniform in [-0.05, 0.05].
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_add(1);
    (0..n / 2)
        .flat_map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let x = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            let b = (x.to_bits() >> 16) as u16;
            b.to_le_bytes()
        })
        .collect()
}

fn write_checkpoint(dir: &Path) -> u64 {
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![2048, HIDDEN]),
        ("model.norm.weight".into(), vec![HIDDEN]),
        ("lm_head.weight".into(), vec![2048, HIDDEN]),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        tensors.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        for proj in ["q", "k", "v", "o"] {
            tensors.push((format!("{p}.self_attn.{proj}_proj.weight"), vec![HIDDEN, HIDDEN]));
        }
        tensors.push((format!("{p}.block_sparse_moe.gate.weight"), vec![EXPERTS, HIDDEN]));
        for e in 0..EXPERTS {
            let q = format!("{p}.block_sparse_moe.experts.{e}");
            tensors.push((format!("{q}.w1.weight"), vec![INTER, HIDDEN]));
            tensors.push((format!("{q}.w2.weight"), vec![HIDDEN, INTER]));
            tensors.push((format!("{q}.w3.weight"), vec![INTER, HIDDEN]));
        }
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .enumerate()
        .map(|(i, (n, s))| {
            let b = bytes(s.iter().product::<usize>() * 2, i as u64);
            (n, s, b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> =
        data.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::BF16, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 8,
        "num_key_value_heads": 8, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
        "vocab_size": 2048, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::metadata(dir.join("model.safetensors")).unwrap().len()
}

fn surgery(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("model");
    std::fs::create_dir_all(&src).unwrap();
    let size = write_checkpoint(&src);
    let original: BTreeMap<usize, usize> = (0..LAYERS).map(|l| (l, EXPERTS)).collect();
    let kept: BTreeMap<usize, Vec<usize>> =
        (0..LAYERS).map(|l| (l, (0..EXPERTS).filter(|e| e % 4 != l % 4).collect())).collect();
    let plan = PruningPlan::new("mixtral", original, kept, "bench");
    let out = tmp.path().join("pruned");
    let copy = tmp.path().join("copy.safetensors");
    let mut g = c.benchmark_group("surgery");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(size));
    g.bench_function("apply_plan/bf16-260MB/25%-removed", |bench| {
        bench.iter(|| apply_plan(&src, &plan, &out, &SurgeryOptions { force: true, ..Default::default() }).unwrap());
    });
    g.bench_function("fs_copy/bf16-260MB", |bench| {
        bench.iter(|| std::fs::copy(src.join("model.safetensors"), &copy).unwrap());
    });
    g.finish();
}

criterion_group!(benches, surgery);
criterion_main!(benches);
