//! diep-eval against lm-evaluation-harness: template strings, the context/continuation token
//! split and continuation log-likelihoods from lm-eval 0.4.13 itself
//! (`scripts/gen_lm_eval_goldens.py` → `fixtures/eval/`), and log-likelihoods hand-computed on a
//! model whose layers contribute nothing. The device comes from `DIEP_TEST_DEVICE`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use diep_eval::{
    EncodedPair, LmTokenizer, LoglikOptions, Loglikelihood, McDoc, SpecialTokens, TaskFormat, load_task,
    loglikelihoods, np_argmax, score_docs,
};
use diep_models::burn::tensor::Device;
use diep_models::{DeviceSpec, MoeModel};
use serde_json::{Value, json};

/// `DIEP_TEST_DEVICE` (`cpu` by default; CI also runs `wgpu`).
fn device() -> Device {
    DeviceSpec::from_test_env().unwrap().device().unwrap()
}

fn opts(max_length: usize, max_batch_tokens: usize, logits_cache: bool) -> LoglikOptions {
    LoglikOptions { max_length, max_batch_tokens, logits_cache }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/eval").join(name)).unwrap()).unwrap()
}

#[test]
fn templates_match_lm_eval() {
    let g = golden("templates.json");
    let tasks = g["tasks"].as_object().unwrap();
    assert!(tasks.len() >= 10, "every template has reference documents");
    for (name, rows) in tasks {
        let format = TaskFormat::from_task_name(name).unwrap();
        let docs = load_task(root().join(format!("fixtures/eval/docs/{name}.jsonl")), &format).unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(docs.len(), rows.len(), "{name}");
        for (i, (doc, row)) in docs.iter().zip(rows).enumerate() {
            let requests: Vec<(String, String)> = row["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r[0].as_str().unwrap().to_owned(), r[1].as_str().unwrap().to_owned()))
                .collect();
            assert_eq!(doc.requests, requests, "{name} document {i}: requests");
            let choices: Vec<String> =
                row["choices"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
            assert_eq!(doc.choices, choices, "{name} document {i}: choices");
            assert_eq!(doc.gold as u64, row["gold"].as_u64().unwrap(), "{name} document {i}: gold");
        }
    }
}

#[test]
fn token_split_matches_lm_eval() {
    let g = golden("loglik-trained-moe.json");
    let tok = LmTokenizer::from_dir(root().join("fixtures/trained-moe")).unwrap();
    for r in g["requests"].as_array().unwrap() {
        let pair = tok.encode_pair(r["context"].as_str().unwrap(), r["continuation"].as_str().unwrap()).unwrap();
        let ids =
            |k: &str| -> Vec<u32> { r[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
        assert_eq!(pair.context, ids("context_enc"), "{r}");
        assert_eq!(pair.continuation, ids("continuation_enc"), "{r}");
    }
}

#[test]
fn loglikelihoods_match_lm_eval_on_the_trained_fixture() {
    let g = golden("loglik-trained-moe.json");
    let dir = root().join("fixtures/trained-moe");
    let tok = LmTokenizer::from_dir(&dir).unwrap();
    assert_eq!(diep_eval::lm_eval_max_length(&dir).unwrap() as u64, g["max_length"].as_u64().unwrap());
    let model = MoeModel::load(&dir, &device()).unwrap();
    let reqs = g["requests"].as_array().unwrap();
    let pairs: Vec<EncodedPair> = reqs
        .iter()
        .map(|r| tok.encode_pair(r["context"].as_str().unwrap(), r["continuation"].as_str().unwrap()).unwrap())
        .collect();
    // A small batch budget, so requests of different lengths share padded batches.
    let lls = loglikelihoods(&model, &pairs, opts(512, 300, true), |_, _| {}).unwrap();
    for (r, l) in reqs.iter().zip(&lls) {
        let want = r["loglikelihood"].as_f64().unwrap();
        assert!((l.loglikelihood - want).abs() <= 1e-4 * want.abs().max(1.0), "{} vs {want}: {r}", l.loglikelihood);
        assert_eq!(l.is_greedy, r["is_greedy"].as_bool().unwrap(), "{r}");
    }
    // The same numbers one request at a time, each with its own forward pass (no padding).
    let single = loglikelihoods(&model, &pairs, opts(512, 1, false), |_, _| {}).unwrap();
    for (a, b) in single.iter().zip(&lls) {
        assert!((a.loglikelihood - b.loglikelihood).abs() < 1e-4);
    }
}

/// A word-level tokenizer over six words, `<s>` as BOS.
fn word_tokenizer(dir: &std::path::Path) {
    let vocab: BTreeMap<&str, u32> =
        [("<s>", 0), ("the", 1), ("cat", 2), ("sat", 3), ("on", 4), ("mat", 5)].into_iter().collect();
    let tok = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<s>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

const EMBED: [[f32; 4]; 6] = [
    [0.5, -1.0, 0.25, 2.0],
    [1.0, 0.0, -0.5, 0.5],
    [-0.75, 1.5, 0.5, 0.0],
    [0.2, 0.4, -1.2, 1.0],
    [2.0, -0.5, 0.0, -1.0],
    [0.0, 0.3, 0.9, -0.6],
];
const HEAD: [[f32; 4]; 6] = [
    [0.1, 0.2, -0.3, 0.4],
    [-1.0, 0.5, 0.25, 0.0],
    [0.6, -0.2, 0.8, -0.4],
    [0.0, 1.1, -0.7, 0.3],
    [0.9, 0.0, 0.4, -1.2],
    [-0.3, -0.6, 0.2, 0.7],
];
const NORM: [f32; 4] = [1.0, 0.5, 2.0, 1.5];
const EPS: f64 = 1e-6;

/// A one-layer Mixtral whose attention output and expert down projections are zero, so the
/// logits at a position depend only on that position's token:
/// `lm_head · (norm ⊙ e / sqrt(mean(e²) + eps))`.
fn residual_only_model(dir: &std::path::Path) {
    let config = json!({
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4,
        "intermediate_size": 2, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 2, "num_local_experts": 2, "num_experts_per_tok": 1, "vocab_size": 6,
        "max_position_embeddings": 16, "rms_norm_eps": EPS, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "hidden_act": "silu", "sliding_window": null, "bos_token_id": 0, "eos_token_id": 0
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        ("model.embed_tokens.weight".into(), vec![6, 4], EMBED.concat()),
        ("lm_head.weight".into(), vec![6, 4], HEAD.concat()),
        ("model.norm.weight".into(), vec![4], NORM.to_vec()),
    ];
    let p = "model.layers.0";
    let ramp = |n: usize| (0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<f32>>();
    tensors.push((format!("{p}.input_layernorm.weight"), vec![4], vec![1.0; 4]));
    tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![4], vec![1.0; 4]));
    tensors.push((format!("{p}.self_attn.q_proj.weight"), vec![4, 4], ramp(16)));
    tensors.push((format!("{p}.self_attn.k_proj.weight"), vec![2, 4], ramp(8)));
    tensors.push((format!("{p}.self_attn.v_proj.weight"), vec![2, 4], ramp(8)));
    tensors.push((format!("{p}.self_attn.o_proj.weight"), vec![4, 4], vec![0.0; 16]));
    tensors.push((format!("{p}.block_sparse_moe.gate.weight"), vec![2, 4], ramp(8)));
    for e in 0..2 {
        let q = format!("{p}.block_sparse_moe.experts.{e}");
        tensors.push((format!("{q}.w1.weight"), vec![2, 4], ramp(8)));
        tensors.push((format!("{q}.w3.weight"), vec![2, 4], ramp(8)));
        tensors.push((format!("{q}.w2.weight"), vec![4, 2], vec![0.0; 8]));
    }
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// log p(next | prev) by hand, in f64.
fn hand_logp(prev: usize, next: usize) -> f64 {
    let e: Vec<f64> = EMBED[prev].iter().map(|x| *x as f64).collect();
    let rms = (e.iter().map(|x| x * x).sum::<f64>() / 4.0 + EPS).sqrt();
    let h: Vec<f64> = e.iter().zip(NORM).map(|(x, w)| x / rms * w as f64).collect();
    let logits: Vec<f64> = HEAD.iter().map(|row| row.iter().zip(&h).map(|(a, b)| *a as f64 * b).sum()).collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    logits[next] - lse
}

#[test]
fn loglikelihoods_equal_hand_computed_values() {
    let dir = tempfile::tempdir().unwrap();
    word_tokenizer(dir.path());
    residual_only_model(dir.path());
    let tok = LmTokenizer::from_dir(dir.path()).unwrap();
    let model = MoeModel::load(dir.path(), &device()).unwrap();
    // "the cat" + " sat on" → context [the, cat], continuation [sat, on].
    let pair = tok.encode_pair("the cat ", "sat on").unwrap();
    assert_eq!(pair, EncodedPair { context: vec![1, 2], continuation: vec![3, 4] });
    // An empty context is BOS (`<s>` from config.json's bos_token_id).
    let empty = tok.encode_pair("", " mat the").unwrap();
    assert_eq!(empty, EncodedPair { context: vec![0], continuation: vec![5, 1] });
    let pairs = [pair, empty, EncodedPair { context: vec![5, 5, 2, 1], continuation: vec![3] }];
    let lls = loglikelihoods(&model, &pairs, opts(16, 64, true), |_, _| {}).unwrap();
    let expected = [hand_logp(2, 3) + hand_logp(3, 4), hand_logp(0, 5) + hand_logp(5, 1), hand_logp(1, 3)];
    for (l, want) in lls.iter().zip(expected) {
        assert!((l.loglikelihood - want).abs() < 1e-5, "{} vs {want}", l.loglikelihood);
    }
    // is_greedy: the continuation is the argmax at every scored position.
    let best = |prev: usize| (0..6).max_by(|&a, &b| hand_logp(prev, a).total_cmp(&hand_logp(prev, b))).unwrap();
    let greedy = EncodedPair { context: vec![2], continuation: vec![best(2) as u32, best(best(2)) as u32] };
    let l = loglikelihoods(&model, &[greedy], opts(16, 64, true), |_, _| {}).unwrap();
    assert!(l[0].is_greedy);
    assert!(!lls[0].is_greedy || (best(2) == 3 && best(3) == 4));
    // lm-eval's logits cache: A and B share context+continuation[:-1] = [1, 2, 3, 4] but split
    // it differently; A (the longer continuation) is run, and B reads its tokens at A's first
    // continuation positions (after tokens 2 and 3) instead of its own (after 3 and 4).
    let a = EncodedPair { context: vec![1, 2], continuation: vec![3, 4, 5] };
    let b = EncodedPair { context: vec![1, 2, 3], continuation: vec![4, 5] };
    let cached = loglikelihoods(&model, &[a.clone(), b.clone()], opts(16, 64, true), |_, _| {}).unwrap();
    let plain = loglikelihoods(&model, &[a, b], opts(16, 64, false), |_, _| {}).unwrap();
    let a_ll = hand_logp(2, 3) + hand_logp(3, 4) + hand_logp(4, 5);
    assert!((cached[0].loglikelihood - a_ll).abs() < 1e-5 && (plain[0].loglikelihood - a_ll).abs() < 1e-5);
    assert!((cached[1].loglikelihood - (hand_logp(2, 4) + hand_logp(3, 5))).abs() < 1e-5);
    assert!((plain[1].loglikelihood - (hand_logp(3, 4) + hand_logp(4, 5))).abs() < 1e-5);
    // Left truncation to max_length: with max_length 2 only the last 2 input tokens remain,
    // which for this model changes nothing.
    let long = EncodedPair { context: vec![1, 2, 3, 4, 5], continuation: vec![1, 2] };
    let t = loglikelihoods(&model, &[long], opts(2, 64, true), |_, _| {}).unwrap();
    assert!((t[0].loglikelihood - (hand_logp(5, 1) + hand_logp(1, 2))).abs() < 1e-5);
}

#[test]
fn special_tokens_follow_the_tokenizer_and_lm_eval() {
    let dir = tempfile::tempdir().unwrap();
    word_tokenizer(dir.path());
    let base = diep_models::tokenizer::load_tokenizer(dir.path()).unwrap();
    let bos = Some((0u32, "<s>".to_owned()));
    let with_bos =
        LmTokenizer::new(base.clone(), SpecialTokens::Explicit { bos: Some(0), eos: None }, bos.clone(), None);
    assert_eq!(with_bos.encode("the cat").unwrap(), vec![0, 1, 2]);
    // A string that already starts with BOS gets none added.
    assert_eq!(with_bos.encode("<s> the cat").unwrap(), vec![0, 1, 2]);
    // BOS is in both the whole and the context encoding, so the continuation is unchanged.
    assert_eq!(
        with_bos.encode_pair("the", " cat sat").unwrap(),
        EncodedPair { context: vec![0, 1], continuation: vec![2, 3] }
    );
    // tokenizer_config.json's add_bos_token is ignored when tokenizer.json exists (transformers
    // 5.x); a post-processor that adds BOS is what makes the tokenizer add it.
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<s>", "add_bos_token": true}"#).unwrap();
    let t = LmTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.special_tokens(), &SpecialTokens::PostProcessor);
    assert_eq!(t.encode("the cat").unwrap(), vec![1, 2]);
    assert_eq!(t.prefix_token(), Some(0));
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap()).unwrap();
    tok["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}});
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    let t = LmTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(t.encode("the cat").unwrap(), vec![0, 1, 2]);
    assert_eq!(t.encode_plain("the cat").unwrap(), vec![1, 2]);
    assert_eq!(
        t.encode_pair("the cat", " sat").unwrap(),
        EncodedPair { context: vec![0, 1, 2], continuation: vec![3] }
    );
    // A bos_token that is not in the vocabulary is an error naming the file and the field.
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<bos>"}"#).unwrap();
    let err = LmTokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(err.contains("tokenizer_config.json") && err.contains("bos_token"), "{err}");
}

#[test]
fn accuracy_is_argmax_and_acc_norm_divides_by_characters() {
    let doc = |choices: &[&str], gold| McDoc {
        requests: choices.iter().map(|c| ("q".to_owned(), format!(" {c}"))).collect(),
        choices: choices.iter().map(|c| c.to_string()).collect(),
        gold,
    };
    let ll = |x: f64| Loglikelihood { loglikelihood: x, is_greedy: false };
    // "é" is 2 bytes but 1 character: by characters -3/3 = -1 beats -2.2/2 = -1.1; by bytes
    // (-3/6 = -0.5) it would win even more clearly, so use a case where they disagree:
    // "éé" (2 chars, 4 bytes) with -2.2 → -1.1 per char, -0.55 per byte; "abc" with -3 → -1.
    let docs = [doc(&["éé", "abc"], 1), doc(&["a", "b", "c"], 0)];
    let lls = [ll(-2.2), ll(-3.0), ll(-1.0), ll(-1.0), ll(-2.0)];
    let s = score_docs(&docs, &lls);
    assert_eq!((s.docs[0].pred, s.docs[0].pred_norm), (0, 1));
    // Ties go to the first maximum, as numpy.argmax.
    assert_eq!(s.docs[1].pred, 0);
    assert_eq!((s.acc, s.acc_norm, s.n), (0.5, 1.0, 2));
    assert_eq!(np_argmax(&[1.0, f64::NAN, 3.0]), 1);
}

#[test]
fn text_is_cut_into_full_windows_without_special_tokens() {
    let dir = tempfile::tempdir().unwrap();
    word_tokenizer(dir.path());
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token": "<s>", "add_bos_token": true}"#).unwrap();
    let t = LmTokenizer::from_dir(dir.path()).unwrap();
    let w = diep_eval::text_windows(&t, "the cat sat on the mat the cat", 3).unwrap();
    assert_eq!(w, vec![vec![1, 2, 3], vec![4, 1, 5]]);
}

#[test]
fn malformed_task_files_name_the_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arc.jsonl");
    std::fs::write(&path, "{\"question\": \"q\", \"choices\": {\"text\": [\"a\"], \"label\": [\"A\"]}, \"answerKey\": \"A\"}\n{\"question\": \"q\"}\n").unwrap();
    let err = load_task(&path, &TaskFormat::ArcEasy).unwrap_err().to_string();
    assert!(err.contains("arc.jsonl") && err.contains("line 2") && err.contains("choices.text"), "{err}");
    std::fs::write(&path, "{\"context\": \"c\", \"choices\": [\"a\", \"b\"], \"gold\": 2}\n").unwrap();
    let err = load_task(&path, &TaskFormat::Generic).unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("out of range"), "{err}");
    let err = load_task(&path, &TaskFormat::Mmlu { subject: None }).unwrap_err().to_string();
    assert!(err.contains("subject") || err.contains("question"), "{err}");
}
