"""Reference data for diep-eval, produced by lm-evaluation-harness itself.

Writes under fixtures/eval/:
  docs/<task>.jsonl   hand-written documents in each HF dataset's own schema (input)
  templates.json      for each task and document: lm-eval's (context, continuation) requests,
                      its choices (the strings acc_norm divides by) and the gold index
  loglik-<model>.json for a model directory: lm-eval's HFLM token split (context_enc,
                      continuation_enc) and loglikelihood of every request of every task

Usage (needs `pip install lm_eval==0.4.13 transformers torch`, see requirements-fixtures.txt):
  python scripts/gen_lm_eval_goldens.py --templates
  python scripts/gen_lm_eval_goldens.py --loglik fixtures/trained-moe
The test path never runs Python; crates/diep-eval/tests/lm_eval.rs reads these files.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "fixtures", "eval")

# Documents in each dataset's own field layout (HF datasets lm-eval reads). They cover the
# hazards: trailing whitespace at the end of the context, non-ASCII text, hellaswag's bracket
# artifacts and capitalisation, ARC's numeric labels, OBQA's padded answer keys, winogrande's
# blank, MMLU's subject description.
DOCS = {
    "boolq": [
        {"question": "is the sun a star", "passage": "The Sun is the star at the centre of the Solar System.",
         "idx": 0, "label": 1},
        {"question": "does water boil at 50 degrees at sea level", "passage": "Water boils at 100 °C at sea level — not lower.",
         "idx": 1, "label": 0},
    ],
    "rte": [
        {"sentence1": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
         "sentence2": "Christopher Reeve had an accident.", "label": 1, "idx": 0},
        {"sentence1": "Yet, we now are discovering that antibiotics are losing their effectiveness.",
         "sentence2": "Bacteria is winning the war against antibiotics.", "label": 0, "idx": 1},
    ],
    "openbookqa": [
        {"id": "7-980", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                              "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
        {"id": "7-584", "question_stem": "When food is reduced in the stomach ",
         "choices": {"text": ["the mind needs time to digest", "take a second to digest what I said",
                              "nutrients are being deconstructed", "reader's digest is a body of works"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": " C"},
    ],
    "arc_easy": [
        {"id": "Mercury_7220990", "question": "Which factor will most likely cause a person to develop a fever?",
         "choices": {"text": ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
                              "several viral particles on the skin", "carbohydrates being digested in the stomach"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "NYSEDREGENTS_2015_4_8", "question": "Which is a renewable resource? ",
         "choices": {"text": ["coal", "oil", "wind", "natural gas"], "label": ["1", "2", "3", "4"]},
         "answerKey": "3"},
    ],
    "arc_challenge": [
        {"id": "Mercury_SC_415702", "question": "George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most heat?",
         "choices": {"text": ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        {"id": "MCAS_2000_4_6", "question": "Which technology was developed most recently?",
         "choices": {"text": ["cellular telephone", "television", "refrigerator", "airplane", "café espresso machine"],
                     "label": ["A", "B", "C", "D", "E"]}, "answerKey": "A"},
    ],
    "hellaswag": [
        {"ind": 24, "activity_label": "Roof shingle removal",
         "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "ctx": "A man is sitting on a roof. he",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
        {"ind": 4, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to grow a lemon tree [title] Choose a sunny spot.", "ctx_b": "then [step] water it",
         "ctx": "", "endings": ["  daily [substeps] Keep the soil moist.", "once a year.",
                                "with café au lait [title] Done.", "never."],
         "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "0"},
    ],
    "winogrande": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
    ],
    "piqa": [
        {"goal": "How do I ready a guinea pig cage for it's new occupants?",
         "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
         "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.",
         "label": 0},
        {"goal": "To make crème brûlée crisp on top,", "sol1": "torch the sugar.", "sol2": "freeze the sugar.",
         "label": 0},
    ],
    "mmlu_abstract_algebra": [
        {"question": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
         "subject": "abstract_algebra", "choices": ["0", "1", "2", "3"], "answer": 1},
        {"question": "  Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. ",
         "subject": "abstract_algebra", "choices": ["True, True", "False, False", "True, False", "False, True"],
         "answer": 1},
    ],
    "mmlu_high_school_biology": [
        {"question": "Which of the following is not a way to form recombinant DNA?",
         "subject": "high_school_biology", "choices": ["Translation", "Conjugation", "Specialized transduction",
                                                       "Transformation"], "answer": 0},
    ],
}


def task_spec(name, path):
    """lm-eval's own task config, with the dataset swapped for a local JSONL file."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": path}},
        "test_split": "test",
        "validation_split": None,
        "training_split": None,
        "fewshot_split": None,
    }


def load_tasks(docs_dir, names):
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    out = {}
    for name in names:
        # The registered task (its YAML, includes and !function hooks) with the dataset overridden.
        entry = tm._entry(name)
        task = tm._factory.build(entry, overrides=task_spec(name, os.path.join(docs_dir, f"{name}.jsonl")),
                                 registry=tm._index)
        out[name] = task
    return out


def _leaves(d):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def requests_of(task):
    task.build_all_requests(limit=None, rank=0, world_size=1)
    by_doc = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    docs = list(task.eval_docs)
    rows = []
    for i, doc in enumerate(docs):
        insts = sorted(by_doc[i], key=lambda x: x.idx)
        choices = task.doc_to_choice(doc)
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold)
        rows.append({
            "requests": [list(inst.args) for inst in insts],
            "choices": list(choices),
            "gold": int(gold),
        })
    return rows


def write_templates():
    docs_dir = os.path.join(OUT, "docs")
    os.makedirs(docs_dir, exist_ok=True)
    for name, docs in DOCS.items():
        with open(os.path.join(docs_dir, f"{name}.jsonl"), "w") as f:
            for d in docs:
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    tasks = load_tasks(docs_dir, list(DOCS))
    import lm_eval

    golden = {"lm_eval_version": lm_eval.__version__, "tasks": {n: requests_of(t) for n, t in tasks.items()}}
    with open(os.path.join(OUT, "templates.json"), "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}/templates.json")


def write_loglik(model_dir):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.api.instance import Instance
    import lm_eval

    golden = json.load(open(os.path.join(OUT, "templates.json")))
    lm = HFLM(pretrained=model_dir, dtype="float32", batch_size=4, device="cpu")
    out = []
    reqs = []
    for name, rows in golden["tasks"].items():
        for i, row in enumerate(rows):
            for ctx, cont in row["requests"]:
                reqs.append((name, i, ctx, cont))
    # The extra requests exercise the empty-context path and a whitespace-only context.
    reqs.append(("extra", 0, "", " hello world"))
    reqs.append(("extra", 1, "The end.  ", "\nNew line"))
    instances = [Instance("loglikelihood", {}, (ctx, cont), idx=k) for k, (_, _, ctx, cont) in enumerate(reqs)]
    results = lm.loglikelihood(instances)
    for (name, i, ctx, cont), (ll, greedy) in zip(reqs, results):
        if ctx:
            c_enc, x_enc = lm._encode_pair(ctx, cont)
        else:
            x_enc = lm.tok_encode(cont, add_special_tokens=False)
            c_enc, x_enc = ([lm.prefix_token_id], x_enc) if lm.prefix_token_id != x_enc[0] else (x_enc[:1], x_enc[1:])
        out.append({"task": name, "doc": i, "context": ctx, "continuation": cont,
                    "context_enc": list(map(int, c_enc)), "continuation_enc": list(map(int, x_enc)),
                    "loglikelihood": ll, "is_greedy": bool(greedy)})
    # Whole-task metrics from lm-eval's evaluator (acc and acc_norm for every task).
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    docs_dir = os.path.join(OUT, "docs")
    tasks = []
    for tname in golden["tasks"]:
        spec = task_spec(tname, os.path.join(docs_dir, f"{tname}.jsonl"))
        spec["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                               for m in ("acc", "acc_norm")]
        tasks.append(tm._factory.build(tm._entry(tname), overrides=spec, registry=tm._index))
    res = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=0)
    metrics = {t: {"acc": r["acc,none"], "acc_norm": r["acc_norm,none"]} for t, r in res["results"].items()}

    # Text perplexity as `xtask eval --text` defines it, computed with transformers directly.
    text_ppl = None
    text_path = os.path.join(model_dir, "heldout", "english.txt")
    if os.path.exists(text_path):
        import math
        import torch

        seq_len = 256
        ids = lm.tokenizer(open(text_path).read(), add_special_tokens=False)["input_ids"]
        windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        with torch.no_grad():
            losses = [lm.model(torch.tensor([w]), labels=torch.tensor([w])).loss.item() for w in windows]
        text_ppl = {"file": "heldout/english.txt", "seq_len": seq_len, "windows": len(windows),
                    "perplexity": math.exp(sum(losses) / len(losses))}

    name = os.path.basename(os.path.normpath(model_dir))
    path = os.path.join(OUT, f"loglik-{name}.json")
    with open(path, "w") as f:
        json.dump({"lm_eval_version": lm_eval.__version__, "model": name, "max_length": lm.max_length,
                   "task_metrics": metrics, "text_perplexity": text_ppl,
                   "requests": out}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path} ({len(out)} requests)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", action="store_true")
    ap.add_argument("--loglik", metavar="MODEL_DIR")
    a = ap.parse_args()
    if not a.templates and not a.loglik:
        ap.error("give --templates and/or --loglik MODEL_DIR")
    if a.templates:
        write_templates()
    if a.loglik:
        write_loglik(a.loglik)
