#!/usr/bin/env python3
"""Generate the tiny random MoE parity fixtures under ``fixtures/``.

GENERATION ONLY. This script is never run by the Rust test suite; the tests only
read the files it wrote (``fixtures/models/<name>/`` and ``fixtures/parity/<name>/``),
which are committed. Re-run it only to regenerate them:

    /opt/ref-venv/bin/python scripts/gen_parity_fixtures.py --out fixtures

Versions used for the committed fixtures (see scripts/requirements-fixtures.txt):
transformers 5.24.0, torch 2.15.0, tokenizers 0.23.3, safetensors 0.8.0 (CPU, 2 threads).
``tiny-qwen3-moe-tf4`` is written by transformers 4.57.1, installed beside the venv with

    /opt/ref-venv/bin/pip install --target /opt/tf4 transformers==4.57.1

and run in a subprocess of this script with ``PYTHONPATH=/opt/tf4`` (``--tf4-path``), so its
config.json really is in the 4.x key style (``rope_theta``, ``num_experts``) and its reference
logits come from a real transformers 4.57.1 forward pass.

What it generates (all random init, fixed seeds, deterministic):

* ``tiny-mixtral``        mixtral, f32, one model.safetensors, untied embeddings, no sliding window.
* ``tiny-mixtral-swa``    the same weights as tiny-mixtral with ``sliding_window=6`` (16-token
                          sequences, so the window matters; checked below).
* ``tiny-mixtral-bf16``   the tiny-mixtral weights rounded to bf16 and saved in bf16.
* ``tiny-qwen2-moe``      qwen2_moe, 4 layers, layer 2 dense (mlp_only_layers=[2]), shared expert with
                          a sigmoid gate, q/k/v biases, norm_topk_prob=false, saved in 3+ shards.
* ``tiny-qwen3-moe``      qwen3_moe, 4 layers, decoder_sparse_step=2 (layers 1 and 3 MoE, 0 and 2 dense),
                          explicit head_dim=24, per-head q/k RMSNorm, norm_topk_prob=true, tied embeddings.
* ``tiny-olmoe``          olmoe, 3 layers, q/k RMSNorm over the whole projection, clip_qkv that clips.
* ``tiny-qwen3-moe-tf4``  qwen3_moe saved by transformers 4.57.1 (4.x config key style).
* ``tiny-deepseek-v3``    deepseek_v3, 3 layers (layer 0 dense via first_k_dense_replace=1), MLA with
                          q_lora_rank, yarn RoPE (mscale != mscale_all_dim), sigmoid routing with a
                          random e_score_correction_bias, n_group=2 / topk_group=1, shared expert.
* ``tiny-gpt-oss``        gpt_oss, 3 layers (sliding, full, sliding; window 6), fused experts with
                        biases, router bias, clamped SwiGLU (limit 2 so it clamps), attention sinks,
                        q/k/v/o biases, yarn RoPE (truncate false).
* ``tiny-deepseek-v2``    deepseek_v2, 3 layers (layer 0 dense), MLA without q_lora_rank (q_proj),
                          yarn RoPE, group_limited_greedy (n_group=4, topk_group=2), 2 shared experts.
* ``tiny-deepseek``       deepseek (DeepSeek-MoE 16B's remote-code model type), 3 layers (layer 0 dense via
                          first_k_dense_replace=1, moe_layer_freq=1), Llama attention with GQA (2 kv heads),
                          rotate-half RoPE, softmax greedy top-2 without renormalisation, 2 shared experts.
* ``tiny-deepseek-freq2`` deepseek, 4 layers, first_k_dense_replace=1 and moe_layer_freq=2 (only layer 2 is
                          MoE), norm_topk_prob=true, no shared experts, linear rope_scaling (factor 2), tied
                          embeddings.
* ``tiny-deepseek-v3-fp8`` deepseek_v3 as tiny-deepseek-v3 (other weights, moe_intermediate_size=24) in the
                          DeepSeek-V3 release format: decoder-layer linears F8_E4M3 with 16x16-block f32
                          ``weight_scale_inv`` (partial edge blocks), everything else bf16 (correction bias f32),
                          plus one MTP layer (``model.layers.3.*``: embed_tokens, enorm, hnorm, eh_proj,
                          shared_head, a full MoE decoder layer). References from transformers on the
                          dequantised weights; ``dequantized.safetensors``; MTP router logits.
* ``tiny-glm4-moe``       glm4_moe, 3 layers (layer 0 dense via first_k_dense_replace=1), GQA with q/k/v biases,
                          per-head q/k RMSNorm (use_qk_norm), partial rotate-half RoPE (partial_rotary_factor 0.5:
                          first 8 of 16 dims), sigmoid routing + random e_score_correction_bias, n_group=2 /
                          topk_group=1, norm_topk_prob, routed_scaling_factor 1.7, 1 shared expert; no MTP weights.
* ``tiny-minimax-m2``     minimax_m2, 3 layers all MoE, on disk ``block_sparse_moe.experts.{e}.w1/w2/w3``, q/k
                          RMSNorm over the whole projection, partial RoPE (rotary_dim 8 of head_dim 16), sigmoid
                          routing + random ``block_sparse_moe.e_score_correction_bias``, top-k renormalised.
* ``tiny-ernie4-5-moe``   ernie4_5_moe, 4 layers (layer 0 dense; MoE 1..3), softmax routing + random
                          ``moe_statics.e_score_correction_bias`` [1, 8], 2 shared experts, use_bias (q/k/v/o, dense
                          and shared MLPs, lm_head bias), interleaved (GLM-style) RoPE, tied embeddings.
  These three also store ``topk_idx.{layer}`` / ``topk_weight.{layer}`` and a physically-removed
  ``masked.safetensors``.
* ``tiny-llama4-text``    llama4_text (Llama4ForCausalLM), 4 layers, interleave_moe_layer_step=2 (MoE 1 and 3;
                          dense 0 and 2, width intermediate_size_mlp 96), fused experts
                          ``feed_forward.experts.gate_up_proj`` [E, H, 2I] / ``down_proj`` [E, I, H], top-2 on the
                          raw logits, sigmoid of the chosen logits scaling the expert INPUT, shared expert; RoPE
                          layers 0-2 (complex / interleaved pairs, llama3 frequency scaling) chunked
                          (attention_chunk_size 6) with weightless L2 q/k norm, NoPE layer 3 full attention with
                          attention temperature tuning (floor_scale 4, attn_scale 0.1). Records the loss with each
                          feature switched off, an independent re-implementation of the forward, and
                          ``topk_idx`` / ``topk_weight`` and a physically-removed ``masked.safetensors``.
* ``tiny-llama4``         llama4 (Llama4ForConditionalGeneration): tiny-llama4-text's text_config (other weights)
                          plus a 1-layer vision tower (hidden 32, 28x28 images, patch 14) and projector, saved by
                          save_pretrained (``language_model.model.*``, ``language_model.lm_head.weight``,
                          ``vision_model.*``, ``multi_modal_projector.*``); references from the TEXT-ONLY forward.
* ``tiny-qwen3-next``     qwen3_next (Qwen3NextForCausalLM), 4 layers (full_attention_interval 4: Gated DeltaNet
                          linear attention 0-2, gated full attention 3), every layer MoE (8 experts, top-2,
                          norm_topk_prob) with a sigmoid-gated shared expert; zero-centred RMSNorms (1 + weight:
                          weights 0.3 randn), gated RMSNorm (1 + 0.3 randn), random A_log / dt_bias / conv1d; GQA
                          gated attention (q_proj doubled, per-head q/k norm, partial rotate-half RoPE on 4 of 16
                          dims). ``logits`` from transformers' default chunked gated delta rule, ``logits_recurrent``
                          with the recurrent rule substituted; independent re-implementation from the disk tensors;
                          feature ablations; ``topk_idx`` / ``topk_weight``; physically-removed ``masked.safetensors``.

transformers has no ``deepseek`` model (DeepSeek-MoE ships remote code, ``configuration_deepseek.py`` /
``modeling_deepseek.py``, referenced from its config.json's ``auto_map``). Its references are built HERE,
from the remote code's semantics (read from a vendored copy of the upstream file,
``BZX667/CMoE: modeling_deepseek.py``; the upstream repository is ``deepseek-ai/deepseek-moe-16b-base``):
transformers' own Llama pieces (``LlamaModel``: embeddings, ``LlamaAttention`` with eager attention and
``repeat_kv``, ``LlamaRotaryEmbedding`` (rotate-half; ``rope_type: linear`` divides the frequencies by the
factor, which for factor 2 is bit-identical to the remote code's ``t / factor``), ``LlamaRMSNorm``, dense
``LlamaMLP``) are exactly the remote code's ``DeepseekAttention`` / ``DeepseekRMSNorm`` /
``DeepseekRotaryEmbedding`` / ``DeepseekMLP``; only the MoE block is hand-written below
(``DeepseekMoERef``, ``MoEGateRef``): ``logits = F.linear(x, gate.weight)`` in the model dtype,
``softmax``, ``torch.topk`` (greedy), ``/ (sum + 1e-20)`` only if ``top_k > 1 and norm_topk_prob``,
routed experts ``experts.{e}.{gate,up,down}_proj`` (SiLU-gated) weighted and summed per token as in
``moe_infer``, plus ``shared_experts`` (width ``moe_intermediate_size * n_shared_experts``) without a gate.
Parameter names equal the upstream checkpoint keys; the checkpoint is written with ``safetensors`` and a
config.json in the upstream key style (``model_type: deepseek``, ``auto_map`` to
``configuration_deepseek.DeepseekConfig`` / ``modeling_deepseek.DeepseekForCausalLM``, ``rope_theta``,
``rope_scaling``), and the references come from the model rebuilt from that config.json and loaded from
that file.

Every model: vocab 320 (= the byte-level BPE tokenizer.json written next to it), hidden 64,
4 heads / 2 kv heads, 8 experts, top-2, max_position_embeddings 512, non-default rope theta and
rms_norm_eps, initializer_range 0.2, every RMSNorm weight = 1 + 0.3 * randn (qwen3_next's zero-centred
``(1 + weight)`` RMSNorms: 0.3 * randn), q/k/v biases (qwen2_moe) = 0.5 * randn.

References (``fixtures/parity/<name>/``), all from ``attn_implementation="eager"``,
``experts_implementation="eager"`` (5.x), ``model.eval()``, ``torch.no_grad()``, computed from the
model *reloaded from disk*:

* ``reference.json``         versions, ids (3 x 16), loss (batched; without the router aux loss),
                             loss_per_sequence, text / text_ids, moe_layers, on-disk key patterns, ...
* ``ids.json``               the 3 x 16 token ids.
* ``reference.safetensors``  f32 ``logits`` [3,16,V]; ``router_logits.{layer}`` [48,E] for each MoE
                             layer (raw gate logits, before softmax); ``hidden_states.{k}`` for
                             k = 0..L (k = 0 embeddings, k = 1..L-1 outputs of layer k-1, k = L the
                             output of the last layer AFTER the final norm); ``final_prenorm`` (the
                             output of the last layer before the final norm).
* ``masked.safetensors``     (tiny-mixtral, tiny-qwen2-moe) ``logits`` with some experts per layer
                             made unselectable (router logits forced to -inf before softmax/top-k).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TF_MAJOR = int(transformers.__version__.split(".")[0])
TF4_VERSION = "4.57.1"

VOCAB = 320
SEQ_LEN = 16
BATCH = 3
HIDDEN = 64
N_HEADS = 4
N_KV_HEADS = 2
N_EXPERTS = 8
TOP_K = 2
NORM_STD = 0.3
BIAS_STD = 0.5
BOS, EOS = 1, 2
SWA_WINDOW = 6
OLMOE_CLIP_QKV = 2.0

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog, and the experts route every token."

# Small English corpus the byte-level BPE tokenizer is trained on.
CORPUS = """
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs away.
A mixture of experts model sends every token to a few of its experts. The router scores each
expert, keeps the best two, and adds their outputs with the routing weights.
Attention lets every token look at the tokens before it. A sliding window limits how far back it looks.
The model reads the text, predicts the next token, and the loss measures how surprised it was.
We test that the Rust toolkit reproduces the logits of the reference implementation exactly.
Small models are fast to run and easy to check. Random weights are enough to catch mistakes in
the order of operations, the shapes of the tensors, and the names of the keys on disk.
There is no such thing as a free lunch, but there is such a thing as a cheap test.
In the morning the team reads the reports; in the evening they fix what the tests found.
Numbers, too: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024.
""".strip().splitlines()


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    assert tok.token_to_id("<s>") == BOS and tok.token_to_id("</s>") == EOS
    return tok


# --------------------------------------------------------------------------------------------
# Model construction helpers
# --------------------------------------------------------------------------------------------


def common_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
    )


def make_config(kind: str):
    """kind -> transformers config (works with 4.57 and 5.x)."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    c = common_kwargs()
    if kind in ("tiny-mixtral", "tiny-mixtral-bf16", "tiny-mixtral-swa"):
        return MixtralConfig(
            **c,
            num_hidden_layers=2,
            intermediate_size=48,
            num_local_experts=N_EXPERTS,
            rope_theta=10000.0,  # mixtral default is 1e6
            rms_norm_eps=1e-6,  # mixtral default is 1e-5
            sliding_window=SWA_WINDOW if kind == "tiny-mixtral-swa" else None,
            tie_word_embeddings=False,
        )
    if kind == "tiny-qwen2-moe":
        return Qwen2MoeConfig(
            **c,
            num_hidden_layers=4,
            intermediate_size=128,  # dense layer (layer 2)
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=N_EXPERTS,
            decoder_sparse_step=1,
            mlp_only_layers=[2],
            norm_topk_prob=False,
            rope_theta=1000000.0,  # default 1e4
            rms_norm_eps=1e-5,  # default 1e-6
            tie_word_embeddings=False,
            use_sliding_window=False,
        )
    if kind in ("tiny-qwen3-moe", "tiny-qwen3-moe-tf4"):
        return Qwen3MoeConfig(
            **c,
            num_hidden_layers=4,
            head_dim=24,  # != hidden/heads = 16
            intermediate_size=64,  # dense layers 0 and 2
            moe_intermediate_size=32,
            num_experts=N_EXPERTS,
            decoder_sparse_step=2,
            mlp_only_layers=[],
            norm_topk_prob=True,
            rope_theta=1000000.0,  # default 1e4
            rms_norm_eps=1e-5,  # default 1e-6
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    if kind == "tiny-olmoe":
        return OlmoeConfig(
            **c,
            num_hidden_layers=3,
            intermediate_size=32,
            num_experts=N_EXPERTS,
            norm_topk_prob=False,
            clip_qkv=OLMOE_CLIP_QKV,
            rope_theta=500000.0,  # default 1e4
            rms_norm_eps=1e-6,  # default 1e-5
            tie_word_embeddings=False,
        )
    if kind == "tiny-deepseek-v3-fp8":
        # 24 is not a multiple of the 16x16 FP8 block: partial edge blocks in every expert tensor
        return deepseek_config("v3", moe_intermediate_size=24)
    if kind.startswith("tiny-deepseek-v3"):
        return deepseek_config("v3")
    if kind.startswith("tiny-deepseek-v2"):
        return deepseek_config("v2")
    if kind == "tiny-gpt-oss":
        return gpt_oss_config()
    if kind == "tiny-gpt-oss-mxfp4":
        # MXFP4 packs 32 input values a block: intermediate_size (down_proj's input) must be a multiple
        return gpt_oss_config(num_hidden_layers=2, intermediate_size=32)
    if kind == "tiny-glm4-moe":
        return glm4_moe_config()
    if kind == "tiny-minimax-m2":
        return minimax_m2_config()
    if kind == "tiny-ernie4-5-moe":
        return ernie4_5_moe_config()
    if kind == "tiny-llama4-text":
        return llama4_text_config()
    if kind == "tiny-qwen3-next":
        return qwen3_next_config()
    raise ValueError(kind)


def glm4_moe_config():
    """Tiny GLM-4.5 (glm4_moe): layer 0 dense, sigmoid + correction-bias group-limited routing, partial RoPE."""
    from transformers import Glm4MoeConfig

    cfg = Glm4MoeConfig(
        **common_kwargs(),
        num_hidden_layers=3,
        first_k_dense_replace=1,  # layer 0 dense
        intermediate_size=96,  # dense layer width
        moe_intermediate_size=32,
        n_routed_experts=N_EXPERTS,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.7,
        n_shared_experts=1,
        attention_bias=True,  # q/k/v biases (o_proj never has one)
        use_qk_norm=True,  # per-head RMSNorm over head_dim
        rms_norm_eps=1e-6,  # default 1e-5
        tie_word_embeddings=False,
        # head_dim 16 -> 8 rotary dims; rope_theta default 1e4
        rope_parameters=dict(rope_type="default", rope_theta=20000.0, partial_rotary_factor=0.5),
    )
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5, cfg.rope_parameters
    return cfg


def minimax_m2_config():
    """Tiny MiniMax-M2: all layers MoE, q/k norm over the whole projection, partial RoPE via rotary_dim."""
    from transformers import MiniMaxM2Config

    cfg = MiniMaxM2Config(
        **common_kwargs(),
        num_hidden_layers=3,
        head_dim=16,
        intermediate_size=32,  # expert width (MiniMax-M2 has no moe_intermediate_size)
        num_local_experts=N_EXPERTS,
        rotary_dim=8,  # the released-checkpoint key (there: 64 of head_dim 128) -> partial_rotary_factor 0.5
        rms_norm_eps=1e-5,  # default 1e-6
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=30000.0),  # default 5e6
    )
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.5, cfg.rope_parameters
    return cfg


def ernie4_5_moe_config():
    """Tiny ERNIE-4.5 MoE: layer 0 dense, MoE 1..3, softmax + correction-bias routing, biases everywhere."""
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(
        **common_kwargs(),
        num_hidden_layers=4,
        moe_layer_start_index=1,
        moe_layer_end_index=3,
        moe_layer_interval=1,
        intermediate_size=96,  # dense layer width
        moe_intermediate_size=32,
        moe_num_experts=N_EXPERTS,
        moe_k=TOP_K,
        moe_num_shared_experts=2,
        use_bias=True,
        moe_norm_min=1e-12,
        rms_norm_eps=1e-6,  # default 1e-5
        tie_word_embeddings=True,  # ernie's default
        rope_parameters=dict(rope_type="default", rope_theta=50000.0),  # default 5e5
    )


GPT_OSS_SWIGLU_LIMIT = 2.0  # default 7 never clamps at this scale

# std of the random e_score_correction_bias per model_type (default 0.1: the DeepSeek-V3 fixtures). Sized so the
# bias changes a sizeable share, but not all, of the top-2 selections (recorded as correction_bias_changed_selections).
CORRECTION_BIAS_STD = {"glm4_moe": 0.25, "minimax_m2": 0.2, "ernie4_5_moe": 0.05}


def gpt_oss_config(**overrides):
    """Tiny gpt-oss: 3 layers (transformers' default layer_types: sliding, full, sliding)."""
    from transformers import GptOssConfig

    c = common_kwargs()
    kw = dict(
        num_hidden_layers=3,
        head_dim=16,
        intermediate_size=16,
        num_local_experts=N_EXPERTS,
        sliding_window=SWA_WINDOW,
        rms_norm_eps=1e-6,  # default 1e-5
        swiglu_limit=GPT_OSS_SWIGLU_LIMIT,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=5000.0, factor=4.0, original_max_position_embeddings=128,
                             beta_fast=32.0, beta_slow=1.0, truncate=False),
    )
    kw.update(overrides)
    return GptOssConfig(**{**c, **kw})


def deepseek_config(version: str, **overrides):
    """Tiny DeepSeek-V3 / V2 configs. MLA has no GQA: num_key_value_heads = num_attention_heads."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    c = common_kwargs()
    c["num_key_value_heads"] = N_HEADS
    yarn = dict(rope_type="yarn", rope_theta=5000.0, factor=4.0, original_max_position_embeddings=128,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.7)
    common = dict(
        num_hidden_layers=3,
        first_k_dense_replace=1,  # layer 0 dense
        intermediate_size=96,  # dense layer width
        moe_intermediate_size=32,
        n_routed_experts=N_EXPERTS,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters=yarn,
    )
    if version == "v3":
        kw = dict(common, q_lora_rank=24, n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=2.5, rope_interleave=True)
        kw.update(overrides)
        return DeepseekV3Config(**{**c, **kw})
    kw = dict(common, q_lora_rank=None, n_shared_experts=2, n_group=4, topk_group=2,
              topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    kw.update(overrides)
    return DeepseekV2Config(**{**c, **kw})


SEEDS = {
    "tiny-mixtral": 1001,
    "tiny-qwen2-moe": 1002,
    "tiny-qwen3-moe": 1003,
    "tiny-olmoe": 1004,
    "tiny-qwen3-moe-tf4": 1005,
    "tiny-deepseek-v3": 1006,
    "tiny-deepseek-v2": 1007,
    "tiny-gpt-oss": 1008,
    "tiny-gpt-oss-mxfp4": 1009,
    "tiny-deepseek": 1010,
    "tiny-deepseek-freq2": 1011,
    "tiny-deepseek-v3-fp8": 1012,
    "tiny-glm4-moe": 1013,
    "tiny-minimax-m2": 1014,
    "tiny-ernie4-5-moe": 1015,
    "tiny-llama4-text": 1016,
    "tiny-llama4": 1017,
    "tiny-qwen3-next": 1018,
}
IDS_SEEDS = {
    "tiny-mixtral": 2001,
    "tiny-mixtral-swa": 2001,  # same ids as tiny-mixtral on purpose (window check / comparison)
    "tiny-mixtral-bf16": 2001,
    "tiny-qwen2-moe": 2002,
    "tiny-qwen3-moe": 2003,
    "tiny-olmoe": 2004,
    "tiny-qwen3-moe-tf4": 2005,
    "tiny-deepseek-v3": 2006,
    "tiny-deepseek-v2": 2007,
    "tiny-gpt-oss": 2008,
    "tiny-gpt-oss-mxfp4": 2009,
    "tiny-deepseek": 2010,
    "tiny-deepseek-freq2": 2011,
    "tiny-deepseek-v3-fp8": 2012,
    "tiny-glm4-moe": 2013,
    "tiny-minimax-m2": 2014,
    "tiny-ernie4-5-moe": 2015,
    "tiny-llama4-text": 2016,
    "tiny-llama4": 2017,
    "tiny-qwen3-next": 2018,
}


def impl_kwargs() -> dict:
    kw = dict(attn_implementation="eager")
    if TF_MAJOR >= 5:
        kw["experts_implementation"] = "eager"
    return kw


def build_model(kind: str, seed: int):
    from transformers import AutoModelForCausalLM

    cfg = make_config(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, **impl_kwargs()).float().eval()
    perturb(model, seed)
    check_params_nontrivial(model)
    return model


@torch.no_grad()
def perturb(model, seed: int) -> None:
    """RMSNorm weights -> 1 + 0.3 randn; q/k/v biases -> 0.5 randn (where present); e_score_correction_bias
    (zeros at init) -> CORRECTION_BIAS_STD[model_type] (default 0.1: DeepSeek-V3) * randn; ernie4_5_moe (use_bias):
    every other nn.Linear bias (o_proj, dense / shared-expert MLPs, lm_head) -> 0.5 randn too; llama4 (the multimodal
    wrapper): the vision tower's LayerNorms (weight 1 + 0.3 randn, bias 0.5 randn) and o_proj / fc1 / fc2 biases;
    qwen3_next: its zero-centred RMSNorms ((1 + weight), 0 at init) -> 0.3 randn, and perturb_qwen3_next."""
    g = torch.Generator().manual_seed(seed + 7)
    n_norm = n_bias = 0
    mt = model.config.model_type
    corr_std = CORRECTION_BIAS_STD.get(mt, 0.1)
    for name, mod in model.named_modules():
        if getattr(mod, "e_score_correction_bias", None) is not None:
            mod.e_score_correction_bias.copy_(corr_std * torch.randn(mod.e_score_correction_bias.shape, generator=g))
        if type(mod).__name__.endswith("RMSNorm"):
            if mt == "qwen3_next":  # zero-centred: y = norm(x) * (1 + weight), weight 0 at init
                mod.weight.copy_(NORM_STD * torch.randn(mod.weight.shape, generator=g))
            else:
                mod.weight.copy_(1.0 + NORM_STD * torch.randn(mod.weight.shape, generator=g))
            n_norm += 1
        if mt == "qwen3_next":
            perturb_qwen3_next(mod, g)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj") and getattr(mod, "bias", None) is not None:
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
            n_bias += 1
        if model.config.model_type == "gpt_oss":
            # zero at init: o_proj bias, expert biases; sinks 1.0 randn so they take real mass
            if leaf == "o_proj":
                mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
            if hasattr(mod, "gate_up_proj_bias"):
                mod.gate_up_proj_bias.copy_(BIAS_STD * torch.randn(mod.gate_up_proj_bias.shape, generator=g))
                mod.down_proj_bias.copy_(BIAS_STD * torch.randn(mod.down_proj_bias.shape, generator=g))
            if hasattr(mod, "sinks"):
                mod.sinks.copy_(torch.randn(mod.sinks.shape, generator=g))
        if mt == "llama4" and isinstance(mod, torch.nn.LayerNorm):
            # vision tower LayerNorms (weight 1, bias 0 at init)
            mod.weight.copy_(1.0 + NORM_STD * torch.randn(mod.weight.shape, generator=g))
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
        if mt == "llama4" and leaf not in ("q_proj", "k_proj", "v_proj") \
                and isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            # vision tower o_proj / fc1 / fc2 biases (zero at init)
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
            n_bias += 1
        if mt == "ernie4_5_moe" and leaf not in ("q_proj", "k_proj", "v_proj") \
                and isinstance(mod, torch.nn.Linear) and mod.bias is not None:
            # use_bias: o_proj, dense / shared-expert MLP and lm_head biases (zero at init)
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
            n_bias += 1
    log(f"    perturbed {n_norm} RMSNorm weights, {n_bias} q/k/v biases")


def check_params_nontrivial(model) -> None:
    for name, p in model.named_parameters():
        assert p.float().std() > 1e-3, f"parameter {name} looks uninitialised"


def moe_block(layer):
    for attr in ("mlp", "block_sparse_moe", "feed_forward"):  # feed_forward: llama4_text
        m = getattr(layer, attr, None)
        if m is not None and hasattr(m, "experts") and (hasattr(m, "gate") or hasattr(m, "router")):
            return m
    return None


def router_of(block):
    """The router module (`gate`, gpt-oss: `router`)."""
    return block.router if hasattr(block, "router") else block.gate


def moe_layers_of(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if moe_block(layer) is not None]


def expected_moe_layers(cfg) -> list[int]:
    L = cfg.num_hidden_layers
    if cfg.model_type in ("mixtral", "olmoe", "gpt_oss", "minimax_m2"):
        return list(range(L))
    if cfg.model_type in ("deepseek_v3", "deepseek_v2", "glm4_moe"):
        return list(range(cfg.first_k_dense_replace, L))
    if cfg.model_type == "ernie4_5_moe":
        return [i for i in range(L) if (i + 1) % cfg.moe_layer_interval == 0
                and cfg.moe_layer_start_index <= i <= cfg.moe_layer_end_index]
    if cfg.model_type == "deepseek":
        return [i for i in range(L) if i >= cfg.first_k_dense_replace and i % cfg.moe_layer_freq == 0]
    if cfg.model_type == "llama4_text":
        # interleave_moe_layer_step s: layers s-1, 2s-1, ... (transformers derives config.moe_layers the same way)
        step = cfg.interleave_moe_layer_step
        derived = [i for i in range(L) if (i + 1) % step == 0]
        assert cfg.moe_layers == derived, (cfg.moe_layers, derived)
        return derived
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
    return [
        i
        for i in range(L)
        if i not in cfg.mlp_only_layers and n_exp > 0 and (i + 1) % cfg.decoder_sparse_step == 0
    ]


def make_ids(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(IDS_SEEDS[name])
    # avoid the 3 special tokens
    return torch.randint(3, VOCAB, (BATCH, SEQ_LEN), generator=g)


def load(model_dir: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **impl_kwargs())
    return m.eval()


# --------------------------------------------------------------------------------------------
# On-disk inspection
# --------------------------------------------------------------------------------------------


def disk_tensors(model_dir: Path) -> dict[str, tuple[list[int], str, str]]:
    """key -> (shape, dtype, file)"""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (list(sl.get_shape()), sl.get_dtype(), f.name)
    return out


def key_patterns(keys: dict) -> dict[str, dict]:
    """{pattern: {shape, dtype, layers}} with layer index -> {i} and expert index -> {e}."""
    pats: dict[str, dict] = {}
    for k, (shape, dtype, _) in sorted(keys.items()):
        m = re.search(r"\.layers\.(\d+)\.", k)
        p = re.sub(r"\.layers\.\d+\.", ".layers.{i}.", k)
        p = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", p)
        ent = pats.setdefault(p, {"shape": shape, "dtype": dtype, "layers": []})
        assert ent["shape"] == shape and ent["dtype"] == dtype, (k, shape, ent)
        if m and int(m.group(1)) not in ent["layers"]:
            ent["layers"].append(int(m.group(1)))
    for ent in pats.values():
        ent["layers"].sort()
        if not ent["layers"]:
            del ent["layers"]
    return dict(sorted(pats.items()))


def check_disk_layout(name: str, model_dir: Path, cfg, moe_layers: list[int]) -> dict:
    keys = disk_tensors(model_dir)
    mt = cfg.model_type
    if mt == "gpt_oss":
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        for i in moe_layers:
            p = f"model.layers.{i}.mlp"
            want = {f"{p}.router.weight": [E, H], f"{p}.router.bias": [E],
                    f"{p}.experts.gate_up_proj": [E, H, 2 * I], f"{p}.experts.gate_up_proj_bias": [E, 2 * I],
                    f"{p}.experts.down_proj": [E, I, H], f"{p}.experts.down_proj_bias": [E, H],
                    f"model.layers.{i}.self_attn.sinks": [cfg.num_attention_heads]}
            for n, shape in want.items():
                assert n in keys and keys[n][0] == shape, f"{name}: {n} missing or not {shape}"
        assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings)
        return keys
    if mt == "llama4_text":
        check_llama4_text_keys(name, keys, cfg, moe_layers, prefix="")
        return keys
    assert not any("gate_up_proj" in k for k in keys), "fused expert tensors on disk"
    for i in moe_layers:
        for e in range(N_EXPERTS):
            if mt in ("mixtral", "minimax_m2"):
                names = [f"model.layers.{i}.block_sparse_moe.experts.{e}.w{j}.weight" for j in (1, 2, 3)]
            else:
                names = [f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight" for p in ("gate", "up", "down")]
            for n in names:
                assert n in keys, f"{name}: missing per-expert key {n}"
        if mt in ("deepseek_v3", "glm4_moe"):
            n = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
            assert n in keys and keys[n][1] == "F32", f"{name}: {n} missing or not f32"
        if mt == "minimax_m2":
            p = f"model.layers.{i}.block_sparse_moe"
            for n, shape in {f"{p}.gate.weight": [N_EXPERTS, cfg.hidden_size],
                             f"{p}.e_score_correction_bias": [N_EXPERTS]}.items():
                assert n in keys and keys[n][:2] == (shape, "F32"), f"{name}: {n} missing or not f32 {shape}"
            assert not any(f"layers.{i}.mlp." in k for k in keys), f"{name}: mlp.* keys on disk"
        if mt == "ernie4_5_moe":
            n = f"model.layers.{i}.mlp.moe_statics.e_score_correction_bias"
            assert n in keys and keys[n][:2] == ([1, N_EXPERTS], "F32"), f"{name}: {n} missing or not f32 [1, E]"
            assert f"model.layers.{i}.mlp.gate.weight" in keys
            assert not any(".gate.moe_statics." in k for k in keys), f"{name}: in-memory bias name on disk"
    tied = getattr(cfg, "tie_word_embeddings", False)
    assert ("lm_head.weight" in keys) == (not tied), f"{name}: lm_head presence vs tie_word_embeddings"
    return keys


# --------------------------------------------------------------------------------------------
# Reference computation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def run_reference(model, ids: torch.Tensor, *, verify: bool = True) -> tuple[dict, dict]:
    """Returns (tensors, json_fields) for one model in its current dtype."""
    cfg = model.config
    L = cfg.num_hidden_layers
    moe_layers = moe_layers_of(model)
    assert moe_layers == expected_moe_layers(cfg), (moe_layers, expected_moe_layers(cfg))

    # Hooks: last decoder layer output (pre final norm), gate inputs.
    captured: dict = {}

    def last_layer_hook(_m, _inp, out):
        captured["prenorm"] = (out[0] if isinstance(out, tuple) else out).clone()

    def gate_hook(i):
        def h(_m, inp, _out):
            captured[f"gate_in.{i}"] = inp[0].clone()

        return h

    handles = [model.model.layers[-1].register_forward_hook(last_layer_hook)]
    for i in moe_layers:
        handles.append(router_of(moe_block(model.model.layers[i])).register_forward_hook(gate_hook(i)))
    try:
        out = model(ids, output_hidden_states=True, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()

    logits = out.logits.float()
    assert logits.shape == (BATCH, SEQ_LEN, cfg.vocab_size)
    assert torch.isfinite(logits).all()

    tensors = {"logits": logits.contiguous()}
    hs = out.hidden_states
    assert len(hs) == L + 1, len(hs)
    for k, h in enumerate(hs):
        tensors[f"hidden_states.{k}"] = h.float().contiguous()
    tensors["final_prenorm"] = captured["prenorm"].float().contiguous()

    rl = out.router_logits
    assert len(rl) == len(moe_layers), (len(rl), moe_layers)
    for i, r in zip(moe_layers, rl):
        assert r.shape == (BATCH * SEQ_LEN, N_EXPERTS), r.shape
        tensors[f"router_logits.{i}"] = r.float().contiguous()

    if verify:
        # hidden_states[0] = embeddings; hidden_states[L] = final norm(last layer output).
        emb = model.model.embed_tokens(ids)
        assert torch.equal(hs[0], emb), "hidden_states[0] is not the embedding output"
        assert torch.equal(hs[L], model.model.norm(captured["prenorm"])), "hidden_states[L] != norm(last layer)"
        assert not torch.allclose(hs[L], captured["prenorm"]), "final norm seems not applied"
        # router logits are the raw linear gate outputs (before softmax).
        for i, r in zip(moe_layers, rl):
            gate = router_of(moe_block(model.model.layers[i]))
            x = captured[f"gate_in.{i}"].reshape(-1, cfg.hidden_size)
            raw = F.linear(x, gate.weight, getattr(gate, "bias", None))
            assert torch.equal(r, raw), f"router_logits.{i} is not gate(x)"
            assert (r < 0).any() and not torch.allclose(r.float().exp().sum(-1), torch.ones(r.shape[0]))

    loss = model(ids, labels=ids).loss  # output_router_logits defaults to False -> plain CE
    assert not cfg.output_router_logits
    loss_seq = [float(model(ids[b : b + 1], labels=ids[b : b + 1]).loss) for b in range(BATCH)]
    # sanity: plain causal-LM cross entropy, mean over all B*(T-1) shifted tokens
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(float(ce) - float(loss)) < 1e-4, (float(ce), float(loss))

    probs = logits.softmax(-1)
    ent = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    fields = {
        "loss": float(loss),
        "loss_per_sequence": loss_seq,
        "moe_layers": moe_layers,
        "logits_stats": {
            "std": float(logits.std()),
            "mean_entropy_nats": ent,
            "uniform_entropy_nats": math.log(cfg.vocab_size),
            "mean_max_prob": float(probs.max(-1).values.mean()),
        },
    }
    return tensors, fields


_NUM = r"-?[0-9][0-9.eE+-]*"


def write_json(path: Path, obj) -> None:
    """Indented JSON, but flat lists of numbers (and [shape, dtype] pairs) on one line."""
    s = json.dumps(obj, indent=2)
    s = re.sub(rf"\[\s*({_NUM}(?:,\s*{_NUM})*)\s*\]", lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", s)
    s = re.sub(r'\{\s*("shape": \[[^\[\]]*\]),\s*("dtype": "[A-Z0-9]+")(?:,\s*("layers": \[[^\[\]]*\]))?\s*\}',
               lambda m: "{" + ", ".join(g for g in m.groups() if g) + "}", s)
    s = re.sub(r"\[\s*(\[[^\[\]]*\](?:,\s*\[[^\[\]]*\])*)\s*\]",
               lambda m: "[\n    " + re.sub(r"\],\s*\[", "],\n    [", m.group(1)) + "\n  ]", s)
    assert json.loads(s) == json.loads(json.dumps(obj))
    path.write_text(s + "\n")


def base_reference_json(name: str, model, ids: torch.Tensor, keys: dict, dtype_on_disk: str) -> dict:
    cfg = model.config
    L = cfg.num_hidden_layers
    return {
        "name": name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "model_type": cfg.model_type,
        "dtype_on_disk": dtype_on_disk,
        "attn_implementation": "eager",
        "experts_implementation": "eager" if TF_MAJOR >= 5 else "n/a (4.x per-expert nn.ModuleList)",
        "num_hidden_layers": L,
        "vocab_size": cfg.vocab_size,
        "ids": ids.tolist(),
        "hidden_states_semantics": (
            f"hidden_states.0 = token embeddings; hidden_states.k (1..{L - 1}) = output of decoder layer k-1; "
            f"hidden_states.{L} = output of the last layer AFTER the final model.norm (== last_hidden_state); "
            "final_prenorm = output of the last layer BEFORE the final norm"
        ),
        "router_logits_semantics": (
            "router_logits.{layer}: [batch*seq, num_experts], row index = b*seq + t; raw gate logits "
            "x @ W_gate^T (model dtype, before softmax/top-k), x = post_attention_layernorm output"
        ),
        "loss_semantics": (
            "model(ids, labels=ids).loss with output_router_logits=False: mean token cross-entropy over "
            "the 3x15 shifted positions (no router aux loss)"
        ),
        "on_disk_key_patterns": key_patterns(keys),
    }


# --------------------------------------------------------------------------------------------
# Expert masking (router patch) and physical removal check
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def masked_router(model, masked: dict[int, list[int]]):
    """Make the given experts unselectable: their router logits become -inf right after the gate's
    linear projection, i.e. before transformers' own softmax / top-k / renormalisation code runs.

    Implementation: transformers 5.x routers compute ``router_logits = F.linear(hidden_states,
    self.weight)`` with ``F`` the modeling module's global; we swap that global for a shim whose
    ``linear`` masks the columns when it is called with one of the patched gate weights and delegates
    everything else to torch.nn.functional. The routing code itself is transformers' unmodified code.
    """
    assert TF_MAJOR >= 5
    gates = {i: router_of(moe_block(model.model.layers[i])) for i in masked}
    mod = sys.modules[type(next(iter(gates.values()))).__module__]
    real_F = mod.F
    by_weight = {id(g.weight): (i, list(masked[i])) for i, g in gates.items()}
    hits: dict[int, int] = {}

    class _Shim:
        def __getattr__(self, attr):
            return getattr(real_F, attr)

        @staticmethod
        def linear(x, w, b=None):
            out = real_F.linear(x, w, b)
            hit = by_weight.get(id(w))
            if hit is not None:
                i, cols = hit
                out = out.clone()
                out[..., cols] = float("-inf")
                hits[i] = hits.get(i, 0) + 1
            return out

    mod.F = _Shim()
    try:
        yield hits
    finally:
        mod.F = real_F


@torch.no_grad()
def physically_remove_experts(model, masked: dict[int, list[int]]):
    """Deep copy with the masked experts deleted (router rows and expert tensors), per layer."""
    m = copy.deepcopy(model)
    for i, drop in masked.items():
        blk = moe_block(m.model.layers[i])
        gate = router_of(blk)
        keep = [e for e in range(N_EXPERTS) if e not in drop]
        gate.weight = torch.nn.Parameter(gate.weight[keep].clone())
        gate.num_experts = len(keep)
        if getattr(gate, "e_score_correction_bias", None) is not None:
            gate.e_score_correction_bias = torch.nn.Buffer(gate.e_score_correction_bias[keep].clone())
        if getattr(blk, "e_score_correction_bias", None) is not None:  # minimax_m2: on the MoE block
            blk.e_score_correction_bias = torch.nn.Buffer(blk.e_score_correction_bias[keep].clone())
        if getattr(gate, "moe_statics", None) is not None:  # ernie4_5_moe: [1, E] parameter
            st = gate.moe_statics
            st.e_score_correction_bias = torch.nn.Parameter(st.e_score_correction_bias[:, keep].clone(),
                                                            requires_grad=False)
        if isinstance(getattr(gate, "bias", None), torch.nn.Parameter):
            gate.bias = torch.nn.Parameter(gate.bias[keep].clone())
        if isinstance(blk.experts, torch.nn.ModuleList):  # per-expert modules (tiny-deepseek)
            blk.experts = torch.nn.ModuleList([blk.experts[e] for e in keep])
            continue
        blk.experts.gate_up_proj = torch.nn.Parameter(blk.experts.gate_up_proj[keep].clone())
        blk.experts.down_proj = torch.nn.Parameter(blk.experts.down_proj[keep].clone())
        for b in ("gate_up_proj_bias", "down_proj_bias"):
            if getattr(blk.experts, b, None) is not None:
                setattr(blk.experts, b, torch.nn.Parameter(getattr(blk.experts, b)[keep].clone()))
        blk.experts.num_experts = len(keep)
    return m


def choose_masked(name: str, moe_layers: list[int], n_fixed: int | None = None) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(IDS_SEEDS[name] + 99)
    out = {}
    for j, i in enumerate(moe_layers):
        n = n_fixed or 2 + (j % 2)  # 2 or 3 experts (n_fixed: that many)
        while True:
            pick = sorted(torch.randperm(N_EXPERTS, generator=g)[:n].tolist())
            if pick not in out.values():
                break
        out[i] = pick
    return out


@torch.no_grad()
def masked_reference(name: str, model, ids, ref_tensors) -> tuple[dict, dict]:
    moe_layers = moe_layers_of(model)
    masked = choose_masked(name, moe_layers)
    # every masked set must contain an expert the unmasked run actually selects, so masking matters
    for i, drop in masked.items():
        sel = ref_tensors[f"router_logits.{i}"].topk(TOP_K, dim=-1).indices.unique().tolist()
        assert set(drop) & set(sel), f"layer {i}: masked experts {drop} never selected"
    with masked_router(model, masked) as hits:
        out = model(ids, output_router_logits=True)
        loss = float(model(ids, labels=ids).loss)
    assert sorted(hits) == sorted(masked), hits
    logits = out.logits.float()
    for i, r in zip(moe_layers, out.router_logits):
        assert torch.isneginf(r[:, masked[i]]).all()
    diff_vs_unmasked = float((logits - ref_tensors["logits"]).abs().max())
    assert diff_vs_unmasked > 1e-2, "masking had no effect"

    # Equivalence with physically removing the experts (softmax renormalised over the kept ones).
    pruned = physically_remove_experts(model, masked)
    logits_pruned = pruned(ids).logits.float()
    max_diff = float((logits - logits_pruned).abs().max())
    log(f"    masked vs physically-removed experts: max |dlogit| = {max_diff:.3g}")
    assert torch.allclose(logits, logits_pruned, atol=1e-5, rtol=1e-5), max_diff
    fields = {
        "masked_experts": {str(i): v for i, v in masked.items()},
        "masked_loss": loss,
        "masked_semantics": (
            "masked.safetensors logits: the listed experts' router logits set to -inf after the gate "
            "linear, before softmax/top-k (transformers' own routing code otherwise); checked equal to "
            "deleting those experts (router rows + expert weights) from the model"
        ),
        "masked_vs_removed_max_abs_diff": max_diff,
        "masked_vs_unmasked_max_abs_diff": diff_vs_unmasked,
    }
    return {"logits": logits.contiguous()}, fields


# --------------------------------------------------------------------------------------------
# Per-architecture extra checks
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def check_swa(swa_logits: torch.Tensor, full_logits: torch.Tensor) -> dict:
    """Same weights / ids with and without the window: positions < window identical, later differ."""
    w = SWA_WINDOW
    d_early = float((swa_logits[:, :w] - full_logits[:, :w]).abs().max())
    d_late = (swa_logits[:, w:] - full_logits[:, w:]).abs().amax(dim=(0, 2))
    log(f"    SWA vs full attention: max |d| positions <{w}: {d_early:.3g}; positions >={w}: "
        f"min over positions of max |d| = {float(d_late.min()):.3g}")
    assert d_early < 1e-5, d_early
    assert float(d_late.min()) > 1e-3, "sliding window not applied"
    return {"swa_vs_no_window_max_abs_diff_first_window_positions": d_early,
            "swa_vs_no_window_min_per_position_max_abs_diff_after_window": float(d_late.min())}


@torch.no_grad()
def check_olmoe_clip(model, ids) -> dict:
    clip = model.config.clip_qkv
    stats = {"q": [0, 0], "k": [0, 0], "v": [0, 0]}
    handles = []

    def hook(kind):
        def h(_m, _i, out):  # clone: the attention clamps these tensors in place afterwards
            o = out.detach().clone()
            stats[kind][0] += int((o.abs() > clip).sum())
            stats[kind][1] += o.numel()

        return h

    for layer in model.model.layers:
        a = layer.self_attn
        handles += [a.q_norm.register_forward_hook(hook("q")), a.k_norm.register_forward_hook(hook("k")),
                    a.v_proj.register_forward_hook(hook("v"))]
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    frac = {k: v[0] / v[1] for k, v in stats.items()}
    log(f"    clip_qkv={clip}: fraction of entries clipped q={frac['q']:.3f} k={frac['k']:.3f} v={frac['v']:.3f}")
    assert all(f > 0.005 for f in frac.values()), frac
    old = model.config.clip_qkv
    model.config.clip_qkv = None
    try:
        unclipped = model(ids).logits
    finally:
        model.config.clip_qkv = old
    d = float((unclipped - logits).abs().max())
    assert d > 1e-2, "clip_qkv had no effect"
    return {"clip_qkv_fraction_clipped": frac, "clip_qkv_vs_unclipped_max_abs_diff": d}


@torch.no_grad()
def check_shared_gate(model, ids) -> dict:
    vals = []
    handles = [moe_block(l).shared_expert_gate.register_forward_hook(lambda _m, _i, o: vals.append(o.sigmoid()))
               for l in model.model.layers if moe_block(l) is not None]
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    v = torch.cat(vals)
    log(f"    shared_expert_gate sigmoid: min {float(v.min()):.3f} max {float(v.max()):.3f} std {float(v.std()):.3f}")
    assert float(v.min()) < 0.3 and float(v.max()) > 0.7, "shared expert gate is trivial"
    return {"shared_expert_gate_sigmoid_range": [float(v.min()), float(v.max())]}


# --------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------


def fresh_dir(p: Path) -> Path:
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


def emit(name: str, out: Path, ref_json: dict, tensors: dict, ids: torch.Tensor, extra_files: dict | None = None):
    pdir = fresh_dir(out / "parity" / name)
    save_file(tensors, str(pdir / "reference.safetensors"), metadata={"format": "pt"})
    write_json(pdir / "ids.json", ids.tolist())
    for fname, t in (extra_files or {}).items():
        save_file(t, str(pdir / fname), metadata={"format": "pt"})
    write_json(pdir / "reference.json", ref_json)


def generate_f32(name: str, out: Path, model_src, save_kwargs: dict | None = None, masked: bool = False,
                 extra_check=None, extra_tensors=None) -> tuple[dict, dict]:
    """Save model_src (an in-memory f32 model) and write its references from the reloaded model."""
    mdir = fresh_dir(out / "models" / name)
    model_src.save_pretrained(mdir, **(save_kwargs or {}))
    model = load(mdir)
    ids = make_ids(name)
    tensors, fields = run_reference(model, ids)
    # reloaded model must reproduce the in-memory model exactly (on-disk layout round trip)
    with torch.no_grad():
        assert torch.equal(model_src(ids).logits, model(ids).logits), f"{name}: save/load round trip changed logits"
    keys = check_disk_layout(name, mdir, model.config, fields["moe_layers"])
    ref = base_reference_json(name, model, ids, keys, "float32")
    ref.update(fields)
    extra = {}
    if masked:
        mt, mf = masked_reference(name, model, ids, tensors)
        extra["masked.safetensors"] = mt
        ref.update(mf)
    if extra_check is not None:
        ref.update(extra_check(model, ids))
    if extra_tensors is not None:  # (model, ids, tensors) -> (more reference tensors, json fields)
        more, more_fields = extra_tensors(model, ids, tensors)
        assert not set(more) & set(tensors)
        tensors.update(more)
        ref.update(more_fields)
    emit(name, out, ref, tensors, ids, extra)
    return ref, tensors


def gen_mixtral_family(out: Path) -> None:
    # tiny-mixtral
    log("tiny-mixtral")
    base = build_model("tiny-mixtral", SEEDS["tiny-mixtral"])
    _, ref_t = generate_f32("tiny-mixtral", out, base, masked=True)

    # tiny-mixtral-swa: identical weights, sliding_window=6
    log("tiny-mixtral-swa")
    from transformers import AutoModelForCausalLM

    swa = AutoModelForCausalLM.from_config(make_config("tiny-mixtral-swa"), **impl_kwargs()).eval()
    swa.load_state_dict(base.state_dict())
    assert swa.config.sliding_window == SWA_WINDOW
    assert IDS_SEEDS["tiny-mixtral-swa"] == IDS_SEEDS["tiny-mixtral"]
    generate_f32("tiny-mixtral-swa", out, swa, extra_check=lambda m, ids: check_swa(m(ids).logits, ref_t["logits"]))

    # tiny-mixtral-bf16: tiny-mixtral weights rounded to bf16, saved in bf16
    log("tiny-mixtral-bf16")
    name = "tiny-mixtral-bf16"
    mdir = fresh_dir(out / "models" / name)
    copy.deepcopy(base).to(torch.bfloat16).save_pretrained(mdir)
    ids = make_ids(name)
    m16 = load(mdir, dtype=torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        o16 = m16(ids, output_router_logits=True)
        logits_bf16 = o16.logits.float().contiguous()
        loss_bf16 = float(m16(ids, labels=ids).loss)
        loss_bf16_seq = [float(m16(ids[b : b + 1], labels=ids[b : b + 1]).loss) for b in range(BATCH)]
    m32 = m16.float()  # bf16 weights upcast to f32, run in f32
    assert next(m32.parameters()).dtype == torch.float32
    tensors, fields = run_reference(m32, ids)
    tensors["logits_bf16"] = logits_bf16
    flips = []
    for i, r16 in zip(fields["moe_layers"], o16.router_logits):
        tensors[f"router_logits_bf16.{i}"] = r16.float().contiguous()
        sel16 = r16.float().softmax(-1).topk(TOP_K).indices.sort(-1).values
        sel32 = tensors[f"router_logits.{i}"].softmax(-1).topk(TOP_K).indices.sort(-1).values
        for row in (sel16 != sel32).any(-1).nonzero().flatten().tolist():
            flips.append([i, row // SEQ_LEN, row % SEQ_LEN])
    keys = disk_tensors(mdir)
    assert all(d == "BF16" for _, d, _ in keys.values()), "not bf16 on disk"
    check_disk_layout(name, mdir, m32.config, fields["moe_layers"])
    ref = base_reference_json(name, m32, ids, keys, "bfloat16")
    ref.update(fields)
    ref["loss_bf16"] = loss_bf16
    ref["loss_bf16_per_sequence"] = loss_bf16_seq
    ref["bf16_semantics"] = (
        "logits / loss / hidden_states / router_logits: bf16 weights upcast to f32 (model.float()), run in "
        "f32; logits_bf16 / loss_bf16: the same checkpoint run in bf16 (logits cast to f32 for saving)"
    )
    ref["logits_bf16_vs_f32_max_abs_diff"] = float((logits_bf16 - tensors["logits"]).abs().max())
    ref["bf16_top_k_flips_vs_f32"] = flips
    ref["bf16_top_k_flips_semantics"] = (
        "[layer, batch, position] where the bf16 run picks a different top-k expert set than the f32 run "
        "(near-ties in random routers); logits_bf16 at and after those positions can differ by O(1)"
    )
    log(f"    bf16 vs f32 run: max |dlogit| = {ref['logits_bf16_vs_f32_max_abs_diff']:.3g}; "
        f"top-k flips [layer, b, t]: {flips}")
    emit(name, out, ref, tensors, ids)


def gen_qwen2(out: Path) -> None:
    log("tiny-qwen2-moe")
    m = build_model("tiny-qwen2-moe", SEEDS["tiny-qwen2-moe"])
    generate_f32("tiny-qwen2-moe", out, m, save_kwargs={"max_shard_size": "300KB"}, masked=True,
                 extra_check=check_shared_gate)
    mdir = out / "models" / "tiny-qwen2-moe"
    idx = json.loads((mdir / "model.safetensors.index.json").read_text())
    n_shards = len(set(idx["weight_map"].values()))
    log(f"    {n_shards} shards")
    assert n_shards >= 3, n_shards


def gen_qwen3(out: Path) -> None:
    log("tiny-qwen3-moe")
    m = build_model("tiny-qwen3-moe", SEEDS["tiny-qwen3-moe"])
    generate_f32("tiny-qwen3-moe", out, m)


def gen_olmoe(out: Path) -> None:
    log("tiny-olmoe")
    m = build_model("tiny-olmoe", SEEDS["tiny-olmoe"])
    generate_f32("tiny-olmoe", out, m, extra_check=check_olmoe_clip)


def choose_removed_per_group(name: str, moe_layers: list[int], n_group: int) -> dict[int, list[int]]:
    """One expert per group per MoE layer: group-limited routing stays equal to removal only when
    every group keeps the same count."""
    g = torch.Generator().manual_seed(IDS_SEEDS[name] + 99)
    size = N_EXPERTS // n_group
    return {i: sorted(gi * size + int(torch.randint(size, (1,), generator=g))
                      for gi in range(n_group)) for i in moe_layers}


@torch.no_grad()
def deepseek_removed_reference(name: str, model, ids, ref_tensors) -> tuple[dict, dict]:
    """DeepSeek: ``masked.safetensors`` holds the logits of the model with the listed experts
    physically deleted (router rows, correction bias, expert weights; one per group). Setting their
    logits to -inf is not removal for V3 (sigmoid(-inf) + bias stays selectable), so removal is the
    reference an expert mask must reproduce."""
    moe_layers = moe_layers_of(model)
    cfg = model.config
    masked = choose_removed_per_group(name, moe_layers, cfg.n_group)
    pruned = physically_remove_experts(model, masked)
    logits = pruned(ids).logits.float()
    loss = float(pruned(ids, labels=ids).loss)
    d = float((logits - ref_tensors["logits"]).abs().max())
    log(f"    removed {masked}: max |dlogit| vs full = {d:.3g}")
    assert d > 1e-2, "removal had no effect"
    return {"logits": logits.contiguous()}, {
        "masked_experts": {str(i): v for i, v in masked.items()},
        "masked_loss": loss,
        "masked_semantics": (
            "masked.safetensors logits: the listed experts physically deleted (router rows, "
            "e_score_correction_bias entries, expert weights; one expert per routing group, so groups stay "
            "contiguous and equal) and the model run by transformers"
        ),
        "masked_vs_unmasked_max_abs_diff": d,
    }


@torch.no_grad()
def check_deepseek(model, ids) -> dict:
    """Records the yarn factors and checks they matter; checks the group limit binds."""
    cfg = model.config
    att = model.model.layers[0].self_attn
    rot = model.model.rotary_emb
    plain_scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    log(f"    yarn: cos/sin factor {rot.attention_scaling:.6f}; softmax scale {att.scaling:.6f} "
        f"(plain {plain_scale:.6f})")
    assert abs(rot.attention_scaling - 1.0) > 1e-3 and abs(att.scaling - plain_scale) > 1e-3
    return {
        "yarn_cos_sin_factor": float(rot.attention_scaling),
        "softmax_scale": float(att.scaling),
        "softmax_scale_without_mscale": plain_scale,
    }


def gen_deepseek(out: Path, name: str) -> None:
    log(name)
    m = build_model(name, SEEDS[name])
    ref, tensors = generate_f32(name, out, m, extra_check=check_deepseek)
    model = load(out / "models" / name)
    ids = make_ids(name)
    mt, mf = deepseek_removed_reference(name, model, ids, tensors)
    pdir = out / "parity" / name
    save_file(mt, str(pdir / "masked.safetensors"), metadata={"format": "pt"})
    ref.update(mf)
    write_json(pdir / "reference.json", ref)


# --------------------------------------------------------------------------------------------
# GLM-4.5 (glm4_moe), MiniMax-M2 (minimax_m2), ERNIE-4.5 MoE (ernie4_5_moe): correction-bias routing
# --------------------------------------------------------------------------------------------


def correction_bias_of(block) -> torch.Tensor:
    """The MoE layer's e_score_correction_bias as a flat [E] tensor, wherever the architecture keeps it
    (glm4_moe: mlp.gate; minimax_m2: the MoE block; ernie4_5_moe: mlp.gate.moe_statics, shape [1, E])."""
    gate = router_of(block)
    if getattr(gate, "moe_statics", None) is not None:
        return gate.moe_statics.e_score_correction_bias.reshape(-1)
    if getattr(gate, "e_score_correction_bias", None) is not None:
        return gate.e_score_correction_bias
    return block.e_score_correction_bias


def route_ref(cfg, logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent re-implementation of the three routers, from the raw router logits [N, E] (f32):
    scores = sigmoid(logits) (glm4_moe, minimax_m2) or softmax(logits) (ernie4_5_moe); the choice uses
    scores + bias (glm4_moe: only within the topk_group groups with the best sum of their top-2 biased scores);
    the weights are the UNbiased scores of the chosen experts, renormalised: / (sum + 1e-20) * routed_scaling_factor
    (glm4_moe), / sum (minimax_m2), / max(sum, moe_norm_min) (ernie4_5_moe). Returns (idx, weight), each row
    sorted by expert id."""
    mt = cfg.model_type
    logits = logits.float()
    scores = logits.softmax(-1) if mt == "ernie4_5_moe" else logits.sigmoid()
    choice = scores + bias.float()
    if mt == "glm4_moe":
        E, G = scores.shape[-1], cfg.n_group
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), float("-inf"))
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, idx)
    if mt == "glm4_moe":
        assert cfg.norm_topk_prob
        w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    elif mt == "minimax_m2":
        w = w / w.sum(-1, keepdim=True)
    else:
        w = w / w.sum(-1, keepdim=True).clamp(min=cfg.moe_norm_min)
    idx, order = idx.sort(-1)
    return idx, w.gather(1, order)


ROUTING_SEMANTICS = {
    "glm4_moe": "s = sigmoid(logits) (f32); choice = s + e_score_correction_bias; group score = sum of the top-2 "
                "choice values in each of n_group contiguous groups; keep the topk_group best groups (others "
                "-inf); top-k of choice; w = s[idx] / (sum(s[idx]) + 1e-20) (norm_topk_prob) * routed_scaling_factor",
    "minimax_m2": "s = sigmoid(logits.float()); choice = s + e_score_correction_bias; top-k of choice; "
                  "w = s[idx] / sum(s[idx]) (no epsilon, no scaling factor)",
    "ernie4_5_moe": "p = softmax(logits) (f32, over all experts); choice = p + moe_statics.e_score_correction_bias; "
                    "top-k of choice; w = p[idx] / max(sum(p[idx]), moe_norm_min) (no scaling factor)",
}


@torch.no_grad()
def routing_tensors(model, ids, tensors) -> tuple[dict, dict]:
    """topk_idx.{layer} / topk_weight.{layer} from a hook on transformers' router output, checked against
    route_ref; how many of the 48 top-2 selections per layer the correction bias changes."""
    cfg = model.config
    moe_layers = moe_layers_of(model)
    cap: dict = {}

    def hook(i):
        def h(_m, _inp, out):
            cap[i] = tuple(o.clone() for o in out)  # (router_logits, top_k_weights, top_k_index)

        return h

    handles = [router_of(moe_block(model.model.layers[i])).register_forward_hook(hook(i)) for i in moe_layers]
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits.float(), tensors["logits"])
    more, changed, wdiff = {}, {}, 0.0
    for i in moe_layers:
        r, w, idx = cap[i]
        assert torch.equal(r.float(), tensors[f"router_logits.{i}"]), i
        assert idx.shape == w.shape == (BATCH * SEQ_LEN, TOP_K), (idx.shape, w.shape)
        idx_s, order = idx.sort(-1)
        w_s = w.float().gather(1, order)
        more[f"topk_idx.{i}"] = idx_s.to(torch.int64).contiguous()
        more[f"topk_weight.{i}"] = w_s.contiguous()
        bias = correction_bias_of(moe_block(model.model.layers[i])).float()
        assert bias.shape == (N_EXPERTS,) and bool((bias != 0).all())
        ref_idx, ref_w = route_ref(cfg, r, bias)
        assert torch.equal(ref_idx, idx_s), f"layer {i}: route_ref disagrees with transformers' selection"
        wdiff = max(wdiff, float((ref_w - w_s).abs().max()))
        unbiased_idx, _ = route_ref(cfg, r, torch.zeros_like(bias))
        changed[str(i)] = int((unbiased_idx != idx_s).any(-1).sum())
    log(f"    route_ref vs transformers: same top-k, max |dweight| = {wdiff:.3g}; correction bias changes "
        f"{changed} of {BATCH * SEQ_LEN} selections per layer")
    assert wdiff < 1e-6, wdiff
    assert all(0 < c < BATCH * SEQ_LEN for c in changed.values()), changed
    return more, {
        "routing_semantics": ROUTING_SEMANTICS[cfg.model_type],
        "topk_semantics": (
            "topk_idx.{layer}: int64 [batch*seq, 2], the expert ids transformers' router selected (row = b*seq + t), "
            "each row sorted ascending; topk_weight.{layer}: f32 [batch*seq, 2], the weight each selected expert's "
            "output is multiplied by, in the same order (hook on the router's output)"
        ),
        "route_ref_max_abs_weight_diff": wdiff,
        "correction_bias_changed_selections": changed,
        "correction_bias_changed_selections_semantics": (
            "per MoE layer, how many of the batch*seq rows select a different expert set when the same router "
            "logits are routed with e_score_correction_bias = 0"
        ),
    }


@torch.no_grad()
def check_rope(model, ids) -> dict:
    """Effective rotary dim, and which dims rotate together: transformers' own apply_rotary_pos_emb is checked
    against a rotate-half (pairs j, j + r/2 over the first r dims) or interleaved (pairs 2j, 2j+1) rotation."""
    cfg = model.config
    mod = sys.modules[type(model.model).__module__]
    rot = model.model.rotary_emb
    head_dim = model.model.layers[0].self_attn.head_dim
    r = 2 * rot.inv_freq.numel()
    style = "interleaved" if cfg.model_type == "ernie4_5_moe" else "rotate_half"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, SEQ_LEN, head_dim, generator=g)
    pos = torch.arange(SEQ_LEN)[None]
    cos, sin = rot(q, pos)
    q_emb, _ = mod.apply_rotary_pos_emb(q, q, cos, sin)
    ang = pos[0, :, None].float() * rot.inv_freq[None].float()  # [T, r/2]
    c, s = ang.cos(), ang.sin()
    want = q.clone()
    if style == "rotate_half":
        x1, x2 = q[..., : r // 2], q[..., r // 2 : r]
        want[..., : r // 2], want[..., r // 2 : r] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        x1, x2 = q[..., 0:r:2], q[..., 1:r:2]
        want[..., 0:r:2], want[..., 1:r:2] = x1 * c - x2 * s, x2 * c + x1 * s
    d = float((q_emb - want).abs().max())
    log(f"    RoPE: {style} over {r} of {head_dim} head dims; vs hand rotation max |d| = {d:.3g}")
    assert d < 1e-5, d
    assert torch.equal(q_emb[..., r:], q[..., r:])
    fields = {"head_dim": head_dim, "rotary_dim_effective": r, "rope_style": style,
              "rope_semantics": (
                  f"rotary on the first {r} of {head_dim} dims of each q/k head, the rest passed through; "
                  + ("rotate-half pairs (j, j + r/2)" if style == "rotate_half" else
                     "interleaved pairs (2j, 2j+1) (GLM style), computed in f32")
                  + f"; inv_freq = theta^(-2j/{r})")}
    if cfg.model_type == "ernie4_5_moe":
        # tied embeddings with use_bias: lm_head.weight is the embedding, lm_head.bias a tensor of its own
        out = model(ids, output_hidden_states=True)
        want = F.linear(out.hidden_states[-1], model.model.embed_tokens.weight, model.lm_head.bias)
        assert torch.equal(out.logits, want) and float(model.lm_head.bias.abs().max()) > 0
        fields["lm_head_semantics"] = "logits = final_norm(h) @ embed_tokens.weight^T + lm_head.bias (tied weight, own bias)"
    return fields


@torch.no_grad()
def removed_experts_reference(model, ids, ref_tensors, masked: dict[int, list[int]], how: str) -> tuple[dict, dict]:
    """The logits of the model with the listed experts physically deleted (router rows, correction-bias entries,
    expert weights), run by transformers."""
    for i, drop in masked.items():
        sel = ref_tensors[f"topk_idx.{i}"].unique().tolist()
        assert set(drop) & set(sel), f"layer {i}: removed experts {drop} never selected"
    pruned = physically_remove_experts(model, masked)
    for i, drop in masked.items():
        blk = moe_block(pruned.model.layers[i])
        n = N_EXPERTS - len(drop)
        assert router_of(blk).weight.shape[0] == blk.experts.gate_up_proj.shape[0] == n
        assert correction_bias_of(blk).numel() == n
    logits = pruned(ids).logits.float()
    loss = float(pruned(ids, labels=ids).loss)
    d = float((logits - ref_tensors["logits"]).abs().max())
    log(f"    removed {masked}: max |dlogit| vs full = {d:.3g}")
    assert d > 1e-2, "removal had no effect"
    return {"logits": logits.contiguous()}, {
        "masked_experts": {str(i): v for i, v in masked.items()},
        "masked_loss": loss,
        "masked_semantics": (
            "masked.safetensors logits: the listed experts physically deleted (router rows, "
            f"e_score_correction_bias entries, expert weights; {how}) and the model run by transformers"
        ),
        "masked_vs_unmasked_max_abs_diff": d,
    }


BIAS_ROUTED = ("tiny-glm4-moe", "tiny-minimax-m2", "tiny-ernie4-5-moe")


def gen_bias_routed(out: Path, name: str) -> None:
    """tiny-glm4-moe / tiny-minimax-m2 / tiny-ernie4-5-moe."""
    log(name)
    m = build_model(name, SEEDS[name])
    ref, tensors = generate_f32(name, out, m, extra_check=check_rope, extra_tensors=routing_tensors)
    mdir = out / "models" / name
    cfg_json = json.loads((mdir / "config.json").read_text())
    model = load(mdir)
    cfg = model.config
    ids = make_ids(name)
    if cfg.model_type == "glm4_moe":
        assert cfg_json["rope_parameters"]["partial_rotary_factor"] == 0.5, cfg_json["rope_parameters"]
        assert not any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in disk_tensors(mdir))
        ref["mtp_semantics"] = (
            f"config.json says num_nextn_predict_layers: {cfg_json['num_nextn_predict_layers']} (transformers' "
            "default) but the checkpoint holds no MTP weights (transformers builds no MTP layer)")
        masked = choose_removed_per_group(name, ref["moe_layers"], cfg.n_group)
        how = f"one expert per routing group (n_group {cfg.n_group}), so groups stay contiguous and equal"
    else:
        if cfg.model_type == "minimax_m2":
            assert cfg_json["rotary_dim"] == 8 and cfg_json["rope_parameters"]["partial_rotary_factor"] == 0.5
        masked = choose_masked(name, ref["moe_layers"], n_fixed=2)
        how = "two experts per MoE layer"
        if cfg.model_type == "ernie4_5_moe":
            how += "; the softmax then runs over the 6 kept experts"
    assert ref["rotary_dim_effective"] == (16 if cfg.model_type == "ernie4_5_moe" else 8)
    mt, mf = removed_experts_reference(model, ids, tensors, masked, how)
    pdir = out / "parity" / name
    save_file(mt, str(pdir / "masked.safetensors"), metadata={"format": "pt"})
    ref.update(mf)
    write_json(pdir / "reference.json", ref)


# --------------------------------------------------------------------------------------------
# Llama 4: llama4_text (Llama4ForCausalLM) and the multimodal llama4 wrapper (Llama4ForConditionalGeneration)
# --------------------------------------------------------------------------------------------

LLAMA4_CHUNK = 6  # attention_chunk_size, shorter than the 16-token sequences
LLAMA4_FLOOR_SCALE = 4  # default 8192: temperature tuning would be 1.0 at every one of 16 positions
LLAMA4_ATTN_SCALE = 0.1
LLAMA4_NO_ROPE_LAYERS = [1, 1, 1, 0]  # transformers' convention: 1 = the layer USES RoPE; layer 3 is NoPE
# llama3 scaling with original_max_position_embeddings 32 (not 8): head_dim 16 with rope_theta 1e4 has wavelengths
# 2*pi/theta^(-2j/16) = 6.3, 19.9, 62.8, ...; with 32, low_freq_wavelen = 32 / low_freq_factor = 32 and
# high_freq_wavelen = 32 / high_freq_factor = 8, so j = 0 keeps its frequency, j = 1 is smoothed and j >= 2 are
# divided by the factor: all three branches of the formula are taken. (With 8, high_freq_wavelen would be 2 < 2*pi,
# and the "unchanged" branch could never be taken at any head_dim or theta.)
LLAMA4_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)  # default theta 5e5
LLAMA4_VISION = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,  # head_dim 16
    intermediate_size=128,  # = 4 * hidden: the pixel-shuffled patch width, which vision_adapter.mlp.fc1 takes
    image_size=28,
    patch_size=14,  # 2x2 patches (+ a class token); pixel_shuffle_ratio 0.5 -> 1 image token per image
    pixel_shuffle_ratio=0.5,
    projector_input_dim=64,  # vision_adapter fc1 out = fc2 in = fc2 out (must be equal)
    projector_output_dim=64,
    vision_output_dim=64,  # multi_modal_projector.linear_1 input (= projector_output_dim)
    initializer_range=0.2,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
)
# in-vocab special token ids for the wrapper (its defaults 200080 / 200081 / 200092 are outside the 320-token vocab)
LLAMA4_IMAGE_TOKENS = dict(boi_token_index=317, eoi_token_index=318, image_token_index=319)


def llama4_text_kwargs(**overrides) -> dict:
    kw = dict(
        **common_kwargs(),
        num_hidden_layers=4,
        head_dim=16,  # Llama4TextConfig's default head_dim is 128, not hidden / heads
        interleave_moe_layer_step=2,  # MoE layers 1 and 3 (config.moe_layers is derived from it)
        num_local_experts=N_EXPERTS,
        intermediate_size=32,  # expert and shared-expert width
        intermediate_size_mlp=96,  # dense layers 0 and 2
        attention_chunk_size=LLAMA4_CHUNK,
        no_rope_layers=list(LLAMA4_NO_ROPE_LAYERS),
        use_qk_norm=True,
        attn_temperature_tuning=True,
        floor_scale=LLAMA4_FLOOR_SCALE,
        attn_scale=LLAMA4_ATTN_SCALE,
        rms_norm_eps=1e-6,  # default 1e-5 (also the eps of the weightless L2 q/k norm)
        tie_word_embeddings=False,
        rope_parameters=dict(LLAMA4_ROPE),
    )
    kw.update(overrides)
    return kw


def llama4_text_config(**overrides):
    """Tiny Llama 4 text model (llama4_text, Llama4ForCausalLM)."""
    from transformers import Llama4TextConfig

    cfg = Llama4TextConfig(**llama4_text_kwargs(**overrides))
    assert cfg.num_experts_per_tok == TOP_K == 2  # the Scout / Maverick releases use 1
    assert cfg.moe_layers == [1, 3], cfg.moe_layers
    assert cfg.layer_types == ["chunked_attention"] * 3 + ["full_attention"], cfg.layer_types
    return cfg


def llama4_mm_config():
    """Tiny Llama 4 multimodal wrapper (llama4, Llama4ForConditionalGeneration)."""
    from transformers import Llama4Config

    cfg = Llama4Config(text_config=llama4_text_kwargs(), vision_config=dict(LLAMA4_VISION), **LLAMA4_IMAGE_TOKENS)
    assert cfg.text_config.model_type == "llama4_text" and cfg.vision_config.model_type == "llama4_vision_model"
    assert cfg.text_config.moe_layers == [1, 3] and cfg.text_config.head_dim == 16
    return cfg


def check_llama4_text_keys(name: str, keys: dict, cfg, moe_layers: list[int], prefix: str) -> None:
    """Fused experts on disk, router / shared expert / dense MLP names; `prefix` is "language_model." in the
    multimodal wrapper."""
    E, H, I, Im = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp
    for i in range(cfg.num_hidden_layers):
        p = f"{prefix}model.layers.{i}.feed_forward"
        if i in moe_layers:
            want = {f"{p}.experts.gate_up_proj": [E, H, 2 * I], f"{p}.experts.down_proj": [E, I, H],
                    f"{p}.router.weight": [E, H], f"{p}.shared_expert.gate_proj.weight": [I, H],
                    f"{p}.shared_expert.up_proj.weight": [I, H], f"{p}.shared_expert.down_proj.weight": [H, I]}
            assert not any(k.startswith(f"{p}.gate_proj") or k.startswith(f"{p}.experts.0.") for k in keys)
        else:
            want = {f"{p}.gate_proj.weight": [Im, H], f"{p}.up_proj.weight": [Im, H], f"{p}.down_proj.weight": [H, Im]}
            assert not any(k.startswith(f"{p}.router") or k.startswith(f"{p}.experts") for k in keys)
        for n, shape in want.items():
            assert n in keys and keys[n][:2] == (shape, "F32"), f"{name}: {n} missing or not f32 {shape}: {keys.get(n)}"
        a = f"{prefix}model.layers.{i}.self_attn"
        assert not any(k.startswith(f"{a}.qk_norm") or k.startswith(f"{a}.q_norm") for k in keys), "weights for the L2 norm"
    assert (f"{prefix}lm_head.weight" in keys) == (not cfg.tie_word_embeddings)


def llama4_default_inv_freq(cfg) -> torch.Tensor:
    d = cfg.head_dim
    return 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def llama4_llama3_inv_freq(cfg) -> tuple[torch.Tensor, list[str]]:
    """Independent llama3 frequency scaling (Llama 3.1): wavelen = 2 pi / f; wavelen < orig / high_freq_factor:
    f; wavelen > orig / low_freq_factor: f / factor; otherwise (1 - s) f / factor + s f with
    s = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    rp = cfg.rope_parameters
    f = llama4_default_inv_freq(cfg)
    orig, lo, hi, fac = (rp["original_max_position_embeddings"], rp["low_freq_factor"], rp["high_freq_factor"],
                         rp["factor"])
    out, branch = f.clone(), []
    for j in range(f.numel()):
        wl = 2 * math.pi / float(f[j])
        if wl < orig / hi:
            branch.append("unchanged")
        elif wl > orig / lo:
            out[j] = f[j] / fac
            branch.append("divided_by_factor")
        else:
            s = (orig / wl - lo) / (hi - lo)
            out[j] = (1 - s) * f[j] / fac + s * f[j]
            branch.append("smoothed")
    return out, branch


def llama4_temperature_scales(cfg, T: int) -> torch.Tensor:
    pos = torch.arange(T).float()
    return torch.log1p(torch.floor((pos + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0


@torch.no_grad()
def llama4_text_ref_forward(lm, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Independent re-implementation of the Llama4ForCausalLM forward (f32), from the weights only, written
    from the semantics this script records (not calling any transformers module). Returns (logits,
    {layer: (idx sorted, weight) per MoE layer})."""
    cfg = lm.config
    sd = {k: v.float() for k, v in lm.state_dict().items()}
    B, T = ids.shape
    H, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps

    def rms(x, w=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if w is None else y * w

    inv, _ = llama4_llama3_inv_freq(cfg)
    ang = torch.arange(T).float()[:, None] * inv[None]  # [T, d/2]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rope(x):  # [B, T, heads, d], interleaved pairs (2j, 2j+1) rotated by angle pos * inv[j]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    i_idx, j_idx = torch.arange(T)[:, None], torch.arange(T)[None]
    causal = j_idx <= i_idx
    chunked = causal & (j_idx // cfg.attention_chunk_size == i_idx // cfg.attention_chunk_size)
    x = sd["model.embed_tokens.weight"][ids]
    routing = {}
    for li in range(cfg.num_hidden_layers):
        p = f"model.layers.{li}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, nh, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, nkv, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, nkv, d)
        use_rope = bool(cfg.no_rope_layers[li])
        if use_rope:
            q, k = rope(q), rope(k)
            if cfg.use_qk_norm:  # after RoPE; x / sqrt(mean(x^2) + eps) over head_dim, no weight
                q, k = rms(q), rms(k)
        elif cfg.attn_temperature_tuning:  # NoPE layers only, queries only
            q = q * llama4_temperature_scales(cfg, T)[None, :, None, None]
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=2)  # query head hq uses kv head hq // rep
        v = v.repeat_interleave(rep, dim=2)
        att = torch.einsum("bihd,bjhd->bhij", q, k) * d ** -0.5
        allowed = chunked if cfg.layer_types[li] == "chunked_attention" else causal
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = torch.einsum("bhij,bjhd->bihd", att, v).reshape(B, T, nh * d)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"]).reshape(B * T, H)
        f = p + "feed_forward."

        def mlp(z, q_):
            return (F.silu(z @ sd[q_ + "gate_proj.weight"].T) * (z @ sd[q_ + "up_proj.weight"].T)) @ sd[q_ + "down_proj.weight"].T

        if li in cfg.moe_layers:
            logits = h @ sd[f + "router.weight"].T  # [N, E]
            top_v, top_i = logits.topk(cfg.num_experts_per_tok, dim=-1)
            w = top_v.sigmoid()
            gu_w, dn_w = sd[f + "experts.gate_up_proj"], sd[f + "experts.down_proj"]
            I = dn_w.shape[1]
            y = mlp(h, f + "shared_expert.")
            for n in range(h.shape[0]):
                for kk in range(top_i.shape[1]):
                    e = int(top_i[n, kk])
                    xin = w[n, kk] * h[n]  # the router weight scales the expert INPUT
                    gu = xin @ gu_w[e]  # [2I]: gate = first I, up = last I
                    y[n] += (F.silu(gu[:I]) * gu[I:]) @ dn_w[e]
            srt, order = top_i.sort(-1)
            routing[li] = (srt, w.gather(1, order))
        else:
            y = mlp(h, f)
        x = x + y.view(B, T, H)
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T, routing


@contextlib.contextmanager
def llama4_ablation(lm, what: str):
    """Switch one feature off in a loaded Llama4ForCausalLM (restored on exit)."""
    cfg, layers = lm.config, lm.model.layers
    rot = lm.model.rotary_emb
    saved = None
    if what == "chunking":
        saved = list(cfg.layer_types)
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    elif what == "temperature_tuning":
        for l in layers:
            l.self_attn.attn_temperature_tuning = False
    elif what == "qk_norm":
        saved = {i: l.self_attn.qk_norm for i, l in enumerate(layers) if hasattr(l.self_attn, "qk_norm")}
        for i in saved:
            del layers[i].self_attn.qk_norm
    elif what == "llama3_scaling":
        saved = rot.inv_freq.clone()
        rot.inv_freq.copy_(llama4_default_inv_freq(cfg))
    else:
        raise ValueError(what)
    try:
        yield
    finally:
        if what == "chunking":
            cfg.layer_types = saved
        elif what == "temperature_tuning":
            for l in layers:
                l.self_attn.attn_temperature_tuning = cfg.attn_temperature_tuning
        elif what == "qk_norm":
            for i, m in saved.items():
                layers[i].self_attn.qk_norm = m
        else:
            rot.inv_freq.copy_(saved)


@torch.no_grad()
def check_llama4_text(lm, ids) -> dict:
    """RoPE form and llama3 frequencies, temperature scales, chunked mask, an independent forward, and how much
    each feature (chunking, temperature tuning, L2 q/k norm, llama3 scaling) changes the loss / logits."""
    cfg = lm.config
    mod = sys.modules[type(lm.model).__module__]
    rot = lm.model.rotary_emb
    T = ids.shape[1]
    # llama3 inverse frequencies: transformers' buffer vs the independent formula; all three branches taken
    inv_default = llama4_default_inv_freq(cfg)
    inv_l3, branch = llama4_llama3_inv_freq(cfg)
    d_inv = float((rot.inv_freq - inv_l3).abs().max() / inv_l3.abs().max())
    assert d_inv < 1e-6, (rot.inv_freq, inv_l3)
    assert set(branch) == {"unchanged", "smoothed", "divided_by_factor"}, branch
    assert rot.attention_scaling == 1.0
    # RoPE: complex multiplication on interleaved pairs (2j, 2j+1)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 2, cfg.head_dim, generator=g)
    pos = torch.arange(T)[None]
    freqs_cis = rot(q, pos)
    assert freqs_cis.is_complex()
    q_emb, _ = mod.apply_rotary_emb(q, q, freqs_cis)
    ang = pos[0, :, None].float() * rot.inv_freq[None]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    a, b = q[..., 0::2], q[..., 1::2]
    want = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    d_rope = float((q_emb - want).abs().max())
    assert d_rope < 1e-5, d_rope
    # the L2 "norm" is x * rsqrt(mean(x^2) + rms_norm_eps), no weight, on RoPE layers only
    for i, l in enumerate(lm.model.layers):
        at = l.self_attn
        assert bool(at.use_rope) == bool(cfg.no_rope_layers[i])
        assert hasattr(at, "qk_norm") == bool(cfg.use_qk_norm and cfg.no_rope_layers[i])
        if hasattr(at, "qk_norm"):
            assert at.qk_norm.eps == cfg.rms_norm_eps and not list(at.qk_norm.parameters())
    scales = llama4_temperature_scales(cfg, T)
    assert len(set(scales.tolist())) >= 4, scales
    # independent forward
    base = lm(ids).logits
    base_loss = float(lm(ids, labels=ids).loss)
    ref_logits, _ = llama4_text_ref_forward(lm, ids)
    d_ref = float((ref_logits - base).abs().max())
    log(f"    independent Llama 4 forward vs transformers: max |dlogit| = {d_ref:.3g}")
    assert d_ref < 1e-4, d_ref
    # feature ablations
    ablations = {}
    for what in ("chunking", "temperature_tuning", "qk_norm", "llama3_scaling"):
        with llama4_ablation(lm, what):
            lo = lm(ids).logits
            loss = float(lm(ids, labels=ids).loss)
        d = (lo - base).abs()
        ablations[what] = {"loss": loss, "loss_delta": loss - base_loss, "max_abs_dlogit": float(d.max())}
        if what == "chunking":  # positions before the first chunk boundary see the same keys either way
            early = float(d[:, :cfg.attention_chunk_size].max())
            late = d[:, cfg.attention_chunk_size:].amax(dim=(0, 2))
            ablations[what]["max_abs_dlogit_positions_before_first_boundary"] = early
            ablations[what]["min_per_position_max_abs_dlogit_after"] = float(late.min())
            assert early < 1e-5 and float(late.min()) > 1e-3, (early, late)
        log(f"    {what} off: loss {loss:.6f} (delta {loss - base_loss:+.4g}), max |dlogit| {float(d.max()):.3g}")
        assert float(d.max()) > 1e-2 and abs(loss - base_loss) > 1e-4, (what, ablations[what])
    assert torch.equal(lm(ids).logits, base), "ablation not restored"
    return {
        "layer_types": list(cfg.layer_types),
        "no_rope_layers": list(cfg.no_rope_layers),
        "no_rope_layers_semantics": "no_rope_layers[i] == 1: layer i USES RoPE (and the L2 q/k norm, and is chunked); "
                                    "0: NoPE layer (no RoPE, no q/k norm, full causal attention, temperature tuning)",
        "attention_chunk_size": cfg.attention_chunk_size,
        "chunked_mask_semantics": (
            f"chunked_attention layers (= the RoPE layers): query i sees key j iff j <= i and j // {cfg.attention_chunk_size} "
            f"== i // {cfg.attention_chunk_size} (non-overlapping chunks from position 0, NOT a sliding window); "
            "full_attention layers: j <= i"),
        "head_dim": cfg.head_dim,
        "rope_style": "interleaved_complex",
        "rope_semantics": (
            "q/k viewed as head_dim/2 complex numbers (dims 2j, 2j+1 = real, imag), multiplied by exp(i * pos * inv_freq[j]) "
            "(freqs_cis = torch.polar(1, pos * inv_freq), f32); all head dims rotate; RoPE layers only"),
        "rope_vs_hand_rotation_max_abs_diff": d_rope,
        "inv_freq_default": inv_default.tolist(),
        "inv_freq_llama3": rot.inv_freq.tolist(),
        "inv_freq_llama3_branch": branch,
        "llama3_semantics": (
            "f_j = theta^(-2j/head_dim); wavelen = 2 pi / f_j; wavelen < orig/high_freq_factor: f_j unchanged; "
            "wavelen > orig/low_freq_factor: f_j / factor; otherwise (1 - s) f_j / factor + s f_j with "
            "s = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor); orig = "
            "original_max_position_embeddings; attention_scaling 1.0"),
        "qk_norm_semantics": (
            f"RoPE layers with use_qk_norm: AFTER RoPE, q and k (each head, over head_dim) -> x * rsqrt(mean(x^2) + "
            f"rms_norm_eps) in f32, no weight (eps {cfg.rms_norm_eps}); NoPE layers: no q/k norm"),
        "attn_temperature_scales": scales.tolist(),
        "attn_temperature_semantics": (
            "NoPE layers only, queries only, after the (absent) RoPE / q-k norm step: q *= 1 + attn_scale * "
            "log1p(floor((pos + 1) / floor_scale)), pos = absolute position (0-based, cache offset included)"),
        "softmax_scale": float(lm.model.layers[0].self_attn.scaling),
        "independent_forward_max_abs_diff": d_ref,
        "feature_ablations": ablations,
        "feature_ablations_semantics": (
            "loss / max |dlogit| of the same checkpoint and ids with one feature switched off: chunking (every layer "
            "full causal), temperature_tuning (attn_temperature_tuning false), qk_norm (no L2 norm), llama3_scaling "
            "(inv_freq = theta^(-2j/d))"),
    }


LLAMA4_ROUTING_SEMANTICS = (
    "top-k (k = num_experts_per_tok) of the raw router logits (no softmax); w = sigmoid(chosen logit) (f32, cast "
    "back); no renormalisation, no scaling factor; each chosen expert e gets w * x as its INPUT (not its output): "
    "y = shared_expert(x) + sum_k down_e(silu(gate_e(w_k x)) * up_e(w_k x)), gate_up_proj[e] = [H, 2I] with gate = "
    "first I columns, up = last I columns"
)


@torch.no_grad()
def llama4_routing_tensors(lm, ids, tensors) -> tuple[dict, dict]:
    """topk_idx / topk_weight from a hook on transformers' Llama4Router output (router_scores: sigmoid of the
    chosen logits, exactly 0 elsewhere), checked against the independent forward's routing."""
    cfg = lm.config
    moe_layers = moe_layers_of(lm)
    cap: dict = {}
    handles = [router_of(moe_block(lm.model.layers[i])).register_forward_hook(
        lambda _m, _i, o, i=i: cap.__setitem__(i, tuple(t.clone() for t in o))) for i in moe_layers]
    try:
        logits = lm(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits.float(), tensors["logits"])
    _, ref_routing = llama4_text_ref_forward(lm, ids)
    more, wdiff = {}, 0.0
    for i in moe_layers:
        scores, r = cap[i]  # Llama4Router returns (router_scores [N, E], router_logits [N, E])
        assert torch.equal(r.float(), tensors[f"router_logits.{i}"]), i
        chosen = scores > 0
        assert bool((chosen.sum(-1) == TOP_K).all()), "router_scores not exactly top-k nonzero"
        idx = chosen.nonzero()[:, 1].view(-1, TOP_K)  # ascending per row
        w = scores.float().gather(1, idx)
        more[f"topk_idx.{i}"] = idx.to(torch.int64).contiguous()
        more[f"topk_weight.{i}"] = w.contiguous()
        ref_idx, ref_w = ref_routing[i]
        assert torch.equal(ref_idx, idx), f"layer {i}: reference routing disagrees"
        wdiff = max(wdiff, float((ref_w - w).abs().max()))
        assert torch.equal(w, r.float().gather(1, idx).sigmoid())
    log(f"    reference routing vs transformers: same top-k, max |dweight| = {wdiff:.3g}")
    assert wdiff < 1e-5, wdiff
    return more, {
        "routing_semantics": LLAMA4_ROUTING_SEMANTICS,
        "topk_semantics": (
            "topk_idx.{layer}: int64 [batch*seq, 2], the expert ids transformers' router selected (row = b*seq + t), "
            "each row sorted ascending; topk_weight.{layer}: f32 [batch*seq, 2], sigmoid of their router logits, "
            "which multiplies the expert's INPUT (Llama 4), in the same order (hook on the router's router_scores)"),
        "route_ref_max_abs_weight_diff": wdiff,
    }


@torch.no_grad()
def llama4_removed_reference(model, lm, ids, ref_tensors, masked: dict[int, list[int]]) -> tuple[dict, dict]:
    """`model` (Llama4ForCausalLM, or the Llama4ForConditionalGeneration around `lm`) run with the listed experts
    physically deleted from its text model (router rows, gate_up_proj / down_proj slices)."""
    for i, drop in masked.items():
        sel = ref_tensors[f"topk_idx.{i}"].unique().tolist()
        assert set(drop) & set(sel), f"layer {i}: removed experts {drop} never selected"
    if model is lm:
        pruned = physically_remove_experts(lm, masked)
        text = pruned
    else:
        pruned = copy.deepcopy(model)
        pruned.language_model = physically_remove_experts(pruned.language_model, masked)
        text = pruned.language_model
    for i, drop in masked.items():
        blk = moe_block(text.model.layers[i])
        n = N_EXPERTS - len(drop)
        assert router_of(blk).weight.shape[0] == blk.experts.gate_up_proj.shape[0] == blk.experts.down_proj.shape[0] == n
    with llama4_output_fix():
        logits = pruned(input_ids=ids).logits.float()
        loss = float(pruned(input_ids=ids, labels=ids).loss)
    # independent: the reference forward of the pruned text model
    ref_logits, _ = llama4_text_ref_forward(text, ids)
    d_ref = float((ref_logits - logits).abs().max())
    assert d_ref < 1e-4, d_ref
    d = float((logits - ref_tensors["logits"]).abs().max())
    log(f"    removed {masked}: max |dlogit| vs full = {d:.3g}; vs independent forward {d_ref:.3g}")
    assert d > 1e-2, "removal had no effect"
    return {"logits": logits.contiguous()}, {
        "masked_experts": {str(i): v for i, v in masked.items()},
        "masked_loss": loss,
        "masked_semantics": (
            "masked.safetensors logits: the listed experts physically deleted from the text model (router.weight "
            "rows, experts.gate_up_proj / experts.down_proj slices; two experts per MoE layer) and the model run by "
            "transformers (top-2 of the 6 kept logits; with sigmoid-of-chosen-logit weights this equals setting the "
            "removed experts' logits to -inf)"),
        "masked_vs_unmasked_max_abs_diff": d,
        "masked_independent_forward_max_abs_diff": d_ref,
    }


def gen_llama4_text(out: Path, name: str = "tiny-llama4-text") -> None:
    log(name)
    m = build_model(name, SEEDS[name])
    ref, tensors = generate_f32(name, out, m, extra_check=check_llama4_text, extra_tensors=llama4_routing_tensors)
    mdir = out / "models" / name
    cfg_json = json.loads((mdir / "config.json").read_text())
    assert cfg_json["moe_layers"] == [1, 3] and cfg_json["no_rope_layers"] == LLAMA4_NO_ROPE_LAYERS
    assert cfg_json["rope_parameters"]["rope_type"] == "llama3"
    model = load(mdir)
    ids = make_ids(name)
    masked = choose_masked(name, ref["moe_layers"], n_fixed=2)
    mt, mf = llama4_removed_reference(model, model, ids, tensors, masked)
    ref["experts_implementation_note"] = ("Llama4TextExperts has no experts_implementation switch: always the batched "
                                          "bmm over all experts with zero-weighted inputs for unchosen ones")
    pdir = out / "parity" / name
    save_file(mt, str(pdir / "masked.safetensors"), metadata={"format": "pt"})
    ref.update(mf)
    write_json(pdir / "reference.json", ref)


@contextlib.contextmanager
def llama4_output_fix():
    """transformers 5.24's Llama4ForConditionalGeneration.forward ends with
    ``Llama4CausalLMOutputWithPast(..., image_outputs=outputs.image_outputs, ...)`` where ``outputs`` is the inner
    Llama4ForCausalLM's MoeCausalLMOutputWithPast, which has no ``image_outputs`` field, so EVERY forward raises
    AttributeError (with or without pixel_values). While this is active, MoeCausalLMOutputWithPast has a class
    attribute ``image_outputs = None``; nothing else is touched (the forward is transformers' own)."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast as Out

    patch = not hasattr(Out, "image_outputs")
    if patch:
        Out.image_outputs = None
    try:
        yield patch
    finally:
        if patch:
            del Out.image_outputs


def load_llama4_mm(mdir: Path):
    from transformers import Llama4ForConditionalGeneration

    return Llama4ForConditionalGeneration.from_pretrained(mdir, dtype=torch.float32, **impl_kwargs()).eval()


@torch.no_grad()
def gen_llama4_mm(out: Path, name: str = "tiny-llama4") -> None:
    """Llama4ForConditionalGeneration: text-only references (input_ids, no pixel_values)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, Llama4ForConditionalGeneration

    log(name)
    seed = SEEDS[name]
    cfg = llama4_mm_config()
    torch.manual_seed(seed)
    src = AutoModelForImageTextToText.from_config(cfg, **impl_kwargs()).float().eval()
    assert type(src) is Llama4ForConditionalGeneration
    perturb(src, seed)
    check_params_nontrivial(src)
    mdir = fresh_dir(out / "models" / name)
    src.save_pretrained(mdir)
    model = load_llama4_mm(mdir)
    lm = model.language_model
    tcfg = lm.config
    ids = make_ids(name)
    # the inner Llama4ForCausalLM: every check of run_reference (hidden states, router logits = gate(x), CE loss)
    inner, fields = run_reference(lm, ids)
    with llama4_output_fix() as patched:
        try_unpatched = None
        out_w = model(input_ids=ids, output_hidden_states=True, output_router_logits=True)
        loss = float(model(input_ids=ids, labels=ids).loss)
        loss_seq = [float(model(input_ids=ids[b: b + 1], labels=ids[b: b + 1]).loss) for b in range(BATCH)]
        assert torch.equal(src(input_ids=ids).logits, out_w.logits), f"{name}: save/load round trip changed logits"
        # smoke check of the image path (not stored): one image token per 28x28 image after pixel shuffle
        g = torch.Generator().manual_seed(IDS_SEEDS[name] + 7)
        ids_img = ids.clone()
        ids_img[:, 1] = cfg.image_token_index
        img_logits = model(input_ids=ids_img, pixel_values=torch.randn(BATCH, 3, 28, 28, generator=g)).logits
        assert torch.isfinite(img_logits).all()
    if patched:  # record that the unpatched forward really fails in this transformers version
        try:
            model(input_ids=ids)
        except AttributeError as e:
            try_unpatched = f"AttributeError: {e}"
        assert try_unpatched is not None
    # the wrapper's text-only forward is exactly the inner text model's
    assert torch.equal(out_w.logits.float(), inner["logits"])
    assert abs(loss - fields["loss"]) == 0.0 and loss_seq == fields["loss_per_sequence"], (loss, fields["loss"])
    assert len(out_w.hidden_states) == tcfg.num_hidden_layers + 1
    for k, h in enumerate(out_w.hidden_states):
        assert torch.equal(h.float(), inner[f"hidden_states.{k}"]), k
    for i, r in zip(fields["moe_layers"], out_w.router_logits):
        assert torch.equal(r.float(), inner[f"router_logits.{i}"]), i
    tensors = dict(inner)
    more, more_fields = llama4_routing_tensors(lm, ids, tensors)
    ref_logits, _ = llama4_text_ref_forward(lm, ids)
    d_ref = float((ref_logits - inner["logits"]).abs().max())
    log(f"    independent Llama 4 text forward vs transformers: max |dlogit| = {d_ref:.3g}")
    assert d_ref < 1e-4, d_ref
    # text_config is tiny-llama4-text's config (the weights differ: other seed)
    skip = {"architectures", "dtype", "transformers_version"}
    want = {k: v for k, v in make_config("tiny-llama4-text").to_dict().items() if k not in skip}
    have = {k: v for k, v in tcfg.to_dict().items() if k not in skip}
    assert have == want, {k: (have.get(k), want.get(k)) for k in set(have) | set(want) if have.get(k) != want.get(k)}
    tensors.update(more)
    # text-only AutoModelForCausalLM load of the same directory (transformers maps llama4 -> Llama4ForCausalLM)
    auto = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, **impl_kwargs()).eval()
    assert type(auto).__name__ == "Llama4ForCausalLM" and auto.config.model_type == "llama4_text"
    assert torch.equal(auto(ids).logits.float(), inner["logits"])
    del auto

    keys = disk_tensors(mdir)
    check_llama4_text_keys(name, keys, tcfg, fields["moe_layers"], prefix="language_model.")
    prefixes = sorted({k.split(".")[0] if not k.startswith("language_model.") else ".".join(k.split(".")[:2])
                       for k in keys})
    assert prefixes == ["language_model.lm_head", "language_model.model", "multi_modal_projector", "vision_model"], prefixes
    cfg_json = json.loads((mdir / "config.json").read_text())
    assert cfg_json["model_type"] == "llama4" and cfg_json["architectures"] == ["Llama4ForConditionalGeneration"]
    assert cfg_json["text_config"]["model_type"] == "llama4_text"
    assert cfg_json["vision_config"]["model_type"] == "llama4_vision_model"

    ref = base_reference_json(name, lm, ids, keys, "float32")
    ref["model_type"] = cfg.model_type
    ref["text_model_type"] = tcfg.model_type
    ref.update(fields)
    ref["loss"], ref["loss_per_sequence"] = loss, loss_seq
    ref["reference_semantics"] = (
        "TEXT-ONLY forward of Llama4ForConditionalGeneration (input_ids, no pixel_values): logits / loss / "
        "hidden_states / router_logits of the text model inside it (language_model), checked bit-identical to "
        "running model.language_model (a Llama4ForCausalLM) alone and to AutoModelForCausalLM.from_pretrained on "
        "this directory (which builds a Llama4ForCausalLM from text_config, strips 'language_model.' and ignores the "
        "vision_model / multi_modal_projector keys)")
    ref["transformers_bug_workaround"] = (
        ("transformers " + transformers.__version__ + ": Llama4ForConditionalGeneration.forward reads "
         "outputs.image_outputs from the inner MoeCausalLMOutputWithPast, which has no such field (" + try_unpatched
         + "); the references were computed with MoeCausalLMOutputWithPast.image_outputs = None set as a class "
         "attribute during the call, transformers' forward otherwise unmodified") if patched else None)
    ref["vision_config_semantics"] = (
        "vision tower not used by the references (no pixel_values); a 28x28 image -> 2x2 patches of 14 + class token; "
        "pixel_shuffle_ratio 0.5 -> 1 image token per image; checked to run with pixel_values (image_token_index "
        f"{cfg.image_token_index}); its LayerNorms (1 + 0.3 randn, bias 0.5 randn) and biases (0.5 randn) are random")
    ref["image_token_ids_in_ids"] = sorted({int(t) for t in ids.flatten().tolist()} & {
        cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index})
    ref["text_config_semantics"] = ("text_config = tiny-llama4-text's config (MoE layers 1, 3; chunked RoPE layers 0-2, "
                                    "NoPE layer 3; llama3 RoPE; see its reference.json), other weights (seed "
                                    f"{seed}) and ids")
    ref["independent_forward_max_abs_diff"] = d_ref
    ref.update(more_fields)
    masked = choose_masked(name, ref["moe_layers"], n_fixed=2)
    mt, mf = llama4_removed_reference(model, lm, ids, tensors, masked)
    ref.update(mf)
    emit(name, out, ref, tensors, ids, {"masked.safetensors": mt})


LLAMA4 = ("tiny-llama4-text", "tiny-llama4")


def gen_llama4(out: Path, name: str) -> None:
    if name == "tiny-llama4-text":
        gen_llama4_text(out, name)
    else:
        gen_llama4_mm(out, name)


# --------------------------------------------------------------------------------------------
# Qwen3-Next (qwen3_next): hybrid Gated DeltaNet (linear attention) / gated full attention, MoE + gated shared expert
# --------------------------------------------------------------------------------------------

QWEN3_NEXT_A_LOG = (-1.0, 0.5)  # A_log = -1 + 0.5 randn: A = exp(A_log) ~ 0.37 (x/ 1.6), so exp(g) keeps memory
QWEN3_NEXT_DT_BIAS_STD = 0.5  # dt_bias (1 at init) -> 0.5 randn
QWEN3_NEXT_CONV_STD = 0.5  # conv1d.weight -> 0.5 randn (0.2 would leave the SiLU after the conv near-linear)
QWEN3_NEXT_L2NORM_EPS = 1e-6  # hard-coded in transformers' l2norm (not rms_norm_eps)
QWEN3_NEXT_RELEASED_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
    "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "intermediate_size",
    "rope_parameters", "tie_word_embeddings")


def qwen3_next_config(**overrides):
    """Tiny Qwen3-Next: layers 0-2 Gated DeltaNet, layer 3 gated full attention (full_attention_interval 4), every
    layer MoE (decoder_sparse_step 1, mlp_only_layers [] as in Qwen3-Next-80B-A3B) with a sigmoid-gated shared expert."""
    from transformers import Qwen3NextConfig

    kw = dict(
        **common_kwargs(),
        num_hidden_layers=4,
        full_attention_interval=4,  # the released config.json key; transformers derives layer_types from it
        head_dim=16,  # default 256
        intermediate_size=96,  # dense MLP width: unused (every layer is MoE), as in the release
        linear_num_key_heads=2,
        linear_num_value_heads=4,  # 2 value heads per key head
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=N_EXPERTS,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        rms_norm_eps=1e-5,  # default 1e-6 (also the gated norm's eps; the l2norm eps is a fixed 1e-6)
        tie_word_embeddings=False,
        # head_dim 16 * 0.25 -> rotary dim 4 (even: rotate-half pairs (0, 2), (1, 3)); rope_theta default 1e4
        rope_parameters=dict(rope_type="default", rope_theta=1000.0, partial_rotary_factor=0.25),
    )
    kw.update(overrides)
    cfg = Qwen3NextConfig(**kw)
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"], cfg.layer_types
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25 and int(16 * 0.25) % 2 == 0
    return cfg


@torch.no_grad()
def perturb_qwen3_next(mod, g: torch.Generator) -> None:
    """Gated DeltaNet: A_log, dt_bias, conv1d.weight random; its gated norm's (plain, not zero-centred) weight
    1 + 0.3 randn."""
    name = type(mod).__name__
    if name == "Qwen3NextGatedDeltaNet":
        mu, sd = QWEN3_NEXT_A_LOG
        mod.A_log.copy_(mu + sd * torch.randn(mod.A_log.shape, generator=g))
        mod.dt_bias.copy_(QWEN3_NEXT_DT_BIAS_STD * torch.randn(mod.dt_bias.shape, generator=g))
        mod.conv1d.weight.copy_(QWEN3_NEXT_CONV_STD * torch.randn(mod.conv1d.weight.shape, generator=g))
    elif name == "Qwen3NextRMSNormGated":
        mod.weight.copy_(1.0 + NORM_STD * torch.randn(mod.weight.shape, generator=g))


def qwen3_next_dims(cfg) -> dict:
    nk, nv, dk, dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, \
        cfg.linear_value_head_dim
    R = nv // nk
    return dict(nk=nk, nv=nv, dk=dk, dv=dv, R=R, W=2 * dk + 2 * R * dv, K=cfg.linear_conv_kernel_dim,
                conv_dim=2 * nk * dk + nv * dv, nh=cfg.num_attention_heads, nkv=cfg.num_key_value_heads,
                hd=cfg.head_dim, r=int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"]))


def qwen3_next_split_index(cfg) -> dict:
    """Column indices into in_proj_qkvz / in_proj_ba outputs (= rows of their weights) for q [nk, dk], k [nk, dk],
    v [nv, dv], z [nv, dv], b [nv], a [nv]: key head g owns the contiguous block [g*W, (g+1)*W) of qkvz laid out
    [q_g (dk) | k_g (dk) | v of value heads g*R..g*R+R-1 (R*dv) | z of the same (R*dv)], and [g*2R, (g+1)*2R) of ba
    laid out [b (R) | a (R)]; value head h = g*R + j belongs to key head g = h // R."""
    d = qwen3_next_dims(cfg)
    nk, dk, dv, R, W = d["nk"], d["dk"], d["dv"], d["R"], d["W"]
    ar = torch.arange
    q = torch.stack([g * W + ar(dk) for g in range(nk)])
    k = torch.stack([g * W + dk + ar(dk) for g in range(nk)])
    v = torch.stack([g * W + 2 * dk + j * dv + ar(dv) for g in range(nk) for j in range(R)])
    z = torch.stack([g * W + 2 * dk + R * dv + j * dv + ar(dv) for g in range(nk) for j in range(R)])
    b = torch.tensor([g * 2 * R + j for g in range(nk) for j in range(R)])
    a = torch.tensor([g * 2 * R + R + j for g in range(nk) for j in range(R)])
    return dict(q=q, k=k, v=v, z=z, b=b, a=a)


@torch.no_grad()
def qwen3_next_ref_forward(sd: dict, cfg, ids: torch.Tensor, removed: dict | None = None,
                           capture: dict | None = None) -> tuple[torch.Tensor, dict]:
    """Independent re-implementation of the Qwen3NextForCausalLM forward in f32 from the ON-DISK tensors (per-expert
    keys), written from the semantics recorded in reference.json (no transformers module is called). The gated delta
    rule is the token-by-token recurrence. `removed` {layer: [experts]}: those experts deleted (softmax over the rest).
    Returns (logits, {layer: (topk idx sorted, weight)})."""
    d = qwen3_next_dims(cfg)
    nk, nv, dk, dv, R, K = d["nk"], d["nv"], d["dk"], d["dv"], d["R"], d["K"]
    nh, nkv, hd, r = d["nh"], d["nkv"], d["hd"], d["r"]
    eps = cfg.rms_norm_eps
    idx = qwen3_next_split_index(cfg)
    B, T = ids.shape
    H = cfg.hidden_size
    E = cfg.num_experts

    def rms0(x, w):  # zero-centred RMSNorm
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)

    def l2n(x):
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + QWEN3_NEXT_L2NORM_EPS)

    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, r, 2).float() / r))  # [r/2]
    ang = torch.arange(T).float()[:, None] * inv[None]
    c, s = ang.cos()[None, None], ang.sin()[None, None]  # [1, 1, T, r/2]

    def rope(x):  # [B, heads, T, hd]; rotate-half over the first r dims, pairs (j, j + r/2)
        x1, x2 = x[..., : r // 2], x[..., r // 2: r]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., r:]], -1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][ids]
    routing = {}
    for li, lt in enumerate(cfg.layer_types):
        p = f"model.layers.{li}."
        h = rms0(x, sd[p + "input_layernorm.weight"])
        if lt == "linear_attention":
            la = p + "linear_attn."
            qkvz = h @ sd[la + "in_proj_qkvz.weight"].T  # [B, T, nk*W]
            ba = h @ sd[la + "in_proj_ba.weight"].T  # [B, T, nk*2R]
            q, k, v, z = (qkvz[..., idx[n]] for n in ("q", "k", "v", "z"))  # [B, T, heads, dim]
            b, a = ba[..., idx["b"]], ba[..., idx["a"]]  # [B, T, nv]
            mixed = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], -1)  # conv channels [q | k | v]
            w = sd[la + "conv1d.weight"][:, 0, :]  # [C, K]; w[:, K-1] multiplies the current token
            conv = torch.zeros_like(mixed)
            for j in range(K):
                lag = K - 1 - j
                conv[:, lag:] += w[:, j] * mixed[:, : T - lag]
            mixed = F.silu(conv)
            q = mixed[..., : nk * dk].view(B, T, nk, dk)
            k = mixed[..., nk * dk: 2 * nk * dk].view(B, T, nk, dk)
            v = mixed[..., 2 * nk * dk:].view(B, T, nv, dv)
            kh = torch.arange(nv) // R  # value head h reads key / query head h // R
            q = l2n(q)[:, :, kh] * dk ** -0.5
            k = l2n(k)[:, :, kh]
            beta = b.sigmoid()
            gdec = -sd[la + "A_log"].exp() * F.softplus(a + sd[la + "dt_bias"])  # [B, T, nv], <= 0
            S = torch.zeros(B, nv, dk, dv)
            o = torch.zeros(B, T, nv, dv)
            for t in range(T):
                S = S * gdec[:, t].exp()[..., None, None]
                kv_mem = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
                delta = beta[:, t, :, None] * (v[:, t] - kv_mem)
                S = S + k[:, t, :, :, None] * delta[:, :, None, :]
                o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
            if capture is not None:
                capture[f"gdn_core_out.{li}"] = o.clone()
            # gated RMSNorm per value head over dv: norm, times weight (plain), times silu(z)
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * sd[la + "norm.weight"] * F.silu(z)
            mix = o.flatten(2) @ sd[la + "out_proj.weight"].T
        else:
            at = p + "self_attn."
            qg = (h @ sd[at + "q_proj.weight"].T).view(B, T, nh, 2 * hd)  # per head [q (hd) | gate (hd)]
            q, gate = qg[..., :hd], qg[..., hd:].reshape(B, T, nh * hd)
            k = (h @ sd[at + "k_proj.weight"].T).view(B, T, nkv, hd)
            v = (h @ sd[at + "v_proj.weight"].T).view(B, T, nkv, hd)
            q = rope(rms0(q, sd[at + "q_norm.weight"]).transpose(1, 2))
            k = rope(rms0(k, sd[at + "k_norm.weight"]).transpose(1, 2))
            v = v.transpose(1, 2)
            rep = nh // nkv  # query head hq uses kv head hq // rep
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = (q @ k.transpose(-1, -2)) * hd ** -0.5
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            o = (att @ v).transpose(1, 2).reshape(B, T, nh * hd) * gate.sigmoid()
            mix = o @ sd[at + "o_proj.weight"].T
        if capture is not None:
            capture[f"token_mixer_out.{li}"] = mix.clone()
        x = x + mix
        h = rms0(x, sd[p + "post_attention_layernorm.weight"]).reshape(B * T, H)
        m = p + "mlp."
        keep = [e for e in range(E) if e not in (removed or {}).get(li, [])]
        logits = h @ sd[m + "gate.weight"][keep].T
        prob = logits.softmax(-1)
        top_v, top_i = prob.topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            top_v = top_v / top_v.sum(-1, keepdim=True)
        top_e = torch.tensor(keep)[top_i]
        y = torch.zeros_like(h)
        for e in keep:
            rows, slot = (top_e == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            xe = h[rows]
            ge = xe @ sd[f"{m}experts.{e}.gate_proj.weight"].T
            ue = xe @ sd[f"{m}experts.{e}.up_proj.weight"].T
            y.index_add_(0, rows, ((F.silu(ge) * ue) @ sd[f"{m}experts.{e}.down_proj.weight"].T) * top_v[rows, slot, None])
        sh = (F.silu(h @ sd[m + "shared_expert.gate_proj.weight"].T) * (h @ sd[m + "shared_expert.up_proj.weight"].T)) \
            @ sd[m + "shared_expert.down_proj.weight"].T
        y = y + (h @ sd[m + "shared_expert_gate.weight"].T).sigmoid() * sh
        srt, order = top_e.sort(-1)
        routing[li] = (srt, top_v.gather(1, order))
        x = x + y.view(B, T, H)
    x = rms0(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T, routing


def qwen3_next_disk_sd(mdir: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(mdir / "model.safetensors")).items()}


@contextlib.contextmanager
def qwen3_next_delta_rule(model, which: str):
    """Counts the calls of the gated delta rule the GatedDeltaNet forward makes (`which` = "chunk": transformers'
    default torch_chunk_gated_delta_rule, counted; "recurrent": the module's torch_chunk_gated_delta_rule global
    replaced by torch_recurrent_gated_delta_rule for the duration)."""
    mod = sys.modules[type(model.model).__module__]
    saved = mod.torch_chunk_gated_delta_rule
    impl = saved if which == "chunk" else mod.torch_recurrent_gated_delta_rule
    calls = []

    def counted(*args, **kwargs):
        calls.append(which)
        return impl(*args, **kwargs)

    mod.torch_chunk_gated_delta_rule = counted
    try:
        yield calls
    finally:
        mod.torch_chunk_gated_delta_rule = saved


@contextlib.contextmanager
def qwen3_next_ablation(model, what: str):
    """Switch one feature off in a loaded Qwen3NextForCausalLM (restored on exit)."""
    mod = sys.modules[type(model.model).__module__]
    layers = model.model.layers
    las = [l.linear_attn for l in layers if hasattr(l, "linear_attn")]
    sas = [l.self_attn for l in layers if hasattr(l, "self_attn")]
    mlps = [l.mlp for l in layers]
    handles, restore = [], []
    if what == "shared_expert_gate_zero":  # sigmoid(0) = 0.5 for every token
        for m in mlps:
            w = m.shared_expert_gate.weight
            restore.append((w, w.detach().clone()))
            w.data.zero_()
    elif what == "shared_expert_off":
        handles = [m.shared_expert.register_forward_hook(lambda _m, _i, o: torch.zeros_like(o)) for m in mlps]
    elif what == "conv_identity":  # conv1d weight = [0, 0, 0, 1]: the current token only (SiLU still applied)
        for la in las:
            w = la.conv1d.weight
            restore.append((w, w.detach().clone()))
            w.data.zero_()
            w.data[..., -1] = 1.0
    elif what == "conv_no_silu":
        for la in las:
            la.activation = None
    elif what == "no_decay":  # A_log = -inf: g = 0, exp(g) = 1
        for la in las:
            restore.append((la.A_log, la.A_log.detach().clone()))
            la.A_log.data.fill_(float("-inf"))
    elif what == "qk_l2norm_off":
        saved_l2 = mod.l2norm
        mod.l2norm = lambda x, dim=-1, eps=1e-6: x
    elif what == "gated_norm_no_gate":  # o = norm(o) * weight, no * silu(z)
        def fwd(self, hidden_states, gate=None):
            x = hidden_states.float()
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
        for la in las:
            la.norm.forward = fwd.__get__(la.norm)
    elif what == "attn_output_gate_off":  # gate half of q_proj -> +1e4: sigmoid = 1
        def hook(m, _i, o):
            o = o.clone()
            hd = m.out_features // (2 * model.config.num_attention_heads)
            o.view(*o.shape[:-1], -1, 2 * hd)[..., hd:] = 1e4
            return o
        handles = [a.q_proj.register_forward_hook(hook) for a in sas]
    elif what == "rmsnorm_weight_not_plus_one":  # the misreading y = norm(x) * weight (every zero-centred norm)
        cls = mod.Qwen3NextRMSNorm
        saved_fwd = cls.forward
        cls.forward = lambda self, x: (self._norm(x.float()) * self.weight.float()).type_as(x)
    elif what == "rope_off":
        rot = model.model.rotary_emb
        restore.append((rot.inv_freq, rot.inv_freq.clone()))
        rot.inv_freq.zero_()
    else:
        raise ValueError(what)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for t, v in restore:
            t.data.copy_(v)
        if what == "conv_no_silu":
            for la in las:
                la.activation = model.config.hidden_act
        elif what == "qk_l2norm_off":
            mod.l2norm = saved_l2
        elif what == "gated_norm_no_gate":
            for la in las:
                del la.norm.forward
        elif what == "rmsnorm_weight_not_plus_one":
            mod.Qwen3NextRMSNorm.forward = saved_fwd


QWEN3_NEXT_ABLATIONS = ("shared_expert_gate_zero", "shared_expert_off", "conv_identity", "conv_no_silu", "no_decay",
                        "qk_l2norm_off", "gated_norm_no_gate", "attn_output_gate_off", "rmsnorm_weight_not_plus_one",
                        "rope_off")


@torch.no_grad()
def check_qwen3_next(model, ids) -> dict:
    """Layer types, RoPE form, cache on/off, the on-disk layout and split order, an independent forward from the disk
    tensors, the shared-expert gate range, and the loss with each feature switched off."""
    from transformers import Qwen3NextConfig

    cfg = model.config
    mod = sys.modules[type(model.model).__module__]
    mdir = Path(model.name_or_path)
    dims = qwen3_next_dims(cfg)
    T = ids.shape[1]
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    for i, l in enumerate(model.model.layers):
        assert hasattr(l, "linear_attn") == (cfg.layer_types[i] == "linear_attention")
        assert hasattr(l, "self_attn") == (cfg.layer_types[i] == "full_attention")
    # layer_types from the released key (config.json of Qwen3-Next-80B-A3B has full_attention_interval, no layer_types)
    cj = json.loads((mdir / "config.json").read_text())
    cj_released = {k: v for k, v in cj.items() if k != "layer_types"}
    cj_released["full_attention_interval"] = 4
    assert Qwen3NextConfig(**{k: v for k, v in cj_released.items()
                              if k not in ("architectures", "model_type", "transformers_version", "dtype")}
                           ).layer_types == cfg.layer_types
    # on-disk layout: per-expert keys, GatedDeltaNet / gated attention shapes
    keys = disk_tensors(mdir)
    H, E, I, Is = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    for i, lt in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        want = {p + "mlp.gate.weight": [E, H], p + "mlp.shared_expert_gate.weight": [1, H],
                p + "mlp.shared_expert.gate_proj.weight": [Is, H], p + "mlp.shared_expert.up_proj.weight": [Is, H],
                p + "mlp.shared_expert.down_proj.weight": [H, Is], p + "input_layernorm.weight": [H],
                p + "post_attention_layernorm.weight": [H]}
        for e in range(E):
            want.update({f"{p}mlp.experts.{e}.gate_proj.weight": [I, H], f"{p}mlp.experts.{e}.up_proj.weight": [I, H],
                         f"{p}mlp.experts.{e}.down_proj.weight": [H, I]})
        if lt == "linear_attention":
            la = p + "linear_attn."
            want.update({la + "in_proj_qkvz.weight": [dims["nk"] * dims["W"], H],
                         la + "in_proj_ba.weight": [2 * dims["nv"], H],
                         la + "conv1d.weight": [dims["conv_dim"], 1, dims["K"]], la + "A_log": [dims["nv"]],
                         la + "dt_bias": [dims["nv"]], la + "norm.weight": [dims["dv"]],
                         la + "out_proj.weight": [H, dims["nv"] * dims["dv"]]})
        else:
            at = p + "self_attn."
            want.update({at + "q_proj.weight": [2 * dims["nh"] * dims["hd"], H],
                         at + "k_proj.weight": [dims["nkv"] * dims["hd"], H],
                         at + "v_proj.weight": [dims["nkv"] * dims["hd"], H],
                         at + "o_proj.weight": [H, dims["nh"] * dims["hd"]],
                         at + "q_norm.weight": [dims["hd"]], at + "k_norm.weight": [dims["hd"]]})
        have = {k for k in keys if k.startswith(p)}
        assert have == set(want), sorted(have ^ set(want))
        for n, shape in want.items():
            assert keys[n][:2] == (shape, "F32"), (n, keys[n], shape)
    assert not any("conv1d.bias" in k or "gate_up_proj" in k for k in keys)
    # the split: transformers' fix_query_key_value_ordering vs the index formula
    la0 = model.model.layers[0].linear_attn
    g = torch.Generator().manual_seed(0)
    xq = torch.randn(1, 2, dims["nk"] * dims["W"], generator=g)
    xb = torch.randn(1, 2, 2 * dims["nv"], generator=g)
    got = la0.fix_query_key_value_ordering(xq, xb)
    idx = qwen3_next_split_index(cfg)
    for n, t in zip(("q", "k", "v", "z"), got[:4]):
        assert torch.equal(t, xq[..., idx[n]]), n
    for n, t in zip(("b", "a"), got[4:]):
        assert torch.equal(t, xb[..., idx[n]]), n
    # RoPE: rotate-half on the first r dims, rest passed through
    rot = model.model.rotary_emb
    r = 2 * rot.inv_freq.numel()
    assert r == dims["r"] == 4, (r, dims["r"])
    qh = torch.randn(1, 1, T, dims["hd"], generator=g)
    pos = torch.arange(T)[None]
    cos, sin = rot(qh, pos)
    q_emb, _ = mod.apply_rotary_pos_emb(qh, qh, cos, sin)
    ang = pos[0, :, None].float() * rot.inv_freq[None].float()
    x1, x2 = qh[..., : r // 2], qh[..., r // 2: r]
    want_q = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin(), qh[..., r:]], -1)
    d_rope = float((q_emb - want_q).abs().max())
    assert d_rope < 1e-5 and torch.equal(q_emb[..., r:], qh[..., r:]), d_rope
    # cache on (the default: DynamicCache, prefill) vs off: same logits; the chunked rule runs once per linear layer
    with qwen3_next_delta_rule(model, "chunk") as calls:
        base = model(ids, use_cache=False).logits
    assert calls == ["chunk"] * 3, calls
    with_cache = model(ids, use_cache=True).logits
    assert torch.equal(base, with_cache), "use_cache changes the prefill logits"
    base_loss = float(model(ids, labels=ids).loss)
    # independent forward from the on-disk tensors
    sd = qwen3_next_disk_sd(mdir)
    ref_logits, _ = qwen3_next_ref_forward(sd, cfg, ids)
    d_ref = float((ref_logits - base).abs().max())
    log(f"    independent Qwen3-Next forward (recurrent rule, disk tensors) vs transformers: max |dlogit| = {d_ref:.3g}")
    assert d_ref < 1e-4, d_ref
    shared = check_shared_gate(model, ids)
    # decay / beta statistics (how much the recurrence matters)
    cap = {}
    hs = [l.linear_attn.in_proj_ba.register_forward_hook(lambda _m, _i, o, i=i: cap.__setitem__(i, o.clone()))
          for i, l in enumerate(model.model.layers) if hasattr(l, "linear_attn")]
    model(ids)
    for hk in hs:
        hk.remove()
    decays, betas = [], []
    for i, ba in cap.items():
        la = model.model.layers[i].linear_attn
        _, _, _, _, b, a = la.fix_query_key_value_ordering(torch.zeros(*ba.shape[:-1], dims["nk"] * dims["W"]), ba)
        decays.append((-la.A_log.exp() * F.softplus(a + la.dt_bias)).exp().flatten())
        betas.append(b.sigmoid().flatten())
    decays, betas = torch.cat(decays), torch.cat(betas)
    # feature ablations
    ablations = {}
    for what in QWEN3_NEXT_ABLATIONS:
        with qwen3_next_ablation(model, what):
            lo = model(ids).logits
            loss = float(model(ids, labels=ids).loss)
        assert torch.isfinite(lo).all(), what
        dl = float((lo - base).abs().max())
        ablations[what] = {"loss": loss, "loss_delta": loss - base_loss, "max_abs_dlogit": dl}
        log(f"    {what}: loss {loss:.6f} (delta {loss - base_loss:+.4g}), max |dlogit| {dl:.3g}")
        assert dl > 1e-2 and abs(loss - base_loss) > 1e-4, (what, ablations[what])
    assert torch.equal(model(ids).logits, base), "ablation not restored"
    defaults = Qwen3NextConfig()
    return {
        "layer_types": list(cfg.layer_types),
        "layer_types_semantics": (
            "layer i is full_attention iff (i + 1) % full_attention_interval == 0, else linear_attention (Gated "
            "DeltaNet); transformers writes the derived layer_types list into config.json, the released "
            "Qwen3-Next-80B-A3B config.json has full_attention_interval: 4 and no layer_types (checked: this "
            "config.json with layer_types replaced by full_attention_interval 4 gives the same layer_types)"),
        "config_class_defaults": {k: getattr(defaults, k) for k in QWEN3_NEXT_RELEASED_KEYS} | {
            "layer_types_first_8": defaults.layer_types[:8], "full_attention_interval": 4},
        "config_class_defaults_semantics": (
            "Qwen3NextConfig() defaults in transformers " + transformers.__version__ + " (its docstring names "
            "Qwen/Qwen3-Next-80B-A3B-Instruct): 48 layers, every 4th full attention, every layer MoE "
            "(decoder_sparse_step 1, mlp_only_layers []), 512 experts top-10 + 1 gated shared expert; the published "
            "config.json differs from the class defaults at least in intermediate_size (5120) and "
            "max_position_embeddings (262144), and has full_attention_interval: 4 instead of layer_types"),
        "expert_count_key": "num_experts (config.json); top-k key num_experts_per_tok",
        "moe_layers_semantics": (
            "MoE iff i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0: every layer "
            "here and in the release (decoder_sparse_step 1, mlp_only_layers []); intermediate_size (dense MLP) unused"),
        "experts_on_disk": (
            "per expert: mlp.experts.{e}.gate_proj / up_proj [moe_intermediate_size, hidden], down_proj [hidden, "
            "moe_intermediate_size] (transformers 5.x fuses them in memory into experts.gate_up_proj [E, 2I, H] "
            "(gate = rows 0..I-1, up = rows I..2I-1) and experts.down_proj [E, H, I], and splits them again on save)"),
        "rms_norm_semantics": (
            "Qwen3NextRMSNorm (input_layernorm, post_attention_layernorm, model.norm, self_attn.q_norm / k_norm): "
            f"ZERO-CENTRED, y = (x * rsqrt(mean(x^2) + rms_norm_eps)) * (1 + weight), computed in f32 and cast back "
            f"(weight 0 at init; here 0.3 randn); eps {cfg.rms_norm_eps}"),
        "gated_norm_semantics": (
            "linear_attn.norm (Qwen3NextRMSNormGated, weight [linear_value_head_dim], NOT zero-centred, 1 at init; "
            "here 1 + 0.3 randn): per token and value head over the dv dims of the delta-rule output o: "
            "y = weight * (o * rsqrt(mean(o^2) + rms_norm_eps)) * silu(z), the normalisation in f32 (cast back to the "
            "input dtype before * weight), silu(z) in f32, result cast to the input dtype; z = the value head's z slice "
            "of in_proj_qkvz (not convolved)"),
        "qkvz_ba_split": (
            "R = linear_num_value_heads / linear_num_key_heads; W = 2*dk + 2*R*dv. in_proj_qkvz output column "
            "(= weight row) c: key head g = c // W owns [g*W, (g+1)*W) = [q_g | k_g | v of value heads g*R..g*R+R-1 "
            "| z of the same]: q[g, d] = g*W + d, k[g, d] = g*W + dk + d, v[g*R + j, d] = g*W + 2*dk + j*dv + d, "
            "z[g*R + j, d] = g*W + 2*dk + R*dv + j*dv + d (d < dk resp. dv, j < R). in_proj_ba output column: "
            "b[g*R + j] = g*2R + j, a[g*R + j] = g*2R + R + j"),
        "qkvz_ba_index": {n: t.tolist() for n, t in idx.items()},
        "conv_semantics": (
            "the channels cat([q (nk*dk, head-major), k (nk*dk), v (nv*dv)]) (conv_dim = 2*nk*dk + nv*dv), each "
            "convolved on its own (depthwise, no bias) causally over time with kernel K = linear_conv_kernel_dim: "
            "out[c, t] = sum_{j=0}^{K-1} w[c, 0, j] * x[c, t - (K-1) + j] (x = 0 before position 0; w[c, 0, K-1] "
            "multiplies the current token), then silu; then split back into q, k, v"),
        "delta_rule_semantics": (
            "per value head h (key/query head h // R: consecutive value heads share a key head, "
            "repeat_interleave): q, k <- l2norm(q), l2norm(k) with l2norm(x) = x * rsqrt(sum(x^2) + 1e-6) over dk "
            f"(eps fixed {QWEN3_NEXT_L2NORM_EPS}, not rms_norm_eps) after the conv, in f32; q <- q / sqrt(dk); "
            "beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias) (f32); state S [dk, dv] = 0 at t = 0; per "
            "token: S <- S * exp(g_t); kv = S^T k_t; S <- S + k_t (beta_t (v_t - kv))^T; o_t = S^T q_t"),
        "delta_rule_stats": {"exp_g_min": float(decays.min()), "exp_g_median": float(decays.median()),
                             "exp_g_max": float(decays.max()), "beta_min": float(betas.min()),
                             "beta_max": float(betas.max())},
        "gated_attention_semantics": (
            "self_attn.q_proj out = num_attention_heads * head_dim * 2, laid out per head [q_h (head_dim) | gate_h "
            "(head_dim)]: q[h, d] = row h*2*hd + d, gate[h, d] = row h*2*hd + hd + d; q_norm / k_norm (zero-centred, "
            "over head_dim) per head before RoPE; softmax scale head_dim^-0.5; GQA (query head h uses kv head "
            "h // (heads / kv_heads)); attention output [heads*hd] (head-major) * sigmoid(gate) before o_proj"),
        "rotary_dim_effective": r,
        "rope_style": "rotate_half",
        "rope_semantics": (
            f"rotary on the first {r} of {dims['hd']} dims of each q/k head (int(head_dim * partial_rotary_factor)), "
            f"the rest passed through; rotate-half pairs (j, j + {r // 2}); inv_freq = theta^(-2j/{r}), "
            "positions 0..T-1; full-attention layers only"),
        "inv_freq": rot.inv_freq.tolist(),
        "rope_vs_hand_rotation_max_abs_diff": d_rope,
        "routing_semantics": QWEN3_NEXT_ROUTING_SEMANTICS,
        "use_cache_semantics": (
            "references with the default use_cache (a DynamicCache filled during the forward); use_cache=False gives "
            "bit-identical logits; both call torch_chunk_gated_delta_rule (chunk_size 64: one zero-padded chunk) once "
            "per linear-attention layer"),
        "fla_installed": importlib.util.find_spec("fla") is not None,
        "independent_forward_max_abs_diff": d_ref,
        **shared,
        "feature_ablations": ablations,
        "feature_ablations_semantics": (
            "loss / max |dlogit| of the same checkpoint and ids with one feature changed: shared_expert_gate_zero "
            "(gate weight 0: sigmoid = 0.5), shared_expert_off, conv_identity (conv weight [0, 0, 0, 1], silu kept), "
            "conv_no_silu, no_decay (A_log = -inf: exp(g) = 1), qk_l2norm_off, gated_norm_no_gate (no * silu(z)), "
            "attn_output_gate_off (sigmoid(gate) = 1), rmsnorm_weight_not_plus_one (the misreading norm(x) * weight "
            "in every zero-centred norm), rope_off (inv_freq 0)"),
    }


QWEN3_NEXT_ROUTING_SEMANTICS = (
    "p = softmax(router_logits) in f32 over all experts; top-k (num_experts_per_tok) of p; norm_topk_prob: "
    "w = p[idx] / sum(p[idx]) (no epsilon, no scaling factor), cast to the logits dtype; y = sum_k w_k * "
    "down_e(silu(gate_e(x)) * up_e(x)) + sigmoid(x @ shared_expert_gate.weight^T) * shared_expert(x), shared_expert "
    "= down(silu(gate(x)) * up(x)) of width shared_expert_intermediate_size, x = post_attention_layernorm output")


@torch.no_grad()
def qwen3_next_extra_tensors(model, ids, tensors) -> tuple[dict, dict]:
    """logits_recurrent (the recurrent delta rule substituted), topk_idx / topk_weight (hook on the router output),
    token_mixer_out.{layer} / gdn_core_out.{layer} (independent forward), checked against each other."""
    cfg = model.config
    moe_layers = moe_layers_of(model)
    with qwen3_next_delta_rule(model, "recurrent") as calls:
        out_rec = model(ids, output_hidden_states=True)
        loss_rec = float(model(ids, labels=ids).loss)
    assert calls == ["recurrent"] * 6, calls
    logits_rec = out_rec.logits.float()
    d_rec = float((logits_rec - tensors["logits"]).abs().max())
    d_rec_hidden = max(float((h.float() - tensors[f"hidden_states.{k}"]).abs().max())
                       for k, h in enumerate(out_rec.hidden_states))
    log(f"    chunked vs recurrent gated delta rule: max |dlogit| = {d_rec:.3g}, max |dhidden| = {d_rec_hidden:.3g}")
    assert 0 < d_rec < 1e-4, d_rec
    cap: dict = {}
    handles = [router_of(moe_block(model.model.layers[i])).register_forward_hook(
        lambda _m, _i, o, i=i: cap.__setitem__(i, tuple(t.clone() for t in o))) for i in moe_layers]
    mix_cap: dict = {}
    for i, l in enumerate(model.model.layers):
        mixer = l.linear_attn if hasattr(l, "linear_attn") else l.self_attn
        handles.append(mixer.register_forward_hook(
            lambda _m, _i, o, i=i: mix_cap.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone())))
    try:
        logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits.float(), tensors["logits"])
    ref_cap: dict = {}
    ref_logits, ref_routing = qwen3_next_ref_forward(qwen3_next_disk_sd(Path(model.name_or_path)), cfg, ids,
                                                    capture=ref_cap)
    d_ref_rec = float((ref_logits - logits_rec).abs().max())
    more, wdiff = {"logits_recurrent": logits_rec.contiguous()}, 0.0
    for i in moe_layers:
        r, w, idx = cap[i]  # (router_logits, routing weights [N, k], selected experts [N, k])
        assert torch.equal(r.float(), tensors[f"router_logits.{i}"]), i
        idx_s, order = idx.sort(-1)
        w_s = w.float().gather(1, order)
        more[f"topk_idx.{i}"] = idx_s.to(torch.int64).contiguous()
        more[f"topk_weight.{i}"] = w_s.contiguous()
        ref_idx, ref_w = ref_routing[i]
        assert torch.equal(ref_idx, idx_s), f"layer {i}: reference routing disagrees"
        wdiff = max(wdiff, float((ref_w - w_s).abs().max()))
    d_mix = 0.0
    for i in range(cfg.num_hidden_layers):
        more[f"token_mixer_out.{i}"] = mix_cap[i].float().contiguous()
        d_mix = max(d_mix, float((ref_cap[f"token_mixer_out.{i}"] - mix_cap[i]).abs().max()))
        if f"gdn_core_out.{i}" in ref_cap:
            more[f"gdn_core_out.{i}"] = ref_cap[f"gdn_core_out.{i}"].contiguous()
    log(f"    routing vs reference: same top-k, max |dweight| = {wdiff:.3g}; token mixer outputs max |d| = {d_mix:.3g}; "
        f"independent forward vs recurrent logits {d_ref_rec:.3g}")
    assert wdiff < 1e-5 and d_mix < 1e-4 and d_ref_rec < 1e-4, (wdiff, d_mix, d_ref_rec)
    return more, {
        "delta_rule_reference": (
            "logits (and hidden_states, router_logits, loss) come from transformers' default path: "
            "torch_chunk_gated_delta_rule (the torch fallback, fla not installed, chunk_size 64); logits_recurrent "
            "from the same model with the modeling module's torch_chunk_gated_delta_rule replaced by "
            "torch_recurrent_gated_delta_rule (the token-by-token recurrence)"),
        "logits_chunked_vs_recurrent_max_abs_diff": d_rec,
        "hidden_states_chunked_vs_recurrent_max_abs_diff": d_rec_hidden,
        "loss_recurrent": loss_rec,
        "independent_forward_vs_recurrent_max_abs_diff": d_ref_rec,
        "topk_semantics": (
            "topk_idx.{layer}: int64 [batch*seq, 2], the expert ids transformers' router selected (row = b*seq + t), "
            "each row sorted ascending; topk_weight.{layer}: f32 [batch*seq, 2], the weight each selected expert's "
            "output is multiplied by, in the same order (hook on the router's output)"),
        "route_ref_max_abs_weight_diff": wdiff,
        "token_mixer_out_semantics": (
            "token_mixer_out.{layer} [3, 16, 64]: output of linear_attn (after out_proj) or self_attn (after o_proj) "
            "of that layer, before the residual add (transformers, chunked rule); gdn_core_out.{layer} [3, 16, "
            "linear_num_value_heads, linear_value_head_dim] (linear-attention layers): the gated delta rule output "
            "before the gated norm, from the independent forward (recurrence); token_mixer_out of transformers vs "
            f"the independent forward max |d| {d_mix:.3g}"),
    }


@torch.no_grad()
def qwen3_next_removed_reference(model, ids, ref_tensors, masked: dict[int, list[int]]) -> tuple[dict, dict]:
    for i, drop in masked.items():
        sel = ref_tensors[f"topk_idx.{i}"].unique().tolist()
        assert set(drop) & set(sel), f"layer {i}: removed experts {drop} never selected"
    pruned = physically_remove_experts(model, masked)
    for i, drop in masked.items():
        blk = moe_block(pruned.model.layers[i])
        n = N_EXPERTS - len(drop)
        assert router_of(blk).weight.shape[0] == blk.experts.gate_up_proj.shape[0] == blk.experts.down_proj.shape[0] == n
    logits = pruned(ids).logits.float()
    loss = float(pruned(ids, labels=ids).loss)
    with masked_router(model, masked) as hits:
        logits_masked = model(ids).logits.float()
    assert sorted(hits) == sorted(masked), hits
    d_mask = float((logits_masked - logits).abs().max())
    ref_logits, _ = qwen3_next_ref_forward(qwen3_next_disk_sd(Path(model.name_or_path)), model.config, ids,
                                           removed=masked)
    d_ref = float((ref_logits - logits).abs().max())
    d = float((logits - ref_tensors["logits"]).abs().max())
    log(f"    removed {masked}: max |dlogit| vs full = {d:.3g}; vs -inf router mask {d_mask:.3g}; vs independent "
        f"forward {d_ref:.3g}")
    assert d > 1e-2 and d_mask < 1e-5 and d_ref < 1e-4, (d, d_mask, d_ref)
    return {"logits": logits.contiguous()}, {
        "masked_experts": {str(i): v for i, v in masked.items()},
        "masked_loss": loss,
        "masked_semantics": (
            "masked.safetensors logits: the listed experts physically deleted (mlp.gate.weight rows, expert weights; "
            "two experts per MoE layer) and the model run by transformers (softmax over the 6 kept logits); equal to "
            "setting the removed experts' router logits to -inf (masked_vs_router_mask_max_abs_diff)"),
        "masked_vs_unmasked_max_abs_diff": d,
        "masked_vs_router_mask_max_abs_diff": d_mask,
        "masked_independent_forward_max_abs_diff": d_ref,
    }


def gen_qwen3_next(out: Path, name: str = "tiny-qwen3-next") -> None:
    log(name)
    m = build_model(name, SEEDS[name])
    ref, tensors = generate_f32(name, out, m, extra_check=check_qwen3_next, extra_tensors=qwen3_next_extra_tensors)
    mdir = out / "models" / name
    cfg_json = json.loads((mdir / "config.json").read_text())
    assert cfg_json["num_experts"] == N_EXPERTS and "num_local_experts" not in cfg_json
    assert cfg_json["rope_parameters"]["partial_rotary_factor"] == 0.25
    model = load(mdir)
    ids = make_ids(name)
    masked = choose_masked(name, ref["moe_layers"], n_fixed=2)
    mt, mf = qwen3_next_removed_reference(model, ids, tensors, masked)
    pdir = out / "parity" / name
    save_file(mt, str(pdir / "masked.safetensors"), metadata={"format": "pt"})
    ref.update(mf)
    write_json(pdir / "reference.json", ref)


QWEN3_NEXT = ("tiny-qwen3-next",)


# --------------------------------------------------------------------------------------------
# DeepSeek-V3 in the FP8 block-quantised release format, with one MTP layer
# --------------------------------------------------------------------------------------------

FP8_BLOCK = 16
FP8_E4M3_MAX = 448.0
# the nn.Linear weights the DeepSeek-V3 release stores as F8_E4M3 + `<name>_scale_inv` (MTP eh_proj included)
FP8_QUANTIZED_RE = re.compile(
    r"^model\.layers\.\d+\.(?:self_attn\.(?:q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(?:gate|up|down)_proj|mlp\.experts\.\d+\.(?:gate|up|down)_proj"
    r"|mlp\.shared_experts\.(?:gate|up|down)_proj|eh_proj)\.weight$"
)
# MTP-only tensors (besides the decoder layer) under model.layers.{num_hidden_layers}.
MTP_EXTRA_KEYS = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                  "shared_head.head.weight")


def fp8_scale_grid(scale: torch.Tensor, shape, block: int = FP8_BLOCK) -> torch.Tensor:
    """[ceil(out/b), ceil(in/b)] block scales -> [out, in]; a partial edge block uses its block's scale."""
    rows, cols = shape
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]


def fp8_block_quantize(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's blockwise weight quantisation: per block x block tile s = amax(|w|) / 448,
    q = (w / s).to(float8_e4m3fn). Returns (q, s) with s float32 [ceil(out/b), ceil(in/b)] (= weight_scale_inv)."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    padded = F.pad(w.abs(), (0, nc * block - cols, 0, nr * block - rows))  # zero padding: amax unchanged
    amax = padded.reshape(nr, block, nc, block).amax(dim=(1, 3))
    assert (amax > 0).all()
    s = (amax / FP8_E4M3_MAX).float().contiguous()
    q = (w.float() / fp8_scale_grid(s, w.shape, block)).to(torch.float8_e4m3fn).contiguous()
    assert not torch.isnan(q.float()).any()
    return q, s


def fp8_block_dequantize(q: torch.Tensor, s: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """q.float() * s, blockwise, in float32 (one f32 multiply per element)."""
    return (q.float() * fp8_scale_grid(s, q.shape, block)).contiguous()


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def fp8_table(dtype) -> list:
    """The 256 values of an 8-bit float format as torch decodes them (NaN / +-inf as strings)."""
    out = []
    for v in torch.arange(256, dtype=torch.uint8).view(dtype).float().tolist():
        out.append("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else v)
    return out


def loading_info_of(mdir: Path, **config_overrides):
    from transformers import AutoModelForCausalLM

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report lists the (expected) unused MTP keys
    try:
        m, info = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, output_loading_info=True,
                                                       **impl_kwargs(), **config_overrides)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return m.eval(), info


@torch.no_grad()
def run_mtp(trunk, mtp_layer, w: dict, ids: torch.Tensor, last_hidden: torch.Tensor, zero_pos0: bool = False):
    """The MTP module on the trunk's final (post-norm) hidden states, vLLM DeepSeekMTP-style, on positions
    i = 0..T-2: x = eh_proj([enorm(embed(ids[:, i+1])), hnorm(last_hidden[:, i])]), then the MTP decoder layer
    (transformers' DeepseekV3DecoderLayer, causal mask over the T-1 positions, position ids 0..T-2, the trunk's
    rotary embedding), then shared_head (norm, head). zero_pos0: vLLM also zeroes the embedding at position 0."""
    from transformers.masking_utils import create_causal_mask
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    cfg = trunk.config
    p = f"model.layers.{cfg.num_hidden_layers}."

    def norm(key):
        n = DeepseekV3RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        n.weight.copy_(w[p + key])
        return n

    e = F.embedding(ids[:, 1:], w[p + "embed_tokens.weight"])
    if zero_pos0:
        e[:, 0] = 0.0
    x = F.linear(torch.cat([norm("enorm.weight")(e), norm("hnorm.weight")(last_hidden[:, :-1])], dim=-1),
                 w[p + "eh_proj.weight"])
    pos = torch.arange(x.shape[1])[None]
    mask = create_causal_mask(config=cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
    cap = {}
    h = mtp_layer.mlp.gate.register_forward_hook(lambda _m, _i, o: cap.update(logits=o[0].clone(), idx=o[2].clone()))
    try:
        y = mtp_layer(x, attention_mask=mask, position_ids=pos, position_embeddings=trunk.model.rotary_emb(x, pos))
    finally:
        h.remove()
    logits = F.linear(norm("shared_head.norm.weight")(y), w[p + "shared_head.head.weight"])
    return x, cap["logits"], cap["idx"].sort(dim=-1).values, logits


@torch.no_grad()
def check_trunk_layers_standalone(model, ids, final_prenorm) -> None:
    """The decoder layers called one by one the way run_mtp calls the MTP layer reproduce the trunk."""
    from transformers.masking_utils import create_causal_mask

    x = model.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
    pe = model.model.rotary_emb(x, pos)
    for layer in model.model.layers:
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
    assert torch.equal(x, final_prenorm), "standalone decoder-layer calls differ from the model forward"


@torch.no_grad()
def gen_deepseek_v3_fp8(out: Path, name: str = "tiny-deepseek-v3-fp8") -> None:
    """DeepSeek-V3 as released (FP8 e4m3 weights with 16x16-block f32 weight_scale_inv, bf16 elsewhere, one MTP
    layer at index num_hidden_layers), written here (transformers' FP8 quantiser needs a GPU). References come
    from transformers' DeepseekV3ForCausalLM loading the dequantised weights in f32."""
    import tempfile

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    log(name)
    seed = SEEDS[name]
    cfg3 = make_config(name)
    L = cfg3.num_hidden_layers
    p_mtp = f"model.layers.{L}."
    # one (L+1)-layer model, usual seed scheme: layers 0..L-1 are the trunk, layer L the MTP decoder layer
    torch.manual_seed(seed)
    m4 = AutoModelForCausalLM.from_config(deepseek_config("v3", moe_intermediate_size=24, num_hidden_layers=L + 1),
                                          **impl_kwargs()).float().eval()
    perturb(m4, seed)
    check_params_nontrivial(m4)
    src = AutoModelForCausalLM.from_config(cfg3, **impl_kwargs()).float().eval()  # un-quantised f32 trunk
    src.load_state_dict({k: v for k, v in m4.state_dict().items() if not k.startswith(p_mtp)}, strict=True)
    assert src.model.layers[1].mlp.experts.down_proj.shape[-1] == 24

    mdir = fresh_dir(out / "models" / name)
    ids = make_ids(name)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        src.save_pretrained(tmp / "f32")
        m4.save_pretrained(tmp / "f32-mtp")
        orig = load_file(str(tmp / "f32" / "model.safetensors"))  # on-disk (per-expert) key names
        orig_mtp = load_file(str(tmp / "f32-mtp" / "model.safetensors"))
        for k, v in orig_mtp.items():
            if k.startswith(p_mtp):
                orig[k] = v
            else:
                assert torch.equal(orig[k], v), k
        g = torch.Generator().manual_seed(seed + 13)
        H = cfg3.hidden_size
        orig[p_mtp + "embed_tokens.weight"] = orig["model.embed_tokens.weight"].clone()  # a copy, as in DeepSeek-V3
        orig[p_mtp + "enorm.weight"] = 1.0 + NORM_STD * torch.randn(H, generator=g)
        orig[p_mtp + "hnorm.weight"] = 1.0 + NORM_STD * torch.randn(H, generator=g)
        orig[p_mtp + "eh_proj.weight"] = cfg3.initializer_range * torch.randn(H, 2 * H, generator=g)
        orig[p_mtp + "shared_head.norm.weight"] = 1.0 + NORM_STD * torch.randn(H, generator=g)
        orig[p_mtp + "shared_head.head.weight"] = orig["lm_head.weight"].clone()  # a copy, as in DeepSeek-V3

        # ---- model.safetensors in the release layout
        disk, deq_mem = {}, {}
        for k in sorted(orig):
            v = orig[k]
            assert v.dtype == torch.float32, k
            if FP8_QUANTIZED_RE.match(k):
                q, s = fp8_block_quantize(v)
                disk[k], disk[k + "_scale_inv"] = q, s
                deq_mem[k] = fp8_block_dequantize(q, s)
            elif k.endswith(".e_score_correction_bias"):
                disk[k] = deq_mem[k] = v.contiguous()
            else:
                assert v.dim() == 1 or k.endswith(("embed_tokens.weight", "mlp.gate.weight", "lm_head.weight",
                                                   "shared_head.head.weight")), f"unclassified matrix {k}"
                disk[k] = v.to(torch.bfloat16).contiguous()
                deq_mem[k] = disk[k].float()
        save_file(disk, str(mdir / "model.safetensors"), metadata={"format": "pt"})
        cfg_json = json.loads((tmp / "f32" / "config.json").read_text())
        assert cfg_json.get("num_nextn_predict_layers") == 1, cfg_json.get("num_nextn_predict_layers")
        cfg_json.update({
            "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]},
            "num_nextn_predict_layers": 1,
            "dtype": "bfloat16",
            "torch_dtype": "bfloat16",
        })
        (mdir / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
        shutil.copy(tmp / "f32" / "generation_config.json", mdir / "generation_config.json")

        # ---- on-disk dtypes and shapes, from the raw header
        hdr = safetensors_header(mdir / "model.safetensors")
        assert hdr.pop("__metadata__") == {"format": "pt"}
        n_by_dtype: dict[str, int] = {}
        for k, ent in hdr.items():
            n_by_dtype[ent["dtype"]] = n_by_dtype.get(ent["dtype"], 0) + 1
            if k.endswith("_scale_inv"):
                o, i = hdr[k[: -len("_scale_inv")]]["shape"]
                assert ent["dtype"] == "F32" and ent["shape"] == [-(-o // FP8_BLOCK), -(-i // FP8_BLOCK)], (k, ent)
            elif FP8_QUANTIZED_RE.match(k):
                assert ent["dtype"] == "F8_E4M3" and k + "_scale_inv" in hdr, (k, ent)
            elif k.endswith(".e_score_correction_bias"):
                assert ent["dtype"] == "F32", (k, ent)
            else:
                assert ent["dtype"] == "BF16", (k, ent)
        for k in MTP_EXTRA_KEYS:
            assert p_mtp + k in hdr, k
        partial = sorted({k for k in hdr if FP8_QUANTIZED_RE.match(k)
                          and any(d % FP8_BLOCK for d in hdr[k]["shape"])})
        assert any(".experts." in k for k in partial) and any("kv_a_proj_with_mqa" in k for k in partial)
        log(f"    on disk: {dict(sorted(n_by_dtype.items()))}; {len(partial)} FP8 tensors with partial blocks")

        # ---- dequantised copy, from the file
        deq = {}
        with safe_open(str(mdir / "model.safetensors"), "pt") as f:
            for k in f.keys():
                if k.endswith("_scale_inv"):
                    continue
                t = f.get_tensor(k)
                if t.dtype == torch.float8_e4m3fn:
                    t = fp8_block_dequantize(t, f.get_tensor(k + "_scale_inv"))
                deq[k] = t.float().contiguous()
        assert deq.keys() == deq_mem.keys() == orig.keys()
        assert all(torch.equal(deq[k], deq_mem[k]) for k in deq)
        err: dict[str, float] = {}
        err_dtype: dict[str, float] = {}
        for k in sorted(deq):
            pat = re.sub(r"\.experts\.\d+\.", ".experts.{e}.", re.sub(r"\.layers\.\d+\.", ".layers.{i}.", k))
            d = float((deq[k] - orig[k]).abs().max())
            err[pat] = max(err.get(pat, 0.0), d)
            err_dtype[hdr[k]["dtype"]] = max(err_dtype.get(hdr[k]["dtype"], 0.0), d)
        log(f"    max |dequantized - original f32| by dtype: {err_dtype}")
        assert 0 < err_dtype["F8_E4M3"] < 0.1 and 0 < err_dtype["BF16"] < err_dtype["F8_E4M3"]
        assert err_dtype["F32"] == 0.0

        # ---- references: transformers on the dequantised weights (config without quantization_config)
        ddir = tmp / "dequantized"
        ddir.mkdir()
        shutil.copy(tmp / "f32" / "config.json", ddir / "config.json")
        save_file(deq, str(ddir / "model.safetensors"), metadata={"format": "pt"})
        model, info = loading_info_of(ddir)
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        unexpected = set(info["unexpected_keys"])
        assert unexpected and all(k.startswith(p_mtp) for k in unexpected), unexpected  # only the MTP layer
        model.save_pretrained(tmp / "resaved")  # the loaded trunk is exactly the dequantised trunk
        resaved = load_file(str(tmp / "resaved" / "model.safetensors"))
        assert resaved.keys() == {k for k in deq if not k.startswith(p_mtp)}
        assert all(torch.equal(v, deq[k]) for k, v in resaved.items())
        tensors, fields = run_reference(model, ids)
        # quantisation matters, but the dequantised model stays close to the f32 one it was made from (this
        # random model amplifies the ~2% weight error: ~10% after layer 0, and routing flips after that)
        o_unq = src(ids, output_hidden_states=True)
        lq, lu = tensors["logits"], o_unq.logits
        d_unq = float((lq - lu).abs().max())
        rel_unq = float((lq - lu).norm() / lu.norm())
        rel_hidden = [float((tensors[f"hidden_states.{k}"] - h).norm() / h.norm())
                      for k, h in enumerate(o_unq.hidden_states)]
        argmax_agree = float((lq.argmax(-1) == lu.argmax(-1)).float().mean())
        loss_unq = float(src(ids, labels=ids).loss)
        log(f"    dequantised vs un-quantised f32 model: max |dlogit| = {d_unq:.4g}, mean "
            f"{float((lq - lu).abs().mean()):.3g}, relative L2 {rel_unq:.3g} (hidden states: "
            f"{', '.join(f'{r:.3g}' for r in rel_hidden)}), argmax agreement {argmax_agree:.3f}; "
            f"loss {fields['loss']:.5f} vs {loss_unq:.5f}")
        assert d_unq > 1e-3 and 0 < rel_hidden[1] < 0.15 and rel_unq < 0.5 and argmax_agree > 0.5, d_unq
        check_trunk_layers_standalone(model, ids, tensors["final_prenorm"])

        # ---- MTP: its decoder layer from a (L+1)-layer load of the same dequantised weights
        model_mtp, info = loading_info_of(ddir, num_hidden_layers=L + 1)
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        assert set(info["unexpected_keys"]) == {p_mtp + k for k in MTP_EXTRA_KEYS}, info["unexpected_keys"]
        mtp_layer = model_mtp.model.layers[L]
        assert type(mtp_layer.mlp).__name__ == "DeepseekV3MoE"
        H_final = tensors[f"hidden_states.{L}"]
        mtp_in, mtp_rl, mtp_idx, mtp_logits = run_mtp(model, mtp_layer, deq, ids, H_final)
        _, mtp_rl0, _, _ = run_mtp(model, mtp_layer, deq, ids, H_final, zero_pos0=True)
        T1 = SEQ_LEN - 1
        assert mtp_in.shape == (BATCH, T1, H) and mtp_rl.shape == (BATCH * T1, N_EXPERTS)
        assert mtp_idx.shape == (BATCH * T1, TOP_K) and mtp_idx.dtype == torch.int64
        assert len(mtp_idx.unique()) >= 4 and (mtp_rl < 0).any()
        rows0 = torch.arange(BATCH) * T1
        assert not torch.equal(mtp_rl0[rows0], mtp_rl[rows0])

        # cross-check: transformers' own MtpModel (shares embed / head with the trunk; reads layer L's keys)
        model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}\..*"]  # class default: layer 61
        model.config.dtype = torch.float32  # (the config keeps the string "float32", which MtpModel cannot use)
        tf_mtp = MtpModel.from_pretrained(model).eval()
        cap = {}
        hooks = [tf_mtp.layers[0].mtp_block.mlp.gate.register_forward_hook(lambda _m, _i, o: cap.update(rl=o[0])),
                 tf_mtp.layers[0].eh_proj.register_forward_hook(lambda _m, _i, o: cap.update(x=o))]
        try:
            y = tf_mtp.forward_layer(0, H_final[:, :-1], torch.arange(T1)[None], None, input_ids=ids[:, 1:])
        finally:
            for hk in hooks:
                hk.remove()
        tf_logits = tf_mtp._project_to_logits(y)
        d_mtp = max(float((cap["x"] - mtp_in).abs().max()), float((cap["rl"] - mtp_rl).abs().max()),
                    float((tf_logits - mtp_logits).abs().max()))
        log(f"    MTP vs transformers MtpModel (position ids 0..T-2): max |d| = {d_mtp:.3g}; "
            f"selected experts {sorted(mtp_idx.unique().tolist())}")
        assert d_mtp < 1e-5, d_mtp

    tensors["mtp_hidden_in"] = mtp_in.contiguous()
    tensors["mtp_router_logits"] = mtp_rl.contiguous()
    tensors["mtp_topk_idx"] = mtp_idx.contiguous()
    tensors["mtp_logits"] = mtp_logits.contiguous()
    tensors["mtp_router_logits_pos0_zeroed"] = mtp_rl0.contiguous()

    keys = check_disk_layout(name, mdir, model.config, fields["moe_layers"])
    ref = base_reference_json(name, model, ids, keys, "float8_e4m3fn (16x16 blocks) + float32 weight_scale_inv; "
                              "bfloat16 embeddings / norms / router / lm_head; float32 e_score_correction_bias")
    ref.update(fields)
    ref["reference_semantics"] = (
        "logits / loss / hidden_states / router_logits: transformers DeepseekV3ForCausalLM (config.json without "
        "quantization_config, float32, eager) on the dequantised trunk weights (FP8: q.float() * scale_inv "
        "blockwise; bf16 upcast; f32 as is), loaded strictly (nothing missing; only model.layers.3.* unused). "
        "dequantized.safetensors: every tensor of model.safetensors except *_scale_inv, dequantised that way "
        "(f32), MTP layer included")
    ref["quantization"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        "quantized_keys_regex": FP8_QUANTIZED_RE.pattern,
        "scale_semantics": (
            "<name>_scale_inv f32 [ceil(out/16), ceil(in/16)]; per 16x16 block s = amax(|w|) / 448, "
            "q = (w / s).to(float8_e4m3fn); dequantised w[r, c] = float(q[r, c]) * s[r // 16, c // 16] (one f32 "
            "multiply; partial edge blocks use their block's s)"),
        "tensors_by_dtype": dict(sorted(n_by_dtype.items())),
        "fp8_tensors_with_partial_blocks": len(partial),
    }
    ref["dequantized_vs_original_max_abs_diff"] = dict(sorted(err.items()))
    ref["dequantized_vs_original_max_abs_diff_by_dtype"] = dict(sorted(err_dtype.items()))
    ref["logits_vs_unquantized_f32_max_abs_diff"] = d_unq
    ref["logits_vs_unquantized_f32_relative_l2"] = rel_unq
    ref["hidden_states_vs_unquantized_f32_relative_l2"] = rel_hidden
    ref["logits_vs_unquantized_f32_argmax_agreement"] = argmax_agree
    ref["loss_unquantized_f32"] = loss_unq
    ref["mtp"] = {
        "layer": L,
        "hidden_state": "after model.norm",
        "concat_order": "[enorm(embed(next token)), hnorm(hidden)]",
        "semantics": (
            f"positions i = 0..{SEQ_LEN - 2}: e = enorm(model.layers.{L}.embed_tokens(ids[:, i+1])), "
            f"h = hnorm(hidden_states.{L}[:, i]), mtp_hidden_in = eh_proj(cat([e, h], -1)) [B, T-1, H]; then "
            f"transformers' DeepseekV3DecoderLayer with the model.layers.{L}.* weights (causal mask over the T-1 "
            "positions, position ids 0..T-2, the trunk's yarn rotary embedding); mtp_router_logits [B*(T-1), E] "
            "(row = b*(T-1) + t) = raw gate logits of its MoE block (before sigmoid); mtp_topk_idx [B*(T-1), 2] "
            "int64 = the selected experts (group-limited, with e_score_correction_bias), sorted ascending per row; "
            "mtp_logits [B, T-1, V] = shared_head.head(shared_head.norm(layer output))"),
        "embed_and_head": "model.layers.3.embed_tokens / shared_head.head are copies of the trunk's (as in DeepSeek-V3)",
        "pos0_zeroed": (
            "mtp_router_logits_pos0_zeroed: the same with e = 0 at position 0 (vLLM's DeepSeekMTP zeroes the "
            "embedding where positions == 0); rows b*(T-1) differ, later rows also through attention"),
        "cross_check": (
            "transformers.modeling_layers.MtpModel.forward_layer (loaded from the dequantised weights, position ids "
            "0..T-2 passed explicitly; transformers' drafting loop itself passes the next token's positions 1..T-1) "
            f"gives the same mtp_hidden_in / router logits / logits within {d_mtp:.3g}"),
    }
    ref["fp8_e4m3_table"] = fp8_table(torch.float8_e4m3fn)
    ref["fp8_e5m2_table"] = fp8_table(torch.float8_e5m2)
    emit(name, out, ref, tensors, ids, {"dequantized.safetensors": deq})

    # the transformers model loaded from dequantized.safetensors' trunk keys reproduces the reference logits
    with tempfile.TemporaryDirectory() as tmp_s:
        tdir = Path(tmp_s)
        cfg_json = json.loads((mdir / "config.json").read_text())
        del cfg_json["quantization_config"]
        (tdir / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
        trunk = {k: v for k, v in load_file(str(out / "parity" / name / "dequantized.safetensors")).items()
                 if not k.startswith(p_mtp)}
        save_file(trunk, str(tdir / "model.safetensors"), metadata={"format": "pt"})
        again, info = loading_info_of(tdir)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        with safe_open(str(out / "parity" / name / "reference.safetensors"), "pt") as f:
            assert torch.equal(again(ids).logits, f.get_tensor("logits")), "dequantized.safetensors reload differs"


# --------------------------------------------------------------------------------------------
# DeepSeek-MoE (`deepseek`): no transformers class; reference built from the remote code's semantics
# --------------------------------------------------------------------------------------------

DEEPSEEK_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}


def deepseek_moe_config(name: str) -> dict:
    """config.json of the tiny DeepSeek-MoE fixtures, in the upstream (transformers 4.x remote code) key
    style and key order of deepseek-moe-16b-base."""
    freq2 = name == "tiny-deepseek-freq2"
    return {
        "architectures": ["DeepseekForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": DEEPSEEK_AUTO_MAP,
        "aux_loss_alpha": 0.001,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.2,
        "intermediate_size": 96,
        "max_position_embeddings": 512,
        "model_type": "deepseek",
        "moe_intermediate_size": 32,
        "moe_layer_freq": 2 if freq2 else 1,
        "n_routed_experts": N_EXPERTS,
        "n_shared_experts": None if freq2 else 2,
        "norm_topk_prob": freq2,
        "num_attention_heads": N_HEADS,
        "num_experts_per_tok": TOP_K,
        "num_hidden_layers": 4 if freq2 else 3,
        "num_key_value_heads": N_KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 2e-6 if freq2 else 1e-5,  # default 1e-6
        "rope_scaling": {"type": "linear", "factor": 2.0} if freq2 else None,
        "rope_theta": 20000.0 if freq2 else 5000.0,  # default 10000
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": freq2,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


class DeepseekMLPRef(torch.nn.Module):
    """The remote code's ``DeepseekMLP`` (pretraining_tp = 1): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGateRef(torch.nn.Module):
    """The remote code's ``MoEGate`` at inference: softmax scores, greedy top-k, optional renormalisation.
    Keeps the raw logits of its last call (``router_logits``). ``F`` is this module's global, so
    ``masked_router`` can patch it like transformers' routers."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.top_k = cfg["num_experts_per_tok"]
        self.norm_topk_prob = cfg["norm_topk_prob"]
        assert cfg["scoring_func"] == "softmax"
        self.weight = torch.nn.Parameter(torch.empty(cfg["n_routed_experts"], cfg["hidden_size"]))
        self.last_logits = None

    def forward(self, hidden_states):
        h = hidden_states.shape[-1]
        logits = F.linear(hidden_states.view(-1, h), self.weight, None)
        self.last_logits = logits
        scores = logits.softmax(dim=-1)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight


class DeepseekMoERef(torch.nn.Module):
    """The remote code's ``DeepseekMoE`` at inference (``moe_infer``): each expert runs on the tokens
    routed to it, its output times the routing weight is summed per token; then the shared experts'
    output is added without a gate."""

    def __init__(self, cfg: dict):
        super().__init__()
        H, I = cfg["hidden_size"], cfg["moe_intermediate_size"]
        self.experts = torch.nn.ModuleList([DeepseekMLPRef(H, I) for _ in range(cfg["n_routed_experts"])])
        self.gate = MoEGateRef(cfg)
        if cfg["n_shared_experts"] is not None:
            self.shared_experts = DeepseekMLPRef(H, I * cfg["n_shared_experts"])

    def forward(self, hidden_states):
        identity = hidden_states
        shape = hidden_states.shape
        topk_idx, topk_weight = self.gate(hidden_states)
        x = hidden_states.view(-1, shape[-1])
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (topk_idx == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            out = expert(x[tok]) * topk_weight[tok, slot].unsqueeze(-1)
            y.index_add_(0, tok, out)
        y = y.view(*shape)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(identity)
        return y


class DeepseekMoERefForCausalLM(torch.nn.Module):
    """DeepSeek-MoE as its remote code computes it: transformers' ``LlamaModel`` (the remote code's attention,
    RoPE, RMSNorm and dense MLP are Llama's) with the MoE layers' ``mlp`` replaced by ``DeepseekMoERef``,
    and an ``lm_head``. Submodule names give the upstream checkpoint keys."""

    def __init__(self, cfg: dict):
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        rs = cfg["rope_scaling"]
        rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
        if rs is not None:
            assert rs["type"] == "linear", rs
            rope = {"rope_type": "linear", "rope_theta": cfg["rope_theta"], "factor": rs["factor"]}
        llama_cfg = LlamaConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"], hidden_act=cfg["hidden_act"],
            max_position_embeddings=cfg["max_position_embeddings"], initializer_range=cfg["initializer_range"],
            rms_norm_eps=cfg["rms_norm_eps"], bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"],
            pad_token_id=None, tie_word_embeddings=cfg["tie_word_embeddings"], rope_parameters=rope,
            attention_bias=cfg["attention_bias"], attention_dropout=0.0, mlp_bias=False,
            attn_implementation="eager",
        )
        lm = LlamaForCausalLM(llama_cfg)
        self.model = lm.model
        self.lm_head = lm.lm_head
        if cfg["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.moe_layers = [i for i in range(cfg["num_hidden_layers"])
                           if i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0]
        for i in self.moe_layers:
            self.model.layers[i].mlp = DeepseekMoERef(cfg)
        self.config = argparse.Namespace(**cfg, output_router_logits=False)

    def forward(self, input_ids, labels=None, output_hidden_states=False, output_router_logits=False):
        out = self.model(input_ids=input_ids, output_hidden_states=output_hidden_states)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:  # transformers' ForCausalLMLoss: mean CE over the shifted positions
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))
        router_logits = None
        if output_router_logits:
            router_logits = tuple(self.model.layers[i].mlp.gate.last_logits for i in moe_layers_of(self))
        return argparse.Namespace(logits=logits, loss=loss, hidden_states=out.hidden_states,
                                  router_logits=router_logits)


def build_deepseek_moe(name: str, seed: int) -> DeepseekMoERefForCausalLM:
    cfg = deepseek_moe_config(name)
    torch.manual_seed(seed)
    model = DeepseekMoERefForCausalLM(cfg).float().eval()
    with torch.no_grad():  # hand-written modules: same init as transformers' (normal, initializer_range)
        for i in model.moe_layers:
            for p in model.model.layers[i].mlp.parameters():
                p.normal_(0.0, cfg["initializer_range"])
    perturb(model, seed)
    check_params_nontrivial(model)
    return model


def save_deepseek_moe(model: DeepseekMoERefForCausalLM, mdir: Path) -> None:
    cfg = dict(vars(model.config))
    del cfg["output_router_logits"]
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        del sd["lm_head.weight"]
    save_file(sd, str(mdir / "model.safetensors"), metadata={"format": "pt"})
    (mdir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "transformers_version": transformers.__version__}
    (mdir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def load_deepseek_moe(mdir: Path) -> DeepseekMoERefForCausalLM:
    """Rebuilt from config.json, weights from model.safetensors (strict: every key used, none missing)."""
    from safetensors.torch import load_file

    cfg = json.loads((mdir / "config.json").read_text())
    model = DeepseekMoERefForCausalLM(cfg).float().eval()
    sd = load_file(str(mdir / "model.safetensors"))
    if cfg["tie_word_embeddings"]:
        assert "lm_head.weight" not in sd
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    if cfg["tie_word_embeddings"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@torch.no_grad()
def check_deepseek_moe(model, ids) -> dict:
    """Records that the shared experts and (freq2) the renormalisation and linear RoPE scaling matter."""
    cfg = model.config
    base = model(ids).logits
    out = {"moe_layer_freq": cfg.moe_layer_freq, "first_k_dense_replace": cfg.first_k_dense_replace}
    if cfg.n_shared_experts is not None:
        saved = {}
        for i in moe_layers_of(model):
            m = model.model.layers[i].mlp
            saved[i] = m.shared_experts
            del m.shared_experts
        d = float((model(ids).logits - base).abs().max())
        for i, s in saved.items():
            model.model.layers[i].mlp.shared_experts = s
        log(f"    without shared experts: max |dlogit| {d:.3g}")
        assert d > 1e-2
        out["without_shared_experts_max_abs_diff"] = d
    if cfg.norm_topk_prob:
        gates = [model.model.layers[i].mlp.gate for i in moe_layers_of(model)]
        for g in gates:
            g.norm_topk_prob = False
        d = float((model(ids).logits - base).abs().max())
        for g in gates:
            g.norm_topk_prob = True
        log(f"    without renormalisation: max |dlogit| {d:.3g}")
        assert d > 1e-2
        out["without_norm_topk_prob_max_abs_diff"] = d
    if cfg.rope_scaling is not None:
        rot = model.model.rotary_emb
        saved = rot.inv_freq.clone()
        rot.inv_freq.mul_(cfg.rope_scaling["factor"])
        d = float((model(ids).logits - base).abs().max())
        rot.inv_freq.copy_(saved)
        log(f"    without linear RoPE scaling: max |dlogit| {d:.3g}")
        assert d > 1e-2
        out["without_rope_scaling_max_abs_diff"] = d
    assert torch.equal(model(ids).logits, base)
    return out


def gen_deepseek_moe(out: Path, name: str) -> None:
    log(name)
    src = build_deepseek_moe(name, SEEDS[name])
    mdir = fresh_dir(out / "models" / name)
    save_deepseek_moe(src, mdir)
    model = load_deepseek_moe(mdir)
    ids = make_ids(name)
    tensors, fields = run_reference(model, ids)
    with torch.no_grad():
        assert torch.equal(src(ids).logits, model(ids).logits), f"{name}: save/load round trip changed logits"
    keys = check_disk_layout(name, mdir, model.config, fields["moe_layers"])
    ref = base_reference_json(name, model, ids, keys, "float32")
    ref.update(fields)
    ref["transformers_version"] = (
        f"{transformers.__version__} (LlamaModel pieces; the MoE block hand-written from the remote code)")
    ref["experts_implementation"] = "n/a (DeepseekMoERef, per-expert nn.ModuleList as the remote code)"
    ref["reference_implementation"] = (
        "no transformers class: scripts/gen_parity_fixtures.py DeepseekMoERefForCausalLM = transformers "
        "LlamaModel (attention, RoPE, RMSNorm, dense MLP) + hand-written DeepseekMoE/MoEGate following the "
        "upstream remote code modeling_deepseek.py (deepseek-ai/deepseek-moe-16b-base; read from the vendored "
        "copy BZX667/CMoE:modeling_deepseek.py)")
    mt, mf = masked_reference(name, model, ids, tensors)
    ref.update(mf)
    ref.update(check_deepseek_moe(model, ids))
    emit(name, out, ref, tensors, ids, {"masked.safetensors": mt})


@torch.no_grad()
def check_gpt_oss(model, ids) -> dict:
    """Checks that sinks, the sliding window and the SwiGLU clamp all matter on these inputs."""
    cfg = model.config
    base = model(ids).logits
    # sinks: -inf sinks drop the extra softmax column
    saved = [layer.self_attn.sinks.clone() for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.sinks.fill_(float("-inf"))
    d_sinks = float((model(ids).logits - base).abs().max())
    for layer, s in zip(model.model.layers, saved):
        layer.self_attn.sinks.copy_(s)
    # clamp: fraction of gate (> limit) and up (|.| > limit) entries over all experts
    xs = {}
    hs = [model.model.layers[i].mlp.experts.register_forward_pre_hook(
        lambda _m, a, i=i: xs.__setitem__(i, a[0].clone())) for i in range(cfg.num_hidden_layers)]
    model(ids)
    for h in hs:
        h.remove()
    lim = cfg.swiglu_limit
    n_gate = n_up = n = 0
    for i, x in xs.items():
        ex = model.model.layers[i].mlp.experts
        gu = torch.einsum("nh,ehk->enk", x, ex.gate_up_proj) + ex.gate_up_proj_bias[:, None, :]
        n_gate += int((gu[..., ::2] > lim).sum())
        n_up += int((gu[..., 1::2].abs() > lim).sum())
        n += gu[..., ::2].numel()
    log(f"    sinks -> -inf: max |dlogit| {d_sinks:.3g}; clamped gate {n_gate / n:.3f}, up {n_up / n:.3f}; "
        f"layer_types {cfg.layer_types}")
    assert d_sinks > 1e-2 and n_gate > 0 and n_up > 0
    assert "sliding_attention" in cfg.layer_types and "full_attention" in cfg.layer_types
    return {
        "layer_types": cfg.layer_types,
        "sliding_window": cfg.sliding_window,
        "swiglu_limit": lim,
        "sinks_to_neg_inf_max_abs_diff": d_sinks,
        "swiglu_clamped_fraction": {"gate": n_gate / n, "up": n_up / n},
        "yarn_cos_sin_factor": float(model.model.rotary_emb.attention_scaling),
    }


def gen_gpt_oss(out: Path, name: str = "tiny-gpt-oss") -> None:
    """gpt-oss with masked.safetensors (router logits -> -inf, checked equal to removal)."""
    log(name)
    m = build_model(name, SEEDS[name])
    generate_f32(name, out, m, masked=True, extra_check=check_gpt_oss)


def mxfp4_quantize(w: torch.Tensor):
    """w [E, in, out] (gpt-oss's x @ W layout) -> blocks [E, out, in/32, 16] uint8, scales [E, out, in/32]
    uint8, and the dequantised [E, in, out], in the layout transformers' ``convert_moe_packed_tensors``
    reads: per 32 input values one exponent ``2^(s-127)`` (the smallest with max|v|/2^s <= 6), values
    rounded to the nearest FP4 E2M1 value, two a byte, the low nibble first."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    lut = torch.tensor(FP4_VALUES)
    wt = w.transpose(1, 2).contiguous()
    E, O, I = wt.shape
    g = wt.reshape(E, O, I // 32, 32)
    s = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(s)[..., None]
    idx = (scaled.abs()[..., None] - lut[:8]).abs().argmin(-1) + 8 * (scaled < 0).long()
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    deq = (lut[idx] * torch.exp2(s)[..., None]).reshape(E, O, I).transpose(1, 2).contiguous()
    return blocks.contiguous(), (s + 127).to(torch.uint8).contiguous(), deq


@torch.no_grad()
def gen_gpt_oss_mxfp4(out: Path, name: str = "tiny-gpt-oss-mxfp4") -> None:
    """A gpt-oss checkpoint whose expert weights are MXFP4 (``*_blocks`` + ``*_scales``, as
    ``openai/gpt-oss-*`` ship), written here with transformers' layout (its quantiser needs a GPU);
    transformers loads it on CPU by dequantising, and that model gives the references."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    log(name)
    src = build_model(name, SEEDS[name])
    tensors, deq = {}, {}
    for k, v in src.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            b, sc, d = mxfp4_quantize(v)
            assert torch.equal(convert_moe_packed_tensors(b, sc, dtype=torch.float32), d), k
            tensors[k + "_blocks"], tensors[k + "_scales"], deq[k] = b, sc, d
        else:
            tensors[k] = v.contiguous()
    mdir = fresh_dir(out / "models" / name)
    save_file(tensors, str(mdir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads(src.config.to_json_string())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }
    (mdir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    model = load(mdir)  # CPU: transformers dequantises the MXFP4 experts
    for k, d in deq.items():
        got = model.get_parameter(k)
        assert got.dtype == torch.float32 and torch.equal(got, d), f"{k}: transformers' dequantisation differs"
    ids = make_ids(name)
    ref_tensors, fields = run_reference(model, ids)
    src.load_state_dict({**src.state_dict(), **deq})
    assert torch.equal(src(ids).logits, model(ids).logits), "dequantised in-memory model differs from the load"
    keys = disk_tensors(mdir)
    ref = base_reference_json(name, model, ids, keys, "float32 + uint8 MXFP4 experts")
    ref.update(fields)
    ref["mxfp4_semantics"] = (
        "experts.{gate_up,down}_proj stored as *_blocks [E, out, in/32, 16] + *_scales [E, out, in/32] (uint8); "
        "references from transformers loading the checkpoint on CPU (dequantize=True) in float32; the loaded "
        "expert weights equal transformers.integrations.mxfp4.convert_moe_packed_tensors(blocks, scales)"
    )
    emit(name, out, ref, ref_tensors, ids)


def tf4_worker(out: Path) -> None:
    """Runs under transformers 4.x: build, save and reference tiny-qwen3-moe-tf4 (no tokenizer)."""
    assert TF_MAJOR == 4, transformers.__version__
    name = "tiny-qwen3-moe-tf4"
    log(f"{name} (transformers {transformers.__version__})")
    m = build_model(name, SEEDS[name])
    generate_f32(name, out, m)


def gen_tf4(out: Path, tf4_path: str) -> None:
    name = "tiny-qwen3-moe-tf4"
    if not Path(tf4_path, "transformers").is_dir():
        sys.exit(
            f"transformers {TF4_VERSION} not found under {tf4_path}; install it with\n"
            f"  {sys.executable} -m pip install --target {tf4_path} transformers=={TF4_VERSION}\n"
            "or pass --skip-tf4"
        )
    env = dict(os.environ, PYTHONPATH=tf4_path)
    subprocess.run([sys.executable, __file__, "--out", str(out), "--tf4-worker"], check=True, env=env)
    mdir = out / "models" / name
    cfg = json.loads((mdir / "config.json").read_text())
    assert cfg["transformers_version"].startswith("4."), cfg["transformers_version"]
    assert "rope_theta" in cfg and "rope_parameters" not in cfg, "expected 4.x rope_theta key"
    assert "num_experts" in cfg and "num_local_experts" not in cfg, "expected 4.x num_experts key"
    # cross-check: transformers 5.x reading the 4.x checkpoint gives the same logits
    pdir = out / "parity" / name
    ref = json.loads((pdir / "reference.json").read_text())
    ids = torch.tensor(ref["ids"])
    m5 = load(mdir)
    assert m5.config.rope_parameters["rope_theta"] == cfg["rope_theta"]
    with torch.no_grad():
        l5 = m5(ids).logits
    with safe_open(str(pdir / "reference.safetensors"), "pt") as f:
        l4 = f.get_tensor("logits")
    d = float((l5 - l4).abs().max())
    log(f"    transformers {transformers.__version__} on the 4.x checkpoint vs 4.x logits: max |d| = {d:.3g}")
    assert d < 1e-4, d
    ref["cross_check"] = {
        "transformers_version": transformers.__version__,
        "logits_max_abs_diff_vs_reference": d,
    }
    write_json(pdir / "reference.json", ref)


def finish_tokenizer(out: Path, names: list[str]) -> None:
    tok = build_tokenizer()
    text_ids = tok.encode(SAMPLE_TEXT, add_special_tokens=False).ids
    assert tok.decode(text_ids) == SAMPLE_TEXT
    for name in names:
        mdir = out / "models" / name
        tok.save(str(mdir / "tokenizer.json"))
        pj = out / "parity" / name / "reference.json"
        ref = json.loads(pj.read_text())
        ref["text"] = SAMPLE_TEXT
        ref["text_ids"] = text_ids
        ref["tokenizer_vocab_size"] = tok.get_vocab_size()
        write_json(pj, ref)


README_TEMPLATE = """\
# Parity fixtures

Tiny random MoE checkpoints (`fixtures/models/<name>/`, exactly as `save_pretrained` wrote them, plus a
byte-level BPE `tokenizer.json` with 320 tokens = `vocab_size`) and transformers' outputs for them
(`fixtures/parity/<name>/`). Written by `scripts/gen_parity_fixtures.py` with transformers {tf},
torch {torch} (CPU, eager attention, eager experts, `model.eval()`, `torch.no_grad()`); the
`-tf4` fixture with transformers {tf4}. Generation only: the tests just read these files.

All models: hidden 64, 4 heads / 2 kv heads, 8 experts, top-2, 3 x 16 token ids, initializer_range
0.2, every RMSNorm weight 1 + 0.3 randn (the zero-centred `(1 + weight)` norms of tiny-qwen3-next: 0.3 randn, the
same effective scale), non-default rope theta and rms_norm_eps.

| name | model_type | on disk | exercises |
|---|---|---|---|
| `tiny-mixtral` | mixtral | f32, 1 file | 2 layers, untied lm_head, `block_sparse_moe.experts.{{e}}.w1/w2/w3`, softmax -> top-2 -> renormalise; `masked.safetensors` |
| `tiny-mixtral-swa` | mixtral | f32, 1 file | tiny-mixtral's weights and ids with `sliding_window: 6` (key j visible from query i iff i-6 < j <= i); positions 0-5 equal tiny-mixtral, 6-15 differ |
| `tiny-mixtral-bf16` | mixtral | bf16, 1 file | tiny-mixtral's weights rounded to bf16; `logits` = bf16 weights upcast, run in f32; `logits_bf16` = run in bf16 (its top-k flips vs f32: `bf16_top_k_flips_vs_f32`) |
| `tiny-qwen2-moe` | qwen2_moe | f32, 5 shards + index | 4 layers, layer 2 dense (`mlp_only_layers`), shared expert + sigmoid gate, q/k/v biases, norm_topk_prob=false, experts split across shards; `masked.safetensors` |
| `tiny-qwen3-moe` | qwen3_moe | f32, 1 file | 4 layers, `decoder_sparse_step: 2` (MoE layers 1, 3; dense 0, 2), head_dim 24 != 64/4, per-head q/k RMSNorm, norm_topk_prob=true, tied embeddings (no `lm_head.weight`), 5.x config keys (`rope_parameters`, `num_local_experts`) |
| `tiny-olmoe` | olmoe | f32, 1 file | 3 layers, q/k RMSNorm over the whole projection, `clip_qkv: 2.0` (clips ~6% of q/k, ~24% of v entries), norm_topk_prob=false |
| `tiny-qwen3-moe-tf4` | qwen3_moe | f32, 1 file | as tiny-qwen3-moe (other weights) but saved by transformers {tf4}: 4.x config keys (`rope_theta`, `num_experts`); references from a 4.x forward (5.x reproduces them) |
| `tiny-deepseek-v3` | deepseek_v3 | f32, 1 file | 3 layers, layer 0 dense (`first_k_dense_replace: 1`), MLA with `q_lora_rank: 24` (kv_lora 16, nope 16, rope 8, v 12, 4 heads = 4 kv heads), yarn RoPE (factor 4, mscale 1, mscale_all_dim 0.7: cos/sin and softmax scale both change) on interleaved pairs, sigmoid routing + random `e_score_correction_bias`, `n_group: 2`, `topk_group: 1`, norm_topk_prob, `routed_scaling_factor: 2.5`, 1 shared expert; `masked.safetensors` |
| `tiny-deepseek-v2` | deepseek_v2 | f32, 1 file | 3 layers, layer 0 dense, MLA without q_lora_rank (`q_proj`), yarn RoPE (complex-number form), softmax `group_limited_greedy` (`n_group: 4`, `topk_group: 2`), `routed_scaling_factor: 1.5`, 2 shared experts; `masked.safetensors` |
| `tiny-gpt-oss` | gpt_oss | f32, 1 file | 3 layers (`layer_types` sliding, full, sliding; `sliding_window: 6`), fused `mlp.experts.gate_up_proj` (interleaved) / `down_proj` with biases, router bias, clamped SwiGLU with `swiglu_limit: 2` (clamps), per-head attention `sinks` (1.0 randn), q/k/v/o biases, yarn RoPE (factor 4, truncate false), intermediate 16, head_dim 16; `masked.safetensors` |
| `tiny-gpt-oss-mxfp4` | gpt_oss | f32 + uint8 MXFP4 experts, 1 file | 2 layers, intermediate 32, experts as `gate_up_proj_blocks/_scales`, `down_proj_blocks/_scales` (written in transformers' layout; transformers on CPU dequantises them, and its loaded weights equal `convert_moe_packed_tensors`); references from that load in f32 |
| `tiny-deepseek` | deepseek | f32, 1 file | DeepSeek-MoE (remote code; reference built by the script, see below): 3 layers, layer 0 dense (`first_k_dense_replace: 1`, `moe_layer_freq: 1`), Llama attention with GQA (4 heads, 2 kv heads), rotate-half RoPE, softmax greedy top-2 without renormalisation, 2 shared experts (`mlp.shared_experts`, width 64); `masked.safetensors` |
| `tiny-deepseek-v3-fp8` | deepseek_v3 | F8_E4M3 + f32 `_scale_inv` + bf16, 1 file | tiny-deepseek-v3's architecture (other weights) with `moe_intermediate_size: 24`, in the DeepSeek-V3 release format: `quantization_config` fp8 e4m3, dynamic activations, `weight_block_size: [16, 16]`; every decoder-layer linear (attention, dense MLP, experts, shared experts, MTP `eh_proj`) `F8_E4M3` + `<name>_scale_inv` f32 `[ceil(out/16), ceil(in/16)]` (s = block amax / 448; partial 16x8 / 8x16 edge blocks wherever a dim is 24: experts, shared experts, q_a_proj, kv_a_proj_with_mqa, q_b_proj), embeddings / norms / router / lm_head bf16, `e_score_correction_bias` f32; MTP layer `model.layers.3.*` (`embed_tokens`, `enorm`, `hnorm`, `eh_proj`, `shared_head.{{norm,head}}`, full MoE decoder layer; `num_nextn_predict_layers: 1`). References: transformers on the dequantised weights (f32, MTP ignored); `dequantized.safetensors` (every non-scale tensor in f32, FP8 as `q.float() * s`); `mtp_hidden_in`, `mtp_router_logits`, `mtp_topk_idx`, `mtp_logits`; `fp8_e4m3_table` / `fp8_e5m2_table` in reference.json |
| `tiny-deepseek-freq2` | deepseek | f32, 1 file | DeepSeek-MoE, 4 layers, `first_k_dense_replace: 1`, `moe_layer_freq: 2` (layer 2 MoE; 0, 1, 3 dense), `norm_topk_prob: true`, no shared experts, `rope_scaling: {{type: linear, factor: 2}}`, tied embeddings; `masked.safetensors` |
| `tiny-glm4-moe` | glm4_moe | f32, 1 file | GLM-4.5: 3 layers, layer 0 dense (`first_k_dense_replace: 1`, width 96), GQA with q/k/v biases (`attention_bias`, no o_proj bias), per-head q/k RMSNorm (`use_qk_norm`), partial rotate-half RoPE (`rope_parameters.partial_rotary_factor: 0.5`: first 8 of 16 head dims), sigmoid routing + random `mlp.gate.e_score_correction_bias` (0.25 randn), `n_group: 2`, `topk_group: 1` (group score = sum of the top-2 biased scores), norm_topk_prob (`/ (sum + 1e-20)`), `routed_scaling_factor: 1.7`, 1 shared expert; `num_nextn_predict_layers: 1` in config.json but no MTP weights; `topk_idx`/`topk_weight`; `masked.safetensors` (one expert per group removed) |
| `tiny-minimax-m2` | minimax_m2 | f32, 1 file | MiniMax-M2: 3 layers, all MoE, on disk `block_sparse_moe.experts.{{e}}.w1/w2/w3`, `block_sparse_moe.gate.weight`, `block_sparse_moe.e_score_correction_bias` (0.2 randn; in memory `mlp.*`), expert width `intermediate_size: 32`, q/k RMSNorm over the whole projection (`q_norm` [64], `k_norm` [32]) before the head split, `head_dim: 16`, `rotary_dim: 8` (-> `partial_rotary_factor: 0.5`, rotate-half on the first 8 dims), sigmoid routing, top-2 renormalised by the sum (no epsilon, no scaling); `topk_idx`/`topk_weight`; `masked.safetensors` (two experts per layer removed) |
| `tiny-ernie4-5-moe` | ernie4_5_moe | f32, 1 file | ERNIE-4.5 MoE: 4 layers, layer 0 dense (width 96), MoE 1..3 (`moe_layer_start_index: 1`, `moe_layer_end_index: 3`, `moe_layer_interval: 1`), softmax routing, top-2 chosen on `softmax + moe_statics.e_score_correction_bias` (`mlp.moe_statics.e_score_correction_bias` [1, 8] on disk, 0.05 randn), weights = softmax probs renormalised `/ max(sum, moe_norm_min)`, 2 shared experts (width 64), `use_bias: true` (q/k/v/o, dense and shared-expert MLP biases, and an `lm_head.bias` although the weight is tied), interleaved (GLM-style) full-head RoPE in f32, tied embeddings; `topk_idx`/`topk_weight`; `masked.safetensors` (two experts per layer removed) |
| `tiny-llama4-text` | llama4_text | f32, 1 file | Llama 4 text (`Llama4ForCausalLM`): 4 layers, `interleave_moe_layer_step: 2` (`moe_layers` [1, 3]; dense 0, 2 with `intermediate_size_mlp: 96`), fused experts `feed_forward.experts.gate_up_proj` [8, 64, 64] (gate = first 32 columns, up = last 32) / `down_proj` [8, 32, 64], `feed_forward.router.weight`, shared expert (`feed_forward.shared_expert.*`, width 32), top-2 on the raw router logits, weight = sigmoid(chosen logit) multiplying the expert INPUT; `no_rope_layers` [1, 1, 1, 0] (1 = uses RoPE): layers 0-2 RoPE as complex multiplication on interleaved pairs with llama3 scaling (theta 1e4, factor 8, low 1, high 4, `original_max_position_embeddings: 32`: one frequency unchanged, one smoothed, six divided), weightless L2 q/k norm after RoPE (eps = `rms_norm_eps`), chunked attention (`attention_chunk_size: 6`: key j visible from query i iff j <= i and j // 6 == i // 6); NoPE layer 3: full causal attention, temperature tuning (`floor_scale: 4`, `attn_scale: 0.1`: q *= 1 + 0.1 log1p(floor((pos + 1) / 4))); `feature_ablations` (loss with chunking / temperature tuning / q-k norm / llama3 scaling off), independent re-implementation within 1e-5; `topk_idx`/`topk_weight`; `masked.safetensors` (two experts per layer removed) |
| `tiny-qwen3-next` | qwen3_next | f32, 1 file | Qwen3-Next (`Qwen3NextForCausalLM`): 4 layers, `layer_types` linear, linear, linear, full (the release writes `full_attention_interval: 4`); every layer MoE (`decoder_sparse_step: 1`, `mlp_only_layers: []`, `num_experts: 8`, top-2, softmax, `norm_topk_prob`, `moe_intermediate_size: 32`) plus shared expert (width 48) times sigmoid(`mlp.shared_expert_gate`); ZERO-CENTRED RMSNorms (`norm(x) * (1 + weight)`, weights 0.3 randn) for the layer norms, final norm and q/k norms; Gated DeltaNet (layers 0-2): `in_proj_qkvz` [128, 64] / `in_proj_ba` [8, 64] grouped per key head (2 key heads of dim 16, 4 value heads of dim 8: 2 value heads per key head), causal depthwise `conv1d.weight` [96, 1, 4] + SiLU over [q, k, v], l2-normalised q/k (eps 1e-6), q / sqrt(16), decay g = -exp(`A_log`) softplus(a + `dt_bias`), beta = sigmoid(b), gated delta rule, gated RMSNorm `linear_attn.norm` [8] (plain weight, 1 + 0.3 randn) times silu(z), `out_proj`; gated attention (layer 3): `q_proj` [128, 64] = per head [q (16) | gate (16)], 4 heads / 2 kv heads, per-head `q_norm` / `k_norm`, partial rotate-half RoPE on the first 4 of 16 dims (`partial_rotary_factor: 0.25`, theta 1000), output * sigmoid(gate) before `o_proj`; `logits` = transformers' default chunked delta rule, `logits_recurrent` = the recurrent rule substituted (max diff in reference.json); `token_mixer_out.{{layer}}`, `gdn_core_out.{{layer}}`; `feature_ablations`; independent re-implementation from the disk tensors; `topk_idx`/`topk_weight`; `masked.safetensors` (two experts per layer removed) |
| `tiny-llama4` | llama4 | f32, 1 file | Llama 4 multimodal wrapper (`Llama4ForConditionalGeneration`, config.json with `text_config` = tiny-llama4-text's config and `vision_config`), other weights; on disk `language_model.model.*`, `language_model.lm_head.weight`, `vision_model.*` (1 layer, hidden 32, 28x28 images, patch 14, pixel shuffle 0.5 -> 1 token per image; LayerNorms and biases random), `multi_modal_projector.linear_1.weight`; image tokens 317/318/319 (boi/eoi/image); references from the TEXT-ONLY forward (input_ids, no pixel_values; transformers {tf} needs a one-attribute workaround, see `transformers_bug_workaround`), identical to the inner `language_model` run alone and to `AutoModelForCausalLM` on the same directory; `topk_idx`/`topk_weight`; `masked.safetensors` (two experts per text MoE layer removed) |

Per fixture, in `fixtures/parity/<name>/`:

- `reference.json`: versions, `ids` (3 x 16), `loss` (`model(ids, labels=ids).loss`, all 3 batched, no router
  aux loss), `loss_per_sequence`, `text` / `text_ids` (`tokenizer.encode(text, add_special_tokens=False)`),
  `moe_layers`, `on_disk_key_patterns`, plus per-fixture checks (`masked_experts`, `loss_bf16`, ...).
- `ids.json`: the same 3 x 16 ids.
- `reference.safetensors` (f32): `logits` [3, 16, 320]; `router_logits.{{layer}}` [48, 8] per MoE layer (raw gate
  logits before softmax, row = b*16 + t); `hidden_states.{{k}}` [3, 16, 64] for k = 0..L (0 = embeddings,
  k = output of layer k-1, **L = after the final norm**); `final_prenorm` (last layer output before the final norm);
  bf16 fixture also `logits_bf16`, `router_logits_bf16.{{layer}}`; tiny-glm4-moe, tiny-minimax-m2, tiny-ernie4-5-moe, tiny-llama4-text,
  tiny-llama4, tiny-qwen3-next also
  `topk_idx.{{layer}}` (int64 [48, 2], the router's selected expert ids, each row sorted ascending) and
  `topk_weight.{{layer}}` (f32 [48, 2], their final weights, same order), and in reference.json `routing_semantics`,
  `correction_bias_changed_selections` (rows per layer whose top-2 differs with the correction bias zeroed),
  `rotary_dim_effective`, `rope_style`.
- `masked.safetensors` (tiny-mixtral, tiny-qwen2-moe, tiny-gpt-oss, tiny-deepseek, tiny-deepseek-freq2): `logits`
  with `masked_experts` (per layer) never selectable (router logits set to -inf before softmax/top-k; checked
  equal to deleting those experts). For the DeepSeek-V2/V3 and tiny-glm4-moe fixtures: the logits with
  `masked_experts` (one per routing group) physically deleted; for tiny-minimax-m2 and tiny-ernie4-5-moe: two
  experts per MoE layer physically deleted (with a correction bias, -inf logits do not make an expert unselectable);
  for tiny-llama4-text and tiny-llama4: two experts per MoE layer physically deleted from the text model;
  for tiny-qwen3-next: two experts per MoE layer physically deleted (checked equal to -inf router logits).
  Llama 4's `topk_weight` is sigmoid(chosen router logit), which scales the expert's input, not its output.

`tiny-deepseek*` (`model_type: deepseek`, DeepSeek-MoE 16B) have no transformers class: the model ships remote
code (`configuration_deepseek.py`, `modeling_deepseek.py` of `deepseek-ai/deepseek-moe-16b-base`, named by
`auto_map` in its config.json). The script builds the reference from that remote code's semantics (read
from a vendored copy of the upstream file, `BZX667/CMoE: modeling_deepseek.py`): transformers' `LlamaModel`
supplies the parts the remote code copied from Llama (embeddings, eager `LlamaAttention` with `repeat_kv`,
rotate-half `LlamaRotaryEmbedding`, `LlamaRMSNorm`, dense `LlamaMLP`), and only the MoE block is written by
hand (`DeepseekMoERef` / `MoEGateRef`: `F.linear(x, gate.weight)` in the model dtype, softmax, `torch.topk`,
`/ (sum + 1e-20)` only if `top_k > 1 and norm_topk_prob`, SiLU-gated `experts.{{e}}.{{gate,up,down}}_proj`
weighted and summed per token as `moe_infer` does, plus ungated `shared_experts`). Parameter names are the
upstream checkpoint keys; config.json is written in the upstream key style (`rope_theta`, `rope_scaling`,
`auto_map`), and the references come from the model rebuilt from that config.json and loaded from the
saved file. Their `reference.json` says so in `reference_implementation`.

The DeepSeek, gpt-oss, GLM-4.5, MiniMax-M2, ERNIE-4.5, Llama 4 and Qwen3-Next fixtures can be regenerated alone (the others stay untouched):
`/opt/ref-venv/bin/python scripts/gen_parity_fixtures.py --out fixtures --only tiny-deepseek-v3 tiny-deepseek-v2 tiny-gpt-oss tiny-gpt-oss-mxfp4 tiny-deepseek tiny-deepseek-freq2 tiny-deepseek-v3-fp8 tiny-glm4-moe tiny-minimax-m2 tiny-ernie4-5-moe tiny-llama4-text tiny-llama4 tiny-qwen3-next`.

Regenerate (needs `/opt/tf4`, see `scripts/requirements-fixtures.txt`):

```
/opt/ref-venv/bin/python scripts/gen_parity_fixtures.py --out fixtures
```

The output is byte-for-byte deterministic with the pinned versions.
"""


def write_readme(out: Path) -> None:
    (out / "parity" / "README.md").write_text(README_TEMPLATE.format(
        tf=transformers.__version__, torch=torch.__version__.split("+")[0], tf4=TF4_VERSION))


def summary(out: Path) -> None:
    total = 0
    log("\nwritten:")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.stat().st_size:>10}  {p}")
    log(f"  {total:>10}  total bytes under {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fixtures", type=Path)
    ap.add_argument("--tf4-path", default="/opt/tf4", help=f"--target dir holding transformers {TF4_VERSION}")
    ap.add_argument("--skip-tf4", action="store_true")
    ap.add_argument("--only", nargs="+", choices=["tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-gpt-oss",
                                                        "tiny-gpt-oss-mxfp4", "tiny-deepseek",
                                                        "tiny-deepseek-freq2", "tiny-deepseek-v3-fp8",
                                                        "tiny-glm4-moe", "tiny-minimax-m2", "tiny-ernie4-5-moe",
                                                        "tiny-llama4-text", "tiny-llama4", "tiny-qwen3-next"],
                    help="(re)generate only these fixtures (the others are left as they are)")
    ap.add_argument("--tf4-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out: Path = args.out

    if args.tf4_worker:
        tf4_worker(out)
        return

    assert TF_MAJOR >= 5, f"run with transformers 5.x (got {transformers.__version__})"
    log(f"transformers {transformers.__version__}, torch {torch.__version__}")
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "parity").mkdir(parents=True, exist_ok=True)

    if args.only:
        for name in args.only:
            if name == "tiny-gpt-oss":
                gen_gpt_oss(out, name)
            elif name == "tiny-gpt-oss-mxfp4":
                gen_gpt_oss_mxfp4(out, name)
            elif name in ("tiny-deepseek", "tiny-deepseek-freq2"):
                gen_deepseek_moe(out, name)
            elif name == "tiny-deepseek-v3-fp8":
                gen_deepseek_v3_fp8(out, name)
            elif name in BIAS_ROUTED:
                gen_bias_routed(out, name)
            elif name in LLAMA4:
                gen_llama4(out, name)
            elif name in QWEN3_NEXT:
                gen_qwen3_next(out, name)
            else:
                gen_deepseek(out, name)
        finish_tokenizer(out, args.only)
        write_readme(out)
        summary(out)
        return

    names = ["tiny-mixtral", "tiny-mixtral-swa", "tiny-mixtral-bf16", "tiny-qwen2-moe", "tiny-qwen3-moe",
             "tiny-olmoe", "tiny-deepseek-v3", "tiny-deepseek-v2", "tiny-gpt-oss", "tiny-gpt-oss-mxfp4",
             "tiny-deepseek", "tiny-deepseek-freq2", "tiny-deepseek-v3-fp8", *BIAS_ROUTED, *LLAMA4, *QWEN3_NEXT]
    gen_mixtral_family(out)
    gen_qwen2(out)
    gen_qwen3(out)
    gen_olmoe(out)
    gen_deepseek(out, "tiny-deepseek-v3")
    gen_deepseek(out, "tiny-deepseek-v2")
    gen_gpt_oss(out)
    gen_gpt_oss_mxfp4(out)
    gen_deepseek_moe(out, "tiny-deepseek")
    gen_deepseek_moe(out, "tiny-deepseek-freq2")
    gen_deepseek_v3_fp8(out, "tiny-deepseek-v3-fp8")
    for name in BIAS_ROUTED:
        gen_bias_routed(out, name)
    for name in LLAMA4:
        gen_llama4(out, name)
    for name in QWEN3_NEXT:
        gen_qwen3_next(out, name)
    if not args.skip_tf4:
        gen_tf4(out, args.tf4_path)
        names.append("tiny-qwen3-moe-tf4")
    finish_tokenizer(out, names)
    write_readme(out)
    summary(out)


if __name__ == "__main__":
    main()
