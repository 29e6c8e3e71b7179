"""Forward throughput of transformers/PyTorch against `cargo xtask eval --ids`, on the same
model, the same token ids and the same CPU, in one run (issue 7's done-when).

PyTorch runs `model(ids)` in batches of --batch sequences under `torch.inference_mode()`, with
`torch.set_num_threads(--threads)` (default: all cores), after one warm-up batch; xtask runs
`eval --ids` (its own batching, --batch-tokens 4096) and reports input tokens over forward
seconds. Each side runs --repeats times, alternating; the best run of each is compared.

Usage:
  python scripts/bench_torch_forward.py --model /tmp/heldout-moe \
      --ids /tmp/heldout-moe/heldout-english.ids.json --xtask target/release/xtask [--out FILE.json]
"""
import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def torch_run(model, ids, batch):
    with torch.inference_mode():
        model(ids[:batch])
        start = time.perf_counter()
        for i in range(0, len(ids), batch):
            model(ids[i:i + batch])
        return ids.numel() / (time.perf_counter() - start)


def xtask_run(xtask, model_dir, ids_path, device):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "eval.json")
        subprocess.run([xtask, "eval", "--model", model_dir, "--ids", ids_path, "--device", device,
                        "--json", out], check=True, capture_output=True)
        return json.load(open(out))["tokens_per_second"]


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--xtask", default="target/release/xtask")
    ap.add_argument("--batch", type=int, default=16, help="sequences per PyTorch forward")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="xtask device (PyTorch runs on CPU)")
    ap.add_argument("--out")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ids = torch.tensor(json.load(open(a.ids)))
    ours, theirs = [], []
    for r in range(a.repeats):
        theirs.append(torch_run(model, ids, a.batch))
        ours.append(xtask_run(a.xtask, a.model, a.ids, a.device))
        print(f"run {r + 1}: transformers {theirs[-1]:.0f} tok/s, xtask eval {ours[-1]:.0f} tok/s")
    result = {
        "model": a.model, "ids": a.ids, "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": a.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "transformers_tokens_per_second": max(theirs), "xtask_tokens_per_second": max(ours),
        "ratio": max(ours) / max(theirs), "runs": {"transformers": theirs, "xtask": ours},
    }
    print(f"best: transformers {max(theirs):.0f} tok/s, xtask eval {max(ours):.0f} tok/s, "
          f"ratio {result['ratio']:.2f} ({cpu_name()}, {os.cpu_count()} cores)")
    if a.out:
        json.dump(result, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
