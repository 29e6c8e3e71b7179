#!/usr/bin/env python3
"""Check `xtask eval` against transformers' own loss on random checkpoints it has never seen.

VALIDATION ONLY. This script is not part of the test path: neither `cargo test` nor `.ci/run`
runs it, and nothing it writes is committed. It needs torch and transformers 5.x (the venv the
fixtures were generated with, see scripts/requirements-fixtures.txt) and, for the checkpoints
saved by transformers 4.x, transformers 4.57.1 installed with
``pip install --target /opt/tf4 transformers==4.57.1`` (``--tf4-path``; ``--no-tf4`` skips them).

What it checks: for every supported ``model_type`` (mixtral, qwen2_moe, qwen3_moe, olmoe,
deepseek_v3, deepseek_v2, gpt_oss, glm4_moe, minimax_m2, ernie4_5_moe, llama4_text, llama4, qwen3_next;
``--model-types`` picks some) it builds ``--count`` tiny random checkpoints in a fresh temporary directory, with configs
and weights drawn from ``--seed`` (default: time-based; printed, so any failure can be
reproduced with ``--seed N``). The draws vary hidden size,
layers, experts, top-k, GQA ratio, explicit head_dim (qwen3_moe always, mixtral sometimes),
norm_topk_prob, decoder_sparse_step / mlp_only_layers, shared-expert width, qkv / attention
biases, clip_qkv (sometimes None), tied embeddings, mixtral's sliding window (shorter than the
sequences), rope theta and rms eps. The weights are initialised wide (initializer_range 0.1-0.3,
RMSNorm weights 1 + 0.3 randn, all attention biases 0.5 randn) so the logits are far from uniform.

deepseek_v3 / deepseek_v2 / gpt_oss are drawn in the 5.x config style (``rope_parameters``:
default or YaRN with factor, original_max_position_embeddings, beta_fast / beta_slow and, for
DeepSeek, mscale / mscale_all_dim; gpt_oss also truncate) and saved by transformers 5.x only.
DeepSeek draws MLA attention (q_lora_rank None or a rank, kv_lora_rank, qk_nope / qk_rope / v head
dims), first_k_dense_replace 0-2, n_shared_experts 0-2 (0: a zero-width shared MLP),
routed_scaling_factor and attention biases; deepseek_v3 adds group-limited sigmoid routing
(n_group / topk_group, >= 2 experts per group), norm_topk_prob, rope_interleave and a random
e_score_correction_bias (init leaves it 0); deepseek_v2 draws topk_method greedy or
group_limited_greedy (norm_topk_prob stays False: transformers' V2 router ignores it). gpt_oss
draws explicit head_dim, GQA, a mix of sliding / full layer_types (window shorter than the
sequences), attention biases, swiglu_limit / swiglu_alpha, and random attention sinks (1.0 randn)
and router / expert biases (0.5 randn). gpt_oss is saved in f32 or bf16 only (an f16 plan becomes
bf16). For these types the printed line also reports how much the loss moves with
e_score_correction_bias zeroed, sinks removed, expert biases zeroed, swiglu_limit lifted and the
sliding window widened, which shows the features matter.

glm4_moe / minimax_m2 / ernie4_5_moe are 5.x-only too, with default RoPE (random theta) and a random
e_score_correction_bias (init leaves it 0; std 0.25 / 0.2 / 0.05, as the parity fixtures), whose removal the
printed line reports. glm4_moe draws hidden / layers / experts / top-k and group-limited sigmoid routing as
deepseek_v3 (n_group 1-4, >= 2 experts per group), first_k_dense_replace 0-2, n_shared_experts 0-2,
norm_topk_prob, routed_scaling_factor, GQA, q/k/v biases (attention_bias), per-head q/k RMSNorm (use_qk_norm),
explicit head_dim sometimes and partial_rotary_factor 0.5 / 0.25 / 1.0 (sometimes left to the config's 0.5;
always an even rotary width). minimax_m2 draws experts, top-k, GQA, an explicit head_dim (the config default is
128) and partial RoPE as ``rotary_dim`` (even, <= head_dim; the released-checkpoint key) or as
``rope_parameters.partial_rotary_factor``; its e_score_correction_bias sits on the MoE block. ernie4_5_moe draws
moe_num_experts / moe_k, moe_num_shared_experts 0-2, the MoE layers (moe_layer_start_index 0-1,
moe_layer_interval 1-2, moe_layer_end_index a layer or omitted: then config.json has it deleted, -1 or the
resolved last layer), use_bias (every bias 0.5 randn, lm_head.bias included), tied embeddings, sometimes a
moe_norm_min floor (0.2-0.8) and a moe_statics.e_score_correction_bias of shape [1, E].

llama4_text / llama4 / qwen3_next are 5.x-only as well. llama4_text (Llama4ForCausalLM) draws GQA with an explicit
head_dim (the config default is 128), 2-6 layers, num_local_experts 4-16, top-k 1-2, the MoE layers as
interleave_moe_layer_step 1-2 or an explicit moe_layers list, intermediate_size (routed and shared expert width) and
intermediate_size_mlp (dense layers), no_rope_layers (a 0/1 list with both kinds, 1 = the layer uses RoPE, or empty:
transformers' every-4th-layer NoPE default), attention_chunk_size shorter than the sequences (or null: no chunking),
use_qk_norm, attn_temperature_tuning with floor_scale 2-8 (so it acts on short sequences) and attn_scale 0.05-0.3,
attention_bias (q/k/v/o biases 0.5 randn), tied embeddings and default RoPE or llama3 scaling (factor 2-16,
low_freq_factor 1, high_freq_factor 1-4, equal allowed, original_max_position_embeddings 16-64, theta 1e2-1e5, so
frequencies change). config.json sometimes has the resolved layer_types, moe_layers (step draws) or the default
no_rope_layers deleted, as released configs may. llama4 (Llama4ForConditionalGeneration) wraps such a text_config
with a tiny vision tower (hidden 32, 1 layer, 28x28 images in 14x14 patches, projector dims = the text hidden size;
its LayerNorms and biases random) and boi / eoi / image_token_index on the last three ids, which the random ids
avoid; its reference is the text-only loss of the wrapper (input_ids, no pixel_values), computed with the
parity fixtures' llama4_output_fix (transformers 5.24's wrapper forward raises AttributeError on image_outputs) and
checked equal to the AutoModelForCausalLM (Llama4ForCausalLM) load of the same directory. qwen3_next
(Qwen3NextForCausalLM) draws hidden, 2-6 layers mixing linear_attention (Gated DeltaNet) and full_attention as
layer_types or full_attention_interval (config.json then sometimes has the released key instead of layer_types), GQA
with an explicit head_dim (default 256), partial_rotary_factor 0.25-1.0 with an even rotary width (or left to the
0.25 default, sometimes deleted from config.json), linear_num_key_heads 1-4, linear_num_value_heads 1-3x that,
linear key / value head dims, linear_conv_kernel_dim 2-4, num_experts 4-16, top-k, norm_topk_prob,
moe_intermediate_size, shared_expert_intermediate_size (0 sometimes), decoder_sparse_step / mlp_only_layers,
attention_bias; A_log (-1 + 0.5 randn), dt_bias (0.5 randn), conv1d weights (0.5 randn), the gated norm weight
(1 + 0.3 randn) and the zero-centred RMSNorm weights (0.3 randn) are random. The printed line reports the loss moved
by switching off chunking, temperature tuning and llama3 scaling (llama4_text / llama4) or by the DeltaNet conv made
the identity and the shared-expert gate zeroed (qwen3_next).

Each checkpoint is written by ``save_pretrained`` in one of f32 / bf16 / f16, as one file or
sharded (small ``max_shard_size``), and by transformers 5.x or 4.57.1 (a subprocess with
``PYTHONPATH=<tf4-path>``, so config.json has the 4.x key style). The reference is
``model(ids, labels=ids).loss`` of the model reloaded from disk with ``dtype=torch.float32``
(bf16 / f16 weights upcast), eager attention (and eager experts on 5.x), computed by the
transformers version that saved it, on random ids (``--batch`` x ``--seq-len``, equal length).
Then ``xtask eval --model DIR --ids IDS --json OUT`` runs on the same ids and its perplexity must
match ``exp(loss)`` to a relative ``--tol`` (default 1e-4). A table is printed; the exit status is
non-zero if any checkpoint fails.

    cargo build -p xtask
    /opt/ref-venv/bin/python scripts/check_unseen_checkpoints.py [--seed N] [--count 2] \
        [--model-types glm4_moe minimax_m2 ...] [--xtask PATH]

``--xtask`` (default target/debug/xtask) names a prebuilt xtask binary.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

torch.set_num_threads(2)
# n_shared_experts = 0 gives deepseek a zero-width shared-expert MLP, which torch warns about.
warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
# llama4: model.to(save dtype) casts every buffer, the vision tower's complex RoPE table (freqs_ci: not saved, rebuilt on
# load and unused by the text-only reference) included, which torch warns about.
warnings.filterwarnings("ignore", message="Casting complex values to real discards the imaginary part")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()

TF_MAJOR = int(transformers.__version__.split(".")[0])
TF4_VERSION = "4.57.1"
MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss",
               "glm4_moe", "minimax_m2", "ernie4_5_moe", "llama4_text", "llama4", "qwen3_next")
# Drawn in the 5.x config style (rope_parameters) and saved by transformers 5.x only.
TF5_ONLY = ("deepseek_v3", "deepseek_v2", "gpt_oss", "glm4_moe", "minimax_m2", "ernie4_5_moe", "llama4_text", "llama4",
            "qwen3_next")
DTYPES = ("float32", "bfloat16", "float16")
# gpt_oss checkpoints are bf16 (or f32): an f16 save plan is saved as bf16 instead.
NO_F16 = ("gpt_oss",)
DISK_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
NORM_STD = 0.3
BIAS_STD = 0.5
SINK_STD = 1.0  # gpt_oss attention sinks (init: initializer_range randn)
E_BIAS_STD = 0.25  # deepseek_v3 e_score_correction_bias (init: zeros; the sigmoid scores are in (0, 1))
# e_score_correction_bias std of the other correction-bias routers (init: zeros), as the parity fixtures
# (scripts/gen_parity_fixtures.py): sigmoid scores for glm4_moe / minimax_m2; ernie4_5_moe adds its bias to
# softmax probabilities over all experts (~1/E each), so a smaller bias changes some, not all, selections.
E_BIAS_STD_BY_TYPE = {"deepseek_v3": E_BIAS_STD, "glm4_moe": E_BIAS_STD, "minimax_m2": 0.2, "ernie4_5_moe": 0.05}
# qwen3_next's Gated DeltaNet, as the parity fixtures (scripts/gen_parity_fixtures.py): A_log = -1 + 0.5 randn
# (exp(g) keeps some memory), dt_bias 0.5 randn (1 at init), conv1d.weight 0.5 randn (SiLU after it far from linear).
QWEN3_NEXT_A_LOG = (-1.0, 0.5)
QWEN3_NEXT_DT_BIAS_STD = 0.5
QWEN3_NEXT_CONV_STD = 0.5
# The multimodal llama4 wrapper's vision tower (unused by the text-only reference), as the parity fixtures' tiny-llama4:
# 28x28 images, 2x2 patches of 14 (+ a class token), pixel_shuffle_ratio 0.5 -> 1 image token per image. The
# projector dims are set to the drawn text hidden size.
LLAMA4_VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=28,
                     patch_size=14, pixel_shuffle_ratio=0.5, initializer_range=0.2,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0))
REPO = Path(__file__).resolve().parent.parent


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Random configs
# --------------------------------------------------------------------------------------------


def sig(x: float, digits: int = 3) -> float:
    """Round to a few significant digits (keeps config.json readable)."""
    return float(f"{x:.{digits}g}")


def draw_config(rng: random.Random, model_type: str, seq_len: int, tf4: bool) -> dict:
    """Config kwargs (valid for transformers 4.57 and 5.x) for one random checkpoint."""
    if model_type in ("deepseek_v3", "deepseek_v2"):
        return draw_deepseek_config(rng, model_type)
    if model_type == "gpt_oss":
        return draw_gpt_oss_config(rng, seq_len)
    if model_type == "glm4_moe":
        return draw_glm4_moe_config(rng)
    if model_type == "minimax_m2":
        return draw_minimax_m2_config(rng)
    if model_type == "ernie4_5_moe":
        return draw_ernie4_5_moe_config(rng)
    if model_type == "llama4_text":
        return draw_llama4_text_config(rng, seq_len)
    if model_type == "llama4":
        return draw_llama4_config(rng, seq_len)
    if model_type == "qwen3_next":
        return draw_qwen3_next_config(rng)
    # Attention shape: kv heads x GQA ratio, head width, hidden size in 32..96.
    while True:
        n_kv = rng.choice([1, 2, 4])
        ratio = rng.choice([1, 2, 4])
        n_heads = n_kv * ratio
        if n_heads > 8:
            continue
        if model_type == "qwen3_moe":
            hidden = rng.randrange(32, 97, 8)
            head_dim = rng.choice([8, 12, 16, 20, 24, 32])
            if hidden % n_heads == 0 and head_dim == hidden // n_heads:
                continue  # head_dim must really be explicit
            explicit_head_dim = True
        else:
            head_dim = rng.choice([8, 12, 16, 24])
            hidden = n_heads * head_dim
            explicit_head_dim = False
            if model_type == "mixtral" and rng.random() < 0.35:
                # mixtral also honours an explicit head_dim != hidden / heads
                hidden = rng.randrange(32, 97, 8)
                head_dim = rng.choice([d for d in (8, 12, 16, 20, 24) if n_heads * d != hidden])
                explicit_head_dim = True
        if 32 <= hidden <= 96:
            break

    n_layers = rng.randint(2, 4)
    n_experts = rng.randint(4, 16)
    top_k = rng.randint(1, min(4, n_experts))
    vocab = rng.randint(160, 512)
    c = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        num_experts_per_tok=top_k,
        max_position_embeddings=rng.choice([128, 512, 2048, 4096]),
        initializer_range=sig(rng.uniform(0.1, 0.3)),
        rms_norm_eps=rng.choice([1e-6, 1e-5, 3e-5, 1e-4, 1e-3]),
        rope_theta=sig(10 ** rng.uniform(2.0, 6.5)),
        tie_word_embeddings=rng.random() < 0.35,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        hidden_act="silu",
    )
    if explicit_head_dim:
        c["head_dim"] = head_dim

    if model_type == "mixtral":
        c.update(
            intermediate_size=rng.randrange(16, 97, 8),
            num_local_experts=n_experts,
            sliding_window=rng.randint(2, seq_len - 2) if rng.random() < 0.5 else None,
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        step = rng.choice([1, 1, 2, 3])
        while True:
            mlp_only = sorted(i for i in range(n_layers) if rng.random() < 0.25)
            moe = [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]
            if moe:
                break
            step = 1
        c.update(
            intermediate_size=rng.randrange(16, 129, 8),  # dense layers
            moe_intermediate_size=rng.randrange(8, 65, 8),
            num_experts=n_experts,
            decoder_sparse_step=step,
            mlp_only_layers=mlp_only,
            norm_topk_prob=rng.random() < 0.5,
            use_sliding_window=False,
        )
        if model_type == "qwen2_moe":
            c["shared_expert_intermediate_size"] = rng.randrange(8, 129, 8)
            # 4.x hard-codes q/k/v biases; `qkv_bias` is a 5.x option.
            if not tf4:
                c["qkv_bias"] = rng.random() < 0.75
        else:
            c["attention_bias"] = rng.random() < 0.35
    elif model_type == "olmoe":
        c.update(
            intermediate_size=rng.randrange(16, 97, 8),
            num_experts=n_experts,
            norm_topk_prob=rng.random() < 0.5,
            clip_qkv=None if rng.random() < 0.35 else sig(rng.uniform(0.5, 4.0), 2),
            attention_bias=rng.random() < 0.35,
        )
    else:
        raise ValueError(model_type)
    return c


def draw_rope(rng: random.Random, *, gpt_oss: bool = False) -> tuple[dict, int]:
    """5.x-style rope_parameters (default or YaRN) and a matching max_position_embeddings."""
    theta = sig(10 ** rng.uniform(2.0, 6.5))
    if rng.random() < 0.4:
        return {"rope_type": "default", "rope_theta": theta}, rng.choice([128, 512, 2048, 4096])
    # YaRN; max_position_embeddings = factor x original (what transformers' validation expects).
    original = rng.choice([8, 16, 32, 64, 128])
    factor = float(rng.choice([2, 4, 8, 16, 32, 40]))
    rp = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
          "original_max_position_embeddings": original}
    if rng.random() < 0.7:
        rp["beta_fast"] = float(rng.choice([4, 8, 16, 32]))
        rp["beta_slow"] = float(rng.choice([0.5, 1, 2]))
    if gpt_oss:
        rp["truncate"] = rng.random() < 0.5
    else:
        # DeepSeek: mscale / mscale_all_dim scale the cos/sin (their ratio) and the softmax (mscale_all_dim).
        u = rng.random()
        if u < 0.3:
            rp["mscale"] = rp["mscale_all_dim"] = sig(rng.uniform(0.5, 1.5), 2)  # as DeepSeek-V3 (1.0, 1.0)
        elif u < 0.7:
            rp["mscale"] = sig(rng.uniform(0.5, 1.5), 2)
            rp["mscale_all_dim"] = sig(rng.uniform(0.5, 1.5), 2)
        elif u < 0.85:
            rp["mscale"] = sig(rng.uniform(0.5, 1.5), 2)  # mscale alone: attention factor from factor only
    return rp, int(original * factor)


def draw_deepseek_config(rng: random.Random, model_type: str) -> dict:
    """DeepSeek-V3 / V2 (MLA attention, routed + shared experts, dense first layers), 5.x style."""
    n_heads = rng.choice([1, 2, 3, 4, 6, 8])
    hidden = rng.randrange(32, 97, 8)
    if model_type == "deepseek_v2":
        while hidden % n_heads:  # DeepseekV2Config.validate_architecture
            hidden = rng.randrange(32, 97, 8)
    n_layers = rng.randint(2, 4)
    rope, max_pos = draw_rope(rng)
    c = dict(
        vocab_size=rng.randint(160, 512),
        hidden_size=hidden,
        intermediate_size=rng.randrange(16, 129, 8),  # dense layers
        moe_intermediate_size=rng.randrange(8, 65, 8),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,  # MLA: kv_b_proj expands to every head
        q_lora_rank=None if rng.random() < 0.4 else rng.randrange(8, 49, 8),
        kv_lora_rank=rng.randrange(8, 49, 8),
        qk_nope_head_dim=rng.choice([4, 8, 12, 16, 24]),
        qk_rope_head_dim=rng.choice([4, 8, 12, 16]),
        v_head_dim=rng.choice([4, 8, 12, 16, 24]),
        first_k_dense_replace=rng.randint(0, min(2, n_layers - 1)),
        n_shared_experts=rng.randint(0, 2),
        routed_scaling_factor=sig(rng.uniform(0.5, 3.0)),
        attention_bias=rng.random() < 0.3,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
        initializer_range=sig(rng.uniform(0.1, 0.3)),
        rms_norm_eps=rng.choice([1e-6, 1e-5, 3e-5, 1e-4, 1e-3]),
        tie_word_embeddings=rng.random() < 0.35,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        hidden_act="silu",
    )
    if model_type == "deepseek_v3":
        # Group-limited routing on sigmoid scores + e_score_correction_bias: groups are ranked by
        # the sum of their top-2 scores, so every group needs at least 2 experts.
        n_group = rng.choice([1, 2, 3, 4])
        per_group = rng.randint(2, max(2, 16 // n_group))
        topk_group = rng.randint(1, n_group)
        c.update(
            n_routed_experts=n_group * per_group,
            n_group=n_group,
            topk_group=topk_group,
            num_experts_per_tok=rng.randint(1, min(6, topk_group * per_group)),
            norm_topk_prob=rng.random() < 0.5,
            rope_interleave=rng.random() < 0.5,
        )
    else:
        # transformers' DeepseekV2 router ignores norm_topk_prob (left False, as in the released models).
        if rng.random() < 0.5:
            n_experts = rng.randint(4, 16)
            c.update(topk_method="greedy", n_routed_experts=n_experts,
                     num_experts_per_tok=rng.randint(1, min(4, n_experts)))
        else:
            n_group = rng.choice([2, 3, 4])
            per_group = rng.randint(1, 16 // n_group)
            topk_group = rng.randint(1, n_group)
            c.update(topk_method="group_limited_greedy", n_routed_experts=n_group * per_group,
                     n_group=n_group, topk_group=topk_group,
                     num_experts_per_tok=rng.randint(1, min(4, topk_group * per_group)))
    return c


def draw_gpt_oss_config(rng: random.Random, seq_len: int) -> dict:
    """gpt-oss (sinks, biased experts with clamped SwiGLU, sliding/full layers), 5.x style."""
    while True:
        n_kv = rng.choice([1, 2, 4])
        n_heads = n_kv * rng.choice([1, 2, 4])
        if n_heads <= 8:
            break
    n_layers = rng.randint(2, 4)
    while True:
        layer_types = [rng.choice(["sliding_attention", "full_attention"]) for _ in range(n_layers)]
        if len(set(layer_types)) == 2:
            break
    n_experts = rng.randint(4, 16)
    rope, max_pos = draw_rope(rng, gpt_oss=True)
    return dict(
        vocab_size=rng.randint(160, 512),
        hidden_size=rng.randrange(32, 97, 8),
        head_dim=rng.choice([8, 12, 16, 20, 24, 32]),  # explicit, independent of hidden / heads
        intermediate_size=rng.randrange(16, 97, 8),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        num_local_experts=n_experts,
        num_experts_per_tok=rng.randint(1, min(4, n_experts)),
        sliding_window=rng.randint(2, seq_len - 2),
        layer_types=layer_types,
        attention_bias=rng.random() < 0.7,
        swiglu_limit=sig(rng.uniform(0.3, 4.0), 2),
        swiglu_alpha=sig(rng.uniform(1.0, 2.5), 3),
        max_position_embeddings=max_pos,
        rope_parameters=rope,
        initializer_range=sig(rng.uniform(0.1, 0.3)),
        rms_norm_eps=rng.choice([1e-6, 1e-5, 3e-5, 1e-4, 1e-3]),
        tie_word_embeddings=rng.random() < 0.35,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        hidden_act="silu",
    )


def draw_gqa(rng: random.Random) -> tuple[int, int]:
    """(num_attention_heads, num_key_value_heads): kv heads x GQA ratio, at most 8 heads."""
    while True:
        n_kv = rng.choice([1, 2, 4])
        n_heads = n_kv * rng.choice([1, 2, 4])
        if n_heads <= 8:
            return n_heads, n_kv


def common_tail(rng: random.Random) -> dict:
    """The keys every 5.x-style draw of the newer types shares (default RoPE, random theta)."""
    return dict(
        max_position_embeddings=rng.choice([128, 512, 2048, 4096]),
        initializer_range=sig(rng.uniform(0.1, 0.3)),
        rms_norm_eps=rng.choice([1e-6, 1e-5, 3e-5, 1e-4, 1e-3]),
        tie_word_embeddings=rng.random() < 0.35,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        hidden_act="silu",
    )


def draw_glm4_moe_config(rng: random.Random) -> dict:
    """GLM-4.5 (glm4_moe): GQA with optional q/k/v biases and per-head q/k RMSNorm, partial rotate-half RoPE,
    dense first layers, shared experts, DeepSeek-V3-style group-limited sigmoid routing with
    e_score_correction_bias, 5.x style."""
    while True:
        n_heads, n_kv = draw_gqa(rng)
        hidden = rng.randrange(32, 97, 8)
        if rng.random() < 0.4:
            head_dim = rng.choice([8, 12, 16, 20, 24, 32])
            if hidden % n_heads == 0 and head_dim == hidden // n_heads:
                continue  # head_dim must really be explicit
            explicit_head_dim = True
        else:
            if hidden % n_heads:
                continue
            head_dim = hidden // n_heads
            explicit_head_dim = False
        # transformers: rotary width int(head_dim * partial_rotary_factor); keep it even and non-zero
        factors = [f for f in (0.5, 0.25, 1.0) if int(head_dim * f) == head_dim * f and int(head_dim * f) % 2 == 0
                   and int(head_dim * f) >= 2]
        if factors:
            break
    n_layers = rng.randint(2, 4)
    # Group-limited routing as deepseek_v3 (groups ranked by the sum of their top-2 scores: >= 2 experts each).
    n_group = rng.choice([1, 1, 2, 3, 4])
    per_group = rng.randint(2, max(2, 16 // n_group))
    topk_group = rng.randint(1, n_group)
    rope = {"rope_type": "default", "rope_theta": sig(10 ** rng.uniform(2.0, 6.5))}
    if 0.5 not in factors or rng.random() < 0.8:
        rope["partial_rotary_factor"] = rng.choice(factors)
    # else: left out, and Glm4MoeConfig writes its default (0.5) into rope_parameters
    c = dict(
        vocab_size=rng.randint(160, 512),
        hidden_size=hidden,
        intermediate_size=rng.randrange(16, 129, 8),  # dense layers
        moe_intermediate_size=rng.randrange(8, 65, 8),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        first_k_dense_replace=rng.randint(0, min(2, n_layers - 1)),
        n_shared_experts=rng.randint(0, 2),
        n_routed_experts=n_group * per_group,
        n_group=n_group,
        topk_group=topk_group,
        # top_k < E: with every expert chosen the correction bias could not change anything
        num_experts_per_tok=rng.randint(1, min(6, topk_group * per_group, n_group * per_group - 1)),
        norm_topk_prob=rng.random() < 0.5,
        routed_scaling_factor=sig(rng.uniform(0.5, 3.0)),
        attention_bias=rng.random() < 0.5,
        use_qk_norm=rng.random() < 0.5,
        rope_parameters=rope,
        **common_tail(rng),
    )
    if explicit_head_dim:
        c["head_dim"] = head_dim
    return c


def draw_minimax_m2_config(rng: random.Random) -> dict:
    """MiniMax-M2 (minimax_m2): every layer MoE, GQA, explicit head_dim, q/k RMSNorm over the whole
    projection, partial RoPE (rotary_dim or rope_parameters.partial_rotary_factor), sigmoid routing with a
    block-level e_score_correction_bias, 5.x style."""
    n_heads, n_kv = draw_gqa(rng)
    hidden = rng.randrange(32, 97, 8)
    head_dim = rng.choice([8, 12, 16, 20, 24, 32])  # always explicit (the config default is 128)
    n_experts = rng.randint(4, 16)
    rope = {"rope_type": "default", "rope_theta": sig(10 ** rng.uniform(2.0, 6.5))}
    c = dict(
        vocab_size=rng.randint(160, 512),
        hidden_size=hidden,
        head_dim=head_dim,
        intermediate_size=rng.randrange(8, 65, 8),  # expert width
        num_hidden_layers=rng.randint(2, 4),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        num_local_experts=n_experts,
        num_experts_per_tok=rng.randint(1, min(4, n_experts - 1)),  # < E: else the correction bias is moot
        rope_parameters=rope,
        **common_tail(rng),
    )
    if rng.random() < 0.6:
        # The released-checkpoint key; the config turns it into partial_rotary_factor = rotary_dim / head_dim
        # and transformers rotates int(head_dim * that) dims: keep only the widths that survive the round trip.
        widths = [r for r in range(2, head_dim + 1, 2) if int(head_dim * (r / head_dim)) == r]
        c["rotary_dim"] = rng.choice(widths)
    else:
        factors = [f for f in (0.25, 0.5, 0.75, 1.0) if (head_dim * f).is_integer() and int(head_dim * f) % 2 == 0]
        rope["partial_rotary_factor"] = rng.choice(factors)
    return c


def draw_ernie4_5_moe_config(rng: random.Random) -> dict:
    """ERNIE-4.5 MoE (ernie4_5_moe): GQA, interleaved RoPE, MoE layers from start / interval / end index,
    shared experts, softmax routing with moe_statics.e_score_correction_bias, optional biases everywhere
    (use_bias, lm_head too), 5.x style."""
    while True:
        n_heads, n_kv = draw_gqa(rng)
        hidden = rng.randrange(32, 97, 8)
        if hidden % n_heads == 0 and (hidden // n_heads) % 2 == 0:
            break
    n_layers = rng.randint(2, 4)
    n_experts = rng.randint(4, 16)
    while True:
        start = rng.randint(0, 1)
        interval = rng.randint(1, 2)
        end = None if rng.random() < 0.5 else rng.randint(start, n_layers - 1)
        last = n_layers - 1 if end is None else end
        moe = [i for i in range(n_layers) if (i + 1) % interval == 0 and start <= i <= last]
        if moe:
            break
    c = dict(
        vocab_size=rng.randint(160, 512),
        hidden_size=hidden,
        intermediate_size=rng.randrange(16, 129, 8),  # dense layers
        moe_intermediate_size=rng.randrange(8, 65, 8),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        moe_num_experts=n_experts,
        moe_k=rng.randint(1, min(4, n_experts - 1)),  # < E: else the correction bias is moot
        moe_num_shared_experts=rng.randint(0, 2),
        moe_layer_start_index=start,
        moe_layer_interval=interval,
        use_bias=rng.random() < 0.5,
        rope_parameters={"rope_type": "default", "rope_theta": sig(10 ** rng.uniform(2.0, 6.5))},
        **common_tail(rng),
    )
    c["tie_word_embeddings"] = rng.random() < 0.5  # ernie's default is tied
    if end is not None:
        c["moe_layer_end_index"] = end
    if rng.random() < 0.3:
        # Renormalisation w / max(sum w, moe_norm_min) (default 1e-12): a floor above some top-k sums.
        c["moe_norm_min"] = sig(rng.uniform(0.2, 0.8), 2)
    return c


def draw_llama4_text_config(rng: random.Random, seq_len: int) -> dict:
    """Llama 4 text model (llama4_text): GQA with an explicit head_dim, RoPE (interleaved pairs, default or llama3
    scaling) + weightless L2 q/k norm + chunked attention on the RoPE layers, NoPE layers with attention temperature
    tuning, MoE layers (interleave_moe_layer_step or a moe_layers list) with sigmoid-of-logit weights on the expert
    input and an always-on shared expert, dense layers of intermediate_size_mlp, 5.x style."""
    n_heads, n_kv = draw_gqa(rng)
    n_layers = rng.randint(2, 6)
    n_experts = rng.randint(4, 16)
    c = dict(
        vocab_size=rng.randint(160, 512),
        hidden_size=rng.randrange(32, 97, 8),
        head_dim=rng.choice([8, 12, 16, 20, 24, 32]),  # always explicit (the config default is 128); even (RoPE pairs)
        intermediate_size=rng.randrange(8, 65, 8),  # routed and shared expert width
        intermediate_size_mlp=rng.randrange(16, 129, 8),  # dense layers
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        num_local_experts=n_experts,
        num_experts_per_tok=rng.randint(1, 2),
    )
    if rng.random() < 0.3:
        while True:
            moe = [i for i in range(n_layers) if rng.random() < 0.5]
            if moe:
                break
        c["moe_layers"] = moe
    else:
        c["interleave_moe_layer_step"] = rng.randint(1, 2)  # transformers derives moe_layers (step-1, 2*step-1, ...)
    if rng.random() < 0.3:
        c["no_rope_layers"] = []  # empty: transformers' default, every 4th layer NoPE (no_rope_layer_interval)
    else:
        while True:  # transformers' convention: 1 = the layer USES RoPE; both kinds present
            nrl = [int(rng.random() < 0.6) for _ in range(n_layers)]
            if len(set(nrl)) == 2:
                break
        c["no_rope_layers"] = nrl
    # chunked attention on the RoPE layers, chunks shorter than the sequences; null: every layer full causal
    c["attention_chunk_size"] = None if rng.random() < 0.25 else rng.randint(2, seq_len - 2)
    c.update(
        use_qk_norm=rng.random() < 0.6,
        attn_temperature_tuning=rng.random() < 0.7,
        floor_scale=rng.randint(2, 8),  # default 8192: the temperature would be 1 at every short-sequence position
        attn_scale=sig(rng.uniform(0.05, 0.3), 2),
        attention_bias=rng.random() < 0.35,
    )
    tail = common_tail(rng)
    if rng.random() < 0.6:
        # llama3 scaling with a small original context: low-frequency dims divided by factor, some smoothed
        original = rng.choice([16, 32, 64])
        factor = float(rng.choice([2, 4, 8, 16]))
        rope = {"rope_type": "llama3", "rope_theta": sig(10 ** rng.uniform(2.0, 5.0)), "factor": factor,
                "low_freq_factor": 1.0, "high_freq_factor": float(rng.choice([1, 2, 4])),
                "original_max_position_embeddings": original}
        tail["max_position_embeddings"] = int(original * factor)
    else:
        rope = {"rope_type": "default", "rope_theta": sig(10 ** rng.uniform(2.0, 6.5))}
    c["rope_parameters"] = rope
    c.update(tail)
    return c


def draw_llama4_config(rng: random.Random, seq_len: int) -> dict:
    """The multimodal Llama 4 wrapper (llama4, Llama4ForConditionalGeneration): a drawn llama4_text text_config, a
    tiny vision tower (projector dims = the text hidden size) and the image special tokens on the last three ids."""
    text = draw_llama4_text_config(rng, seq_len)
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    vision = dict(LLAMA4_VISION, rope_parameters=dict(LLAMA4_VISION["rope_parameters"]),
                  projector_input_dim=hidden, projector_output_dim=hidden, vision_output_dim=hidden)
    return dict(text_config=text, vision_config=vision, boi_token_index=vocab - 3, eoi_token_index=vocab - 2,
                image_token_index=vocab - 1, tie_word_embeddings=text["tie_word_embeddings"])


def draw_qwen3_next_config(rng: random.Random) -> dict:
    """Qwen3-Next (qwen3_next): Gated DeltaNet (linear_attention) and gated full-attention layers (layer_types or
    full_attention_interval), per-head zero-centred q/k norm, partial RoPE, Qwen2-MoE-style MoE with a sigmoid-gated
    shared expert (width 0 sometimes), decoder_sparse_step / mlp_only_layers, 5.x style."""
    n_heads, n_kv = draw_gqa(rng)
    head_dim = rng.choice([8, 12, 16, 20, 24, 32])  # always explicit (the config default is 256)
    # transformers rotates int(head_dim * partial_rotary_factor) dims (rotate-half): keep it even
    factors = [f for f in (0.25, 0.5, 0.75, 1.0) if (head_dim * f).is_integer() and int(head_dim * f) % 2 == 0]
    n_layers = rng.randint(2, 6)
    interval, layer_types = None, None
    if rng.random() < 0.5:
        interval = rng.randint(2, n_layers)  # layers interval-1, 2*interval-1, ... full; the rest linear
    else:
        while True:
            layer_types = [rng.choice(["linear_attention", "full_attention"]) for _ in range(n_layers)]
            if len(set(layer_types)) == 2:
                break
    n_experts = rng.randint(4, 16)
    step, mlp_only = 1, []
    if rng.random() < 0.4:
        step = rng.choice([1, 2, 3])
        while True:
            mlp_only = sorted(i for i in range(n_layers) if rng.random() < 0.25)
            if [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]:
                break
            step = 1
    n_k = rng.randint(1, 4)
    rope = {"rope_type": "default", "rope_theta": sig(10 ** rng.uniform(2.0, 6.5))}
    if 0.25 not in factors or rng.random() < 0.75:
        rope["partial_rotary_factor"] = rng.choice(factors)
    # else: left out, and Qwen3NextConfig writes its default (0.25) into rope_parameters
    c = dict(
        vocab_size=rng.randint(160, 512),
        hidden_size=rng.randrange(32, 97, 8),
        head_dim=head_dim,
        intermediate_size=rng.randrange(16, 129, 8),  # dense layers
        moe_intermediate_size=rng.randrange(8, 65, 8),
        shared_expert_intermediate_size=0 if rng.random() < 0.2 else rng.randrange(8, 129, 8),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        num_experts=n_experts,
        num_experts_per_tok=rng.randint(1, min(4, n_experts)),
        norm_topk_prob=rng.random() < 0.6,
        decoder_sparse_step=step,
        mlp_only_layers=mlp_only,
        linear_num_key_heads=n_k,
        linear_num_value_heads=n_k * rng.choice([1, 2, 3]),
        linear_key_head_dim=rng.choice([8, 12, 16, 24, 32]),
        linear_value_head_dim=rng.choice([8, 12, 16, 24]),
        linear_conv_kernel_dim=rng.randint(2, 4),
        attention_bias=rng.random() < 0.3,
        rope_parameters=rope,
        **common_tail(rng),
    )
    if interval is not None:
        c["full_attention_interval"] = interval
    else:
        c["layer_types"] = layer_types
    return c


def draw_llama4_text_edits(rng: random.Random, text: dict, prefix: str) -> dict:
    """config.json keys transformers resolves on save that released Llama 4 configs may lack: the derived
    layer_types, moe_layers (from interleave_moe_layer_step) and the default no_rope_layers (drawn empty)."""
    edits = {}
    if rng.random() < 0.4:
        edits[prefix + "layer_types"] = None
    if "moe_layers" not in text and rng.random() < 0.5:
        edits[prefix + "moe_layers"] = None
    if text.get("no_rope_layers") == [] and rng.random() < 0.5:
        edits[prefix + "no_rope_layers"] = None
    return edits


def draw_config_json_edits(rng: random.Random, model_type: str, config: dict) -> dict:
    """Keys to rewrite in the saved config.json (None: delete), applied before the reference reloads it.

    Ernie4_5_MoeConfig resolves an omitted (or -1) moe_layer_end_index to the last layer and saves the
    resolved index; when the draw omits it, config.json gets it deleted or -1 (or keeps the resolved index).
    llama4_text / llama4 (keys under text_config): the resolved layer_types, moe_layers (step-drawn) and default
    no_rope_layers (drawn empty) sometimes deleted; qwen3_next: full_attention_interval instead of layer_types, and
    an implicit default partial_rotary_factor deleted from rope_parameters. A dotted key is a path into config.json."""
    if model_type == "ernie4_5_moe" and "moe_layer_end_index" not in config:
        return rng.choice([{"moe_layer_end_index": None}, {"moe_layer_end_index": -1}, {}])
    if model_type == "llama4_text":
        return draw_llama4_text_edits(rng, config, "")
    if model_type == "llama4":
        return draw_llama4_text_edits(rng, config["text_config"], "text_config.")
    if model_type == "qwen3_next":
        edits = {}
        if "full_attention_interval" in config and rng.random() < 0.7:
            # the released key: config.json without the derived layer_types (Qwen3-Next-80B-A3B's style)
            edits.update({"layer_types": None, "full_attention_interval": config["full_attention_interval"]})
        if "partial_rotary_factor" not in config["rope_parameters"] and rng.random() < 0.5:
            edits["rope_parameters.partial_rotary_factor"] = None  # the default (0.25) left implicit
        return edits
    return {}


def draw_specs(seed: int, count: int, model_types: list[str], *, batch: int, seq_len: int,
               use_tf4: bool) -> list[dict]:
    rng = random.Random(seed)
    # Save plans (dtype x sharded x saver), shuffled and dealt out so one run mixes them all.
    savers = ["5.x", "4.57.1"] if use_tf4 else ["5.x"]
    plans = [(d, s, v) for d in DTYPES for s in (False, True) for v in savers]
    rng.shuffle(plans)
    specs = []
    k = 0
    for mt in model_types:
        for j in range(count):
            dtype, sharded, saver = plans[k % len(plans)]
            k += 1
            if mt in TF5_ONLY:
                saver = "5.x"
            if mt in NO_F16 and dtype == "float16":
                dtype = "bfloat16"
            tf4 = saver != "5.x"
            config = draw_config(rng, mt, seq_len, tf4)
            specs.append(dict(
                name=f"{mt}-{j}",
                model_type=mt,
                config=config,
                config_json_edits=draw_config_json_edits(rng, mt, config),
                weight_seed=rng.randrange(2**31),
                ids_seed=rng.randrange(2**31),
                dtype=dtype,
                sharded=sharded,
                saver=saver,
                batch=batch,
                seq_len=seq_len,
            ))
    return specs


# --------------------------------------------------------------------------------------------
# Building, saving and the reference loss (runs under transformers 5.x or, as a worker, 4.57.1)
# --------------------------------------------------------------------------------------------


def config_class(model_type: str):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    classes = {"mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig,
               "olmoe": OlmoeConfig}
    if model_type in TF5_ONLY:
        from transformers import (DeepseekV2Config, DeepseekV3Config, Ernie4_5_MoeConfig, Glm4MoeConfig, GptOssConfig,
                                  Llama4Config, Llama4TextConfig, MiniMaxM2Config, Qwen3NextConfig)

        classes.update(deepseek_v3=DeepseekV3Config, deepseek_v2=DeepseekV2Config, gpt_oss=GptOssConfig,
                       glm4_moe=Glm4MoeConfig, minimax_m2=MiniMaxM2Config, ernie4_5_moe=Ernie4_5_MoeConfig,
                       llama4_text=Llama4TextConfig, llama4=Llama4Config, qwen3_next=Qwen3NextConfig)
    return classes[model_type]


def impl_kwargs() -> dict:
    kw = dict(attn_implementation="eager")
    if TF_MAJOR >= 5:
        kw["experts_implementation"] = "eager"
    return kw


def text_config_of(spec: dict) -> dict:
    """The drawn text-model config (the multimodal llama4 wrapper's text_config)."""
    return spec["config"]["text_config"] if spec["model_type"] == "llama4" else spec["config"]


def make_ids(spec: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec["ids_seed"])
    vocab = text_config_of(spec)["vocab_size"]
    if spec["model_type"] == "llama4":
        vocab -= 3  # the last three ids are boi / eoi / image tokens
    return torch.randint(0, vocab, (spec["batch"], spec["seq_len"]), generator=g)


@torch.no_grad()
def perturb(model, seed: int) -> None:
    """RMSNorm weights -> 1 + 0.3 randn; every attention bias -> 0.5 randn (init leaves them 0).

    Also what init leaves zero (or tiny) elsewhere: e_score_correction_bias -> E_BIAS_STD_BY_TYPE randn
    (deepseek_v3 / glm4_moe 0.25, minimax_m2 0.2, ernie4_5_moe 0.05), gpt_oss's expert and router biases
    -> 0.5 randn and its attention sinks -> 1.0 randn, ernie4_5_moe's (use_bias) MLP and lm_head biases
    -> 0.5 randn. qwen3_next: its zero-centred RMSNorms (y = norm(x) * (1 + weight), weight 0 at init) -> 0.3 randn,
    the DeltaNet's A_log -> -1 + 0.5 randn, dt_bias -> 0.5 randn, conv1d.weight -> 0.5 randn and its gated norm's
    (plain) weight -> 1 + 0.3 randn. llama4 (the wrapper): the vision tower's LayerNorms (weight 1 + 0.3 randn, bias
    0.5 randn) and its other Linear biases (0.5 randn).
    """
    g = torch.Generator().manual_seed(seed + 7)
    mt = model.config.model_type
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls.endswith("RMSNorm"):
            centre = 0.0 if mt == "qwen3_next" else 1.0  # qwen3_next: zero-centred, y = norm(x) * (1 + weight)
            mod.weight.copy_(centre + NORM_STD * torch.randn(mod.weight.shape, generator=g))
        if cls == "Qwen3NextRMSNormGated":  # the DeltaNet's gated norm: a plain weight (1 at init)
            mod.weight.copy_(1.0 + NORM_STD * torch.randn(mod.weight.shape, generator=g))
        if cls == "Qwen3NextGatedDeltaNet":
            mu, sd = QWEN3_NEXT_A_LOG
            mod.A_log.copy_(mu + sd * torch.randn(mod.A_log.shape, generator=g))
            mod.dt_bias.copy_(QWEN3_NEXT_DT_BIAS_STD * torch.randn(mod.dt_bias.shape, generator=g))
            mod.conv1d.weight.copy_(QWEN3_NEXT_CONV_STD * torch.randn(mod.conv1d.weight.shape, generator=g))
        if mt == "llama4" and isinstance(mod, torch.nn.LayerNorm):  # vision tower (weight 1, bias 0 at init)
            mod.weight.copy_(1.0 + NORM_STD * torch.randn(mod.weight.shape, generator=g))
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa") \
                and getattr(mod, "bias", None) is not None:
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
        if cls == "DeepseekV3TopkRouter":
            mod.e_score_correction_bias.copy_(E_BIAS_STD * torch.randn(mod.e_score_correction_bias.shape, generator=g))
        if cls in ("Glm4MoeTopkRouter", "MiniMaxM2SparseMoeBlock", "Ernie4_5_MoeStatics"):
            std = E_BIAS_STD_BY_TYPE[mt]
            mod.e_score_correction_bias.copy_(std * torch.randn(mod.e_score_correction_bias.shape, generator=g))
        if mt == "ernie4_5_moe" and isinstance(mod, torch.nn.Linear) and mod.bias is not None \
                and leaf not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            # use_bias: dense / shared-expert MLP biases and lm_head.bias (attention ones are done above)
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
        if cls == "GptOssAttention":
            mod.sinks.copy_(SINK_STD * torch.randn(mod.sinks.shape, generator=g))
        if cls == "GptOssTopKRouter":
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))
        if cls == "GptOssExperts":
            mod.gate_up_proj_bias.copy_(BIAS_STD * torch.randn(mod.gate_up_proj_bias.shape, generator=g))
            mod.down_proj_bias.copy_(BIAS_STD * torch.randn(mod.down_proj_bias.shape, generator=g))
        if mt == "llama4" and isinstance(mod, torch.nn.Linear) and mod.bias is not None \
                and leaf not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mod.bias.copy_(BIAS_STD * torch.randn(mod.bias.shape, generator=g))  # vision fc1 / fc2 (0 at init)


def shard_size(model, dtype: torch.dtype) -> str:
    """A max_shard_size that splits the checkpoint into roughly four shards."""
    nbytes = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    return f"{max(8, nbytes // 4 // 1000)}KB"


def model_class(model_type: str):
    """The class that builds (from_config) / reloads (from_pretrained) the checkpoint: AutoModelForCausalLM, but the
    multimodal llama4 wrapper's Llama4ForConditionalGeneration (an AutoModelForCausalLM load of its directory is the
    text model alone) for llama4."""
    from transformers import AutoModelForCausalLM

    if model_type == "llama4":
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


@contextlib.contextmanager
def llama4_output_fix():
    """As scripts/gen_parity_fixtures.py: transformers 5.24's Llama4ForConditionalGeneration.forward ends with
    ``Llama4CausalLMOutputWithPast(..., image_outputs=outputs.image_outputs, ...)`` where ``outputs`` is the inner
    Llama4ForCausalLM's MoeCausalLMOutputWithPast, which has no ``image_outputs`` field, so EVERY forward raises
    AttributeError. While this is active, MoeCausalLMOutputWithPast has a class attribute ``image_outputs = None``;
    nothing else is touched (the forward is transformers' own)."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast as Out

    patch = not hasattr(Out, "image_outputs")
    if patch:
        Out.image_outputs = None
    try:
        yield patch
    finally:
        if patch:
            del Out.image_outputs


@torch.no_grad()
def new_type_effects(ref, spec: dict, ids: torch.Tensor, loss: float) -> dict:
    """|loss - loss with one feature switched off| for llama4_text / llama4 (chunked attention -> full causal,
    attention temperature tuning off, llama3 RoPE scaling -> plain frequencies) and qwen3_next (the DeltaNet's conv1d
    -> identity on the current token, the shared-expert gate -> sigmoid(0) = 0.5), each restored afterwards."""
    mt = spec["model_type"]
    effects = {}

    def delta() -> float:
        return abs(float(ref(ids, labels=ids).loss) - loss)

    if mt in ("llama4_text", "llama4"):
        lm = ref.language_model if mt == "llama4" else ref
        cfg = lm.model.config
        if "chunked_attention" in cfg.layer_types:
            saved = list(cfg.layer_types)
            cfg.layer_types = ["full_attention"] * len(saved)
            try:
                effects["chunking"] = delta()
            finally:
                cfg.layer_types = saved
        attns = [layer.self_attn for layer in lm.model.layers]
        if cfg.attn_temperature_tuning and any(not a.use_rope for a in attns):
            try:
                for a in attns:
                    a.attn_temperature_tuning = False
                effects["temperature_tuning"] = delta()
            finally:
                for a in attns:
                    a.attn_temperature_tuning = cfg.attn_temperature_tuning
        rp = cfg.rope_parameters
        if rp.get("rope_type") == "llama3" and any(a.use_rope for a in attns):
            rot = lm.model.rotary_emb
            saved = rot.inv_freq.clone()
            d = cfg.head_dim
            try:
                rot.inv_freq.copy_(1.0 / (rp["rope_theta"] ** (torch.arange(0, d, 2).float() / d)))
                effects["llama3_scaling"] = delta()
            finally:
                rot.inv_freq.copy_(saved)
    elif mt == "qwen3_next":
        las = [layer.linear_attn for layer in ref.model.layers if hasattr(layer, "linear_attn")]
        if las:
            saved = [la.conv1d.weight.detach().clone() for la in las]
            try:
                for la in las:
                    la.conv1d.weight.zero_()
                    la.conv1d.weight[..., -1] = 1.0
                effects["deltanet_conv"] = delta()
            finally:
                for la, w in zip(las, saved):
                    la.conv1d.weight.copy_(w)
        gates = [layer.mlp.shared_expert_gate for layer in ref.model.layers if hasattr(layer.mlp, "shared_expert_gate")]
        if gates and ref.config.shared_expert_intermediate_size > 0:
            saved = [g.weight.detach().clone() for g in gates]
            try:
                for g in gates:
                    g.weight.zero_()
                effects["shared_expert_gate"] = delta()
            finally:
                for g, w in zip(gates, saved):
                    g.weight.copy_(w)
    return effects


def build_save_reference(spec: dict, mdir: Path) -> dict:
    """Build the random model, save it, reload it in f32 from disk, return transformers' loss."""
    from safetensors import safe_open

    cfg = config_class(spec["model_type"])(**copy.deepcopy(spec["config"]))  # the classes edit rope_parameters
    torch.manual_seed(spec["weight_seed"])
    model = model_class(spec["model_type"]).from_config(cfg, **impl_kwargs()).float().eval()
    perturb(model, spec["weight_seed"])
    for n, p in model.named_parameters():
        if p.numel() == 0:
            continue  # n_shared_experts = 0: deepseek's shared-expert MLP has width 0
        spread = float(p.detach().std()) if p.numel() > 1 else float(p.detach().abs().max())
        assert spread > 1e-3, f"{n} looks uninitialised"

    dtype = getattr(torch, spec["dtype"])
    model = model.to(dtype)
    save_kw = {"max_shard_size": shard_size(model, dtype)} if spec["sharded"] else {"max_shard_size": "10GB"}
    model.save_pretrained(mdir, **save_kw)
    del model
    edits = spec.get("config_json_edits") or {}
    if edits:
        cfg_path = mdir / "config.json"
        disk_cfg = json.loads(cfg_path.read_text())
        for key, value in edits.items():
            *path, leaf = key.split(".")  # "text_config.layer_types": a key of a nested dict
            d = disk_cfg
            for part in path:
                d = d[part]
            if value is None:
                assert leaf in d, f"config.json has no {key} to delete"
                d.pop(leaf)
            else:
                d[leaf] = value
        cfg_path.write_text(json.dumps(disk_cfg, indent=2, sort_keys=True) + "\n")

    # What is on disk is what was asked for.
    files = sorted(mdir.glob("*.safetensors"))
    has_index = (mdir / "model.safetensors.index.json").exists()
    assert (len(files) > 1) == spec["sharded"] and has_index == spec["sharded"], (spec["sharded"], files)
    disk_dtypes = set()
    for f in files:
        with safe_open(str(f), "pt") as h:
            disk_dtypes |= {h.get_slice(k).get_dtype() for k in h.keys()}
    assert disk_dtypes == {DISK_DTYPE[spec["dtype"]]}, disk_dtypes

    ids = make_ids(spec)
    # transformers 5.x's Llama4ForConditionalGeneration forward needs a workaround (llama4_output_fix)
    with llama4_output_fix() if spec["model_type"] == "llama4" else contextlib.nullcontext():
        return reference_loss(spec, mdir, ids, len(files))


def reference_loss(spec: dict, mdir: Path, ids: torch.Tensor, num_files: int) -> dict:
    """transformers' loss on `ids` of the checkpoint in `mdir` (reloaded in f32) and the feature effects."""
    from transformers import AutoModelForCausalLM

    ref = model_class(spec["model_type"]).from_pretrained(mdir, dtype=torch.float32, **impl_kwargs()).eval()
    assert next(ref.parameters()).dtype == torch.float32
    if spec["model_type"] == "llama4":
        assert type(ref).__name__ == "Llama4ForConditionalGeneration", type(ref)
    with torch.no_grad():
        out = ref(ids, labels=ids)
    loss = float(out.loss)
    logits = out.logits.float()
    # The loss is plain next-token cross entropy (no router aux loss).
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(float(ce) - loss) < 1e-5 * max(1.0, loss), (float(ce), loss)
    probs = logits.softmax(-1)
    entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
    # The drawn features must actually change the result: loss with the feature switched off.
    effects = {}
    for key in ("sliding_window", "clip_qkv"):
        if getattr(ref.config, key, None) is not None and key in spec["config"]:
            old = getattr(ref.config, key)
            # gpt_oss always builds a sliding mask for its sliding layers: widen it instead.
            setattr(ref.config, key, 10**6 if spec["model_type"] == "gpt_oss" else None)
            try:
                with torch.no_grad():
                    effects[key] = abs(float(ref(ids, labels=ids).loss) - loss)
            finally:
                setattr(ref.config, key, old)
    # Module state that init leaves at zero / neutral: switched off on the reloaded model (which
    # also proves the perturbed values were saved and reloaded).
    for key, cls, attr, off in (("e_score_correction_bias", "DeepseekV3TopkRouter", "e_score_correction_bias", 0.0),
                                ("e_score_correction_bias", "Glm4MoeTopkRouter", "e_score_correction_bias", 0.0),
                                ("e_score_correction_bias", "MiniMaxM2SparseMoeBlock", "e_score_correction_bias", 0.0),
                                ("e_score_correction_bias", "Ernie4_5_MoeStatics", "e_score_correction_bias", 0.0),
                                ("sinks", "GptOssAttention", "sinks", -math.inf),
                                ("expert_biases", "GptOssExperts", "gate_up_proj_bias", 0.0),
                                ("swiglu_limit", "GptOssExperts", "limit", math.inf)):
        mods = [mod for mod in ref.modules() if type(mod).__name__ == cls]
        if not mods:
            continue
        saved = [getattr(mod, attr) for mod in mods]
        if isinstance(saved[0], torch.Tensor):
            assert all(float(t.detach().abs().max()) > 0 for t in saved), f"{key} reloaded as zeros"
            saved = [t.detach().clone() for t in saved]
        extra = [mod.down_proj_bias.detach().clone() for mod in mods] if key == "expert_biases" else None
        try:
            with torch.no_grad():
                for mod in mods:
                    if isinstance(getattr(mod, attr), torch.Tensor):
                        getattr(mod, attr).fill_(off)
                    else:
                        setattr(mod, attr, off)
                    if extra is not None:
                        mod.down_proj_bias.zero_()
                effects[key] = abs(float(ref(ids, labels=ids).loss) - loss)
        finally:
            with torch.no_grad():
                for i, mod in enumerate(mods):
                    if isinstance(saved[i], torch.Tensor):
                        getattr(mod, attr).copy_(saved[i])
                    else:
                        setattr(mod, attr, saved[i])
                    if extra is not None:
                        mod.down_proj_bias.copy_(extra[i])
    effects.update(new_type_effects(ref, spec, ids, loss))
    if spec["model_type"] == "llama4":
        # The text-only load of the same directory (Llama4ForCausalLM from text_config) gives the same loss.
        # (Its load report lists the vision_model / multi_modal_projector keys as unexpected: silenced.)
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        try:
            text_only = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, **impl_kwargs()).eval()
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        assert type(text_only).__name__ == "Llama4ForCausalLM", type(text_only)
        with torch.no_grad():
            assert float(text_only(ids, labels=ids).loss) == loss
    return {
        "loss": loss,
        "transformers_version": transformers.__version__,
        "entropy_over_log_vocab": entropy / math.log(logits.shape[-1]),
        "num_files": num_files,
        "feature_effects": effects,
        "ids": ids.tolist(),
    }


def worker(job_path: Path) -> None:
    """Subprocess entry (run with PYTHONPATH=<tf4 path>): build/save/reference one checkpoint."""
    job = json.loads(job_path.read_text())
    assert transformers.__version__ == job["expect_version"], transformers.__version__
    res = build_save_reference(job["spec"], Path(job["model_dir"]))
    Path(job["result"]).write_text(json.dumps(res))


@torch.no_grad()
def loss_with_this_transformers(mdir: Path, ids: list) -> float:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, **impl_kwargs()).eval()
    t = torch.tensor(ids)
    return float(m(t, labels=t).loss)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_one(spec: dict, root: Path, args) -> dict:
    mdir = root / spec["name"]
    mdir.mkdir()
    row = {"name": spec["name"], "model_type": spec["model_type"], "dtype": spec["dtype"],
           "sharded": spec["sharded"], "saver": spec["saver"], "status": "ERROR"}
    try:
        if spec["saver"] == "5.x":
            res = build_save_reference(spec, mdir)
        else:
            job = root / f"{spec['name']}.job.json"
            result = root / f"{spec['name']}.result.json"
            job.write_text(json.dumps({"spec": spec, "model_dir": str(mdir), "result": str(result),
                                       "expect_version": TF4_VERSION}))
            env = dict(os.environ, PYTHONPATH=args.tf4_path)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(job)],
                           check=True, env=env)
            res = json.loads(result.read_text())
            disk_cfg = json.loads((mdir / "config.json").read_text())
            assert disk_cfg["transformers_version"] == TF4_VERSION, disk_cfg["transformers_version"]
            assert "rope_theta" in disk_cfg and "rope_parameters" not in disk_cfg, "expected 4.x key style"
            # transformers 5.x on the 4.x checkpoint must agree with 4.x (sanity of the reference).
            l5 = loss_with_this_transformers(mdir, res["ids"])
            row["tf5_xcheck"] = abs(l5 - res["loss"]) / max(1.0, abs(res["loss"]))
        row["saver"] = res["transformers_version"]
        row["loss"] = res["loss"]
        row["entropy"] = res["entropy_over_log_vocab"]
        row["files"] = res["num_files"]
        row["effects"] = res["feature_effects"]
        ids_path = root / f"{spec['name']}.ids.json"
        ids_path.write_text(json.dumps(res["ids"]))
        out_path = root / f"{spec['name']}.eval.json"
        proc = subprocess.run([str(args.xtask), "eval", "--model", str(mdir), "--ids", str(ids_path),
                               "--json", str(out_path)], capture_output=True, text=True)
        if proc.returncode != 0:
            row["error"] = f"xtask eval exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            return row
        ours = json.loads(out_path.read_text())
        # One --ids input: its numbers are under "details" (perplexity, tokens, predictions).
        ours = next(iter(ours["details"].values()))
        b, t = spec["batch"], spec["seq_len"]
        assert ours["tokens"] == b * t and ours["predictions"] == b * (t - 1), ours
        ref_ppl = math.exp(res["loss"])
        row["ref_ppl"] = ref_ppl
        row["ppl"] = ours["perplexity"]
        row["mean_nll"] = ours["mean_nll"]
        row["rel"] = abs(ours["perplexity"] - ref_ppl) / ref_ppl
        ok = row["rel"] <= args.tol
        if not ok:
            row["error"] = f"relative error {row['rel']:.3e} > {args.tol:g} (mean NLL ours {ours['mean_nll']:.9g}, " \
                           f"transformers {res['loss']:.9g})"
        if "tf5_xcheck" in row and row["tf5_xcheck"] > 1e-5:
            row["error"] = f"transformers 5.x disagrees with {TF4_VERSION} on this checkpoint: {row['tf5_xcheck']:.2e}"
            ok = False
        row["status"] = "PASS" if ok else "FAIL"
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    return row


def describe(spec: dict) -> str:
    c = text_config_of(spec)
    parts = [] if spec["model_type"] != "llama4" else [
        "multimodal(vision h={hidden_size} L={num_hidden_layers}, projector {projector_input_dim}; ".format(
            **spec["config"]["vision_config"])
        + "boi/eoi/image={boi_token_index}/{eoi_token_index}/{image_token_index}) text:".format(**spec["config"])]
    parts += [f"L={c['num_hidden_layers']}", f"h={c['hidden_size']}",
             f"heads={c['num_attention_heads']}/{c['num_key_value_heads']}"]
    if "head_dim" in c:
        parts.append(f"head_dim={c['head_dim']}")
    for key, short in [("q_lora_rank", "q_lora"), ("kv_lora_rank", "kv_lora"), ("qk_nope_head_dim", "nope"),
                       ("qk_rope_head_dim", "rope_dim"), ("v_head_dim", "v_dim"), ("rope_interleave", "interleave")]:
        if key in c:
            parts.append(f"{short}={c[key]}")
    n_experts = next(c[k] for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
                     if k in c)
    parts.append(f"E={n_experts}")
    parts.append(f"k={c.get('num_experts_per_tok', c.get('moe_k'))}")
    for key, short in [("topk_method", "method"), ("n_group", "groups"), ("topk_group", "topk_group"),
                       ("norm_topk_prob", "norm_topk"), ("routed_scaling_factor", "scale"),
                       ("first_k_dense_replace", "dense_first"), ("n_shared_experts", "shared_experts"),
                       ("decoder_sparse_step", "step"),
                       ("mlp_only_layers", "mlp_only"), ("shared_expert_intermediate_size", "shared"),
                       ("qkv_bias", "qkv_bias"), ("attention_bias", "attn_bias"), ("clip_qkv", "clip_qkv"),
                       ("sliding_window", "swa"), ("swiglu_limit", "limit"), ("swiglu_alpha", "alpha"),
                       ("use_qk_norm", "qk_norm"), ("rotary_dim", "rotary_dim"),
                       ("moe_num_shared_experts", "shared_experts"), ("moe_layer_start_index", "moe_start"),
                       ("moe_layer_interval", "moe_interval"), ("moe_layer_end_index", "moe_end"),
                       ("moe_norm_min", "norm_min"), ("use_bias", "use_bias"),
                       # llama4_text / llama4
                       ("intermediate_size_mlp", "dense_I"), ("interleave_moe_layer_step", "moe_step"),
                       ("moe_layers", "moe_layers"), ("no_rope_layers", "rope_layers"),
                       ("attention_chunk_size", "chunk"), ("attn_temperature_tuning", "temp_tuning"),
                       ("floor_scale", "floor"), ("attn_scale", "attn_scale"),
                       # qwen3_next
                       ("full_attention_interval", "full_every"), ("linear_num_key_heads", "lin_k_heads"),
                       ("linear_num_value_heads", "lin_v_heads"), ("linear_key_head_dim", "lin_dk"),
                       ("linear_value_head_dim", "lin_dv"), ("linear_conv_kernel_dim", "conv")]:
        if key in c:
            parts.append(f"{short}={c[key]}")
    if "layer_types" in c:
        short = {"sliding_attention": "S", "full_attention": "F", "linear_attention": "L", "chunked_attention": "C"}
        parts.append("layers=" + "".join(short[t] for t in c["layer_types"]))
    parts.append(f"tie={c['tie_word_embeddings']}")
    if "rope_parameters" in c:
        rp = c["rope_parameters"]
        parts.append(f"theta={rp['rope_theta']:g}")
        if "partial_rotary_factor" in rp:
            parts.append(f"partial_rotary={rp['partial_rotary_factor']}")
        elif spec["model_type"] == "glm4_moe":
            parts.append("partial_rotary=0.5(default)")
        elif spec["model_type"] == "qwen3_next":
            parts.append("partial_rotary=0.25(default)")
        if rp["rope_type"] != "default":
            parts.append("rope=" + ",".join(f"{k}={v}" for k, v in rp.items() if k != "rope_theta"))
    else:
        parts.append(f"theta={c['rope_theta']:g}")
    parts += [f"eps={c['rms_norm_eps']:g}", f"init={c['initializer_range']}", f"V={c['vocab_size']}"]
    for key, value in (spec.get("config_json_edits") or {}).items():
        parts.append(f"config.json:{key}={'<deleted>' if value is None else value}")
    return " ".join(parts)


def print_table(rows: list[dict]) -> None:
    hdr = ("name", "model_type", "dtype", "sharded", "saved by", "exp(loss)", "our ppl", "rel err", "H/logV",
           "result")
    lines = []
    for r in rows:
        sharded = f"yes ({r['files']})" if r["sharded"] and "files" in r else ("yes" if r["sharded"] else "no")
        lines.append((
            r["name"], r["model_type"], r["dtype"], sharded, r["saver"],
            f"{r['ref_ppl']:.8g}" if "ref_ppl" in r else "-",
            f"{r['ppl']:.8g}" if "ppl" in r else "-",
            f"{r['rel']:.2e}" if "rel" in r else "-",
            f"{r['entropy']:.2f}" if "entropy" in r else "-",
            r["status"],
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    log(fmt.format(*hdr))
    log(fmt.format(*("-" * w for w in widths)))
    for ln in lines:
        log(fmt.format(*ln))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=None, help="draws configs, weights and ids (default: time-based)")
    ap.add_argument("--count", type=int, default=2, help="checkpoints per model_type")
    ap.add_argument("--model-types", nargs="+", default=list(MODEL_TYPES), choices=MODEL_TYPES)
    ap.add_argument("--xtask", type=Path, default=REPO / "target" / "debug" / "xtask",
                    help="the xtask binary (cargo build -p xtask)")
    ap.add_argument("--tf4-path", default="/opt/tf4", help=f"--target dir holding transformers {TF4_VERSION}")
    ap.add_argument("--no-tf4", action="store_true", help=f"save everything with transformers {transformers.__version__}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=24)
    ap.add_argument("--tol", type=float, default=1e-4, help="largest relative perplexity error")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker is not None:
        worker(args.worker)
        return 0

    if TF_MAJOR < 5:
        sys.exit(f"run with transformers 5.x (got {transformers.__version__})")
    if not args.xtask.is_file():
        sys.exit(f"{args.xtask} not found: build it with `cargo build -p xtask` or pass --xtask")
    use_tf4 = not args.no_tf4 and any(mt not in TF5_ONLY for mt in args.model_types)
    if use_tf4 and not Path(args.tf4_path, "transformers").is_dir():
        sys.exit(f"transformers {TF4_VERSION} not found under {args.tf4_path} (install it there or pass --no-tf4)")
    seed = args.seed if args.seed is not None else int(time.time() * 1000) % (2**31)
    log(f"seed = {seed}  (reproduce with --seed {seed} --count {args.count})")
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, xtask {args.xtask}")

    specs = draw_specs(seed, args.count, args.model_types, batch=args.batch, seq_len=args.seq_len,
                       use_tf4=use_tf4)
    root = Path(tempfile.mkdtemp(prefix="diep-unseen-"))
    log(f"checkpoints in {root}\n")
    rows = []
    for spec in specs:
        log(f"{spec['name']}: {spec['dtype']}, {'sharded' if spec['sharded'] else 'one file'}, "
            f"saved by {spec['saver']}: {describe(spec)}")
        row = run_one(spec, root, args)
        rows.append(row)
        detail = f"rel err {row['rel']:.2e}" if "rel" in row else ""
        for key, d in row.get("effects", {}).items():
            detail += f"; |loss - loss without {key}| = {d:.3g}"
        if "tf5_xcheck" in row:
            detail += f"; transformers {transformers.__version__} vs {TF4_VERSION} loss: {row['tf5_xcheck']:.1e}"
        log(f"  -> {row['status']} {detail} {row.get('error', '')}".rstrip())
        (root / f"{spec['name']}.spec.json").write_text(json.dumps(spec, indent=2))

    log("")
    print_table(rows)
    failed = [r for r in rows if r["status"] != "PASS"]
    log("")
    if failed:
        for r in failed:
            log(f"{r['name']}: {r['status']} {r.get('error', '')}")
        log(f"\n{len(failed)} of {len(rows)} checkpoints FAILED (seed {seed}); kept {root}")
        return 1
    worst = max(r["rel"] for r in rows)
    log(f"all {len(rows)} checkpoints PASS (seed {seed}, worst relative error {worst:.2e} <= {args.tol:g})")
    if args.keep:
        log(f"kept {root}")
    else:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
