"""Splits a two-domain calibration text into one file per domain, for the domain-mix
measurements of docs/METHOD.md ("Calibration: size and domain mix") and for
`prune --calib english.txt --calib code.txt --calib-mix equal`.

    # fixtures/trained-moe: calib.txt's documents (separated by <|endoftext|>) are GCIDE
    # entries and Python files; a document that parses as Python is code.
    python3 scripts/split_calibration.py --fixture fixtures/trained-moe/calib.txt --out /tmp/fx
    # a model of train_heldout_moe.py: the documents its calib.txt was drawn from.
    python3 scripts/split_calibration.py --heldout --out /tmp/hm

Writes `OUT-english.txt` and `OUT-code.txt`. Nothing here is used by the tests.
"""
import argparse, ast, sys, warnings

EOS = "<|endoftext|>"
ap = argparse.ArgumentParser()
src = ap.add_mutually_exclusive_group(required=True)
src.add_argument("--fixture", help="a calib.txt written by `cargo xtask fixture train`")
src.add_argument("--heldout", action="store_true", help="the calibration documents of train_heldout_moe.py")
ap.add_argument("--out", required=True, help="prefix of the two output files")
args = ap.parse_args()


def is_python(doc: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files
        try:
            ast.parse(doc)
            return True
        except (SyntaxError, ValueError):
            return False


if args.fixture:
    texts = {"english": "", "code": ""}
    for d in open(args.fixture, encoding="utf-8").read().split(EOS):
        if d:
            texts["code" if is_python(d) else "english"] += d + EOS
else:
    import heldout_corpus  # beside this script

    docs = heldout_corpus.calibration_documents(heldout_corpus.documents())
    texts = {name: "".join(d) for name, d in docs.items()}
for name, text in texts.items():
    open(f"{args.out}-{name}.txt", "w", encoding="utf-8").write(text)
    print(f"{args.out}-{name}.txt: {len(text)} characters", file=sys.stderr)
