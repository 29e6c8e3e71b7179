"""Per-domain KL to the original model and cross-entropy change of pruned checkpoints on a
model's held-out windows, computed with transformers (a diagnostic, not used by the tests):
does the plan with the lowest KL to the original also keep the most perplexity?

    /opt/ref-venv/bin/python scripts/plan_kl.py --model /tmp/heldout-fine PRUNED_DIR...

For each pruned directory and domain (`heldout/{english,code}.ids.json` of `--model`) it prints
the mean KL(original || pruned) over predicted positions, the mean change of next-token
cross-entropy on the text, and the perplexity ratio base / pruned (the benchmark's retention
term). Uniform plans only: transformers reads one expert count per layer.
"""
import argparse, json

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("pruned", nargs="+")
args = ap.parse_args()
torch.set_num_threads(2)


def load(d):
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    m.eval()
    return m


domains = {k: json.load(open(f"{args.model}/heldout/{k}.ids.json")) for k in ["english", "code"]}
base = load(args.model)
with torch.no_grad():
    base_logp = {k: [torch.log_softmax(base(torch.tensor([s])).logits[0, :-1], -1) for s in v] for k, v in domains.items()}
for d in args.pruned:
    m = load(d)
    parts = []
    with torch.no_grad():
        for k, seqs in domains.items():
            kl = ce = ce_base = n = 0.0
            for s, bl in zip(seqs, base_logp[k]):
                pl = torch.log_softmax(m(torch.tensor([s])).logits[0, :-1], -1)
                y = torch.tensor(s[1:])[:, None]
                kl += (bl.exp() * (bl - pl)).sum().item()
                ce += -pl.gather(1, y).sum().item()
                ce_base += -bl.gather(1, y).sum().item()
                n += len(s) - 1
            parts.append(f"{k}: kl {kl / n:.4f}  dCE {(ce - ce_base) / n:.4f}  ppl ratio {torch.tensor((ce_base - ce) / n).exp().item():.3f}")
    print(d, " | ".join(parts), flush=True)
