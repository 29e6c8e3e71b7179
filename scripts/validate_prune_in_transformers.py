#!/usr/bin/env python3
"""Acceptance check for `cargo xtask prune`: a pruned checkpoint, loaded in transformers 5.x, computes what the
original checkpoint computes with the pruned experts masked out of the router, and `cargo xtask eval --ids`
of the pruned directory agrees with both.

VALIDATION ONLY: never run by the Rust test suite. Needs torch, safetensors and transformers 5.x. Offline
(sets ``HF_HUB_OFFLINE=1``).

Usage::

    /opt/ref-venv/bin/python scripts/validate_prune_in_transformers.py \\
        --original ORIG_DIR --pruned PRUNED_DIR --ids IDS.json [--xtask target/debug/xtask] [--tol 1e-4] \\
        [--json REPORT.json]

What it does:

1. Reads ``PRUNED_DIR/pruning.json`` (``kept_experts: {"<layer>": [original expert ids]}``) and IDS.json (a JSON
   array of equal-length token-id arrays, or ``{"ids": [...]}``).
2. Surgery check (informative, also gates the exit status): every tensor of the pruned safetensors equals the
   original's bit for bit, with per-expert tensors ``...experts.{e}...`` mapped to ``kept[layer][e]`` and router
   ``...gate.weight`` rows sliced to the kept ids.
3. Loads PRUNED_DIR in float32 with eager attention and eager experts (``trust_remote_code=True`` when its
   config.json has ``num_experts_per_layer`` or ``auto_map``); missing / unexpected / mismatched keys are an
   error. Checks that each MoE layer's router has as many rows as the plan keeps. Computes the mean next-token
   NLL of the ids (float64 cross-entropy of the logits; also ``model(ids, labels=ids).loss``).
4. Loads ORIG_DIR the same way (transformers' own class) and computes the loss unmasked (reported) and with the
   pruned experts masked: for the duration of each MoE router's forward, ``torch.nn.functional.linear`` is
   wrapped so that the call whose weight *is* that router's weight gets ``-inf`` in the pruned columns, i.e. the
   router logits are masked right after the projection, before transformers' own softmax / top-k /
   renormalisation. The patch is verified: every masked layer must have been hit on every forward, the
   returned router logits must be ``-inf`` exactly in the pruned columns, and no returned top-k index may be a
   pruned expert.
5. Runs ``XTASK eval --model PRUNED_DIR --ids IDS.json --json TMP`` and reads its perplexity.
6. Prints the perplexities, the pairwise relative errors and the max |logit difference| pruned vs masked;
   exit status 1 if any relative error of the three perplexities exceeds ``--tol``, or a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

EXPERT_RE = re.compile(r"^(.*\blayers\.(\d+)\..*\bexperts\.)(\d+)(\..*)$")
GATE_RE = re.compile(r"^.*\blayers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight$")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def read_ids(path: Path) -> torch.Tensor:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data["ids"]
    if not data or len({len(s) for s in data}) != 1:
        raise SystemExit(f"{path}: expected a non-empty array of equal-length token-id arrays")
    return torch.tensor(data, dtype=torch.long)


def read_plan(pruned: Path) -> dict[int, list[int]]:
    plan = json.loads((pruned / "pruning.json").read_text())
    kept = {int(k): [int(e) for e in v] for k, v in plan["kept_experts"].items()}
    for layer, ids in kept.items():
        if ids != sorted(set(ids)):
            raise SystemExit(f"pruning.json: kept_experts[{layer}] is not strictly ascending: {ids}")
    return kept


def tensors(model_dir: Path) -> dict[str, tuple[Path, str]]:
    """On-disk tensor name -> (file, name), single file or sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: (model_dir / f, k) for k, f in weight_map.items()}
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = (f, k)
    return out


def load_tensor(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(where[0], "pt") as h:
        return h.get_tensor(where[1])


# ----------------------------------------------------------------------------------------------------------------
# Surgery check: pruned tensors == original tensors (per-expert renumbering, router rows sliced)
# ----------------------------------------------------------------------------------------------------------------


def surgery_check(original: Path, pruned: Path, kept: dict[int, list[int]]) -> list[str]:
    orig_t, pruned_t = tensors(original), tensors(pruned)
    problems = []
    expected_names = set()
    for name, where in orig_t.items():
        m = EXPERT_RE.match(name)
        if m and int(m.group(2)) in kept:
            layer, e = int(m.group(2)), int(m.group(3))
            if e in kept[layer]:
                expected_names.add(f"{m.group(1)}{kept[layer].index(e)}{m.group(4)}")
        else:
            expected_names.add(name)
    if set(pruned_t) != expected_names:
        problems.append(
            f"tensor names: missing {sorted(expected_names - set(pruned_t))[:5]}, "
            f"unexpected {sorted(set(pruned_t) - expected_names)[:5]}"
        )
    for name, where in pruned_t.items():
        t = load_tensor(where)
        m = EXPERT_RE.match(name)
        g = GATE_RE.match(name)
        if m and int(m.group(2)) in kept:
            layer, e = int(m.group(2)), int(m.group(3))
            src = f"{m.group(1)}{kept[layer][e]}{m.group(4)}"
            ref = load_tensor(orig_t[src])
        elif g and int(g.group(1)) in kept:
            ref = load_tensor(orig_t[name])[kept[int(g.group(1))]]
        elif name in orig_t:
            ref = load_tensor(orig_t[name])
        else:
            continue
        if t.dtype != ref.dtype or t.shape != ref.shape or not torch.equal(t, ref):
            problems.append(f"{name}: differs from the original ({tuple(t.shape)} {t.dtype} vs {tuple(ref.shape)} {ref.dtype})")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def needs_remote_code(model_dir: Path) -> bool:
    cfg = json.loads((model_dir / "config.json").read_text())
    return "num_experts_per_layer" in cfg or "auto_map" in cfg


def load(model_dir: Path):
    remote = needs_remote_code(model_dir)
    kw = dict(dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["experts_implementation"] = "eager"
    if remote:
        kw["trust_remote_code"] = True
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    except (TypeError, ValueError) as e:  # remote code that does not take experts_implementation
        if "experts_implementation" not in str(e):
            raise
        kw.pop("experts_implementation")
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{model_dir}: loading info not clean: {bad}")
    model.eval()
    return model, remote


def routers(model) -> dict[int, torch.nn.Module]:
    """Layer index -> the MoE block's router module (`<block>.gate` of a block that has `experts`)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():
            parts = name.split(".")
            if parts[-1] != "gate" or len(parts) < 2:
                continue
            parent = layer.get_submodule(".".join(parts[:-1]))
            if hasattr(parent, "experts") and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
                if i in out and out[i] is not mod:
                    raise SystemExit(f"layer {i}: several routers")
                out[i] = mod
    return out


@torch.no_grad()
def score(model, ids: torch.Tensor):
    out = model(input_ids=ids, labels=ids)
    logits = out.logits.float()
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1), reduction="mean"
    ).item()
    return nll, float(out.loss), logits


class RouterMask:
    """Masks pruned router columns with -inf inside each router's forward (see module docstring, step 4)."""

    def __init__(self, model, kept: dict[int, list[int]]):
        self.model = model
        self.routers = routers(model)
        self.pruned: dict[int, list[int]] = {}
        for layer, ids in kept.items():
            if layer not in self.routers:
                raise SystemExit(f"pruning.json names layer {layer}, which has no MoE router in the original")
            n = self.routers[layer].weight.shape[0]
            if max(ids) >= n:
                raise SystemExit(f"layer {layer}: kept id {max(ids)} >= {n} experts")
            drop = [e for e in range(n) if e not in set(ids)]
            if drop:
                self.pruned[layer] = drop
        self.hits: dict[int, int] = {}
        self.checked: dict[int, int] = {}
        self.handles = []

    def _wrap(self, layer: int, router: torch.nn.Module):
        drop = torch.tensor(self.pruned[layer], dtype=torch.long)
        orig_forward = router.forward
        mask = self

        def forward(*args, **kwargs):
            real_linear = torch.nn.functional.linear

            def linear(x, weight, bias=None):
                y = real_linear(x, weight, bias)
                if weight is router.weight:
                    mask.hits[layer] = mask.hits.get(layer, 0) + 1
                    y = y.index_fill(-1, drop.to(y.device), float("-inf"))
                return y

            torch.nn.functional.linear = linear
            try:
                out = orig_forward(*args, **kwargs)
            finally:
                torch.nn.functional.linear = real_linear
            # Verify: logits -inf exactly in the pruned columns, no pruned expert selected.
            logits = out[0] if isinstance(out, tuple) else out
            cols = torch.isneginf(logits).all(dim=0)
            expect = torch.zeros(logits.shape[-1], dtype=torch.bool)
            expect[drop] = True
            if not torch.equal(cols.cpu(), expect) or torch.isneginf(logits[:, ~expect]).any():
                raise RuntimeError(f"layer {layer}: router logits not masked as planned")
            if isinstance(out, tuple) and len(out) >= 3 and out[2].dtype in (torch.int64, torch.int32):
                if torch.isin(out[2].cpu(), drop).any():
                    raise RuntimeError(f"layer {layer}: a pruned expert was selected in top-k")
            mask.checked[layer] = mask.checked.get(layer, 0) + 1
            return out

        router.forward = forward
        self.handles.append((router, orig_forward))

    def __enter__(self):
        for layer in self.pruned:
            self._wrap(layer, self.routers[layer])
        return self

    def __exit__(self, *exc):
        for router, _ in self.handles:
            del router.forward  # back to the class's forward
        self.handles.clear()
        return False


def run_xtask(xtask: str, pruned: Path, ids_path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [xtask, "eval", "--model", str(pruned), "--ids", str(ids_path), "--json", str(out)]
        log("  $ " + " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"xtask eval failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
        return json.loads(out.read_text())


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--original", type=Path, required=True)
    ap.add_argument("--pruned", type=Path, required=True)
    ap.add_argument("--ids", type=Path, required=True)
    ap.add_argument("--xtask", default=str(Path(__file__).resolve().parent.parent / "target" / "debug" / "xtask"))
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    kept = read_plan(args.pruned)
    ids = read_ids(args.ids)
    counts = {layer: len(v) for layer, v in sorted(kept.items())}
    log(f"transformers {transformers.__version__}, torch {torch.__version__}")
    log(f"ids: {tuple(ids.shape)}; kept per layer: {counts} ({'non-uniform' if len(set(counts.values())) > 1 else 'uniform'})")
    failures = []

    problems = surgery_check(args.original, args.pruned, kept)
    log(f"surgery check (tensors vs original, renumbered/sliced): {'OK' if not problems else 'FAIL'}")
    for p in problems[:20]:
        log(f"  {p}")
    failures += problems[:1]

    pruned_model, remote = load(args.pruned)
    log(f"pruned loaded as {type(pruned_model).__name__} ({'trust_remote_code=True' if remote else 'plain'})")
    p_routers = routers(pruned_model)
    for layer, ids_kept in kept.items():
        rows = p_routers[layer].weight.shape[0] if layer in p_routers else None
        if rows != len(ids_kept):
            failures.append(f"pruned model layer {layer}: router has {rows} rows, plan keeps {len(ids_kept)}")
    nll_p, loss_p, logits_p = score(pruned_model, ids)
    del pruned_model

    orig_model, _ = load(args.original)
    nll_o, loss_o, _ = score(orig_model, ids)
    with RouterMask(orig_model, kept) as mask:
        nll_m, loss_m, logits_m = score(orig_model, ids)
    missed = [layer for layer in mask.pruned if mask.hits.get(layer, 0) < 1 or mask.checked.get(layer, 0) < 1]
    if missed:
        failures.append(f"mask patch did not take effect in layers {missed}")
    log(f"mask patch: layers {sorted(mask.pruned)} hit {mask.hits} verified {mask.checked}")
    # the patch must be gone again
    nll_o2, _, _ = score(orig_model, ids)
    if nll_o2 != nll_o:
        failures.append("mask patch leaked after removal")
    del orig_model

    xt = run_xtask(args.xtask, args.pruned, args.ids)
    ppl = {
        "original_unpruned": math.exp(nll_o),
        "transformers_pruned": math.exp(nll_p),
        "masked_original": math.exp(nll_m),
        "xtask_eval": float(next(iter(xt["perplexity"].values()))),
    }
    errs = {
        "pruned_vs_masked": rel(ppl["transformers_pruned"], ppl["masked_original"]),
        "xtask_vs_masked": rel(ppl["xtask_eval"], ppl["masked_original"]),
        "xtask_vs_pruned": rel(ppl["xtask_eval"], ppl["transformers_pruned"]),
    }
    dlog = (logits_p - logits_m).abs().max().item()
    scale = logits_m.abs().max().item()
    loss_check = max(abs(loss_p - nll_p), abs(loss_m - nll_m))
    log(f"perplexity: original (unpruned) {ppl['original_unpruned']:.6f}")
    log(f"            transformers(pruned) {ppl['transformers_pruned']:.6f}  [model loss {math.exp(loss_p):.6f}]")
    log(f"            masked original      {ppl['masked_original']:.6f}  [model loss {math.exp(loss_m):.6f}]")
    log(f"            xtask eval           {ppl['xtask_eval']:.6f}")
    for k, v in errs.items():
        log(f"rel err {k}: {v:.3e}")
    log(f"logits pruned vs masked: max|d| {dlog:.3e} (max|ref| {scale:.3e}); |model loss - own NLL| {loss_check:.2e}")
    for k, v in errs.items():
        if not v <= args.tol:
            failures.append(f"rel err {k} = {v:.3e} > {args.tol}")
    verdict = "PASS" if not failures else "FAIL"
    log(f"{verdict}" + ("" if not failures else ": " + "; ".join(failures)))
    if args.json:
        args.json.write_text(json.dumps(dict(
            original=str(args.original), pruned=str(args.pruned), kept_per_layer=counts,
            non_uniform=len(set(counts.values())) > 1, remote_code=remote, perplexity=ppl, rel_err=errs,
            logits_max_abs_diff=dlog, logits_max_abs_ref=scale, surgery_problems=problems,
            failures=failures, verdict=verdict,
        ), indent=2) + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
