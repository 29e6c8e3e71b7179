"""One DiEP optimiser step in PyTorch against the toolkit's, on the same model, the same batch
and the same CPU threads, reported as a ratio (issue 15).

The step is DiEP's default: the routed-gated relaxation with the implicit threshold — every
MoE layer's router sees `z + log p` and each routed contribution is multiplied by `p`, with
`p = sigmoid((s - theta)/tau)`, `s = log_softmax(alpha) + log N + log beta`, and one global
`theta` solving `sum p = keep` whose gradient is `dtheta/ds_i = sigma'_i / sum_j sigma'_j` —
and the `kl` objective `KL(F || F')` against the original model's next-token distribution,
computed once before timing (the toolkit keeps the top-64 tokens of it, PyTorch the whole
vocabulary: a few thousand entries here, so PyTorch does slightly more). Timed: the relaxed
forward, the objective and the backward to alpha, with PyTorch's autograd through the whole
model at once (the toolkit streams layer by layer and recomputes each layer in the backward).

Usage:
  python scripts/bench_torch_diep_step.py --model fixtures/trained-moe \
      --ids fixtures/trained-moe/heldout/english.ids.json \
      --xtask target/release/xtask [--batch 16] [--threads 2] [--out FILE.json]

Build xtask first: `cargo build --release -p xtask` (its `bench-step` command times our step).
Mixtral-architecture models only (the fixture and `scripts/train_heldout_moe.py`'s default).
"""
import argparse
import json
import math
import subprocess
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--ids", required=True)
ap.add_argument("--xtask", required=True, help="target/release/xtask")
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--ratio", type=float, default=0.5)
ap.add_argument("--tau", type=float, default=0.05)
ap.add_argument("--out")
args = ap.parse_args()
torch.set_num_threads(args.threads)

model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
for p in model.parameters():
    p.requires_grad_(False)
cfg = model.config
ids = torch.tensor(json.load(open(args.ids))[: args.batch])
blocks = [layer.mlp for layer in model.model.layers]
n_exp, top_k = cfg.num_local_experts, cfg.num_experts_per_tok


state = {"bias": None, "gate": None}


def relaxed_moe(idx):
    block = blocks[idx]

    def forward(hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits = F.linear(x, block.gate.weight) + state["bias"][idx]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, sel = torch.topk(probs, top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        w = w * state["gate"][idx][sel]
        # transformers' own expert computation (its default experts implementation).
        return block.experts(x, sel, w).reshape(shape)

    return forward


originals = [b.forward for b in blocks]
with torch.no_grad():
    ref = F.log_softmax(model(ids).logits, dim=-1)
for i, b in enumerate(blocks):
    b.forward = relaxed_moe(i)

total = n_exp * len(blocks)
keep = total - round(args.ratio * total)
alpha = [torch.randn(n_exp, generator=torch.Generator().manual_seed(i)).mul_(0.3).requires_grad_(True)
         for i in range(len(blocks))]
log_beta = [torch.zeros(1) for _ in blocks]


def step():
    s = torch.cat([F.log_softmax(a, 0) + math.log(n_exp) + lb for a, lb in zip(alpha, log_beta)])
    with torch.no_grad():  # bisection for theta
        lo, hi = s.min() - 50 * args.tau - 1, s.max() + 50 * args.tau + 1
        for _ in range(200):
            mid = (lo + hi) / 2
            if torch.sigmoid((s - mid) / args.tau).sum() > keep:
                lo = mid
            else:
                hi = mid
        theta0 = (lo + hi) / 2
        q = torch.sigmoid((s - theta0) / args.tau)
        wts = q * (1 - q)
        wts = wts / wts.sum()
    theta = theta0 + ((s - s.detach()) * wts).sum()
    log_p = F.logsigmoid((s - theta) / args.tau).split(n_exp)
    state["bias"], state["gate"] = log_p, [lp.exp() for lp in log_p]
    out = model(ids).logits
    kl = (ref.exp() * (ref - F.log_softmax(out, dim=-1))).sum() / (ids.shape[0] * ids.shape[1])
    for a in alpha:
        a.grad = None
    kl.backward()
    return float(kl)


step()
times = []
for _ in range(args.repeats):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
torch_s = min(times)
res = subprocess.run([args.xtask, "bench-step", "--model", args.model, "--ids", args.ids, "--batch", str(args.batch),
                      "--reps", str(args.repeats)],
                     check=True, capture_output=True, text=True, env={"RAYON_NUM_THREADS": str(args.threads),
                                                                       "PATH": "/usr/bin:/bin"})
ours = json.loads(res.stdout.strip().splitlines()[-1])
summary = {
    "model": args.model, "batch": ids.shape[0], "seq_len": ids.shape[1], "threads": args.threads,
    "torch": {"version": torch.__version__, "seconds_per_step": torch_s},
    "diep": ours, "ratio_torch_over_diep": torch_s / ours["seconds_per_step"],
}
print(json.dumps(summary, indent=2))
if args.out:
    json.dump(summary, open(args.out, "w"), indent=2)
