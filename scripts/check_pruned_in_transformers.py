#!/usr/bin/env python3
"""Check that a pruned MoE checkpoint computes, in transformers, what the original model computes
with the pruned experts masked out of the router.

VALIDATION ONLY: never run by the Rust test suite. Needs torch, safetensors and transformers (5.x;
4.57 works too, run with ``PYTHONPATH=/opt/tf4``). No network access (it sets ``HF_HUB_OFFLINE=1``).

Check a pruned directory (written by ``diep-surgery`` or by ``--make-pruned``)::

    /opt/ref-venv/bin/python scripts/check_pruned_in_transformers.py \\
        --original ORIG_DIR --pruned PRUNED_DIR --plan pruning.json --ids ids.json [--our-ppl 123.4]

1. Loads PRUNED_DIR in float32 (``--dtype``) with eager attention: for a non-uniform plan (different kept counts per
   MoE layer) with ``AutoModelForCausalLM.from_pretrained(pruned, trust_remote_code=True)``, which goes
   through ``modeling_diep_moe.py`` (``auto_map`` in its config.json); for a uniform plan with a plain
   ``from_pretrained`` (transformers' own class). Missing / unexpected / mismatched keys are an error.
2. Loads ORIG_DIR the same way (transformers' own class, eager experts in 5.x) and masks the pruned
   experts: their router logits become -inf right after the gate projection, before transformers' own
   softmax / top-k / renormalisation (a forward hook on the gate where it is an ``nn.Linear`` (4.x), else
   a shim of the router module's ``F.linear`` (5.x) keyed on the gate weight). It checks that every
   masked layer was hit and that the masked columns of the returned router logits are -inf.
3. Compares ``model(ids, labels=ids).loss`` (mean token cross-entropy over the shifted positions of all
   sequences, no router aux loss) and perplexity ``exp(loss)``, and the logits (max |d| / max |ref|);
   ids come from IDS.json, a JSON array of equal-length token-id arrays (or ``{"ids": [...]}``).
   Exit status 1 if either relative error exceeds ``--tol`` (1e-4).
4. Runs ``generate(ids, max_new_tokens=5, do_sample=False)`` on both and reports whether the tokens agree.
5. With ``--our-ppl FLOAT`` (the Rust tool's perplexity on the same ids) also compares it to both
   perplexities; exit status 1 if its relative error to the masked original exceeds ``--our-ppl-tol``.

Build a pruned directory from an original and a plan, exactly per the surgery contract (same file
layout and tensor names, kept experts renumbered 0..E_i-1 per layer, router rows sliced, expert-count
key(s) set to the maximum kept count, and for non-uniform plans ``num_experts_per_layer``, ``auto_map``
from ``crates/diep-surgery/remote_code/auto_map.json`` and every ``remote_code/*.py`` copied)::

    ... check_pruned_in_transformers.py --original ORIG_DIR --plan pruning.json --make-pruned OUT_DIR

(add ``--ids`` to check OUT_DIR right away). ``--self-test`` builds and checks uniform and non-uniform
plans for every fixture under ``fixtures/models`` in a temporary directory and prints a table;
``--self-test-synthetic`` does the same for tiny random ``glm4_moe``, ``minimax_m2``, ``ernie4_5_moe``, ``llama4_text``
(top-2 and top-1) and ``llama4`` checkpoints built with transformers (no fixture needed).

Llama 4 (transformers 5.x): ``llama4_text`` (``Llama4ForCausalLM``) and the multimodal wrapper ``llama4``
(``Llama4ForConditionalGeneration``: text model under ``language_model.model.*`` / ``language_model.lm_head``, expert
count ``num_local_experts`` and ``num_experts_per_layer`` inside ``text_config``, ``auto_map`` at the top level). Their
experts are fused on disk: ``feed_forward.experts.gate_up_proj [E, H, 2I]`` and ``feed_forward.experts.down_proj
[E, I, H]`` are sliced along axis 0 with the router rows ``feed_forward.router.weight [E, H]``; everything else (the
vision tower and projector included) is copied unchanged. The wrapper is loaded with ``AutoModelForImageTextToText``
(transformers' own class), or for remote code with ``AutoModelForCausalLM`` (the only ``auto_map`` entry; the remote
code builds the whole wrapper for ``model_type`` ``llama4``); the check also compares the non-text weights of the two
models bit for bit and runs an image forward. Llama 4's router takes the top-k of the raw logits and scales each chosen
expert's input by ``sigmoid(logit)`` (0 for the others), so a -inf logit (never in the top-k while ``k <= E_i``) is
exactly a deleted expert. transformers 5.24's ``Llama4ForConditionalGeneration.forward`` always raises
``AttributeError`` (it reads ``image_outputs`` from the inner ``MoeCausalLMOutputWithPast``): for transformers' own
wrapper class that output class gets a class attribute ``image_outputs = None`` while the model runs (the remote code
fixes this itself).

``glm4_moe``, ``minimax_m2`` and ``ernie4_5_moe`` (transformers 5.x) select experts on ``score + e_score_correction_bias``
(GLM-4.5 / MiniMax-M2: sigmoid scores; ERNIE-4.5: softmax probabilities): for them the pruned directory also has
that bias sliced (``mlp.gate.e_score_correction_bias`` [E], ``block_sparse_moe.e_score_correction_bias`` [E],
``mlp.moe_statics.e_score_correction_bias`` [1, E]), and the masked original has it set to -inf for the pruned
experts in addition to the -inf router logits (a -inf logit alone, score 0, can still be selected through the
bias). GLM-4.5's group-limited routing needs every one of the ``n_group`` groups to keep equally many experts
(at least 2); plans that do not are refused. Layers ``>= num_hidden_layers`` (multi-token-prediction layers) are
copied unchanged.

Plan format (``pruning.json``): ``{"format": "diep-pruning-plan/1", "model_type": ..., "original_experts":
{"<layer>": N}, "kept_experts": {"<layer>": [original ids ascending]}, "method": ..., ...}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TF_MAJOR = int(transformers.__version__.split(".")[0])
REPO = Path(__file__).resolve().parent.parent
REMOTE_CODE_DIR = REPO / "crates" / "diep-surgery" / "remote_code"
PLAN_FORMAT = "diep-pruning-plan/1"

# model_type -> (MoE block attribute on disk, config.json expert-count keys written by the surgery)
ARCHS = {
    "mixtral": ("block_sparse_moe", ("num_local_experts",)),
    "qwen2_moe": ("mlp", ("num_experts",)),
    "qwen3_moe": ("mlp", ("num_experts", "num_local_experts")),
    "olmoe": ("mlp", ("num_experts",)),
    # transformers 5.x only (the remote code's classes for these subclass 5.x's blocks)
    "glm4_moe": ("mlp", ("n_routed_experts",)),
    "minimax_m2": ("block_sparse_moe", ("num_local_experts",)),
    "ernie4_5_moe": ("mlp", ("moe_num_experts",)),
    "llama4_text": ("feed_forward", ("num_local_experts",)),
    "llama4": ("feed_forward", ("num_local_experts",)),  # the multimodal wrapper: keys inside `text_config`
}

# model_types whose on-disk layout is not `model.layers.{i}.<moe>.gate.weight` + per-expert tensors: the text model's
# tensor-name prefix, the config key of the text config (None: the top level), the router weight and the fused expert
# tensors ([E, ...], sliced along axis 0) under the MoE block.
LAYOUTS = {
    "llama4_text": dict(prefix="", text_config=None, router="router.weight",
                        fused=("experts.gate_up_proj", "experts.down_proj")),
    "llama4": dict(prefix="language_model.", text_config="text_config", router="router.weight",
                   fused=("experts.gate_up_proj", "experts.down_proj")),
}
DEFAULT_LAYOUT = dict(prefix="", text_config=None, router="gate.weight", fused=())

# model_type -> on-disk name (under the MoE block) of the per-expert selection bias, shape [E] or [1, E]. The surgery
# slices it with the router rows; the masked reference sets it to -inf for the pruned experts, because these routers
# select on `score + bias` and a -inf router logit alone (score 0) can still be selected through the bias.
CORRECTION_BIAS = {
    "glm4_moe": "gate.e_score_correction_bias",  # [E]; sigmoid scores
    "minimax_m2": "e_score_correction_bias",  # [E], block level; sigmoid scores
    "ernie4_5_moe": "moe_statics.e_score_correction_bias",  # [1, E], block level on disk; softmax probabilities
}

# model_types whose router picks `topk_group` of `n_group` contiguous expert groups first (scored by the sum of
# their two best experts): each group must keep equally many experts, at least 2, so that the groups over the
# E_i kept experts are the original groups restricted to them.
GROUPED = ("glm4_moe",)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Plans and checkpoints
# ------------------------------------------------------------------------------------------------


def load_plan(path: Path) -> dict:
    plan = json.loads(Path(path).read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise SystemExit(f"{path}: format {plan.get('format')!r}, expected {PLAN_FORMAT!r}")
    plan["kept_experts"] = {int(k): [int(e) for e in v] for k, v in plan["kept_experts"].items()}
    plan["original_experts"] = {int(k): int(v) for k, v in plan["original_experts"].items()}
    return plan


def plan_is_uniform(plan: dict) -> bool:
    return len({len(v) for v in plan["kept_experts"].values()}) <= 1


def masked_experts(plan: dict) -> dict[int, list[int]]:
    """Layer -> original expert ids the plan removes (layers that lose nothing are left out)."""
    out = {}
    for layer, n in plan["original_experts"].items():
        kept = set(plan["kept_experts"].get(layer, range(n)))
        drop = [e for e in range(n) if e not in kept]
        if drop:
            out[layer] = drop
    return out


def load_ids(path: Path) -> torch.Tensor:
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data["ids"]
    if not data or not all(isinstance(r, list) for r in data) or len({len(r) for r in data}) != 1:
        raise SystemExit(f"{path}: expected a JSON array of equal-length token-id arrays")
    return torch.tensor(data, dtype=torch.long)


def checkpoint_files(model_dir: Path) -> tuple[list[str], dict | None]:
    """(safetensors file names, index json or None)."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        return sorted(set(index["weight_map"].values())), index
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{model_dir}: no *.safetensors")
    return files, None


def check_groups(cfg: dict, kept: dict[int, list[int]], original_experts: dict[int, int]) -> None:
    """For group-limited routers (``GROUPED``, ``n_group > 1``): every group keeps equally many experts, >= 2."""
    n_group = int(cfg.get("n_group") or 1)
    if cfg.get("model_type") not in GROUPED or n_group <= 1:
        return
    for layer, ids in sorted(kept.items()):
        n = original_experts[layer]
        if n % n_group:
            raise SystemExit(f"layer {layer}: {n} experts not divisible by n_group = {n_group}")
        size = n // n_group
        per_group = [sum(1 for e in ids if e // size == g) for g in range(n_group)]
        if len(set(per_group)) != 1 or per_group[0] < 2:
            raise SystemExit(f"layer {layer}: kept experts per routing group {per_group}; every group of the "
                             f"{n_group} must keep equally many, at least 2")


def make_pruned(original: Path, plan: dict, out: Path, force_remote_code: bool = False) -> dict:
    """Write the pruned checkpoint of `original` under `out` per the surgery contract. Returns a summary."""
    cfg = json.loads((original / "config.json").read_text())
    model_type = cfg["model_type"]
    if model_type not in ARCHS:
        raise SystemExit(f"unsupported model_type {model_type!r}")
    if plan["model_type"] != model_type:
        raise SystemExit(f"plan is for {plan['model_type']!r}, checkpoint is {model_type!r}")
    moe_attr, count_keys = ARCHS[model_type]
    layout = LAYOUTS.get(model_type, DEFAULT_LAYOUT)
    tcfg = cfg[layout["text_config"]] if layout["text_config"] else cfg  # the text config (Llama 4 wrapper: nested)
    top_k = int(tcfg["num_experts_per_tok"] if "num_experts_per_tok" in tcfg else tcfg["moe_k"])  # ernie: moe_k
    files, index = checkpoint_files(original)

    # MoE layers = layers with a router on disk.
    pfx = re.escape(layout["prefix"])
    router_re = re.compile(rf"^{pfx}model\.layers\.(\d+)\.{moe_attr}\.{re.escape(layout['router'])}$")
    expert_re = re.compile(rf"^{pfx}model\.layers\.(\d+)\.{moe_attr}\.experts\.(\d+)\.(.+)$")
    fused_re = None
    if layout["fused"]:
        names = "|".join(re.escape(n) for n in layout["fused"])
        fused_re = re.compile(rf"^{pfx}model\.layers\.(\d+)\.{moe_attr}\.(?:{names})$")
    bias_re = None
    if model_type in CORRECTION_BIAS:
        bias_re = re.compile(rf"^model\.layers\.(\d+)\.{moe_attr}\.{re.escape(CORRECTION_BIAS[model_type])}$")
    n_layers = int(tcfg["num_hidden_layers"])
    n_experts: dict[int, int] = {}
    for f in files:
        with safe_open(str(original / f), "pt") as h:
            for k in h.keys():
                m = router_re.match(k)
                # layers >= num_hidden_layers (multi-token-prediction layers of GLM-4.5 / DeepSeek-V3) are not
                # decoder layers: transformers ignores them; they are copied unchanged
                if m and int(m.group(1)) < n_layers:
                    n_experts[int(m.group(1))] = h.get_slice(k).get_shape()[0]
    if sorted(n_experts) != sorted(plan["original_experts"]):
        raise SystemExit(f"plan MoE layers {sorted(plan['original_experts'])} != checkpoint MoE layers {sorted(n_experts)}")
    kept: dict[int, list[int]] = {}
    for layer, n in n_experts.items():
        if plan["original_experts"][layer] != n:
            raise SystemExit(f"layer {layer}: plan says {plan['original_experts'][layer]} experts, checkpoint has {n}")
        ids = plan["kept_experts"].get(layer, list(range(n)))
        if ids != sorted(set(ids)) or not ids or ids[0] < 0 or ids[-1] >= n:
            raise SystemExit(f"layer {layer}: kept ids must be unique, ascending, in 0..{n - 1}: {ids}")
        if len(ids) < top_k:
            raise SystemExit(f"layer {layer}: keeps {len(ids)} < num_experts_per_tok = {top_k}")
        kept[layer] = ids
    check_groups(cfg, kept, n_experts)
    counts = {layer: len(ids) for layer, ids in kept.items()}
    uniform = len(set(counts.values())) == 1
    remote = (not uniform) or force_remote_code

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total_size = total_params = 0
    for f in files:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(original / f), "pt") as h:
            metadata = h.metadata() or {}
            for k in h.keys():
                m = expert_re.match(k)
                if m and int(m.group(1)) in kept:
                    layer, e = int(m.group(1)), int(m.group(2))
                    if e not in kept[layer]:
                        continue
                    new_e = kept[layer].index(e)
                    k_out = f"{layout['prefix']}model.layers.{layer}.{moe_attr}.experts.{new_e}.{m.group(3)}"
                    t = h.get_tensor(k)
                else:
                    k_out = k
                    t = h.get_tensor(k)
                    m = router_re.match(k) or (fused_re.match(k) if fused_re is not None else None)
                    if m and int(m.group(1)) in kept:  # router rows / fused experts [E, ...]: the expert axis is 0
                        t = t[kept[int(m.group(1))]].contiguous()
                    m = bias_re.match(k) if bias_re is not None else None
                    if m and int(m.group(1)) in kept:  # [E] or [1, E]: the expert axis is the last
                        t = t[..., kept[int(m.group(1))]].contiguous()
                tensors[k_out] = t
                weight_map[k_out] = f
                total_size += t.numel() * t.element_size()
                total_params += t.numel()
        save_file(tensors, str(out / f), metadata={"format": "pt", **metadata})
    if index is not None:
        new_index = dict(index)
        meta = dict(index.get("metadata", {}))
        if "total_size" in meta:
            meta["total_size"] = total_size
        if "total_parameters" in meta:
            meta["total_parameters"] = total_params
        new_index["metadata"] = meta
        new_index["weight_map"] = dict(sorted(weight_map.items()))
        (out / "model.safetensors.index.json").write_text(json.dumps(new_index, indent=2) + "\n")

    for p in original.iterdir():  # tokenizer, generation_config, ...
        if p.is_file() and p.name != "config.json" and not p.name.endswith(".safetensors") \
                and p.name != "model.safetensors.index.json":
            shutil.copy2(p, out / p.name)

    new_cfg = dict(cfg)
    new_tcfg = dict(tcfg) if layout["text_config"] else new_cfg  # count keys and the per-layer list go here
    max_kept = max(counts.values())
    for key in count_keys:
        new_tcfg[key] = max_kept
    if remote:
        new_tcfg["num_experts_per_layer"] = [counts.get(i, 0) for i in range(n_layers)]
        auto_map = json.loads((REMOTE_CODE_DIR / "auto_map.json").read_text())
        new_cfg["auto_map"] = auto_map  # the whole file's (top level)
        for py in sorted(REMOTE_CODE_DIR.glob("*.py")):
            shutil.copy2(py, out / py.name)
    else:
        new_tcfg.pop("num_experts_per_layer", None)
        new_cfg.pop("auto_map", None)
    if layout["text_config"]:
        new_cfg[layout["text_config"]] = new_tcfg
    (out / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
    return {"counts": counts, "uniform": uniform, "remote_code": remote}


# ------------------------------------------------------------------------------------------------
# Loading and masking
# ------------------------------------------------------------------------------------------------


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def impl_kwargs(dtype: torch.dtype = torch.float32) -> dict:
    kw = dict(attn_implementation="eager", dtype=dtype)
    if TF_MAJOR >= 5:
        kw["experts_implementation"] = "eager"
    return kw


_NOTED: set[str] = set()


def load_model(model_dir: Path, remote_code: bool, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    extra = {}
    if TF_MAJOR < 5:
        # 4.x reads the Qwen3-MoE expert count from `num_experts` only; a 5.x-saved config has `num_local_experts`.
        if raw.get("model_type") == "qwen3_moe" and "num_experts" not in raw and "num_local_experts" in raw:
            extra["num_experts"] = raw["num_local_experts"]
        if "rope_parameters" in raw and "rope_theta" not in raw and str(model_dir) not in _NOTED:
            _NOTED.add(str(model_dir))
            log(f"  note: {model_dir}: 5.x config (rope_parameters); transformers 4.x ignores it and uses its default "
                "rope theta (for both models, so the comparison stays like for like)")
    auto_cls = AutoModelForCausalLM
    if raw.get("model_type") == "llama4":
        # The multimodal wrapper: transformers' AutoModelForCausalLM would build the text model alone (and report the
        # vision weights unexpected). The remote code's auto_map has AutoModelForCausalLM only, whose class builds the
        # whole wrapper for model_type llama4.
        from transformers import AutoModelForImageTextToText

        if not (remote_code and "AutoModelForImageTextToText" not in raw.get("auto_map", {})):
            auto_cls = AutoModelForImageTextToText
    model, info = auto_cls.from_pretrained(
        str(model_dir), trust_remote_code=remote_code, output_loading_info=True, **impl_kwargs(dtype), **extra
    )
    if raw.get("model_type") == "llama4" and not any(c.__name__ == "Llama4ForConditionalGeneration"
                                                     for c in type(model).__mro__):
        raise SystemExit(f"{model_dir}: expected a Llama4ForConditionalGeneration, got {type(model).__name__}")
    if any(t.is_complex() for t in model.buffers()):
        # Llama 4's vision RoPE table `freqs_ci` is a complex64 buffer: Module.to(dtype) would cast it to the real dtype
        # (dropping its imaginary part); cast the floating-point tensors only
        return model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t).eval()
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{model_dir}: loading reported {bad}")
    return model.to(dtype).eval()


def text_model(model):
    """The decoder (with ``.layers``): ``model.model``, or for the Llama 4 wrapper ``model.language_model.model``."""
    if getattr(model.config, "model_type", None) == "llama4":
        return model.language_model.model
    return model.model


def text_config(model):
    return model.config.text_config if getattr(model.config, "model_type", None) == "llama4" else model.config


def moe_block(layer):
    for attr in ("block_sparse_moe", "mlp", "feed_forward"):
        m = getattr(layer, attr, None)
        if m is not None and (hasattr(m, "gate") or hasattr(m, "router")) and hasattr(m, "experts"):
            return m
    return None


def router_of(blk):
    """The module holding the router weight: ``gate``, or Llama 4's ``router``."""
    return blk.gate if hasattr(blk, "gate") else blk.router


@contextlib.contextmanager
def stock_llama4_fix(model):
    """transformers 5.24's ``Llama4ForConditionalGeneration.forward`` ends with ``image_outputs=outputs.image_outputs``
    where ``outputs`` is the inner ``MoeCausalLMOutputWithPast``, which has no such field: every forward raises
    AttributeError. For transformers' own wrapper class, ``MoeCausalLMOutputWithPast`` has a class attribute
    ``image_outputs = None`` while this is open (nothing else is touched). No-op for other models and for the remote
    code's wrapper, which returns that field itself (so it is checked to work unpatched)."""
    patch = False
    if getattr(model.config, "model_type", None) == "llama4" and not type(model).__name__.startswith("Diep"):
        from transformers.modeling_outputs import MoeCausalLMOutputWithPast as Out

        patch = not hasattr(Out, "image_outputs")
    if patch:
        Out.image_outputs = None
    try:
        yield
    finally:
        if patch:
            del Out.image_outputs


@contextlib.contextmanager
def masked_router(model, masked: dict[int, list[int]]):
    """Router logits of `masked` experts (layer -> original ids) become -inf right after the gate projection,
    before transformers' own softmax / top-k. Where the router selects on `score + e_score_correction_bias`
    (glm4_moe, minimax_m2, ernie4_5_moe) that bias is also -inf for them while the context is open. Yields a dict
    layer -> number of masked gate calls."""
    hits: dict[int, int] = {}
    gates = {}
    biases = []  # (tensor, saved copy)
    for i, cols in masked.items():
        blk = moe_block(text_model(model).layers[i])
        if blk is None:
            raise SystemExit(f"layer {i} has no MoE block to mask")
        gates[i] = (router_of(blk), list(cols))
        for name, t in list(blk.named_buffers()) + list(blk.named_parameters()):
            if name.endswith("e_score_correction_bias"):
                biases.append((t, t.detach().clone()))
                with torch.no_grad():
                    t[..., list(cols)] = float("-inf")

    def mask(out, i, cols):
        out = out.clone()
        out[..., cols] = float("-inf")
        hits[i] = hits.get(i, 0) + 1
        return out

    handles, shims = [], []
    by_weight = {}
    for i, (gate, cols) in gates.items():
        if isinstance(gate, nn.Linear) and type(gate).forward is nn.Linear.forward:
            # transformers 4.x: the gate is a Linear whose output is the logits
            handles.append(gate.register_forward_hook(lambda mod, inp, out, i=i, cols=cols: mask(out, i, cols)))
        else:  # transformers 5.x: *TopKRouter computes F.linear(x, self.weight) then routes, in one forward
            by_weight[id(gate.weight)] = (i, cols)
            # Llama 4's Llama4Router is an nn.Linear whose forward calls nn.Linear.forward (F.linear of torch's
            # linear module) and then routes: shim F there
            mod = sys.modules[nn.Linear.__module__ if isinstance(gate, nn.Linear) else type(gate).__module__]
            if all(s[0] is not mod for s in shims):
                shims.append((mod, mod.F))
    for mod, real_F in shims:
        class _Shim:
            def __getattr__(self, attr, real_F=real_F):
                return getattr(real_F, attr)

            @staticmethod
            def linear(x, w, b=None, real_F=real_F):
                out = real_F.linear(x, w, b)
                hit = by_weight.get(id(w))
                return out if hit is None else mask(out, *hit)

        mod.F = _Shim()
    try:
        yield hits
    finally:
        for h in handles:
            h.remove()
        for mod, real_F in shims:
            mod.F = real_F
        with torch.no_grad():
            for t, saved in biases:
                t.copy_(saved)


def forward(model, ids, masked=None):
    """(loss, logits) of model(ids, labels=ids), optionally with experts masked (every masked layer must be hit)."""
    ctx = masked_router(model, masked) if masked else contextlib.nullcontext({})
    with torch.no_grad(), stock_llama4_fix(model), ctx as hits:
        out = model(ids, labels=ids)
    if masked and sorted(hits) != sorted(masked):
        raise SystemExit(f"masking did not reach every layer: hit {sorted(hits)}, expected {sorted(masked)}")
    return float(out.loss), out.logits.float()


def check_router_logits(model, ids, masked) -> None:
    """The router logits transformers returns show -inf exactly at the masked experts."""
    with torch.no_grad(), stock_llama4_fix(model), masked_router(model, masked):
        out = model(ids, output_router_logits=True)
    moe_layers = [i for i, layer in enumerate(text_model(model).layers) if moe_block(layer) is not None]
    assert len(out.router_logits) == len(moe_layers), (len(out.router_logits), moe_layers)
    for i, r in zip(moe_layers, out.router_logits):
        if i in masked:
            assert torch.isneginf(r[:, masked[i]]).all(), f"layer {i}: masked logits are not -inf"
            keep = [e for e in range(r.shape[-1]) if e not in masked[i]]
            assert torch.isfinite(r[:, keep]).all(), f"layer {i}: kept logits not finite"


def generate(model, ids, masked=None, n=5):
    ctx = masked_router(model, masked) if masked else contextlib.nullcontext({})
    with torch.no_grad(), stock_llama4_fix(model), ctx:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=text_config(model).eos_token_id)
    return out[:, ids.shape[1]:]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def check_llama4_wrapper(orig, model, ids, masked, tol) -> tuple[bool, str]:
    """Llama 4 wrapper: every weight outside ``language_model`` (vision tower, projector) is bit-identical in the two
    models, and a forward with one random image per sequence (image tokens after the first token) matches the masked
    original (logits max |d| / max |ref| <= tol)."""
    so, sp = orig.state_dict(), model.state_dict()
    other = sorted(k for k in so if not k.startswith("language_model."))
    same = sorted(k for k in sp if not k.startswith("language_model.")) == other and all(
        torch.equal(so[k], sp[k]) for k in other)
    vc, cfg = orig.config.vision_config, orig.config
    size, patch = vc.image_size, vc.patch_size
    size, patch = (size if isinstance(size, int) else size[0]), (patch if isinstance(patch, int) else patch[0])
    n_img_tokens = int(round((size // patch) ** 2 * vc.pixel_shuffle_ratio ** 2))
    if n_img_tokens < 1 or n_img_tokens + 1 >= ids.shape[1]:
        return same, f"non-text weights {'identical' if same else 'DIFFER'} ({len(other)} tensors); no image forward"
    ids_img = ids.masked_fill(ids == cfg.image_token_index, 0)  # image tokens exactly where the images go
    ids_img[:, 1:1 + n_img_tokens] = cfg.image_token_index
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(ids.shape[0], vc.num_channels, size, size, generator=g).to(next(orig.parameters()).dtype)
    ctx = masked_router(orig, masked) if masked else contextlib.nullcontext({})
    with torch.no_grad():
        with stock_llama4_fix(orig), ctx:
            ref = orig(input_ids=ids_img, pixel_values=pixels).logits.float()
        with stock_llama4_fix(model):
            got = model(input_ids=ids_img, pixel_values=pixels).logits.float()
    d = float((got - ref).abs().max())
    r = d / float(ref.abs().max())
    ok = same and r <= tol
    return ok, (f"non-text weights {'identical' if same else 'DIFFER'} ({len(other)} tensors); image forward "
                f"({n_img_tokens} image token(s) per sequence) logits max|d| {d:.3e}, rel {r:.3e}")


def check(original: Path, pruned: Path, plan: dict, ids: torch.Tensor, tol: float = 1e-4,
          our_ppl: float | None = None, our_ppl_tol: float | None = None, remote_code: bool | None = None,
          gen_tokens: int = 5, dtype: torch.dtype = torch.float32) -> dict:
    """Compare pruned vs masked original; returns a result dict (result['ok'] = passed)."""
    uniform = plan_is_uniform(plan)
    if remote_code is None:
        remote_code = not uniform
    pcfg = json.loads((pruned / "config.json").read_text())
    if not uniform and "auto_map" not in pcfg:
        raise SystemExit(f"{pruned}: non-uniform plan but config.json has no auto_map")
    masked = masked_experts(plan)
    check_groups(json.loads((original / "config.json").read_text()), plan["kept_experts"], plan["original_experts"])

    orig = load_model(original, remote_code=False, dtype=dtype)
    model = load_model(pruned, remote_code=remote_code, dtype=dtype)
    kind = type(model).__name__
    if remote_code and not kind.startswith("Diep"):
        raise SystemExit(f"{pruned}: expected the remote-code class, got {type(model)}")
    if not remote_code and type(model) is not type(orig):
        raise SystemExit(f"{pruned}: expected {type(orig).__name__}, got {kind}")
    # per-layer expert counts as loaded
    for i, layer in enumerate(text_model(model).layers):
        blk = moe_block(layer)
        if i in plan["kept_experts"]:
            n_gate = router_of(blk).weight.shape[0]
            assert n_gate == len(plan["kept_experts"][i]), (i, n_gate)
        else:
            assert blk is None or i not in plan["original_experts"], i

    loss_o, logits_o = forward(orig, ids)
    loss_m, logits_m = forward(orig, ids, masked)
    if masked:
        check_router_logits(orig, ids, masked)
    loss_p, logits_p = forward(model, ids)
    d_logits = float((logits_p - logits_m).abs().max())
    rel_logits = d_logits / float(logits_m.abs().max())
    rel_loss = rel(loss_p, loss_m)
    ppl_p, ppl_m = math.exp(loss_p), math.exp(loss_m)

    gen_p = generate(model, ids, n=gen_tokens)
    gen_m = generate(orig, ids, masked, n=gen_tokens)
    gen_equal = bool(torch.equal(gen_p, gen_m))

    ok = rel_loss <= tol and rel_logits <= tol
    wrapper_note = None
    if getattr(orig.config, "model_type", None) == "llama4":
        wrapper_ok, wrapper_note = check_llama4_wrapper(orig, model, ids, masked, tol)
        ok = ok and wrapper_ok
    res = dict(
        class_=kind, uniform=uniform, remote_code=remote_code, loss_pruned=loss_p, loss_masked=loss_m,
        loss_unmasked=loss_o, rel_loss=rel_loss, ppl_pruned=ppl_p, ppl_masked=ppl_m, max_abs_dlogits=d_logits,
        rel_logits=rel_logits, gen_equal=gen_equal, gen_pruned=gen_p.tolist(),
        counts={i: len(v) for i, v in sorted(plan["kept_experts"].items())},
    )
    log(f"  transformers {transformers.__version__}, torch {torch.__version__}, {str(dtype).split('.')[-1]}, eager")
    log(f"  pruned loaded as {kind} ({'trust_remote_code' if remote_code else 'plain from_pretrained'}), "
        f"experts per MoE layer {res['counts']}")
    log(f"  loss  pruned {loss_p:.9f}  masked original {loss_m:.9f}  (unmasked original {loss_o:.6f})")
    log(f"  ppl   pruned {ppl_p:.6f}  masked original {ppl_m:.6f}")
    log(f"  relative error: loss {rel_loss:.3e}, logits max|d|/max|ref| {rel_logits:.3e} (max|d| {d_logits:.3e}); "
        f"tol {tol:g}")
    log(f"  generate(max_new_tokens={gen_tokens}, greedy): pruned {gen_p.tolist()} "
        f"{'==' if gen_equal else '!='} masked original")
    if our_ppl is not None:
        t = tol if our_ppl_tol is None else our_ppl_tol
        r_m, r_p = rel(our_ppl, ppl_m), rel(our_ppl, ppl_p)
        log(f"  our ppl {our_ppl:.6f}: rel err vs masked original {r_m:.3e}, vs pruned in transformers {r_p:.3e} "
            f"(tol {t:g})")
        res.update(our_ppl=our_ppl, rel_our_ppl=r_m)
        ok = ok and r_m <= t
    if wrapper_note is not None:
        log(f"  {wrapper_note}")
        res["wrapper"] = wrapper_note
    if abs(loss_o - loss_m) < 1e-7 and masked:
        log("  note: masking did not change the loss (the masked experts are never selected on these ids)")
    res["ok"] = ok
    log(f"  {'PASS' if ok else 'FAIL'}")
    return res


# ------------------------------------------------------------------------------------------------
# Self-test on the fixtures
# ------------------------------------------------------------------------------------------------

SELF_TEST = {
    # name: (non-uniform plan, uniform plan); layer -> kept original ids. 8 experts, top-2 everywhere.
    "tiny-mixtral": ({0: [0, 1, 2, 5, 6], 1: [1, 3, 4]}, {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}),
    "tiny-mixtral-bf16": ({0: [0, 1, 2, 5, 6], 1: [3, 4]}, {0: [1, 2, 3, 5, 6, 7], 1: [0, 1, 3, 4, 5, 7]}),
    "tiny-qwen2-moe": ({0: [0, 3, 5, 6, 7], 1: [2, 4], 3: [0, 1, 2, 3, 4, 5, 6]}, {0: [0, 1, 4, 6], 1: [2, 3, 5, 7], 3: [0, 2, 4, 6]}),
    "tiny-qwen3-moe": ({1: [1, 2, 4, 5, 7], 3: [3, 6]}, {1: [0, 2, 4, 6], 3: [1, 3, 5, 7]}),
    "tiny-qwen3-moe-tf4": ({1: [0, 6], 3: [0, 1, 2, 4, 5, 7]}, {1: [0, 1, 2, 3], 3: [4, 5, 6, 7]}),
    "tiny-olmoe": ({0: [0, 1, 2, 3, 4, 5], 1: [6, 7], 2: [1, 3, 5]}, {0: [0, 1, 2, 3], 1: [2, 3, 6, 7], 2: [1, 3, 5, 7]}),
    # Llama 4 (transformers 5.x): MoE layers 1, 3; the wrapper's text model is tiny-llama4-text's config
    "tiny-llama4-text": ({1: [0, 2, 3, 5, 6, 7], 3: [1, 4, 6]}, {1: [0, 1, 3, 4, 6, 7], 3: [1, 2, 3, 5, 6, 7]}),
    "tiny-llama4": ({1: [1, 2, 3, 4, 6], 3: [0, 5, 7]}, {1: [0, 1, 2, 4, 5, 7], 3: [0, 2, 3, 4, 5, 6]}),
}


# Synthetic checkpoints for model_types without a fixture (transformers 5.x): built with transformers' own classes
# from a tiny random config (8 experts, top-2; Llama 4 also top-1), router rows drawn with std 0.3 and non-zero random
# correction biases, so that the bias changes which experts are selected.
# name: (config, non-uniform plan, uniform plan).
SYNTHETIC_COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=128, num_hidden_layers=4)
SYNTHETIC_LLAMA4_TEXT = dict(intermediate_size=32, intermediate_size_mlp=96, num_local_experts=8,
                             interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4, initializer_range=0.2,
                             rms_norm_eps=1e-6)
SYNTHETIC = {
    # n_group 2 (experts 0-3, 4-7), topk_group 1: each group loses equally many; layer 0 dense
    "synthetic-glm4-moe": (
        dict(model_type="glm4_moe", intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
             num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
             norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=True),
        {1: [0, 2, 3, 5, 6, 7], 2: [1, 3, 4, 6], 3: [0, 1, 2, 3, 4, 5, 6, 7]},
        {1: [0, 1, 3, 4, 5, 7], 2: [0, 1, 3, 4, 5, 7], 3: [0, 1, 3, 4, 5, 7]},
    ),
    "synthetic-minimax-m2": (
        dict(model_type="minimax_m2", intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, rotary_dim=8,
             bos_token_id=None, eos_token_id=None),
        {0: [0, 1, 2, 4, 6, 7], 1: [2, 3, 5, 7], 2: [0, 1, 2, 3, 4, 5, 6, 7], 3: [0, 3, 4, 5, 6]},
        {0: [1, 2, 3, 5, 6, 7], 1: [1, 2, 3, 5, 6, 7], 2: [1, 2, 3, 5, 6, 7], 3: [1, 2, 3, 5, 6, 7]},
    ),
    # layer 0 dense (moe_layer_start_index 1)
    "synthetic-ernie4_5-moe": (
        dict(model_type="ernie4_5_moe", intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
             moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1),
        {1: [0, 1, 2, 4, 6, 7], 2: [2, 3, 5, 7], 3: [0, 1, 3, 4, 5, 6, 7]},
        {1: [0, 2, 3, 4, 6, 7], 2: [0, 2, 3, 4, 6, 7], 3: [0, 2, 3, 4, 6, 7]},
    ),
    # Llama 4 text: MoE layers 1, 3 (interleave_moe_layer_step 2); chunked attention (chunk 8) on layers 0-2, NoPE +
    # temperature tuning on layer 3; top-2 and top-1
    "synthetic-llama4-text": (
        dict(model_type="llama4_text", **SYNTHETIC_LLAMA4_TEXT, num_experts_per_tok=2),
        {1: [0, 2, 3, 5, 6, 7], 3: [1, 4, 6]},
        {1: [0, 1, 3, 4, 6, 7], 3: [1, 2, 3, 5, 6, 7]},
    ),
    "synthetic-llama4-text-top1": (
        dict(model_type="llama4_text", **SYNTHETIC_LLAMA4_TEXT, num_experts_per_tok=1),
        {1: [2, 5], 3: [0, 1, 3, 4, 6]},
        {1: [0, 2, 4, 6], 3: [1, 3, 5, 7]},
    ),
    # the multimodal wrapper (Llama4ForConditionalGeneration): 28x28 images, patch 14, pixel shuffle 0.5 -> one image
    # token per image; image tokens 125-127 (boi, eoi, image)
    "synthetic-llama4": (
        dict(model_type="llama4", text_config=dict(**SYNTHETIC_LLAMA4_TEXT, num_experts_per_tok=2),
             vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                                image_size=28, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                                projector_output_dim=64, initializer_range=0.2),
             boi_token_index=125, eoi_token_index=126, image_token_index=127),
        {1: [1, 2, 3, 4, 6], 3: [0, 5, 7]},
        {1: [0, 1, 2, 4, 5, 7], 3: [0, 2, 3, 4, 5, 6]},
    ),
}


def make_synthetic(config: dict, out: Path, seed: int = 0) -> torch.Tensor:
    """Save a tiny random checkpoint of transformers' own class under `out`; returns seeded ids [2, 24]."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    if "text_config" in config:  # a multimodal wrapper (llama4): the common text settings go into text_config
        cfg = AutoConfig.for_model(**{**config, "text_config": {**SYNTHETIC_COMMON, **config["text_config"]}})
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    else:
        cfg = AutoConfig.for_model(**{**SYNTHETIC_COMMON, **config})
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tcfg = cfg.get_text_config()
    softmax_router = config["model_type"] == "ernie4_5_moe"  # probabilities ~1/E: a smaller bias matters
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("gate.weight", "router.weight")) and t.dim() == 2 and t.shape[1] == tcfg.hidden_size:
                t.normal_(0.0, 0.3)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn_like(t) * (0.02 if softmax_router else 0.1))
    model.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tcfg.vocab_size, (2, 24), generator=g)


def _check_plans(name: str, mdir: Path, ids: torch.Tensor, plans, work: Path, tol: float, rows: list) -> None:
    cfg = json.loads((mdir / "config.json").read_text())
    for label, kept, force_remote in (("non-uniform", plans[0], False), ("uniform", plans[1], False),
                                      ("uniform-remote", plans[1], True)):
        plan = {
            "format": PLAN_FORMAT, "model_type": cfg["model_type"],
            "original_experts": {i: 8 for i in kept}, "kept_experts": kept, "method": "self-test",
        }
        out = work / f"{name}-{label}"
        log(f"== {name} {label}: keep {kept}")
        summary = make_pruned(mdir, plan, out, force_remote_code=force_remote)
        res = check(mdir, out, plan, ids, tol=tol, remote_code=summary["remote_code"])
        if summary["remote_code"]:
            res.update(extra_remote_checks(out, ids, res))
        rows.append((name, label, res))


def self_test(fixtures: Path, tol: float, synthetic: bool = False) -> bool:
    """Fixtures under `fixtures/models` (``SELF_TEST``), or with `synthetic` the ``SYNTHETIC`` checkpoints."""
    rows = []
    work = Path(tempfile.mkdtemp(prefix="diep-pruned-check-"))
    try:
        if synthetic:
            for name, (config, *plans) in SYNTHETIC.items():
                mdir = work / name
                ids = make_synthetic(config, mdir)
                _check_plans(name, mdir, ids, plans, work, tol, rows)
        for name, plans in ({} if synthetic else SELF_TEST).items():
            mdir = fixtures / "models" / name
            ids_path = fixtures / "parity" / name / "ids.json"
            if not mdir.exists():
                log(f"skip {name}: {mdir} missing")
                continue
            _check_plans(name, mdir, load_ids(ids_path), plans, work, tol, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log()
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, float32, eager")
    log("| fixture | plan | experts per MoE layer | loaded as | loss pruned | loss masked original | rel err loss "
        "| rel err logits | generate equal | extra |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for name, label, r in rows:
        all_ok &= r["ok"]
        log(f"| {name} | {label} | {r['counts']} | {r['class_']} | {r['loss_pruned']:.9f} | {r['loss_masked']:.9f} "
            f"| {r['rel_loss']:.2e} | {r['rel_logits']:.2e} | {r['gen_equal']} | {r.get('extra', '')} |")
    log(f"\nself-test {'PASSED' if all_ok else 'FAILED'}")
    return all_ok


def extra_remote_checks(pruned: Path, ids: torch.Tensor, res: dict) -> dict:
    """Remote-code model: output_router_logits / aux loss run, save_pretrained + reload round trip."""
    model = load_model(pruned, remote_code=True)
    with torch.no_grad():
        out = model(ids, labels=ids, output_router_logits=True)
    n_max = max(res["counts"].values())
    assert all(r.shape[-1] == n_max for r in out.router_logits), [r.shape for r in out.router_logits]
    aux_loss = getattr(out, "aux_loss", None)  # glm4_moe, llama4 compute none (the llama4 wrapper has no field)
    assert aux_loss is None or torch.isfinite(aux_loss), aux_loss
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg = json.loads((Path(d) / "config.json").read_text())
        reloaded = load_model(Path(d), remote_code=True)
        with torch.no_grad():
            same = torch.equal(reloaded(ids).logits, model(ids).logits)
        ok = same and cfg["model_type"] == json.loads((pruned / "config.json").read_text())["model_type"]
    aux = "aux_loss ok" if aux_loss is not None else "no aux_loss"
    extra = f"router_logits width {n_max}, {aux}; save+reload {'identical' if ok else 'DIFFERS'}"
    log(f"  {extra}")
    return {"extra": extra, "ok": res["ok"] and ok}


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", type=Path, help="original checkpoint directory")
    ap.add_argument("--pruned", type=Path, help="pruned checkpoint directory to check")
    ap.add_argument("--plan", type=Path, help="pruning.json")
    ap.add_argument("--ids", type=Path, help="JSON array of equal-length token-id arrays")
    ap.add_argument("--our-ppl", type=float, default=None, help="the Rust tool's perplexity on the same ids")
    ap.add_argument("--our-ppl-tol", type=float, default=None, help="relative tolerance for --our-ppl (default --tol)")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (loss and logits)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="dtype both models are loaded and run in (float32 unless the model is too big for it)")
    ap.add_argument("--remote-code", choices=("auto", "yes", "no"), default="auto",
                    help="load the pruned dir with trust_remote_code (auto: iff the plan is non-uniform)")
    ap.add_argument("--make-pruned", type=Path, metavar="OUT", help="build a pruned dir from --original and --plan")
    ap.add_argument("--force-remote-code", action="store_true",
                    help="with --make-pruned: write num_experts_per_layer/auto_map/remote code even for a uniform plan")
    ap.add_argument("--self-test", action="store_true", help="check uniform and non-uniform plans on the fixtures")
    ap.add_argument("--self-test-synthetic", action="store_true",
                    help="the same on tiny random glm4_moe / minimax_m2 / ernie4_5_moe / llama4_text / llama4 "
                         "checkpoints (transformers 5.x)")
    ap.add_argument("--fixtures", type=Path, default=REPO / "fixtures")
    args = ap.parse_args()

    if args.self_test or args.self_test_synthetic:
        sys.exit(0 if self_test(args.fixtures, args.tol, synthetic=args.self_test_synthetic) else 1)
    if args.original is None or args.plan is None:
        ap.error("--original and --plan are required")
    plan = load_plan(args.plan)
    remote = {"auto": None, "yes": True, "no": False}[args.remote_code]
    if args.make_pruned is not None:
        summary = make_pruned(args.original, plan, args.make_pruned, force_remote_code=args.force_remote_code)
        log(f"wrote {args.make_pruned}: {summary}")
        if args.pruned is None:
            args.pruned = args.make_pruned
            if remote is None:
                remote = summary["remote_code"]
        if args.ids is None:
            return
    if args.pruned is None or args.ids is None:
        ap.error("--pruned and --ids are required to check")
    res = check(args.original, args.pruned, plan, load_ids(args.ids), tol=args.tol, our_ppl=args.our_ppl,
                our_ppl_tol=args.our_ppl_tol, remote_code=remote, dtype=DTYPES[args.dtype])
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
