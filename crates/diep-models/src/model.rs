//! The decoder shared by all supported architectures.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use diep_checkpoint::{Checkpoint, LayerKind, ModelConfig, QkNorm};

use crate::attention::{Attention, AttentionContext, MlaAttention, MlaQuery, SelfAttention};
use crate::error::{ModelError, Result};
use crate::kernels;
use crate::lm::check_batch;
use crate::loader::{Loader, transpose};
use crate::moe::{MoeBlock, MoeForwardOptions, MoeOutput, SharedExpert};
use crate::mtp::MtpLayer;
use crate::nn::{Linear, RmsNorm, SwiGlu};
use diep_checkpoint::architectures::{DENSE_MLP, FusedExpertKeys, MoeKeys};

/// The feed-forward half of a decoder layer.
// A model has one per layer, so the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum FeedForward {
    /// A mixture-of-experts block.
    Moe(MoeBlock),
    /// A dense SwiGLU MLP.
    Dense(SwiGlu),
}

/// One decoder layer: `h += attn(norm(h)); h += ffn(norm(h))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// `input_layernorm`.
    pub(crate) input_norm: RmsNorm,
    /// `self_attn`.
    pub(crate) attention: SelfAttention,
    /// `post_attention_layernorm`.
    pub(crate) post_attention_norm: RmsNorm,
    /// `mlp` / `block_sparse_moe`.
    pub(crate) ffn: FeedForward,
}

/// What one decoder layer computed.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    /// The residual stream after the layer, `[rows, hidden]`.
    pub hidden: Tensor<2>,
    /// The feed-forward block's input (`post_attention_layernorm` output), `[rows, hidden]`.
    pub ffn_input: Tensor<2>,
    /// The MoE block's detailed output, for an MoE layer.
    pub moe: Option<MoeOutput>,
}

impl DecoderLayer {
    /// Runs the layer.
    pub fn forward(&self, h: Tensor<2>, ctx: &AttentionContext, moe_opts: &MoeForwardOptions) -> LayerOutput {
        let h = h.clone() + self.attention.forward(self.input_norm.forward(h), ctx);
        let x = self.post_attention_norm.forward(h.clone());
        match &self.ffn {
            FeedForward::Dense(mlp) => LayerOutput { hidden: h + mlp.forward(x.clone()), ffn_input: x, moe: None },
            FeedForward::Moe(moe) => {
                let out = moe.forward_detailed(x.clone(), moe_opts);
                LayerOutput { hidden: h + out.output.clone(), ffn_input: x, moe: Some(out) }
            }
        }
    }

    /// The MoE block, if this is an MoE layer.
    pub fn moe(&self) -> Option<&MoeBlock> {
        match &self.ffn {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }
}

/// A loaded MoE language model.
#[derive(Debug, Clone)]
pub struct MoeModel {
    /// The normalised configuration.
    pub(crate) config: ModelConfig,
    /// `model.embed_tokens.weight [vocab, hidden]`.
    pub(crate) embed_tokens: Tensor<2>,
    /// Decoder layers.
    pub(crate) layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub(crate) norm: RmsNorm,
    /// `lm_head` (the transposed embeddings when tied).
    pub(crate) lm_head: Linear,
    pub(crate) device: Device,
}

impl MoeModel {
    /// Loads `config.json` and the safetensors weights of a HuggingFace model directory.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let mut config = ModelConfig::from_dir(dir)?;
        // A multimodal wrapper: only its text model's tensors, named as in a text checkpoint.
        let ckpt = Checkpoint::open(dir)?;
        config.drop_absent_mtp_layers(&ckpt);
        let ckpt = ckpt.text_view(config.tensor_prefix());
        Self::from_checkpoint(config, &ckpt, device)
    }

    /// Builds the model from an already-opened checkpoint. Every tensor the config implies
    /// must be present with the implied shape, and no other tensor may be.
    fn from_checkpoint(config: ModelConfig, ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let ld = Loader::for_model(ckpt, &config, device);
        Self::build(config, ld, device)
    }

    /// Builds a model whose every tensor comes from `tensor(name, shape)`, called once for each
    /// tensor a checkpoint of `config` holds, with its on-disk name and HF shape (`[out, in]`
    /// projections, separate gate/up expert projections), and returning its row-major values.
    /// The model is exactly what [`MoeModel::load`] would build from a checkpoint of those
    /// tensors (e.g. freshly initialised weights for training).
    pub fn from_fn(
        config: ModelConfig,
        device: &Device,
        mut tensor: impl FnMut(&str, &[usize]) -> Vec<f32>,
    ) -> Result<Self> {
        Self::build(config, Loader::from_fn(&mut tensor, device), device)
    }

    fn build(config: ModelConfig, mut ld: Loader<'_>, device: &Device) -> Result<Self> {
        let c = &config;
        let (h, v) = (c.hidden_size, c.vocab_size);

        let embed_host = ld.host("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if c.tie_word_embeddings {
            if ld.contains("lm_head.weight") {
                // transformers ignores a saved head when the embeddings are tied.
                ld.skip("lm_head.weight");
            }
            let bias = if c.moe.lm_head_bias { Some(ld.tensor("lm_head.bias", [v])?) } else { None };
            Linear::new(ld.upload(transpose(&embed_host, v, h), [h, v]), bias)
        } else {
            ld.linear("lm_head", h, v, c.moe.lm_head_bias)?
        };
        let embed_tokens = ld.upload(embed_host, [v, h]);
        let norm = ld.rms_norm("model.norm.weight", h, c.rms_norm_eps)?;
        let layers = (0..c.num_layers).map(|i| load_layer(&mut ld, c, i)).collect::<Result<Vec<_>>>()?;
        ld.finish()?;
        Ok(MoeModel { config, embed_tokens, layers, norm, lm_head, device: device.clone() })
    }

    /// The normalised configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The LM head `[hidden, vocab]` (the transposed embeddings when they are tied).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        self.layers.iter().enumerate().filter_map(|(i, l)| l.moe().map(|_| i)).collect()
    }

    /// The MoE block of layer `layer`, if it is an MoE layer.
    pub fn moe_block(&self, layer: usize) -> Option<&MoeBlock> {
        self.layers.get(layer).and_then(DecoderLayer::moe)
    }

    /// Masks experts of one MoE layer (`true` = kept); see [`MoeBlock::set_mask`].
    pub fn set_expert_mask(&mut self, layer: usize, keep: Option<&[bool]>) -> Result<()> {
        match self.layers.get_mut(layer).map(|l| &mut l.ffn) {
            Some(FeedForward::Moe(m)) => m.set_mask(keep),
            _ => Err(ModelError::NotMoeLayer { layer }),
        }
    }

    /// Sets (or clears) dynamic skipping in one MoE layer; see [`crate::DynamicSkip`].
    pub fn set_dynamic_skip(&mut self, layer: usize, skip: Option<crate::DynamicSkip>) -> Result<()> {
        match self.layers.get_mut(layer).map(|l| &mut l.ffn) {
            Some(FeedForward::Moe(m)) => m.set_dynamic_skip(skip),
            _ => Err(ModelError::NotMoeLayer { layer }),
        }
    }

    /// Removes every expert mask.
    pub fn clear_expert_masks(&mut self) {
        for l in &mut self.layers {
            if let FeedForward::Moe(m) = &mut l.ffn {
                m.set_mask(None).expect("clearing a mask cannot fail");
            }
        }
    }

    /// Embeds a batch of equal-length token sequences: `[batch·len, hidden]` rows, and the
    /// attention context for that shape.
    pub(crate) fn embed(&self, ids: &[Vec<u32>]) -> Result<(Tensor<2>, AttentionContext)> {
        embed_ids(&self.embed_tokens, &self.config, &self.device, ids)
    }

    /// Final norm and LM head: `[rows, hidden]` to `[rows, vocab]`.
    pub(crate) fn head(&self, h: Tensor<2>) -> Tensor<2> {
        self.lm_head.forward(self.norm.forward(h))
    }

    /// Logits `[batch, len, vocab]` for a batch of equal-length sequences.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<3>> {
        self.forward_with(ids, &MoeForwardOptions::default(), |_, _, _| {})
    }

    /// Logits with per-layer MoE options (layers without an entry run plainly): the entry
    /// point of relaxations that give each layer its own router bias or expert scale.
    pub fn forward_per_layer(
        &self,
        ids: &[Vec<u32>],
        opts: &std::collections::BTreeMap<usize, MoeForwardOptions>,
    ) -> Result<Tensor<3>> {
        let (mut h, ctx) = self.embed(ids)?;
        let plain = MoeForwardOptions::default();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h, &ctx, opts.get(&i).unwrap_or(&plain)).hidden;
        }
        Ok(self.head(h).reshape([ctx.batch, ctx.seq_len, self.config.vocab_size]))
    }

    /// Logits, calling `on_moe(layer, input, output)` after every MoE layer with the block's
    /// input, its routing and (per `opts`) expert outputs. `opts` applies to every MoE layer.
    pub fn forward_with(
        &self,
        ids: &[Vec<u32>],
        opts: &MoeForwardOptions,
        mut on_moe: impl FnMut(usize, Tensor<2>, MoeOutput),
    ) -> Result<Tensor<3>> {
        let (mut h, ctx) = self.embed(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let out = layer.forward(h, &ctx, opts);
            h = out.hidden;
            if let Some(moe) = out.moe {
                on_moe(i, out.ffn_input, moe);
            }
        }
        let logits = self.head(h);
        Ok(logits.reshape([ctx.batch, ctx.seq_len, self.config.vocab_size]))
    }
}

/// transformers builds MLA's `q_a_layernorm` and `kv_a_layernorm` with the RMSNorm default
/// epsilon, not `rms_norm_eps`.
const MLA_NORM_EPS: f64 = 1e-6;

/// Loads decoder layer `i` (and only its tensors) through `ld`.
fn load_layer(ld: &mut Loader<'_>, c: &ModelConfig, i: usize) -> Result<DecoderLayer> {
    let (h, a) = (c.hidden_size, &c.attention);
    let keys = MoeKeys::of(c.architecture);
    let kind = c.layer_kind(i).expect("a trunk or MTP layer");
    let p = format!("model.layers.{i}");
    let (q_out, kv_out) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let linear_layer = a.linear.as_ref().filter(|l| l.layers.get(i).copied().unwrap_or(false));
    let qk_norm = if linear_layer.is_some() { QkNorm::None } else { a.qk_norm };
    let (q_norm, k_norm) = match qk_norm {
        QkNorm::None => (None, None),
        QkNorm::PerHead => (
            Some(ld.rms_norm(&format!("{p}.self_attn.q_norm.weight"), a.head_dim, c.rms_norm_eps)?),
            Some(ld.rms_norm(&format!("{p}.self_attn.k_norm.weight"), a.head_dim, c.rms_norm_eps)?),
        ),
        QkNorm::Full => (
            Some(ld.rms_norm(&format!("{p}.self_attn.q_norm.weight"), q_out, c.rms_norm_eps)?),
            Some(ld.rms_norm(&format!("{p}.self_attn.k_norm.weight"), kv_out, c.rms_norm_eps)?),
        ),
    };
    let attention = match (&a.mla, linear_layer) {
        (_, Some(l)) => {
            let n = |name: &str| format!("{p}.linear_attn.{name}");
            let (key_dim, value_dim) = (l.key_heads * l.key_dim, l.value_heads * l.value_dim);
            let channels = 2 * key_dim + value_dim;
            let conv = ld.host(&n("conv1d.weight"), &[channels, 1, l.conv_kernel])?;
            SelfAttention::Linear(crate::deltanet::GatedDeltaNet {
                in_proj_qkvz: ld.linear(&n("in_proj_qkvz"), h, 2 * key_dim + 2 * value_dim, false)?,
                in_proj_ba: ld.linear(&n("in_proj_ba"), h, 2 * l.value_heads, false)?,
                conv: ld.upload(conv, [channels, l.conv_kernel]),
                a_log: ld.tensor(&n("A_log"), [l.value_heads])?,
                dt_bias: ld.tensor(&n("dt_bias"), [l.value_heads])?,
                // The gated norm's weight is used as is (not zero-centred).
                norm: ld.tensor(&n("norm.weight"), [l.value_dim])?,
                norm_eps: c.rms_norm_eps,
                out_proj: ld.linear(&n("out_proj"), value_dim, h, false)?,
                cfg: l.clone(),
            })
        }
        (None, None) => SelfAttention::Standard(Attention {
            q_proj: ld.linear(
                &format!("{p}.self_attn.q_proj"),
                h,
                if a.gated_output { 2 * q_out } else { q_out },
                a.qkv_bias,
            )?,
            k_proj: ld.linear(&format!("{p}.self_attn.k_proj"), h, kv_out, a.qkv_bias)?,
            v_proj: ld.linear(&format!("{p}.self_attn.v_proj"), h, kv_out, a.qkv_bias)?,
            o_proj: ld.linear(&format!("{p}.self_attn.o_proj"), q_out, h, a.o_bias)?,
            q_norm,
            k_norm,
            sinks: if a.sinks { Some(ld.tensor(&format!("{p}.self_attn.sinks"), [a.num_heads])?) } else { None },
            span: kernels::layer_span(a, i),
            rope: a.llama4.as_ref().is_none_or(|l| l.rope_layers.get(i).copied().unwrap_or(true)),
            cfg: a.clone(),
        }),
        (Some(m), None) => {
            let k = diep_checkpoint::architectures::deepseek_v3::MLA;
            let n = |name: &str| format!("{p}.self_attn.{name}");
            let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
            let q = match m.q_lora_rank {
                None => MlaQuery::Direct(ld.linear(&n(k.q_proj), h, a.num_heads * qk, false)?),
                Some(r) => MlaQuery::LowRank {
                    a: ld.linear(&n(k.q_a_proj), h, r, m.bias)?,
                    norm: ld.rms_norm(&format!("{}.weight", n(k.q_a_layernorm)), r, MLA_NORM_EPS)?,
                    b: ld.linear(&n(k.q_b_proj), r, a.num_heads * qk, false)?,
                },
            };
            SelfAttention::Latent(MlaAttention {
                q,
                kv_a: ld.linear(&n(k.kv_a_proj_with_mqa), h, m.kv_lora_rank + m.qk_rope_head_dim, m.bias)?,
                kv_norm: ld.rms_norm(&format!("{}.weight", n(k.kv_a_layernorm)), m.kv_lora_rank, MLA_NORM_EPS)?,
                kv_b: ld.linear(
                    &n(k.kv_b_proj),
                    m.kv_lora_rank,
                    a.num_heads * (m.qk_nope_head_dim + m.v_head_dim),
                    false,
                )?,
                o_proj: ld.linear(&n(k.o_proj), a.num_heads * m.v_head_dim, h, m.bias)?,
                span: kernels::layer_span(a, i),
                mla: m.clone(),
                cfg: a.clone(),
            })
        }
    };
    let ffn = match kind {
        LayerKind::Dense => FeedForward::Dense(load_swiglu(
            ld,
            &format!("{p}.{}", keys.dense_block),
            DENSE_MLP,
            h,
            c.dense_intermediate_size,
            c.moe.mlp_bias,
        )?),
        LayerKind::Moe { num_experts } => {
            let router_w = ld.weight_t(&keys.router_weight(i), num_experts, h)?;
            let router_bias = match (c.moe.router_bias, keys.router_bias(i)) {
                (true, Some(name)) => Some(ld.tensor(&name, [num_experts])?),
                _ => None,
            };
            let router = Linear::new(ld.upload(router_w, [h, num_experts]), router_bias);
            let experts = match keys.fused_expert_tensors(i) {
                Some(_) => load_fused_experts(
                    ld,
                    &keys.block_prefix(i),
                    keys.fused_experts.expect("fused"),
                    num_experts,
                    h,
                    c.moe.expert_intermediate_size,
                )?,
                None => (0..num_experts)
                    .map(|e| {
                        let [g, u, d] = keys.expert_weights(i, e);
                        load_swiglu_named(ld, [&g, &u, &d], h, c.moe.expert_intermediate_size, c.moe.expert_bias)
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            let block = keys.block_prefix(i);
            let shared = match (keys.shared_expert, keys.shared_experts, c.moe.shared_expert_intermediate_size) {
                (Some((mlp, gate)), _, Some(width)) => Some(SharedExpert {
                    mlp: load_swiglu(ld, &format!("{block}.{mlp}"), DENSE_MLP, h, width, c.moe.mlp_bias)?,
                    gate: Some(ld.linear(&format!("{block}.{gate}"), h, 1, false)?),
                }),
                (None, Some(mlp), Some(width)) => Some(SharedExpert {
                    mlp: load_swiglu(ld, &format!("{block}.{mlp}"), DENSE_MLP, h, width, c.moe.mlp_bias)?,
                    gate: None,
                }),
                _ => None,
            };
            let correction = match (c.moe.routing.correction_bias, keys.router_correction_bias(i)) {
                (true, Some(name)) => Some(ld.expert_vector(&name, num_experts)?),
                _ => None,
            };
            FeedForward::Moe(
                MoeBlock::new(router, experts, shared, c.moe.top_k, c.moe.norm_topk_prob)
                    .with_routing(c.moe.routing.clone(), correction)
                    .with_activation(c.moe.activation),
            )
        }
    };
    Ok(DecoderLayer {
        input_norm: ld.rms_norm(&format!("{p}.input_layernorm.weight"), h, c.rms_norm_eps)?,
        attention,
        post_attention_norm: ld.rms_norm(&format!("{p}.post_attention_layernorm.weight"), h, c.rms_norm_eps)?,
        ffn,
    })
}

/// Checks a batch of token ids and embeds it.
fn embed_ids(
    embed_tokens: &Tensor<2>,
    config: &ModelConfig,
    device: &Device,
    ids: &[Vec<u32>],
) -> Result<(Tensor<2>, AttentionContext)> {
    let (batch, len) = check_batch(ids, config.vocab_size)?;
    let flat: Vec<i64> = ids.iter().flatten().map(|&id| id as i64).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(flat, [batch * len]), device);
    let h = embed_tokens.clone().select(0, idx);
    let ctx = AttentionContext::new(&config.attention, batch, len, device);
    Ok((h, ctx))
}

/// A model whose decoder layers stay on disk (memory-mapped) and are loaded one at a time:
/// for passes that advance a whole calibration set layer by layer, so that resident memory
/// is one layer's weights plus the activations, not the whole model.
pub struct StreamingModel {
    /// The normalised configuration.
    config: ModelConfig,
    ckpt: Checkpoint,
    embed_tokens: Tensor<2>,
    device: Device,
    residency: Residency,
}

impl StreamingModel {
    /// Opens a model directory; only the embeddings are loaded now.
    pub fn open(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let mut config = ModelConfig::from_dir(dir)?;
        // A multimodal wrapper: only its text model's tensors, named as in a text checkpoint.
        let ckpt = Checkpoint::open(dir)?;
        config.drop_absent_mtp_layers(&ckpt);
        let ckpt = ckpt.text_view(config.tensor_prefix());
        let mut ld = Loader::for_model(&ckpt, &config, device);
        let embed_tokens = ld.tensor("model.embed_tokens.weight", [config.vocab_size, config.hidden_size])?;
        Ok(StreamingModel { config, ckpt, embed_tokens, device: device.clone(), residency: Residency::default() })
    }

    /// The device layers are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The normalised configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How layers were loaded so far (for tests and diagnostics).
    pub fn residency(&self) -> &Residency {
        &self.residency
    }

    /// Embeds a batch of equal-length sequences.
    pub(crate) fn embed(&self, ids: &[Vec<u32>]) -> Result<(Tensor<2>, AttentionContext)> {
        embed_ids(&self.embed_tokens, &self.config, &self.device, ids)
    }

    /// The token embeddings `[vocab, hidden]`.
    pub(crate) fn embed_tokens(&self) -> &Tensor<2> {
        &self.embed_tokens
    }

    /// Loads the final norm and the LM head (`[hidden, vocab]`; the transposed embeddings when
    /// they are tied), as [`MoeModel::load`] does.
    pub(crate) fn load_head(&self) -> Result<(RmsNorm, Linear)> {
        let c = &self.config;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut ld = Loader::for_model(&self.ckpt, c, &self.device);
        let lm_head = if c.tie_word_embeddings {
            let embed: Vec<f32> = self.embed_tokens.to_data().iter::<f32>().collect();
            let bias = if c.moe.lm_head_bias { Some(ld.tensor("lm_head.bias", [v])?) } else { None };
            Linear::new(ld.upload(transpose(&embed, v, h), [h, v]), bias)
        } else {
            ld.linear("lm_head", h, v, c.moe.lm_head_bias)?
        };
        Ok((self.load_final_norm()?, lm_head))
    }

    /// Loads the final norm (`model.norm`) alone.
    pub(crate) fn load_final_norm(&self) -> Result<RmsNorm> {
        let c = &self.config;
        Loader::for_model(&self.ckpt, c, &self.device).rms_norm("model.norm.weight", c.hidden_size, c.rms_norm_eps)
    }

    /// Loads MTP module `j` (stored as decoder layer `num_hidden_layers + j`) from disk.
    pub fn load_mtp(&self, j: usize) -> Result<MtpLayer> {
        let c = &self.config;
        if j >= c.mtp_layers {
            return Err(ModelError::NoSuchLayer { layer: c.num_layers + j, layers: c.num_layers + c.mtp_layers });
        }
        let index = c.num_layers + j;
        let mut ld = Loader::for_model(&self.ckpt, c, &self.device);
        let (h, v) = (c.hidden_size, c.vocab_size);
        let [embed, enorm, hnorm, eh_proj] = crate::mtp::mtp_input_names(index);
        // Some conversions drop the MTP layer's copy of the embeddings; DeepSeek-V3's is the
        // trunk's (and transformers' MTP module uses the trunk's).
        let embed = if ld.contains(&embed) { embed } else { "model.embed_tokens.weight".to_string() };
        Ok(MtpLayer {
            index,
            embed_tokens: ld.tensor(&embed, [v, h])?,
            enorm: ld.rms_norm(&enorm, h, c.rms_norm_eps)?,
            hnorm: ld.rms_norm(&hnorm, h, c.rms_norm_eps)?,
            eh_proj: ld.linear(eh_proj.trim_end_matches(".weight"), 2 * h, h, false)?,
            layer: load_layer(&mut ld, c, index)?,
        })
    }

    /// Loads decoder layer `i` from disk.
    pub(crate) fn load_layer(&self, i: usize) -> Result<DecoderLayer> {
        if i >= self.config.num_layers {
            return Err(ModelError::NoSuchLayer { layer: i, layers: self.config.num_layers });
        }
        load_layer(&mut Loader::for_model(&self.ckpt, &self.config, &self.device), &self.config, i)
    }
}

/// Anything that can run a calibration set through decoder layers one at a time: a loaded
/// [`MoeModel`] or a [`StreamingModel`].
pub trait LayerSource {
    /// The configuration.
    fn config(&self) -> &ModelConfig;
    /// Embeds a batch of equal-length sequences.
    fn embed(&self, ids: &[Vec<u32>]) -> Result<(Tensor<2>, AttentionContext)>;
    /// Calls `f` with decoder layer `i` (borrowed, or loaded for the call and dropped after).
    fn with_layer<R>(&self, i: usize, f: impl FnOnce(&DecoderLayer) -> R) -> Result<R>;
    /// Calls `f` with the final norm and the LM head (borrowed, or loaded for the call).
    fn with_head<R>(&self, f: impl FnOnce(&RmsNorm, &Linear) -> R) -> Result<R>;
    /// Calls `f` with the final norm alone (the LM head is not loaded where it need not be).
    fn with_final_norm<R>(&self, f: impl FnOnce(&RmsNorm) -> R) -> Result<R> {
        self.with_head(|norm, _| f(norm))
    }
    /// Calls `f` with MTP module `j` ([`ModelConfig::mtp_layers`]), loaded for the call;
    /// `None` where the source cannot load MTP layers (a [`MoeModel`] holds the trunk only).
    fn with_mtp<R>(&self, _j: usize, _f: impl FnOnce(&MtpLayer) -> R) -> Result<Option<R>> {
        Ok(None)
    }
}

impl LayerSource for MoeModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn embed(&self, ids: &[Vec<u32>]) -> Result<(Tensor<2>, AttentionContext)> {
        MoeModel::embed(self, ids)
    }
    fn with_layer<R>(&self, i: usize, f: impl FnOnce(&DecoderLayer) -> R) -> Result<R> {
        let layers = self.layers.len();
        let layer = self.layers.get(i).ok_or(ModelError::NoSuchLayer { layer: i, layers })?;
        Ok(f(layer))
    }
    fn with_head<R>(&self, f: impl FnOnce(&RmsNorm, &Linear) -> R) -> Result<R> {
        Ok(f(&self.norm, &self.lm_head))
    }
}

impl LayerSource for StreamingModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn embed(&self, ids: &[Vec<u32>]) -> Result<(Tensor<2>, AttentionContext)> {
        StreamingModel::embed(self, ids)
    }
    fn with_layer<R>(&self, i: usize, f: impl FnOnce(&DecoderLayer) -> R) -> Result<R> {
        let layer = self.load_layer(i)?;
        let _resident = self.residency.enter(i);
        Ok(f(&layer))
    }
    fn with_head<R>(&self, f: impl FnOnce(&RmsNorm, &Linear) -> R) -> Result<R> {
        let (norm, head) = self.load_head()?;
        Ok(f(&norm, &head))
    }
    fn with_final_norm<R>(&self, f: impl FnOnce(&RmsNorm) -> R) -> Result<R> {
        Ok(f(&self.load_final_norm()?))
    }
    fn with_mtp<R>(&self, j: usize, f: impl FnOnce(&MtpLayer) -> R) -> Result<Option<R>> {
        let mtp = self.load_mtp(j)?;
        let _resident = self.residency.enter(mtp.index);
        Ok(Some(f(&mtp)))
    }
}

/// Counts of a [`StreamingModel`]'s layer loads: how often each decoder layer was loaded, and the
/// most layers resident at once (a streamed pass keeps this at 1).
#[derive(Debug, Default)]
pub struct Residency {
    loads: std::sync::Mutex<Vec<usize>>,
    resident: std::sync::atomic::AtomicUsize,
    max_resident: std::sync::atomic::AtomicUsize,
}

/// Marks a layer resident until dropped.
struct ResidentGuard<'a>(&'a Residency);

impl Drop for ResidentGuard<'_> {
    fn drop(&mut self) {
        self.0.resident.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Residency {
    fn enter(&self, layer: usize) -> ResidentGuard<'_> {
        use std::sync::atomic::Ordering::SeqCst;
        {
            let mut loads = self.loads.lock().expect("residency lock");
            if loads.len() <= layer {
                loads.resize(layer + 1, 0);
            }
            loads[layer] += 1;
        }
        let now = self.resident.fetch_add(1, SeqCst) + 1;
        self.max_resident.fetch_max(now, SeqCst);
        ResidentGuard(self)
    }

    /// How many times each decoder layer has been loaded through
    /// [`LayerSource::with_layer`].
    pub fn loads(&self) -> Vec<usize> {
        self.loads.lock().expect("residency lock").clone()
    }

    /// The most decoder layers that were resident at the same time.
    pub fn max_resident(&self) -> usize {
        self.max_resident.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// gpt-oss's fused experts `[gate_up [E, H, 2I], gate_up_bias [E, 2I], down [E, I, H],
/// down_bias [E, H]]` (weights in f32/bf16 or MXFP4) split into one SwiGLU per expert, with
/// the interleaved gate (even) and up (odd) columns regrouped as gate first, then up.
/// Experts stored fused (`{prefix}.experts.gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`, in
/// `x·W` layout), split per expert into SwiGLUs with the gate columns first: gpt-oss's
/// interleaved gate/up columns (and biases, and MXFP4 pairs) are de-interleaved; Llama 4's are
/// already gate-then-up.
fn load_fused_experts(
    ld: &mut Loader<'_>,
    prefix: &str,
    f: FusedExpertKeys,
    experts: usize,
    hidden: usize,
    inter: usize,
) -> Result<Vec<SwiGlu>> {
    let name = |n: &str| format!("{prefix}.experts.{n}");
    let gate_up = ld.host_or_mxfp4(&name(f.gate_up), &[experts, hidden, 2 * inter])?;
    let gate_up_bias = f.gate_up_bias.map(|b| ld.host(&name(b), &[experts, 2 * inter])).transpose()?;
    let down = ld.host_or_mxfp4(&name(f.down), &[experts, inter, hidden])?;
    let down_bias = f.down_bias.map(|b| ld.host(&name(b), &[experts, hidden])).transpose()?;
    let deinterleave = |src: &[f32], rows: usize| {
        if !f.interleaved {
            return src.to_vec();
        }
        let mut out = vec![0f32; rows * 2 * inter];
        for r in 0..rows {
            for j in 0..inter {
                out[r * 2 * inter + j] = src[r * 2 * inter + 2 * j];
                out[r * 2 * inter + inter + j] = src[r * 2 * inter + 2 * j + 1];
            }
        }
        out
    };
    Ok((0..experts)
        .map(|e| {
            let w = deinterleave(&gate_up[e * hidden * 2 * inter..(e + 1) * hidden * 2 * inter], hidden);
            let b = gate_up_bias.as_ref().map(|b| deinterleave(&b[e * 2 * inter..(e + 1) * 2 * inter], 1));
            let dw = down[e * inter * hidden..(e + 1) * inter * hidden].to_vec();
            let dbias = down_bias.as_ref().map(|b| b[e * hidden..(e + 1) * hidden].to_vec());
            SwiGlu {
                gate_up: Linear {
                    weight: ld.upload(w, [hidden, 2 * inter]),
                    bias: b.map(|b| ld.upload(b, [2 * inter])),
                },
                down: Linear { weight: ld.upload(dw, [inter, hidden]), bias: dbias.map(|b| ld.upload(b, [hidden])) },
            }
        })
        .collect())
}

fn load_swiglu(
    ld: &mut Loader<'_>,
    prefix: &str,
    names: [&str; 3],
    hidden: usize,
    inter: usize,
    bias: bool,
) -> Result<SwiGlu> {
    let [g, u, d] = names.map(|n| format!("{prefix}.{n}.weight"));
    load_swiglu_named(ld, [&g, &u, &d], hidden, inter, bias)
}

/// A SwiGLU MLP from its three weights, with their biases (`*.bias`) when `bias` (ERNIE-4.5's
/// `use_bias`).
fn load_swiglu_named(
    ld: &mut Loader<'_>,
    [g, u, d]: [&str; 3],
    hidden: usize,
    inter: usize,
    bias: bool,
) -> Result<SwiGlu> {
    let gate_up = ld.fused_linear_biased(&[g, u], hidden, inter, bias)?;
    let down_t = ld.weight_t(d, hidden, inter)?;
    let down_bias = if bias { Some(ld.tensor(&crate::loader::bias_name(d), [hidden])?) } else { None };
    Ok(SwiGlu { gate_up, down: Linear { weight: ld.upload(down_t, [inter, hidden]), bias: down_bias } })
}
