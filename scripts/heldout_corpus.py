"""The two text domains of `train_heldout_moe.py` and their train / held-out split, shared with
`unseen_calibration.py`: English from the fortune files (`apt-get install -y fortunes`), one
document per fortune, and Rust source from the local cargo registry, one document per file.
A document is held out when the SHA-256 of its key is 0 modulo 10."""
import glob, hashlib, json, os, random

CRATES = ["serde-1.", "regex-syntax-0.8", "clap_builder-4.", "rayon-1.", "proptest-1.", "tokio-1."]


def held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 == 0


def documents():
    """`{"english": {"train": [...], "heldout": [...]}, "code": {...}}`, in a fixed order."""
    english = {"train": [], "heldout": []}
    for path in sorted(glob.glob("/usr/share/games/fortunes/*.u8")):
        entries = open(path, encoding="utf-8", errors="replace").read().split("\n%\n")
        for i, e in enumerate(entries):
            english["heldout" if held_out(f"{path}:{i}") else "train"].append(e.strip() + "\n\n")
    code = {"train": [], "heldout": []}
    reg = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))[0]
    for crate in CRATES:
        for d in sorted(glob.glob(reg + crate + "*"))[:1]:
            for path in sorted(glob.glob(d + "/src/**/*.rs", recursive=True)):
                text = open(path, encoding="utf-8", errors="replace").read()
                code["heldout" if held_out(path) else "train"].append(text + "\n")
    return {"english": english, "code": code}


def calibration_documents(corpus):
    """The training documents `train_heldout_moe.py` draws its `calib.txt` from, per domain:
    `{"english": [...], "code": [...]}` (the script joins and shuffles them)."""
    return {"english": corpus["english"]["train"][:4000], "code": corpus["code"]["train"][:40]}


def eval_windows(docs, encode, seq=256, count=64, per_doc=512, seed="windows"):
    """The evaluation windows of one domain: the held-out documents in a seeded order, each cut
    to its first `per_doc` tokens, concatenated and cut into `count` windows of `seq` tokens.
    The cap keeps long files from filling the windows: two Unicode tables of regex-syntax are
    30 % of the held-out code bytes, and the first 64 windows of the unshuffled, uncapped stream
    (the rule before) held 57 windows of one of them, `case_folding_simple.rs`. The order
    spreads the windows over the sources (fortune files, crates). Returns the windows and the
    indices of the documents read."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream, used = [], []
    for i in order:
        if len(stream) >= count * seq:
            break
        stream.extend(encode(docs[i])[:per_doc])
        used.append(i)
    windows = [stream[j:j + seq] for j in range(0, len(stream) - seq + 1, seq)][:count]
    if len(windows) < count:
        raise SystemExit(f"only {len(windows)} windows of {seq} tokens in the held-out documents")
    return windows, used


def write_eval_windows(model_dir, name, windows):
    """Writes one domain's windows to `heldout/{name}.ids.json` and its `heldout-{name}.ids.json`
    copy, each through a temporary file (a symlink, as in `unseen_calibration.py`'s output, is
    replaced by a file)."""
    os.makedirs(f"{model_dir}/heldout", exist_ok=True)
    for path in [f"{model_dir}/heldout/{name}.ids.json", f"{model_dir}/heldout-{name}.ids.json"]:
        if os.path.islink(path):
            os.unlink(path)
        with open(path + ".tmp", "w") as f:
            json.dump(windows, f)
        os.replace(path + ".tmp", path)
