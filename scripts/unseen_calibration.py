"""Writes a calibration text for a model made by `train_heldout_moe.py` from documents it never
trained on: the held-out documents of both domains that lie past the evaluation windows
(`heldout/{english,code}.ids.json` are the first 64 windows of 256 tokens of each domain's
held-out stream). Calibration and evaluation text are then disjoint, and neither was trained on.

The training script's own `calib.txt` is drawn from the training split. A small model trained
for many epochs memorises that text (the 6 x 32 model: perplexity 17.7 on it, 62-71 on held-out
text), and a calibration objective measured on memorised text rewards the experts that memorise:
on that model a plan with a lower calibration objective kept less on held-out text.

    /opt/ref-venv/bin/python scripts/unseen_calibration.py --model /tmp/heldout-fine --out /tmp/heldout-fine-unseen

`--out` becomes a model directory for `cargo xtask bench-methods --model`: the model, tokenizer
and evaluation files linked from `--model`, and the new `calib.txt`.
"""
import argparse, json, os

from tokenizers import Tokenizer

import heldout_corpus

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--seq", type=int, default=256)
args = ap.parse_args()


# The same documents and split as train_heldout_moe.py.
corpus = heldout_corpus.documents()
english, code = corpus["english"]["heldout"], corpus["code"]["heldout"]

tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
calib = []
for name, docs in [("english", english), ("code", code)]:
    evaluated = json.load(open(f"{args.model}/heldout/{name}.ids.json"))
    need = len(evaluated) * args.seq
    stream = []
    for i, d in enumerate(docs):
        stream.extend(tok.encode(d).ids)
        if len(stream) >= need:
            # Check the stream reproduces the evaluation windows, then keep what follows them.
            windows = [stream[j:j + args.seq] for j in range(0, need, args.seq)]
            assert windows == evaluated, f"{name}: the held-out stream does not reproduce heldout/{name}.ids.json"
            rest = docs[i + 1:]
            break
    else:
        raise SystemExit(f"{name}: fewer held-out tokens than the evaluation windows")
    tokens = sum(len(tok.encode(d).ids) for d in rest)
    print(f"{name}: {len(rest)} unseen documents, {tokens} tokens past the evaluation windows")
    calib.append(rest)
os.makedirs(args.out, exist_ok=True)
for f in os.listdir(args.model):
    if f != "calib.txt" and not os.path.exists(f"{args.out}/{f}"):
        os.symlink(os.path.abspath(f"{args.model}/{f}"), f"{args.out}/{f}")
# Equal shares of the two domains, interleaved by document.
n = min(sum(map(len, c)) for c in calib)
text = []
for c in calib:
    acc, part = 0, []
    for d in c:
        if acc >= n:
            break
        part.append(d)
        acc += len(d)
    text.append(part)
mixed = [d for pair in zip(*text) for d in pair] + [d for part in text for d in part[min(map(len, text)):]]
open(f"{args.out}/calib.txt", "w").write("".join(mixed))
print(f"wrote {args.out}/calib.txt: {sum(map(len, mixed))} characters")
