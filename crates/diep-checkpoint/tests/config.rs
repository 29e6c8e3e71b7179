//! `config.json` parsing for every supported architecture, through the public API
//! ([`ModelConfig::from_json_str`]).

use diep_checkpoint::*;

fn parse(json: &str) -> Result<ModelConfig> {
    ModelConfig::from_json_str(json, "test/config.json")
}

const MIXTRAL_4X: &str = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,
    "num_hidden_layers":2,"num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,
    "num_local_experts":8,"num_experts_per_tok":2,"rope_theta":1000000.0,"rms_norm_eps":1e-5,
    "sliding_window":null,"tie_word_embeddings":false,"hidden_act":"silu"}"#;

#[test]
fn mixtral_4x() {
    let c = parse(MIXTRAL_4X).unwrap();
    assert_eq!(c.architecture, Architecture::Mixtral);
    assert_eq!(c.attention.head_dim, 128);
    assert_eq!(c.attention.rope_theta, 1e6);
    assert_eq!(c.moe.num_experts, 8);
    assert!(c.moe.norm_topk_prob);
    assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 8 }; 2]);
}

#[test]
fn rope_parameters_5x() {
    let json = MIXTRAL_4X
        .replace(r#""rope_theta":1000000.0"#, r#""rope_parameters":{"rope_type":"default","rope_theta":12345.0}"#);
    assert_eq!(parse(&json).unwrap().attention.rope_theta, 12345.0);
}

#[test]
fn unsupported_rope_type_names_field() {
    let json = MIXTRAL_4X.replace(
        r#""rope_theta":1000000.0"#,
        r#""rope_parameters":{"rope_type":"yarn","rope_theta":1.0,"factor":4.0}"#,
    );
    let err = parse(&json).unwrap_err().to_string();
    assert!(err.contains("rope_parameters.rope_type") && err.contains("yarn"), "{err}");
}

const QWEN3: &str = r#"{"model_type":"qwen3_moe","vocab_size":100,"hidden_size":64,
    "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":24,
    "intermediate_size":96,"moe_intermediate_size":32,"NUM_KEY":8,"num_experts_per_tok":2,
    "decoder_sparse_step":2,"mlp_only_layers":[],"norm_topk_prob":true,"rope_theta":10000}"#;

#[test]
fn qwen3_expert_count_key_from_4x_and_5x() {
    for key in ["num_experts", "num_local_experts"] {
        let c = parse(&QWEN3.replace("NUM_KEY", key)).unwrap();
        assert_eq!(c.moe.num_experts, 8, "{key}");
        assert_eq!(c.attention.head_dim, 24);
        assert_eq!(c.attention.qk_norm, QkNorm::PerHead);
        // decoder_sparse_step = 2: layers 1 and 3 are MoE.
        assert_eq!(c.moe_layers(), vec![1, 3]);
        assert_eq!(c.layers[0], LayerKind::Dense);
    }
}

#[test]
fn qwen2_layer_placement_follows_mlp_only_layers() {
    let json = r#"{"model_type":"qwen2_moe","vocab_size":100,"hidden_size":64,
    "num_hidden_layers":4,"num_attention_heads":4,"intermediate_size":96,
    "moe_intermediate_size":32,"shared_expert_intermediate_size":48,"num_experts":8,
    "num_experts_per_tok":2,"decoder_sparse_step":1,"mlp_only_layers":[2]}"#;
    let c = parse(json).unwrap();
    assert_eq!(c.moe_layers(), vec![0, 1, 3]);
    assert_eq!(c.moe.shared_expert_intermediate_size, Some(48));
    assert!(c.attention.qkv_bias && !c.attention.o_bias);
    assert!(!c.moe.norm_topk_prob);
}

#[test]
fn unknown_model_type_lists_supported() {
    let err = parse(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
    assert!(err.contains("test/config.json") && err.contains("`llama`"), "{err}");
    for t in SUPPORTED_MODEL_TYPES {
        assert!(err.contains(t), "{err}");
    }
}

#[test]
fn missing_and_invalid_fields_are_named() {
    let err = parse(&MIXTRAL_4X.replace(r#""num_local_experts":8,"#, "")).unwrap_err().to_string();
    assert!(err.contains("missing field `num_local_experts`"), "{err}");
    let err =
        parse(&MIXTRAL_4X.replace(r#""num_local_experts":8"#, r#""num_local_experts":"x""#)).unwrap_err().to_string();
    assert!(err.contains("`num_local_experts`"), "{err}");
    let err =
        parse(&MIXTRAL_4X.replace(r#""num_experts_per_tok":2"#, r#""num_experts_per_tok":9"#)).unwrap_err().to_string();
    assert!(err.contains("num_experts_per_tok"), "{err}");
}

#[test]
fn per_layer_counts() {
    let json = MIXTRAL_4X.replace("\"num_local_experts\":8", "\"num_local_experts\":8,\"num_experts_per_layer\":[6,3]");
    let c = parse(&json).unwrap();
    assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 6 }, LayerKind::Moe { num_experts: 3 }]);
    let bad = MIXTRAL_4X.replace("\"num_local_experts\":8", "\"num_local_experts\":8,\"num_experts_per_layer\":[6,1]");
    assert!(parse(&bad).unwrap_err().to_string().contains("num_experts_per_layer"));
}

const DEEPSEEK_V3_4X: &str = r#"{"model_type":"deepseek_v3","vocab_size":320,"hidden_size":64,
    "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":4,"intermediate_size":96,
    "moe_intermediate_size":32,"n_routed_experts":8,"n_shared_experts":1,"num_experts_per_tok":2,
    "n_group":2,"topk_group":1,"norm_topk_prob":true,"routed_scaling_factor":2.5,"first_k_dense_replace":1,
    "q_lora_rank":24,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":8,"v_head_dim":12,
    "topk_method":"noaux_tc","scoring_func":"sigmoid","max_position_embeddings":512,"rope_theta":5000.0,
    "rope_scaling":{"type":"yarn","factor":4.0,"original_max_position_embeddings":128,"beta_fast":32,
    "beta_slow":1,"mscale":1.0,"mscale_all_dim":0.7}}"#;

#[test]
fn deepseek_v3_4x_rope_scaling() {
    let c = parse(DEEPSEEK_V3_4X).unwrap();
    assert_eq!(c.architecture, Architecture::DeepseekV3);
    assert_eq!(c.layers, vec![LayerKind::Dense, LayerKind::Moe { num_experts: 8 }, LayerKind::Moe { num_experts: 8 }]);
    assert_eq!(c.attention.head_dim, 8);
    assert_eq!(c.attention.rope_theta, 5000.0);
    let RopeScaling::Yarn(y) = &c.attention.rope_scaling else { panic!("not yarn") };
    assert_eq!((y.factor, y.original_max_position_embeddings), (4.0, 128));
    let m = c.attention.mla.as_ref().unwrap();
    assert_eq!((m.q_lora_rank, m.kv_lora_rank, m.v_head_dim), (Some(24), 16, 12));
    assert!(m.rope_interleave);
    assert_eq!(c.moe.shared_expert_intermediate_size, Some(32));
    assert_eq!(c.moe.routing.scoring, Scoring::Sigmoid);
    assert_eq!(c.moe.routing.group_limit, Some(GroupLimit { n_group: 2, topk_group: 1, score: GroupScore::Top2Sum }));
    // softmax scale: 1/sqrt(24) · mscale(4, 0.7)²; cos/sin factor mscale(4, 1)/mscale(4, 0.7).
    let ms = 0.1 * 0.7 * 4f64.ln() + 1.0;
    assert!((c.attention.softmax_scale() - ms * ms / 24f64.sqrt()).abs() < 1e-12);
    assert!((y.attention_factor() - (0.1 * 4f64.ln() + 1.0) / ms).abs() < 1e-12);
}

#[test]
fn deepseek_rope_parameters_5x_and_q_lora_null() {
    let json = DEEPSEEK_V3_4X.replace(r#""q_lora_rank":24"#, r#""q_lora_rank":null"#).replace(
        r#""rope_theta":5000.0,"#,
        r#""rope_parameters":{"rope_type":"yarn","rope_theta":777.0,"factor":2.0,"original_max_position_embeddings":64},"#,
    );
    let c = parse(&json).unwrap();
    assert_eq!(c.attention.mla.as_ref().unwrap().q_lora_rank, None);
    assert_eq!(c.attention.rope_theta, 777.0);
    assert!(matches!(&c.attention.rope_scaling, RopeScaling::Yarn(y) if y.factor == 2.0));
}

#[test]
fn deepseek_v2_routing_and_errors() {
    let v2 = DEEPSEEK_V3_4X
        .replace("deepseek_v3", "deepseek_v2")
        .replace(r#""topk_method":"noaux_tc","scoring_func":"sigmoid""#, r#""topk_method":"group_limited_greedy""#)
        .replace(r#""n_group":2"#, r#""n_group":4"#)
        .replace(r#""topk_group":1"#, r#""topk_group":2"#);
    let c = parse(&v2).unwrap();
    assert_eq!(c.moe.routing.scoring, Scoring::Softmax);
    assert_eq!(c.moe.routing.group_limit.unwrap().score, GroupScore::Max);
    assert!(!c.moe.norm_topk_prob, "transformers' V2 router never renormalises");
    assert_eq!(c.moe.shared_expert_intermediate_size, Some(32));
    let greedy = v2.replace("group_limited_greedy", "greedy");
    assert_eq!(parse(&greedy).unwrap().moe.routing.group_limit, None);
    let err = parse(&v2.replace("group_limited_greedy", "noaux_tc")).unwrap_err().to_string();
    assert!(err.contains("topk_method") && err.contains("config.json"), "{err}");
    let err = parse(&v2.replace(r#""first_k_dense_replace":1"#, r#""first_k_dense_replace":1,"moe_layer_freq":2"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("moe_layer_freq"), "{err}");
    // V3: groups must split the experts and hold top_k experts.
    let err = parse(&DEEPSEEK_V3_4X.replace(r#""n_group":2"#, r#""n_group":3"#)).unwrap_err().to_string();
    assert!(err.contains("n_group"), "{err}");
    let err = parse(
        &DEEPSEEK_V3_4X.replace(r#""n_group":2"#, r#""n_group":8"#).replace(r#""topk_group":1"#, r#""topk_group":4"#),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("at least 2"), "{err}");
    let err = parse(&DEEPSEEK_V3_4X.replace(r#""num_key_value_heads":4"#, r#""num_key_value_heads":2"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_key_value_heads") && err.contains("MLA"), "{err}");
    // Yarn stays refused for architectures that do not implement it.
    let err =
        parse(&MIXTRAL_4X.replace(
            r#""rope_theta":1000000.0"#,
            r#""rope_theta":1000000.0,"rope_scaling":{"type":"yarn","factor":4.0}"#,
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("yarn") && err.contains("rope_scaling"), "{err}");
}

/// `deepseek-ai/deepseek-moe-16b-base`'s config.json (transformers 4.x style, remote code).
const DEEPSEEK_MOE_16B: &str = r#"{"architectures":["DeepseekForCausalLM"],"attention_bias":false,
    "attention_dropout":0.0,"auto_map":{"AutoConfig":"configuration_deepseek.DeepseekConfig",
    "AutoModel":"modeling_deepseek.DeepseekModel","AutoModelForCausalLM":"modeling_deepseek.DeepseekForCausalLM"},
    "aux_loss_alpha":0.001,"bos_token_id":100000,"eos_token_id":100001,"first_k_dense_replace":1,
    "hidden_act":"silu","hidden_size":2048,"initializer_range":0.02,"intermediate_size":10944,
    "max_position_embeddings":4096,"model_type":"deepseek","moe_intermediate_size":1408,"moe_layer_freq":1,
    "n_routed_experts":64,"n_shared_experts":2,"norm_topk_prob":false,"num_attention_heads":16,
    "num_experts_per_tok":6,"num_hidden_layers":28,"num_key_value_heads":16,"pretraining_tp":1,
    "rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":10000,"scoring_func":"softmax","seq_aux":true,
    "tie_word_embeddings":false,"torch_dtype":"bfloat16","transformers_version":"4.36.0","use_cache":true,
    "vocab_size":102400}"#;

#[test]
fn deepseek_moe_16b() {
    let c = parse(DEEPSEEK_MOE_16B).unwrap();
    assert_eq!(c.architecture, Architecture::Deepseek);
    assert!(c.architecture.is_deepseek() && !c.architecture.has_mla());
    assert_eq!((c.vocab_size, c.hidden_size, c.num_layers), (102_400, 2048, 28));
    assert_eq!(c.dense_intermediate_size, 10944);
    assert_eq!(c.layers.len(), 28);
    assert_eq!(c.layers[0], LayerKind::Dense);
    assert_eq!(c.moe_layers(), (1..28).collect::<Vec<_>>());
    assert_eq!(c.experts_in_layer(5), 64);
    let a = &c.attention;
    assert!(a.mla.is_none(), "DeepSeek-MoE has standard attention");
    assert_eq!((a.num_heads, a.num_kv_heads, a.head_dim), (16, 16, 128));
    assert!(!a.qkv_bias && !a.o_bias && a.qk_norm == QkNorm::None && a.sliding_window.is_none());
    assert_eq!((a.rope_theta, &a.rope_scaling), (10_000.0, &RopeScaling::None));
    assert_eq!(a.softmax_scale(), 1.0 / 128f64.sqrt());
    assert_eq!((c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings), (1e-6, 4096, false));
    let m = &c.moe;
    assert_eq!((m.num_experts, m.top_k, m.expert_intermediate_size), (64, 6, 1408));
    assert_eq!(m.shared_expert_intermediate_size, Some(2 * 1408));
    assert!(!m.norm_topk_prob && !m.router_bias && !m.expert_bias);
    assert_eq!(m.routing, RoutingConfig::softmax());
    assert_eq!(m.activation, ExpertActivation::Silu);
    // Absent keys take DeepSeek-MoE's `DeepseekConfig` defaults.
    let bare = DEEPSEEK_MOE_16B
        .replace(r#""rms_norm_eps":1e-06,"#, "")
        .replace(r#""rope_theta":10000,"#, "")
        .replace(r#""max_position_embeddings":4096,"#, "")
        .replace(r#""n_shared_experts":2,"#, "");
    let c = parse(&bare).unwrap();
    assert_eq!((c.rms_norm_eps, c.attention.rope_theta, c.max_position_embeddings), (1e-6, 10_000.0, 2048));
    assert_eq!(c.moe.shared_expert_intermediate_size, None);
}

#[test]
fn deepseek_moe_layer_freq_gqa_and_renormalisation() {
    let tiny = DEEPSEEK_MOE_16B
        .replace(r#""num_hidden_layers":28"#, r#""num_hidden_layers":4"#)
        .replace(r#""moe_layer_freq":1"#, r#""moe_layer_freq":2"#);
    // Layer 0 dense (first_k_dense_replace), 1 and 3 dense (odd), 2 MoE.
    let c = parse(&tiny).unwrap();
    assert_eq!(
        c.layers,
        vec![LayerKind::Dense, LayerKind::Dense, LayerKind::Moe { num_experts: 64 }, LayerKind::Dense]
    );
    let c = parse(&tiny.replace(r#""first_k_dense_replace":1"#, r#""first_k_dense_replace":0"#)).unwrap();
    assert_eq!(c.moe_layers(), vec![0, 2]);
    let err = parse(&tiny.replace(r#""moe_layer_freq":2"#, r#""moe_layer_freq":0"#)).unwrap_err().to_string();
    assert!(err.contains("moe_layer_freq") && err.contains("positive"), "{err}");
    // GQA is honoured (Llama attention with `repeat_kv`), unlike MLA.
    let c = parse(&DEEPSEEK_MOE_16B.replace(r#""num_key_value_heads":16"#, r#""num_key_value_heads":4"#)).unwrap();
    assert_eq!((c.attention.num_heads, c.attention.num_kv_heads), (16, 4));
    // norm_topk_prob renormalises only when top_k > 1.
    let norm = DEEPSEEK_MOE_16B.replace(r#""norm_topk_prob":false"#, r#""norm_topk_prob":true"#);
    assert!(parse(&norm).unwrap().moe.norm_topk_prob);
    let top1 = norm.replace(r#""num_experts_per_tok":6"#, r#""num_experts_per_tok":1"#);
    assert!(!parse(&top1).unwrap().moe.norm_topk_prob);
    let c = parse(&DEEPSEEK_MOE_16B.replace(r#""attention_bias":false"#, r#""attention_bias":true"#)).unwrap();
    assert!(c.attention.qkv_bias && c.attention.o_bias);
}

#[test]
fn deepseek_moe_errors_and_rope_scaling() {
    let err = parse(&DEEPSEEK_MOE_16B.replace(r#""scoring_func":"softmax""#, r#""scoring_func":"sigmoid""#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("scoring_func") && err.contains("sigmoid") && err.contains("softmax"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    let err = parse(&DEEPSEEK_MOE_16B.replace(r#""n_routed_experts":64,"#, "")).unwrap_err().to_string();
    assert!(err.contains("missing field `n_routed_experts`"), "{err}");
    let linear = DEEPSEEK_MOE_16B.replace(r#""rope_scaling":null"#, r#""rope_scaling":{"type":"linear","factor":4.0}"#);
    assert_eq!(parse(&linear).unwrap().attention.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    let err = parse(&linear.replace("linear", "dynamic")).unwrap_err().to_string();
    assert!(err.contains("rope_scaling") && err.contains("dynamic") && err.contains("linear"), "{err}");
    let err = parse(&linear.replace("linear", "yarn")).unwrap_err().to_string();
    assert!(err.contains("rope_scaling") && err.contains("yarn"), "{err}");
    // Linear scaling stays refused where it is not implemented.
    let err = parse(&MIXTRAL_4X.replace(
        r#""rope_theta":1000000.0"#,
        r#""rope_theta":1000000.0,"rope_scaling":{"type":"linear","factor":4.0}"#,
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("linear") && err.contains("rope_scaling"), "{err}");
    // `moe_layer_freq` stays refused for DeepSeek-V2 (transformers ignores it).
    let v2 = DEEPSEEK_V3_4X.replace("deepseek_v3", "deepseek_v2").replace(
        r#""topk_method":"noaux_tc","scoring_func":"sigmoid""#,
        r#""topk_method":"greedy","moe_layer_freq":2"#,
    );
    assert!(parse(&v2).unwrap_err().to_string().contains("moe_layer_freq"));
}

const GPT_OSS: &str = r#"{"model_type":"gpt_oss","vocab_size":320,"hidden_size":64,"num_hidden_layers":3,
    "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"intermediate_size":16,
    "num_local_experts":8,"num_experts_per_tok":2,"sliding_window":6,"swiglu_limit":2.0,
    "layer_types":["sliding_attention","full_attention","sliding_attention"],
    "rope_parameters":{"rope_type":"yarn","rope_theta":5000.0,"factor":4.0,
    "original_max_position_embeddings":128,"beta_fast":32.0,"beta_slow":1.0,"truncate":false}}"#;

#[test]
fn gpt_oss_config() {
    let c = parse(GPT_OSS).unwrap();
    assert_eq!(c.architecture, Architecture::GptOss);
    assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 8 }; 3]);
    assert!(c.attention.qkv_bias && c.attention.o_bias && c.attention.sinks);
    assert_eq!(c.attention.sliding_window, Some(6));
    assert_eq!(c.attention.sliding_layers, Some(vec![true, false, true]));
    assert_eq!(c.moe.activation, ExpertActivation::ClampedSwiglu { alpha: 1.702, limit: 2.0 });
    assert!(c.moe.router_bias && c.moe.expert_bias && c.moe.norm_topk_prob);
    assert_eq!(c.moe.expert_intermediate_size, 16);
    assert_eq!(c.rms_norm_eps, 1e-5);
    let RopeScaling::Yarn(y) = &c.attention.rope_scaling else { panic!("not yarn") };
    assert!(!y.truncate && y.factor == 4.0);
    assert_eq!(c.attention.softmax_scale(), 0.25);
    // transformers' defaults: alternating layer types, yarn factor 32 over 4096, θ 150000.
    let d = GPT_OSS
        .replace(r#""layer_types":["sliding_attention","full_attention","sliding_attention"],"#, "")
        .replace(r#""swiglu_limit":2.0,"#, "");
    let d = &d[..d.find(r#""rope_parameters""#).unwrap()];
    let c = parse(&format!("{}\"rms_norm_eps\":1e-5}}", d)).unwrap();
    assert_eq!(c.attention.sliding_layers, Some(vec![true, false, true]));
    assert_eq!(c.moe.activation, ExpertActivation::ClampedSwiglu { alpha: 1.702, limit: 7.0 });
    assert_eq!(c.attention.rope_theta, 150_000.0);
    let RopeScaling::Yarn(y) = &c.attention.rope_scaling else { panic!("not yarn") };
    assert_eq!((y.factor, y.original_max_position_embeddings, y.truncate), (32.0, 4096, false));
    // Without a window every layer attends fully.
    let c = parse(&GPT_OSS.replace(r#""sliding_window":6"#, r#""sliding_window":null"#)).unwrap();
    assert_eq!(c.attention.sliding_layers, Some(vec![false; 3]));
}

#[test]
fn gpt_oss_bad_fields_are_named() {
    let err = parse(&GPT_OSS.replace("full_attention", "chunked_attention")).unwrap_err().to_string();
    assert!(err.contains("layer_types") && err.contains("entry 1") && err.contains("config.json"), "{err}");
    let err = parse(&GPT_OSS.replace(r#","sliding_attention"]"#, "]")).unwrap_err().to_string();
    assert!(err.contains("layer_types") && err.contains("2 entries for 3 layers"), "{err}");
    let err = parse(&GPT_OSS.replace(r#""swiglu_limit":2.0"#, r#""swiglu_limit":-1"#)).unwrap_err().to_string();
    assert!(err.contains("swiglu_limit"), "{err}");
    let err = parse(&GPT_OSS.replace(r#""num_local_experts":8,"#, "")).unwrap_err().to_string();
    assert!(err.contains("missing field `num_local_experts`"), "{err}");
}
