"""Trains a small MoE with transformers, for checking pruning methods on a model the Rust code
has never seen: two text domains, a BPE tokenizer, held-out token ids per domain (64 windows
of 256 tokens spread over the held-out documents, `heldout_corpus.eval_windows`), a
multiple-choice task from held-out documents, and a calibration text drawn from the training
split. The output directory has the layout `cargo xtask bench-methods --model DIR` reads
(`calib.txt`, `heldout/{english,code}.ids.json`, `mc.jsonl`, `tokenizer.json`).

    apt-get install -y fortunes          # English domain (fortune cookie files)
    # A Mixtral-shaped model: 4 layers x 8 experts, top-2.
    /opt/ref-venv/bin/python scripts/train_heldout_moe.py --out /tmp/heldout-moe --minutes 10
    # A fine-grained model like today's releases: Qwen3-MoE, 6 layers x 32 experts, top-4.
    /opt/ref-venv/bin/python scripts/train_heldout_moe.py --arch qwen3_moe --layers 6 --experts 32 \
        --top-k 4 --expert-width 64 --out /tmp/heldout-fine --minutes 25
    # Train on an otherwise idle machine: the step count, not the minutes, sets the quality
    # (train-log.json records it).

The code domain is Rust source from the local cargo registry (crates this workspace depends
on). Nothing here is used by the tests; the output directory is not committed. A model trained
before the windows were spread over documents gets the current ones from
`scripts/heldout_windows.py --model DIR` without retraining.
"""
import argparse, json, math, os, random, time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
import heldout_corpus
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--minutes", type=float, default=10.0)
ap.add_argument("--vocab", type=int, default=2048)
ap.add_argument("--seq", type=int, default=256)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--arch", choices=["mixtral", "qwen3_moe"], default="mixtral")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--experts", type=int, default=8)
ap.add_argument("--top-k", type=int, default=2)
ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--expert-width", type=int, default=256)
ap.add_argument("--mc-items", type=int, default=200)
# transformers' MoE kernels: `grouped_mm` (tokens sorted by expert, one matmul per expert) trains
# the 6 x 32 model at 0.7 s/step on 2 idle cores, `eager` at 0.95 s (both give the same loss).
ap.add_argument("--experts-implementation", default="grouped_mm", choices=["eager", "grouped_mm"])
args = ap.parse_args()
torch.manual_seed(args.seed)
random.seed(args.seed)
torch.set_num_threads(2)


corpus = heldout_corpus.documents()
english, code = corpus["english"], corpus["code"]
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
    seqs, _ = heldout_corpus.eval_windows(dom["heldout"], lambda d: tok.encode(d).ids, args.seq)
    heldout_corpus.write_eval_windows(args.out, name, seqs)
    print("heldout", name, len(seqs))
# Multiple choice from held-out documents: the true continuation of a context against three
# continuations of other documents of the same domain.
rng = random.Random(args.seed)
items = []
for name, dom in [("english", english), ("code", code)]:
    docs = [d for d in dom["heldout"] if len(d) > 120]
    rng.shuffle(docs)
    for d in docs[: args.mc_items // 2]:
        cut = rng.randint(40, min(len(d) - 40, 400))
        context, cont = d[:cut], d[cut:cut + 60]
        others = [o for o in docs if o is not d]
        distractors = []
        for o in rng.sample(others, 3):
            c2 = rng.randint(0, max(0, len(o) - 60))
            distractors.append(o[c2:c2 + 60])
        choices = distractors + [cont]
        rng.shuffle(choices)
        items.append({"domain": name, "context": context, "choices": choices, "label": choices.index(cont)})
with open(f"{args.out}/mc.jsonl", "w") as f:
    for it in items:
        f.write(json.dumps(it) + "\n")
# Calibration text: training documents of both domains, shuffled.
calib_docs = heldout_corpus.calibration_documents(corpus)
calib = calib_docs["english"] + calib_docs["code"]
random.shuffle(calib)
open(f"{args.out}/calib.txt", "w").write("".join(calib))

if args.arch == "mixtral":
    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_width,
                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.02,
                        sliding_window=None, tie_word_embeddings=False, router_aux_loss_coef=0.02,
                        output_router_logits=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cfg._experts_implementation = args.experts_implementation
    model = MixtralForCausalLM(cfg)
else:
    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         moe_intermediate_size=args.expert_width, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                         num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                         decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=1024,
                         rope_theta=10000.0, rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False,
                         router_aux_loss_coef=0.01, output_router_logits=True, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    cfg._experts_implementation = args.experts_implementation
    model = Qwen3MoeForCausalLM(cfg)
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
json.dump({"steps": step, "seconds": time.time() - start, "args": vars(args), "log": log},
          open(f"{args.out}/train-log.json", "w"))
model.eval()
with torch.no_grad():
    for name in ["english", "code"]:
        seqs = torch.tensor(json.load(open(f"{args.out}/heldout-{name}.ids.json")))
        loss = model(seqs, labels=seqs).loss
        print(name, "held-out ppl", math.exp(float(loss)))
