"""The two text domains of `train_heldout_moe.py` and their train / held-out split, shared with
`unseen_calibration.py`: English from the fortune files (`apt-get install -y fortunes`), one
document per fortune, and Rust source from the local cargo registry, one document per file.
A document is held out when the SHA-256 of its key is 0 modulo 10."""
import glob, hashlib, os

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
