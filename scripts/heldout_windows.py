"""Rewrites the evaluation windows (`heldout/{english,code}.ids.json`, and the `heldout-*.ids.json`
copies) of a model made by `train_heldout_moe.py` with the current rule of
`heldout_corpus.eval_windows`, using the model's own tokenizer. The model is not touched: the
train / held-out split is by document and does not change.

Models trained before the rule existed took the first 64 windows of each domain's held-out
stream in file order; for code, 57 of the 64 windows came from one Unicode table of
regex-syntax (`case_folding_simple.rs`), so "code perplexity" measured one data file.

    /opt/ref-venv/bin/python scripts/heldout_windows.py --model /tmp/heldout-fine
"""
import argparse

from tokenizers import Tokenizer

import heldout_corpus

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--seq", type=int, default=256)
args = ap.parse_args()

tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
corpus = heldout_corpus.documents()
for name in ["english", "code"]:
    seqs, used = heldout_corpus.eval_windows(corpus[name]["heldout"], lambda d: tok.encode(d).ids, args.seq)
    heldout_corpus.write_eval_windows(args.model, name, seqs)
    print(f"{name}: {len(seqs)} windows of {args.seq} tokens from {len(used)} held-out documents")
