"""Writes a calibration text for a model made by `train_heldout_moe.py` from documents it never
trained on: the held-out documents of both domains that the evaluation windows
(`heldout/{english,code}.ids.json`, `heldout_corpus.eval_windows`) do not read, each cut to its
first 4,000 characters so that no long file fills the text. Calibration and evaluation text are
then disjoint, and neither was trained on.

The training script's own `calib.txt` is drawn from the training split, which a small model
trained for many epochs memorises (the 6 x 32 model: perplexity 17.7 on it). This text checks
whether a method's ranking depends on calibrating with memorised text.

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
    windows, used = heldout_corpus.eval_windows(docs, lambda d: tok.encode(d).ids, args.seq)
    assert windows == evaluated, (
        f"{name}: heldout/{name}.ids.json is not heldout_corpus.eval_windows' rule; "
        "run scripts/heldout_windows.py --model first")
    read = set(used)
    rest = [d[:4000] for i, d in enumerate(docs) if i not in read]
    tokens = sum(len(tok.encode(d).ids) for d in rest)
    print(f"{name}: {len(rest)} documents the evaluation windows do not read, {tokens} tokens")
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
