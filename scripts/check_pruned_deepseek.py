#!/usr/bin/env python3
"""Check that a pruned DeepSeek-V2/V3 or gpt-oss checkpoint (written by ``diep-surgery``, e.g. ``cargo xtask prune
--plan``), uniform or non-uniform, loads in transformers and computes what the original computes with the pruned
experts removed; optionally compare the Rust tool's perplexity.

VALIDATION ONLY: never run by the Rust test suite. Needs torch, safetensors and transformers 5.x.

    cargo run -p xtask -- prune --model fixtures/models/tiny-deepseek-v3 --plan PLAN.json --out PRUNED_DIR
    /opt/ref-venv/bin/python scripts/check_pruned_deepseek.py \\
        --original ORIG_DIR --pruned PRUNED_DIR [--ids ids.json] [--our-ppl 123.4]

Non-uniform checkpoints (``num_experts_per_layer`` + ``auto_map`` in config.json) load through the shipped
remote code ``modeling_diep_moe.py`` (``trust_remote_code=True``); uniform ones through transformers' own classes.

Two references, both transformers' own code running the ORIGINAL weights:

* ``deleted``: the original with the pruned experts physically deleted in memory (router rows,
  ``e_score_correction_bias`` / router-bias entries, expert weights; per-layer ``num_experts`` updated), so the
  group-limited routers regroup over the kept experts;
* ``masked``: the original, unchanged except that the pruned experts can never be routed to: DeepSeek-V3's
  ``e_score_correction_bias`` and gpt-oss's router bias set to -inf for them (selection is on ``sigmoid + bias``
  resp. the biased logits; the weights of the chosen experts are unchanged), DeepSeek-V2's router logits set to
  -inf before its softmax (transformers' router forward with the mask added). Plain -inf router logits are not
  removal for V3: a sigmoid score of 0 plus the correction bias is still selectable.

1. Loads PRUNED_DIR (float32, eager): no missing / unexpected keys, every MoE layer's router row count (and the
   expert count) equal to the plan's kept count for that layer.
2. Builds both references from ORIG_DIR and the plan (PRUNED_DIR/pruning.json).
3. Compares logits (max |d| and max |d| / max |ref|) and ``model(ids, labels=ids).loss``; exit 1 above ``--tol``.
4. With ``--our-ppl``, compares the Rust perplexity with ``exp(loss)`` of the pruned checkpoint.

Why not ``check_pruned_in_transformers.py``: it masks with -inf router logits only, which is removal only for
softmax routers.
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
        output_loading_info=True, trust_remote_code=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"{model_dir}: loading problems: {bad}")
    return model.eval()


def moe_block(layer):
    m = getattr(layer, "mlp", None)
    if m is None or not hasattr(m, "experts"):
        return None
    return m if hasattr(m, "gate") or hasattr(m, "router") else None


def router_of(blk):
    return blk.gate if hasattr(blk, "gate") else blk.router


def kept_rows(blk) -> int:
    return router_of(blk).weight.shape[0]


@torch.no_grad()
def delete_experts(model, kept: dict[int, list[int]]):
    m = copy.deepcopy(model)
    for i, keep in kept.items():
        blk = moe_block(m.model.layers[i])
        gate = router_of(blk)
        gate.weight = torch.nn.Parameter(gate.weight[keep].clone())
        if getattr(gate, "e_score_correction_bias", None) is not None:
            gate.e_score_correction_bias = torch.nn.Buffer(gate.e_score_correction_bias[keep].clone())
        if getattr(gate, "bias", None) is not None:
            gate.bias = torch.nn.Parameter(gate.bias[keep].clone())
        gate.num_experts = len(keep)
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            if getattr(blk.experts, name, None) is not None:
                setattr(blk.experts, name, torch.nn.Parameter(getattr(blk.experts, name)[keep].clone()))
        blk.experts.num_experts = len(keep)
    return m


def _v2_masked_forward(gate, mask):
    """transformers 5.x ``DeepseekV2TopkRouter.forward`` with ``mask`` (0 / -inf) added to the router logits."""
    F = torch.nn.functional

    def forward(hidden_states):
        hidden_states = hidden_states.view(-1, gate.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), gate.weight.type(torch.float32)) + mask
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        if gate.topk_method == "greedy":
            topk_weights, topk_indices = torch.topk(scores, k=gate.top_k, dim=-1, sorted=False)
        elif gate.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, gate.num_group, gate.num_experts // gate.num_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = (
                group_mask.unsqueeze(-1)
                .expand(-1, gate.num_group, gate.num_experts // gate.num_group)
                .reshape(-1, gate.num_experts)
            )
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
            topk_weights, topk_indices = torch.topk(scores, k=gate.top_k, dim=-1, sorted=False)
        else:
            raise ValueError(gate.topk_method)
        return router_logits, topk_weights * gate.routed_scaling_factor, topk_indices

    return forward


@torch.no_grad()
def mask_experts(model, kept: dict[int, list[int]]):
    m = copy.deepcopy(model)
    for i, keep in kept.items():
        gate = router_of(moe_block(m.model.layers[i]))
        mask = torch.full((gate.weight.shape[0],), float("-inf"))
        mask[keep] = 0.0
        if getattr(gate, "e_score_correction_bias", None) is not None:  # DeepSeek-V3
            gate.e_score_correction_bias += mask
        elif getattr(gate, "bias", None) is not None:  # gpt-oss
            gate.bias += mask
        elif m.config.model_type == "deepseek_v2":
            gate.forward = _v2_masked_forward(gate, mask)
        else:
            raise SystemExit(f"no masked reference for {m.config.model_type}")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", type=Path, required=True)
    ap.add_argument("--pruned", type=Path, required=True)
    ap.add_argument("--ids", type=Path, help="JSON array of equal-length token-id arrays (default: 2 x 24 seeded)")
    ap.add_argument("--plan", type=Path, help="pruning.json (default PRUNED/pruning.json)")
    ap.add_argument("--our-ppl", type=float, default=None)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    plan = json.loads((args.plan or args.pruned / "pruning.json").read_text())
    kept = {int(k): v for k, v in plan["kept_experts"].items()}

    orig = load(args.original)
    pruned = load(args.pruned)
    cfg = pruned.config
    assert cfg.model_type in ("deepseek_v3", "deepseek_v2", "gpt_oss"), cfg.model_type
    per_layer = getattr(cfg, "num_experts_per_layer", None)
    uniform = len({len(v) for v in kept.values()}) == 1
    count_key = "num_local_experts" if cfg.model_type == "gpt_oss" else "n_routed_experts"
    assert getattr(cfg, count_key) == max(len(v) for v in kept.values()), (getattr(cfg, count_key), kept)
    assert (per_layer is None) == uniform, ("num_experts_per_layer", per_layer, uniform)
    for i, layer in enumerate(pruned.model.layers):
        blk = moe_block(layer)
        assert (blk is not None) == (i in kept), f"layer {i}: MoE placement differs from the plan"
        if blk is not None:
            assert kept_rows(blk) == len(kept[i]), (i, kept_rows(blk), len(kept[i]))
            if per_layer is not None:
                assert per_layer[i] == len(kept[i]), (i, per_layer)
    if args.ids is not None:
        ids = torch.tensor(json.loads(args.ids.read_text()))
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)

    references = {"deleted": delete_experts(orig, kept), "masked": mask_experts(orig, kept)}
    with torch.no_grad():
        out_p = pruned(ids, labels=ids)
        loss_o = float(orig(ids, labels=ids).loss)
        outs = {name: ref(ids, labels=ids) for name, ref in references.items()}
    lp = float(out_p.loss)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; {cfg.model_type} "
          f"({type(pruned).__name__}), kept experts per MoE layer "
          f"{ {i: len(v) for i, v in sorted(kept.items())} }")
    ok = True
    for name, out_r in outs.items():
        lr = float(out_r.loss)
        d = float((out_p.logits - out_r.logits).abs().max())
        rel_logits = d / float(out_r.logits.abs().max())
        rel_loss = abs(lp - lr) / abs(lr)
        print(f"[{name}] loss pruned {lp:.9f}  reference {lr:.9f}  (unpruned {loss_o:.6f}); "
              f"max|d logits| {d:.3e} (relative {rel_logits:.3e}), loss rel err {rel_loss:.3e}; tol {args.tol:g}")
        ok = ok and rel_loss <= args.tol and rel_logits <= args.tol
    if args.our_ppl is not None:
        ppl = math.exp(lp)
        r = abs(args.our_ppl - ppl) / ppl
        print(f"our ppl {args.our_ppl:.6f} vs transformers {ppl:.6f}: rel err {r:.3e}")
        ok = ok and r <= args.tol
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
