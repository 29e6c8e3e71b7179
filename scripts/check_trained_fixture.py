#!/usr/bin/env python3
"""Check ``fixtures/trained-moe`` (built by ``cargo xtask fixture train``) in transformers.

VALIDATION ONLY: never run by the Rust test suite. Needs torch, transformers (5.x) and tokenizers;
no network (it sets ``HF_HUB_OFFLINE=1``)::

    /opt/ref-venv/bin/python scripts/check_trained_fixture.py [--model fixtures/trained-moe] \\
        [--xtask target/release/xtask] [--mc]

1. Loads the directory with ``AutoModelForCausalLM.from_pretrained`` (float32, eager attention;
   missing / unexpected / mismatched keys are an error) and ``AutoTokenizer`` (``tokenizer.json``).
2. Tokenizer parity: ``heldout/<domain>.ids.json`` must be the first N×L tokens of the Python
   tokenizer's encoding of ``heldout/<domain>.txt``.
3. Loss parity per domain: transformers' mean next-token cross-entropy over the held-out ids
   (``model(ids, labels=ids)``, no router aux loss) against ``cargo xtask eval --model DIR --ids
   FILE --json OUT`` (run here; ``--xtask`` uses a built binary instead of ``cargo xtask``).
   Exit status 1 if the relative error of the mean NLL exceeds ``--tol`` (1e-4).
4. Prints held-out perplexity per domain against the uniform baseline (the vocabulary size) and,
   with ``--mc``, the accuracy on ``mc.jsonl`` (the choice with the highest summed log-probability
   of its continuation tokens given the context; chance is 25%).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOMAINS = ("english", "code")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def load_ids(path: Path) -> torch.Tensor:
    data = json.loads(path.read_text())
    if not data or len({len(r) for r in data}) != 1:
        raise SystemExit(f"{path}: expected a JSON array of equal-length token-id arrays")
    return torch.tensor(data, dtype=torch.long)


@torch.no_grad()
def transformers_nll(model, ids: torch.Tensor, batch: int = 16) -> tuple[float, int]:
    """(mean next-token NLL in nats, predictions) as `model(ids, labels=ids).loss` averages it."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch):
        chunk = ids[i : i + batch]
        out = model(chunk, labels=chunk)
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total += out.loss.double().item() * n
        count += n
    return total / count, count


def rust_eval(model_dir: Path, ids_path: Path, xtask: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [xtask] if xtask else ["cargo", "xtask"]
        cmd += ["eval", "--model", str(model_dir), "--ids", str(ids_path), "--json", str(out)]
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr}")
        return json.loads(out.read_text())


@torch.no_grad()
def mc_accuracy(model, tok, path: Path) -> dict[str, tuple[int, int]]:
    """Per domain (correct, items)."""
    res: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        ctx = tok(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            tgt = ids[0, 1:]
            picked = logp[torch.arange(len(tgt)), tgt][len(ctx) - 1 :]
            scores.append(picked.sum().item())
        best = max(range(len(scores)), key=scores.__getitem__)
        r = res.setdefault(item.get("domain", "all"), [0, 0])
        r[0] += int(best == item["label"])
        r[1] += 1
    return {k: (v[0], v[1]) for k, v in res.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "fixtures" / "trained-moe")
    ap.add_argument("--xtask", help="a built xtask binary to run instead of `cargo xtask`")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--mc", action="store_true", help="also score mc.jsonl")
    args = ap.parse_args()
    d = args.model.resolve()

    model, info = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"loading {d}: {bad}")
    model.eval()
    tok = AutoTokenizer.from_pretrained(d)
    cfg = model.config
    vocab = cfg.vocab_size
    params = sum(p.numel() for p in model.parameters())
    log(f"{d}: {type(model).__name__}, {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts, "
        f"top-{cfg.num_experts_per_tok}, vocab {vocab}, {params} parameters")

    ok = True
    log(f"{'domain':>8} {'tf ppl':>10} {'rust ppl':>10} {'uniform':>8} {'rel err (NLL)':>14} {'tokenizer':>10}")
    for dom in DOMAINS:
        ids_path = d / "heldout" / f"{dom}.ids.json"
        ids = load_ids(ids_path)
        text = (d / "heldout" / f"{dom}.txt").read_text()
        enc = tok(text, add_special_tokens=False)["input_ids"]
        n = ids.numel()
        tok_ok = enc[:n] == ids.flatten().tolist()
        nll, count = transformers_nll(model, ids)
        ours = rust_eval(d, ids_path, args.xtask)
        # `xtask eval` reports each input file under "details" (perplexity, predictions, mean_nll).
        ours = next(iter(ours["details"].values()))
        if ours["predictions"] != count:
            raise SystemExit(f"{dom}: {ours['predictions']} predictions in cargo xtask eval, {count} here")
        rel = abs(ours["mean_nll"] - nll) / abs(nll)
        ok &= tok_ok and rel <= args.tol
        log(f"{dom:>8} {math.exp(nll):>10.4f} {ours['perplexity']:>10.4f} {vocab:>8} {rel:>14.2e} "
            f"{'same' if tok_ok else 'DIFFERENT':>10}")

    if args.mc:
        for dom, (correct, total) in mc_accuracy(model, tok, d / "mc.jsonl").items():
            log(f"mc.jsonl {dom}: {correct}/{total} = {correct / total:.1%} (chance 25%)")

    log("OK" if ok else f"FAILED (tolerance {args.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
