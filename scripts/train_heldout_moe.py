"""Trains a small Mixtral MoE with transformers, for checking pruning methods on a model the
Rust code has never seen (issue 4's done-when): two text domains, a BPE tokenizer, held-out
token ids per domain and a calibration text drawn from the training split.

    apt-get install -y fortunes          # English domain (fortune cookie files)
    /opt/ref-venv/bin/python scripts/train_heldout_moe.py --out /tmp/heldout-moe --minutes 10

The code domain is Rust source from the local cargo registry (crates this workspace depends
on). Nothing here is used by the tests; the output directory is not committed.
"""
import argparse, glob, hashlib, json, math, os, random, time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import MixtralConfig, MixtralForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--minutes", type=float, default=10.0)
ap.add_argument("--vocab", type=int, default=2048)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--batch", type=int, default=16)
args = ap.parse_args()
torch.manual_seed(args.seed)
random.seed(args.seed)
torch.set_num_threads(2)


def held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 == 0


english = {"train": [], "heldout": []}
for path in sorted(glob.glob("/usr/share/games/fortunes/*.u8")):
    entries = open(path, encoding="utf-8", errors="replace").read().split("\n%\n")
    for i, e in enumerate(entries):
        english["heldout" if held_out(f"{path}:{i}") else "train"].append(e.strip() + "\n\n")
code = {"train": [], "heldout": []}
reg = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))[0]
for crate in ["serde-1.", "regex-syntax-0.8", "clap_builder-4.", "rayon-1.", "proptest-1.", "tokio-1."]:
    for d in sorted(glob.glob(reg + crate + "*"))[:1]:
        for path in sorted(glob.glob(d + "/src/**/*.rs", recursive=True)):
            text = open(path, encoding="utf-8", errors="replace").read()
            code["heldout" if held_out(path) else "train"].append(text + "\n")
for name, dom in [("english", english), ("code", code)]:
    print(name, {k: sum(map(len, v)) for k, v in dom.items()})

train_text = english["train"] + code["train"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train_from_iterator(train_text, trainer)
os.makedirs(args.out, exist_ok=True)


def stream(docs):
    ids = []
    for d in docs:
        ids.extend(tok.encode(d).ids)
    return ids


def chunks(ids, n):
    return [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]


# Interleave the domains in training batches.
train_e, train_c = chunks(stream(english["train"]), args.seq), chunks(stream(code["train"]), args.seq)
train = train_e + train_c
print("train sequences", len(train_e), len(train_c))
for name, dom in [("english", english), ("code", code)]:
    seqs = chunks(stream(dom["heldout"]), args.seq)[:64]
    json.dump(seqs, open(f"{args.out}/heldout-{name}.ids.json", "w"))
    print("heldout", name, len(seqs))
# Calibration text: training documents of both domains, shuffled.
calib = english["train"][:4000] + code["train"][:40]
random.shuffle(calib)
open(f"{args.out}/calib.txt", "w").write("".join(calib))

cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.02,
                    sliding_window=None, tie_word_embeddings=False, router_aux_loss_coef=0.02,
                    output_router_logits=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
model = MixtralForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
start, step, log = time.time(), 0, []
budget = args.minutes * 60
data = torch.tensor(train)
while time.time() - start < budget:
    frac = (time.time() - start) / budget
    for g in opt.param_groups:
        g["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    idx = torch.randint(0, len(data), (args.batch,))
    batch = data[idx]
    out = model(batch, labels=batch, output_router_logits=True)
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    step += 1
    if step % 20 == 0:
        print(step, round(time.time() - start), float(out.loss), float(out.aux_loss), flush=True)
        log.append({"step": step, "loss": float(out.loss), "aux": float(out.aux_loss)})
model.config.output_router_logits = False
model.save_pretrained(args.out)
tok.save(f"{args.out}/tokenizer.json")
json.dump({"steps": step, "seconds": time.time() - start, "log": log}, open(f"{args.out}/train-log.json", "w"))
model.eval()
with torch.no_grad():
    for name in ["english", "code"]:
        seqs = torch.tensor(json.load(open(f"{args.out}/heldout-{name}.ids.json")))
        loss = model(seqs, labels=seqs).loss
        print(name, "held-out ppl", math.exp(float(loss)))
