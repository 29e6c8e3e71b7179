#!/usr/bin/env python3
"""Check that a pruned DeepSeek-V2/V3 checkpoint (written by ``diep-surgery``, e.g. ``cargo xtask prune
--plan``) loads in transformers and computes what the original computes with the pruned experts
deleted; optionally compare the Rust tool's perplexity.

VALIDATION ONLY: never run by the Rust test suite. Needs torch, safetensors and transformers 5.x.

    /opt/ref-venv/bin/python scripts/check_pruned_deepseek.py \\
        --original ORIG_DIR --pruned PRUNED_DIR --ids ids.json [--our-ppl 123.4]

Why not ``check_pruned_in_transformers.py``: it masks pruned experts by setting their router logits to
-inf, which is removal only for softmax routers. DeepSeek-V3 selects on ``sigmoid(logit) + bias``, so
a -inf logit keeps the expert selectable through its ``e_score_correction_bias``; and group-limited
routers regroup experts when counts change. The reference here is the original model with the
experts physically deleted in memory (router rows, ``e_score_correction_bias`` entries, expert
weights; ``num_experts`` updated), run by transformers' own routing code.

1. Loads PRUNED_DIR with a plain ``from_pretrained`` (float32, eager): no missing / unexpected keys,
   ``n_routed_experts`` and every router's row count equal to the plan's kept count.
2. Deletes the experts the plan (PRUNED_DIR/pruning.json) removed from the original, in memory.
3. Compares logits (max |d| / max |ref|) and ``model(ids, labels=ids).loss``; exit 1 above ``--tol``.
4. With ``--our-ppl``, compares the Rust perplexity with ``exp(loss)`` of the pruned checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def load(model_dir: Path):
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"{model_dir}: loading problems: {bad}")
    return model.eval()


def moe_block(layer):
    m = getattr(layer, "mlp", None)
    return m if m is not None and hasattr(m, "gate") and hasattr(m, "experts") else None


@torch.no_grad()
def delete_experts(model, kept: dict[int, list[int]]):
    m = copy.deepcopy(model)
    for i, keep in kept.items():
        blk = moe_block(m.model.layers[i])
        gate = blk.gate
        gate.weight = torch.nn.Parameter(gate.weight[keep].clone())
        if getattr(gate, "e_score_correction_bias", None) is not None:
            gate.e_score_correction_bias = torch.nn.Buffer(gate.e_score_correction_bias[keep].clone())
        gate.num_experts = len(keep)
        blk.experts.gate_up_proj = torch.nn.Parameter(blk.experts.gate_up_proj[keep].clone())
        blk.experts.down_proj = torch.nn.Parameter(blk.experts.down_proj[keep].clone())
        blk.experts.num_experts = len(keep)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", type=Path, required=True)
    ap.add_argument("--pruned", type=Path, required=True)
    ap.add_argument("--ids", type=Path, required=True, help="JSON array of equal-length token-id arrays")
    ap.add_argument("--plan", type=Path, help="pruning.json (default PRUNED/pruning.json)")
    ap.add_argument("--our-ppl", type=float, default=None)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    plan = json.loads((args.plan or args.pruned / "pruning.json").read_text())
    kept = {int(k): v for k, v in plan["kept_experts"].items()}
    ids = torch.tensor(json.loads(args.ids.read_text()))

    orig = load(args.original)
    pruned = load(args.pruned)
    cfg = pruned.config
    assert cfg.model_type in ("deepseek_v3", "deepseek_v2"), cfg.model_type
    counts = {len(v) for v in kept.values()}
    assert counts == {cfg.n_routed_experts}, (counts, cfg.n_routed_experts)
    for i, layer in enumerate(pruned.model.layers):
        blk = moe_block(layer)
        assert (blk is not None) == (i in kept), f"layer {i}: MoE placement differs from the plan"
        if blk is not None:
            assert blk.gate.weight.shape[0] == len(kept[i]), i
    reference = delete_experts(orig, kept)

    with torch.no_grad():
        out_p = pruned(ids, labels=ids)
        out_r = reference(ids, labels=ids)
        loss_o = float(orig(ids, labels=ids).loss)
    lp, lr = float(out_p.loss), float(out_r.loss)
    d = float((out_p.logits - out_r.logits).abs().max())
    rel_logits = d / float(out_r.logits.abs().max())
    rel_loss = abs(lp - lr) / abs(lr)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; {cfg.model_type}, "
          f"experts per MoE layer {sorted(set(len(v) for v in kept.values()))}")
    print(f"loss pruned {lp:.9f}  original-with-experts-deleted {lr:.9f}  (unpruned {loss_o:.6f})")
    print(f"relative error: loss {rel_loss:.3e}, logits {rel_logits:.3e} (max|d| {d:.3e}); tol {args.tol:g}")
    ok = rel_loss <= args.tol and rel_logits <= args.tol
    if args.our_ppl is not None:
        ppl = math.exp(lp)
        r = abs(args.our_ppl - ppl) / ppl
        print(f"our ppl {args.our_ppl:.6f} vs transformers {ppl:.6f}: rel err {r:.3e}")
        ok = ok and r <= args.tol
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
