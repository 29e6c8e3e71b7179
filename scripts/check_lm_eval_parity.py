"""Check `cargo xtask eval --task` against lm-evaluation-harness on a model and documents the
project has never seen (issue 5's done-when).

1. Builds multiple-choice task files in several HF dataset schemas (hellaswag, arc_easy,
   winogrande, boolq, piqa, mmlu, generic) from a text the project does not use
   (default: the licence texts in /usr/share/common-licenses), with a seeded RNG.
2. Runs lm-eval 0.4.13 (HFLM, float32, CPU) on them: the registered task configs with the
   dataset swapped for the local file, acc and acc_norm for every task, --log_samples.
3. Runs `xtask eval --model DIR --task NAME=FILE ... --log-samples` and compares acc, acc_norm
   per document and the log-likelihoods.

Usage:
  python scripts/check_lm_eval_parity.py --model /tmp/heldout-moe --xtask target/release/xtask \
      [--add-bos] [--docs 60] [--out /tmp/lm-eval-parity]
The model directory is copied; a tokenizer_config.json (PreTrainedTokenizerFast) is added when
it has none. --add-bos gives tokenizer.json a post-processor that prepends BOS, as Llama and
Mixtral tokenizers have.
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys


def sentences(paths):
    text = " ".join(open(p, errors="ignore").read() for p in paths)
    text = re.sub(r"\s+", " ", text)
    out = [s.strip() for s in re.split(r"(?<=[.;:])\s+", text)]
    return [s for s in out if 6 <= len(s.split()) <= 40]


def make_docs(sents, n, rng):
    docs = {k: [] for k in ["hellaswag", "arc_easy", "winogrande", "boolq", "piqa", "mmlu_computer_security", "mcq"]}
    words = sorted({w for s in sents for w in s.split() if w.isalpha() and len(w) > 3})
    # Each document of a task gets its own sentence; the same sentence is document i of every
    # task, so requests of different tasks (winogrande's and mcq's, split at different words)
    # share lm-eval's logits cache, and the check covers that path too (docs/EVALUATION.md).
    mains = rng.sample(sents, n)
    for i in range(n):
        s, t = mains[i], rng.choice(sents)
        w = s.split()
        k = rng.randint(2, len(w) - 3)
        others = [" ".join(x.split()[k:]) for x in rng.sample(sents, 3)]
        true = " ".join(w[k:])
        endings = others + [true]
        rng.shuffle(endings)
        gold = endings.index(true)
        docs["hellaswag"].append({"ind": i, "activity_label": rng.choice(["Licensing", "Law", "Software"]),
                                  "ctx_a": " ".join(w[: k // 2]) + ("  [title]" if i % 7 == 0 else ""),
                                  "ctx_b": " ".join(w[k // 2: k]), "ctx": "", "endings": endings,
                                  "source_id": "x", "split": "val", "split_type": "indomain", "label": str(gold)})
        labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3", "4"]
        docs["arc_easy"].append({"id": str(i), "question": " ".join(w[:k]) + ("?" if i % 2 else " "),
                                 "choices": {"text": endings, "label": labels}, "answerKey": labels[gold]})
        alpha = [j for j, x in enumerate(w) if x.isalpha() and len(x) > 3]
        if alpha:
            j = rng.choice(alpha)
            wrong = rng.choice(words)
            opts = [w[j], wrong] if i % 2 == 0 else [wrong, w[j]]
            docs["winogrande"].append({"sentence": " ".join(w[:j] + ["_"] + w[j + 1:]), "option1": opts[0],
                                       "option2": opts[1], "answer": "1" if i % 2 == 0 else "2"})
        docs["boolq"].append({"question": t.rstrip(".;:").lower(), "passage": s, "idx": i, "label": i % 2})
        docs["piqa"].append({"goal": " ".join(w[:k]), "sol1": true if i % 2 == 0 else others[0],
                             "sol2": others[0] if i % 2 == 0 else true, "label": i % 2})
        docs["mmlu_computer_security"].append({"question": s, "subject": "computer_security",
                                               "choices": [" ".join(x.split()[:4]) for x in endings], "answer": gold})
        docs["mcq"].append({"context": " ".join(w[:k]) + (" " if i % 4 == 0 else ""), "choices": endings, "gold": gold})
    return docs


def lm_eval_spec(name, path):
    spec = {"task": name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": path}}, "test_split": "test",
            "validation_split": None, "training_split": None, "fewshot_split": None,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    if name == "mcq":
        spec.update({"output_type": "multiple_choice", "doc_to_text": "{{context}}",
                     "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"})
    return spec


def run_lm_eval(model, files, batch_size):
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    tasks = []
    for name, path in files.items():
        spec = lm_eval_spec(name, path)
        entry = tm._entry(name)
        if entry is None:
            tasks.append(spec)
        else:
            tasks.append(tm._factory.build(entry, overrides=spec, registry=tm._index))
    lm = HFLM(pretrained=model, dtype="float32", batch_size=batch_size, device="cpu")
    res = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, num_fewshot=0)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--xtask", default="target/release/xtask")
    ap.add_argument("--out", default="/tmp/lm-eval-parity")
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--add-bos", action="store_true")
    ap.add_argument("--source", default="/usr/share/common-licenses/*")
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()

    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    model = os.path.join(a.out, "model")
    shutil.copytree(a.model, model)
    cfg_path = os.path.join(model, "tokenizer_config.json")
    tok_path = os.path.join(model, "tokenizer.json")
    tok = json.load(open(tok_path))
    special = [t for t in tok["added_tokens"] if t.get("special")]
    if not os.path.exists(cfg_path):
        name = special[0]["content"] if special else None
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name, "eos_token": name,
                   "clean_up_tokenization_spaces": False}, open(cfg_path, "w"), indent=1)
    if a.add_bos:
        # As Llama/Mixtral tokenizers do it: a post-processor that prepends BOS (transformers 5.x
        # ignores tokenizer_config.json's add_bos_token when tokenizer.json exists).
        bos = special[0]
        first = {"SpecialToken": {"id": bos["content"], "type_id": 0}}
        tok["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos["content"]: {"id": bos["content"], "ids": [bos["id"]], "tokens": [bos["content"]]}},
        }
        json.dump(tok, open(tok_path, "w"), ensure_ascii=False)

    rng = random.Random(a.seed)
    sents = sentences(sorted(p for p in glob.glob(a.source) if os.path.isfile(p)))
    docs = make_docs(sents, a.docs, rng)
    files = {}
    for name, ds in docs.items():
        path = os.path.join(a.out, f"{name}.jsonl")
        with open(path, "w") as f:
            for d in ds:
                f.write(json.dumps(d) + "\n")
        files[name] = path

    samples_path = os.path.join(a.out, "xtask-samples.jsonl")
    cmd = [a.xtask, "eval", "--model", model, "--json", os.path.join(a.out, "xtask.json"),
           "--log-samples", samples_path]
    for name, path in files.items():
        cmd += ["--task", f"{name}:generic={path}" if name == "mcq" else f"{name}={path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"xtask eval failed ({proc.returncode}):\n{proc.stderr}")
    ours = json.load(open(os.path.join(a.out, "xtask.json")))
    ours_samples = {}
    for line in open(samples_path):
        s = json.loads(line)
        ours_samples[(s["task"], s["doc"])] = s

    res = run_lm_eval(model, files, a.batch_size)
    with open(os.path.join(a.out, "lm-eval-samples.jsonl"), "w") as f:
        for name in files:
            for smp in res["samples"][name]:
                f.write(json.dumps({"task": name, "doc_id": smp["doc_id"], "acc": smp["acc"],
                                    "acc_norm": smp["acc_norm"], "arguments": smp["arguments"],
                                    "loglikelihoods": [float(r[0]) for r in smp["filtered_resps"]]}) + "\n")
    report = {"model": a.model, "add_bos": a.add_bos, "tasks": {}}
    worst = 0.0
    ok = True
    print(f"{'task':<24} {'n':>4} {'acc lm-eval':>11} {'acc ours':>9} {'norm lm-eval':>12} {'norm ours':>10} "
          f"{'docs differ':>11} {'max |Δll|':>10}")
    for name in files:
        theirs = res["results"][name]
        samples = res["samples"][name]
        differ = 0
        max_dll = 0.0
        for s in samples:
            mine = ours_samples[(name, s["doc_id"])]
            lls = [float(r[0]) for r in s["filtered_resps"]]
            max_dll = max(max_dll, max(abs(x - y) for x, y in zip(lls, mine["loglikelihoods"])))
            if s["acc"] != mine["acc"] or s["acc_norm"] != mine["acc_norm"]:
                differ += 1
        t_acc, t_norm = theirs["acc,none"], theirs["acc_norm,none"]
        o = ours["tasks"][name]
        print(f"{name:<24} {len(samples):>4} {t_acc:>11.4f} {o['acc']:>9.4f} {t_norm:>12.4f} {o['acc_norm']:>10.4f} "
              f"{differ:>11} {max_dll:>10.2e}")
        report["tasks"][name] = {"n": len(samples), "lm_eval": {"acc": t_acc, "acc_norm": t_norm},
                                 "xtask": {"acc": o["acc"], "acc_norm": o["acc_norm"]},
                                 "docs_differ": differ, "max_abs_loglik_diff": max_dll}
        worst = max(worst, max_dll)
        ok &= differ <= 1
    json.dump(report, open(os.path.join(a.out, "report.json"), "w"), indent=1)
    print(f"wrote {a.out}/report.json; largest log-likelihood difference {worst:.2e}")
    if not ok:
        sys.exit("FAIL: more than one document differs in some task")
    print("PASS: at most one document differs per task")


if __name__ == "__main__":
    main()
