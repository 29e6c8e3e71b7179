//! `config.json` of GLM-4.5, MiniMax-M2 and ERNIE-4.5 as released on the Hub (transformers 4.x
//! spellings) and as transformers 5.x writes them.

use diep_checkpoint::architectures::{MoeKeys, MoeTensor};
use diep_checkpoint::*;

fn parse(json: &str) -> Result<ModelConfig> {
    ModelConfig::from_json_str(json, "test/config.json")
}

/// GLM-4.5-Air's config.json (zai-org/GLM-4.5-Air), shortened to 4 layers.
const GLM45_AIR: &str = r#"{"architectures":["Glm4MoeForCausalLM"],"attention_bias":true,
    "attention_dropout":0.0,"pad_token_id":151329,"eos_token_id":[151329,151336,151338],"head_dim":128,
    "hidden_act":"silu","hidden_size":4096,"partial_rotary_factor":0.5,"initializer_range":0.02,
    "intermediate_size":10944,"max_position_embeddings":131072,"model_type":"glm4_moe",
    "moe_intermediate_size":1408,"norm_topk_prob":true,"num_attention_heads":96,"n_group":1,"topk_group":1,
    "n_routed_experts":128,"n_shared_experts":1,"routed_scaling_factor":1.0,"num_experts_per_tok":8,
    "first_k_dense_replace":1,"num_hidden_layers":4,"num_key_value_heads":8,"rms_norm_eps":1e-05,
    "rope_scaling":null,"rope_theta":1000000,"num_nextn_predict_layers":1,"tie_word_embeddings":false,
    "torch_dtype":"bfloat16","transformers_version":"4.54.0","use_cache":true,"use_qk_norm":false,
    "vocab_size":151552}"#;

#[test]
fn glm45_air_as_released() {
    let c = parse(GLM45_AIR).unwrap();
    assert_eq!(c.architecture, Architecture::Glm4Moe);
    let a = &c.attention;
    assert_eq!((a.num_heads, a.num_kv_heads, a.head_dim, a.rotary_dim), (96, 8, 128, 64));
    assert!(a.qkv_bias && !a.o_bias);
    assert_eq!(a.qk_norm, QkNorm::None);
    assert_eq!(a.rope_theta, 1e6);
    assert_eq!(c.layers[0], LayerKind::Dense);
    assert_eq!(c.layers[1..], [LayerKind::Moe { num_experts: 128 }; 3]);
    assert_eq!((c.moe.top_k, c.moe.expert_intermediate_size), (8, 1408));
    assert_eq!(c.moe.shared_expert_intermediate_size, Some(1408));
    let r = &c.moe.routing;
    assert_eq!(
        (r.scoring, r.group_limit, r.correction_bias, r.renorm),
        (Scoring::Sigmoid, None, true, Renorm::SumPlusTiny)
    );
    assert!(c.moe.norm_topk_prob);
    assert_eq!(c.mtp_layers, 1);
}

#[test]
fn glm4_moe_5x_spelling_and_defaults() {
    // transformers 5.x moves θ and the factor into `rope_parameters`.
    let json = GLM45_AIR
        .replace(r#""partial_rotary_factor":0.5,"#, "")
        .replace(
            r#""rope_theta":1000000"#,
            r#""rope_parameters":{"rope_type":"default","rope_theta":5e5,"partial_rotary_factor":0.25}"#,
        )
        .replace(r#""use_qk_norm":false"#, r#""use_qk_norm":true"#)
        .replace(r#""n_group":1,"topk_group":1"#, r#""n_group":4,"topk_group":2"#);
    let c = parse(&json).unwrap();
    assert_eq!((c.attention.rope_theta, c.attention.rotary_dim), (5e5, 32));
    assert_eq!(c.attention.qk_norm, QkNorm::PerHead);
    let g = c.moe.routing.group_limit.unwrap();
    assert_eq!((g.n_group, g.topk_group, g.score), (4, 2, GroupScore::Top2Sum));
    // No factor at all: transformers' Glm4MoeConfig default, 0.5.
    let bare = GLM45_AIR.replace(r#""partial_rotary_factor":0.5,"#, "");
    assert_eq!(parse(&bare).unwrap().attention.rotary_dim, 64);
    // A factor whose width is odd is refused, naming the field.
    let odd = GLM45_AIR.replace(r#""partial_rotary_factor":0.5"#, r#""partial_rotary_factor":0.29"#);
    let err = parse(&odd).unwrap_err().to_string();
    assert!(err.contains("partial_rotary_factor") && err.contains("37"), "{err}");
}

/// MiniMax-M2's config.json (MiniMaxAI/MiniMax-M2), shortened to 2 layers, FP8 as released.
const MINIMAX_M2: &str = r#"{"architectures":["MiniMaxM2ForCausalLM"],"attn_type_list":[1,1],
    "head_dim":128,"hidden_act":"silu","hidden_size":3072,"intermediate_size":1536,
    "max_position_embeddings":196608,"model_type":"minimax_m2","mtp_transformer_layers":1,
    "num_attention_heads":48,"num_experts_per_tok":8,"num_hidden_layers":2,"num_key_value_heads":8,
    "num_local_experts":256,"num_mtp_modules":3,"qk_norm_type":"per_layer",
    "quantization_config":{"activation_scheme":"dynamic","fmt":"float8_e4m3fn","quant_method":"fp8",
    "weight_block_size":[128,128]},"rms_norm_eps":1e-06,"rope_theta":5000000,"rotary_dim":64,
    "scoring_func":"sigmoid","shared_intermediate_size":0,"tie_word_embeddings":false,"use_mtp":true,
    "use_qk_norm":true,"use_routing_bias":true,"vocab_size":200064}"#;

#[test]
fn minimax_m2_as_released() {
    let c = parse(MINIMAX_M2).unwrap();
    assert_eq!(c.architecture, Architecture::MinimaxM2);
    let a = &c.attention;
    assert_eq!((a.head_dim, a.rotary_dim, a.qk_norm), (128, 64, QkNorm::Full));
    assert!(!a.qkv_bias && !a.o_bias);
    assert_eq!(c.moe.expert_intermediate_size, 1536);
    assert_eq!(c.moe.shared_expert_intermediate_size, None);
    let r = &c.moe.routing;
    assert_eq!((r.scoring, r.correction_bias, r.renorm), (Scoring::Sigmoid, true, Renorm::Sum));
    assert!(c.moe.norm_topk_prob);
    assert!(c.fp8().is_some());
    let keys = MoeKeys::of(c.architecture);
    assert_eq!(keys.router_correction_bias(1).unwrap(), "model.layers.1.block_sparse_moe.e_score_correction_bias");
    assert_eq!(
        keys.parse("model.layers.1.block_sparse_moe.e_score_correction_bias"),
        Some(MoeTensor::Router { layer: 1 })
    );
    // transformers 5.x writes the factor into rope_parameters; it wins over `rotary_dim`.
    let v5 = MINIMAX_M2.replace(
        r#""rope_theta":5000000"#,
        r#""rope_parameters":{"rope_type":"default","rope_theta":5e6,"partial_rotary_factor":0.25}"#,
    );
    assert_eq!(parse(&v5).unwrap().attention.rotary_dim, 32);
    for (from, to, field) in [
        (r#""qk_norm_type":"per_layer""#, r#""qk_norm_type":"per_head""#, "qk_norm_type"),
        (r#""use_qk_norm":true"#, r#""use_qk_norm":false"#, "use_qk_norm"),
        (r#""scoring_func":"sigmoid""#, r#""scoring_func":"softmax""#, "scoring_func"),
        (r#""rotary_dim":64"#, r#""rotary_dim":256"#, "rotary_dim"),
    ] {
        let err = parse(&MINIMAX_M2.replace(from, to)).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("test/config.json"), "{field}: {err}");
    }
}

/// ERNIE-4.5-21B-A3B-PT's config.json, shortened to 4 layers.
const ERNIE45: &str = r#"{"architectures":["Ernie4_5_MoeForCausalLM"],"bos_token_id":1,"eos_token_id":2,
    "hidden_act":"silu","hidden_size":2560,"intermediate_size":12288,"max_position_embeddings":131072,
    "model_type":"ernie4_5_moe","num_attention_heads":20,"num_key_value_heads":4,"num_hidden_layers":4,
    "pad_token_id":0,"rms_norm_eps":1e-05,"use_cache":false,"vocab_size":103424,"rope_theta":500000,
    "use_bias":false,"moe_num_experts":64,"moe_num_shared_experts":2,"moe_layer_start_index":1,
    "moe_layer_end_index":-1,"moe_intermediate_size":1536,"moe_k":6,"moe_layer_interval":1,
    "moe_use_aux_free":true,"head_dim":128,"torch_dtype":"bfloat16"}"#;

#[test]
fn ernie45_as_released() {
    let c = parse(ERNIE45).unwrap();
    assert_eq!(c.architecture, Architecture::Ernie45Moe);
    assert!(c.tie_word_embeddings, "ERNIE ties its embeddings by default");
    assert!(c.attention.rope_interleave);
    assert_eq!(c.attention.rotary_dim, 128);
    assert_eq!(c.layers[0], LayerKind::Dense);
    assert_eq!(c.layers[1..], [LayerKind::Moe { num_experts: 64 }; 3]);
    assert_eq!((c.moe.top_k, c.moe.shared_expert_intermediate_size), (6, Some(3072)));
    let r = &c.moe.routing;
    assert_eq!((r.scoring, r.correction_bias, r.renorm), (Scoring::Softmax, true, Renorm::AtLeast(1e-12)));
    let keys = MoeKeys::of(c.architecture);
    assert_eq!(
        keys.parse("model.layers.2.mlp.moe_statics.e_score_correction_bias"),
        Some(MoeTensor::Router { layer: 2 })
    );
    // Every other layer from 1 to 2.
    let json = ERNIE45
        .replace(r#""moe_layer_interval":1"#, r#""moe_layer_interval":2"#)
        .replace(r#""moe_layer_end_index":-1"#, r#""moe_layer_end_index":2"#);
    let kinds: Vec<bool> = parse(&json).unwrap().layers.iter().map(|k| matches!(k, LayerKind::Moe { .. })).collect();
    assert_eq!(kinds, [false, true, false, false]);
    for (from, to, field) in [
        (r#""moe_k":6"#, r#""moe_k":0"#, "moe_k"),
        (r#""moe_layer_interval":1"#, r#""moe_layer_interval":0"#, "moe_layer_interval"),
    ] {
        let err = parse(&ERNIE45.replace(from, to)).unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    let biased = parse(&ERNIE45.replace(r#""use_bias":false"#, r#""use_bias":true"#)).unwrap();
    assert!(biased.attention.qkv_bias && biased.attention.o_bias && biased.moe.mlp_bias && biased.moe.lm_head_bias);
    assert!(!biased.moe.expert_bias, "ERNIE's routed experts never carry biases");
    assert!(!c.moe.expert_bias && !c.moe.mlp_bias && !c.attention.qkv_bias);
    let err = parse(&ERNIE45.replace(r#""moe_k":6,"#, "")).unwrap_err().to_string();
    assert!(err.contains("moe_k"), "{err}");
}

/// Llama-4-Scout-17B-16E's config.json as released (transformers 4.51), text part shortened to
/// 4 layers; the vision config abridged.
const LLAMA4_SCOUT: &str = r#"{"architectures":["Llama4ForConditionalGeneration"],"boi_token_index":200080,
    "eoi_token_index":200081,"image_token_index":200092,"model_type":"llama4",
    "text_config":{"_attn_implementation_autoset":true,"attention_bias":false,"attention_chunk_size":8192,
    "attention_dropout":0.0,"attn_scale":0.1,"attn_temperature_tuning":4,"bos_token_id":200000,
    "eos_token_id":[200001,200007,200008],"floor_scale":8192,"for_llm_compressor":false,"head_dim":128,
    "hidden_act":"silu","hidden_size":5120,"initializer_range":0.02,"interleave_moe_layer_step":1,
    "intermediate_size":8192,"intermediate_size_mlp":16384,"max_position_embeddings":10485760,
    "model_type":"llama4_text","no_rope_layers":[],"num_attention_heads":40,"num_experts_per_tok":1,
    "num_hidden_layers":4,"num_key_value_heads":8,"num_local_experts":16,"output_router_logits":false,
    "pad_token_id":200018,"rms_norm_eps":1e-05,"rope_scaling":{"factor":16.0,"high_freq_factor":1.0,
    "low_freq_factor":1.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},"rope_theta":500000.0,
    "router_aux_loss_coef":0.001,"router_jitter_noise":0.0,"torch_dtype":"bfloat16","use_cache":true,
    "use_qk_norm":true,"vocab_size":202048},
    "tie_word_embeddings":false,"torch_dtype":"bfloat16","transformers_version":"4.51.0.dev0",
    "vision_config":{"hidden_size":1408,"image_size":336,"model_type":"llama4_vision_model","num_hidden_layers":34,
    "patch_size":14,"vision_output_dim":4096}}"#;

#[test]
fn llama4_scout_as_released() {
    let c = parse(LLAMA4_SCOUT).unwrap();
    assert_eq!(c.architecture, Architecture::Llama4Text);
    assert_eq!(c.tensor_prefix(), "language_model.");
    let w = c.wrapper.as_ref().unwrap();
    assert_eq!((w.model_type, w.text_key), ("llama4", "text_config"));
    assert!(w.raw.contains_key("vision_config"));
    assert_eq!(c.raw["num_local_experts"], 16);
    // Every layer MoE (step 1), of 16 experts, top-1, dense width 16384 unused.
    assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 16 }; 4]);
    assert_eq!((c.moe.top_k, c.moe.expert_intermediate_size, c.dense_intermediate_size), (1, 8192, 16384));
    assert_eq!(c.moe.shared_expert_intermediate_size, Some(8192));
    assert!(c.moe.routing.weight_on_input && !c.moe.norm_topk_prob);
    let l4 = c.attention.llama4.as_ref().unwrap();
    // `no_rope_layers: []`: the default, every 4th layer NoPE; the RoPE layers chunked.
    assert_eq!(l4.rope_layers, [true, true, true, false]);
    assert_eq!(l4.chunked_layers, [true, true, true, false]);
    assert_eq!(l4.chunk_size, 8192);
    assert_eq!(l4.l2_qk_norm, Some(1e-5));
    assert_eq!(l4.temperature_tuning, Some((8192.0, 0.1)));
    assert!(matches!(c.attention.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 16.0));
    assert!(c.attention.rope_interleave);
    // Refusals name the field, inside the text config.
    let err = parse(&LLAMA4_SCOUT.replace(r#""model_type":"llama4_text""#, r#""model_type":"mixtral""#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_config.model_type"), "{err}");
    // transformers' default chunk is 8192; an explicit null turns chunking off.
    let absent =
        parse(&LLAMA4_SCOUT.replace(r#""attention_chunk_size":8192,"#, r#""attention_chunk_size":null,"#)).unwrap();
    assert_eq!(absent.attention.llama4.unwrap().chunked_layers, [false; 4]);
    let bare = parse(&LLAMA4_SCOUT.replace(r#""attention_chunk_size":8192,"#, "")).unwrap();
    assert_eq!(bare.attention.llama4.unwrap().chunk_size, 8192);
    let err = parse(&LLAMA4_SCOUT.replace(r#""attn_temperature_tuning":4"#, r#""attn_temperature_tuning":"yes""#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("attn_temperature_tuning"), "{err}");
}

/// Qwen3-Next-80B-A3B-Instruct's config.json, shortened to 8 layers.
const QWEN3_NEXT: &str = r#"{"architectures":["Qwen3NextForCausalLM"],"attention_bias":false,"attention_dropout":0.0,
    "bos_token_id":151643,"decoder_sparse_step":1,"eos_token_id":151645,"full_attention_interval":4,"head_dim":256,
    "hidden_act":"silu","hidden_size":2048,"initializer_range":0.02,"intermediate_size":5120,
    "linear_conv_kernel_dim":4,"linear_key_head_dim":128,"linear_num_key_heads":16,"linear_num_value_heads":32,
    "linear_value_head_dim":128,"max_position_embeddings":262144,"mlp_only_layers":[],"model_type":"qwen3_next",
    "moe_intermediate_size":512,"norm_topk_prob":true,"num_attention_heads":16,"num_experts":512,
    "num_experts_per_tok":10,"num_hidden_layers":8,"num_key_value_heads":2,"output_router_logits":false,
    "partial_rotary_factor":0.25,"rms_norm_eps":1e-06,"rope_scaling":null,"rope_theta":10000000,
    "router_aux_loss_coef":0.001,"shared_expert_intermediate_size":512,"tie_word_embeddings":false,
    "torch_dtype":"bfloat16","transformers_version":"4.57.0.dev0","use_cache":true,"use_sliding_window":false,
    "vocab_size":151936}"#;

#[test]
fn qwen3_next_as_released() {
    let c = parse(QWEN3_NEXT).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen3Next);
    assert!(c.zero_centered_norms);
    let a = &c.attention;
    assert_eq!((a.head_dim, a.rotary_dim, a.qk_norm), (256, 64, QkNorm::PerHead));
    assert!(a.gated_output);
    let l = a.linear.as_ref().unwrap();
    // Every 4th layer is full attention.
    assert_eq!(l.layers, [true, true, true, false, true, true, true, false]);
    assert_eq!((l.key_heads, l.value_heads, l.key_dim, l.value_dim, l.conv_kernel), (16, 32, 128, 128, 4));
    assert_eq!(c.layers, vec![LayerKind::Moe { num_experts: 512 }; 8]);
    assert_eq!(
        (c.moe.top_k, c.moe.expert_intermediate_size, c.moe.shared_expert_intermediate_size),
        (10, 512, Some(512))
    );
    assert!(c.moe.norm_topk_prob);
    // transformers 5.x spells the pattern out.
    let v5 = QWEN3_NEXT.replace(
        r#""full_attention_interval":4,"#,
        r#""layer_types":["linear_attention","full_attention","linear_attention","full_attention","linear_attention","full_attention","linear_attention","full_attention"],"#,
    );
    assert_eq!(
        parse(&v5).unwrap().attention.linear.unwrap().layers,
        [true, false, true, false, true, false, true, false]
    );
    let err = parse(&QWEN3_NEXT.replace(r#""linear_num_value_heads":32"#, r#""linear_num_value_heads":24"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("linear_num_value_heads"), "{err}");
    let err = parse(&v5.replace(r#""linear_attention","full_attention","linear_attention","full_attention","linear_attention","full_attention","linear_attention","full_attention""#, r#""linear_attention""#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer_types"), "{err}");
}
