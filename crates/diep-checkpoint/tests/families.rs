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
