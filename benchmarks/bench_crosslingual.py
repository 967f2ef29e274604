"""Cross-lingual transfer on real text: English training, German and Spanish test (MAD-X).

    python benchmarks/bench_crosslingual.py [--model DIR] [--k 1,5,10] [--seeds 3] [--out benchmarks/results]

Data: the textcls training set (English, 464 texts) and its test set in English, German and
Spanish (161 texts each, line-by-line translations, same labels); unlabelled German and Spanish
text for the language adapters: the training texts translated (content disjoint from the test
set).  The test set is split once (seeded, by content: messages sharing a word 5-gram in English,
i.e. one body under several framings, stay together): a pool of at least 10 texts per class that
the few-shot rows draw from, and the rest, on which *every* row is measured (English rows on the
same messages in English).

Models (default the packaged all-MiniLM-L6-v2, an English-only encoder; ``--model`` takes a
multilingual one):
* ``plain``: a bottleneck task adapter (Pfeiffer, reduction 16) and a linear head trained on English.
* ``MAD-X``: language adapters (Pfeiffer, reduction 2) for en, de, es trained by masked language
  modelling on unlabelled text through a head tied to the frozen input embeddings
  (``peftcore.transfer.crosslingual``); the task adapter trained on ``Stack(lang_en, task)``;
  at test time ``Stack(lang_xx, task)``.
* few-shot: from each zero-shot model, the task adapter and head trained further on k
  target-language examples per class (k = 1, 5, 10; several seeds; mean and spread).
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


def plot(rows, path):
    """Accuracy against k (target-language examples per class), one line per setting and language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for setting, style in (("task adapter only", "-"), ("MAD-X: Stack(lang, task)", "--")):
        for lang, color in (("de", "tab:blue"), ("es", "tab:orange")):
            pts = sorted((r["k"], r["accuracy"], r["accuracy_std"]) for r in rows
                         if r["language"] == lang and r["setting"].startswith(setting))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], ls=style,
                            color=color, marker="o", capsize=3, label=f"{setting}, {lang}")
    en = [r["accuracy"] for r in rows if r["language"] == "en" and r["setting"].startswith("task adapter only")]
    if en:
        ax.axhline(en[0], color="gray", lw=1, label="English, same messages")
    ax.axhline(0.2, color="gray", lw=1, ls=":", label="chance")
    ax.set_xlabel("target-language examples per class (0: zero-shot)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.01, 0.87))  # the free band under the English line
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--render", metavar="JSON", help="only redraw the plot of a result file")
    p.add_argument("--model", default=None, help="a local transformers encoder directory (default: packaged MiniLM)")
    p.add_argument("--k", default="1,5,10", help="target-language examples per class for the few-shot rows")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--mlm-epochs", type=int, default=5)
    p.add_argument("--task-epochs", type=int, default=6)
    p.add_argument("--few-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.render:
        plot(json.loads(Path(args.render).read_text())["rows"], Path(args.render).with_suffix(".png"))
        return
    ks = [int(x) for x in args.k.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # adapter and head initialisations, dropout: one run is repeatable
    import peftcore as pc
    from peftcore.assets import check_model_dir, default_model_dir, load_encoder, load_tokenizer
    from peftcore.data import load_textcls, load_unlabelled
    from peftcore.training import encode, evaluate, train_loop
    from peftcore.transfer.classifier import TextClassifier
    from peftcore.transfer.crosslingual import train_language_adapter
    from peftcore.transfer.textdata import content_groups, group_split, per_class_sample

    t_start = time.perf_counter()
    model_dir = check_model_dir(args.model) if args.model else default_model_dir()
    tok, enc = load_tokenizer(model_dir), load_encoder(model_dir)
    pad = tok.pad_token_id
    tr, ytr, names = load_textcls("train")
    test = {lang: load_textcls("test", language=lang)[:2] for lang in ("en", "de", "es")}
    # Messages built on one body (the shipped set frames each body two or three ways) stay on one
    # side: the few-shot pool and the evaluated texts share no word 5-gram.
    pool, held = group_split(test["en"][1], content_groups(test["en"][0]), 10, seed=1234)
    ev = {lang: encode(tok, [x[i] for i in held], [y[i] for i in held], 64) for lang, (x, y) in test.items()}
    unlabelled = {"en": tr, "de": load_unlabelled("de"), "es": load_unlabelled("es")}

    mlm_losses = {}
    for lang in ("en", "de", "es"):
        pc.apply(enc, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=2), name=f"lang_{lang}")
        h = train_language_adapter(enc, tok, unlabelled[lang], f"lang_{lang}", epochs=args.mlm_epochs)
        mlm_losses[lang] = h["loss"]
        print(f"language adapter {lang}: MLM loss per epoch {[round(v, 3) for v in h['loss']]}", flush=True)
    for task in ("plain", "madx"):
        pc.apply(enc, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=16), name=f"task_{task}")
    clf = TextClassifier(enc, len(names))
    heads = {}  # the zero-shot models' trained tensors (task adapter + head), restored before each row

    def activate(task, lang):
        pc.set_active(enc, f"task_{task}" if task == "plain" else pc.Stack(f"lang_{lang}", f"task_{task}"))
        pc.train_adapter(enc, f"task_{task}")

    def trainable(task):
        return [q for q in enc.parameters() if q.requires_grad] + list(clf.head.parameters())

    def snapshot(task):
        activate(task, "en")
        return {n: q.detach().clone() for n, q in clf.named_parameters() if q.requires_grad}

    def restore(state):
        with torch.no_grad():
            for n, q in clf.named_parameters():
                if n in state:
                    q.copy_(state[n])

    english = encode(tok, tr, ytr, 64)
    for task in ("plain", "madx"):
        torch.manual_seed(0)
        clf.head.reset_parameters()
        activate(task, "en")
        train_loop(clf, trainable(task), english, {"lr": 1e-3, "batch_size": 16, "epochs": args.task_epochs},
                   pad, "cpu", 0, f"task adapter ({task})", True)
        heads[task] = snapshot(task)

    rows = []

    def add(setting, lang, k, accs, seconds):
        m = statistics.mean(accs)
        s = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append({"setting": setting, "language": lang, "k": k, "accuracy": m, "accuracy_std": s,
                     "accuracies": accs, "seconds": seconds})
        print(f"{setting:34} {lang} k={k:<3} acc {m:.3f} ± {s:.3f}  ({seconds:.1f} s)", flush=True)

    for task, setting in (("plain", "task adapter only"), ("madx", "MAD-X: Stack(lang, task)")):
        for lang in ("en", "de", "es"):
            restore(heads[task])
            t0 = time.perf_counter()
            activate(task, lang)
            add(f"{setting}, zero-shot", lang, 0, [evaluate(clf, ev[lang], pad, "cpu")], time.perf_counter() - t0)
        if task == "madx":
            for lang in ("de", "es"):  # the ablation: the task adapter on the English language adapter
                restore(heads[task])
                activate(task, "en")
                t0 = time.perf_counter()
                add("MAD-X without the swap (lang_en)", lang, 0, [evaluate(clf, ev[lang], pad, "cpu")],
                    time.perf_counter() - t0)
        for lang in ("de", "es"):
            x, y = test[lang]
            for k in ks:
                t0, accs = time.perf_counter(), []
                for seed in range(args.seeds):
                    restore(heads[task])
                    pick = per_class_sample([y[i] for i in pool], k, seed=seed)
                    shots = encode(tok, [x[pool[i]] for i in pick], [y[pool[i]] for i in pick], 64)
                    activate(task, lang)
                    train_loop(clf, trainable(task), shots,
                               {"lr": 1e-3, "batch_size": min(16, len(pick)), "epochs": args.few_epochs},
                               pad, "cpu", seed, f"{task} {lang} k={k} seed {seed}", False)
                    accs.append(evaluate(clf, ev[lang], pad, "cpu"))
                add(f"{setting}, few-shot", lang, k, accs, time.perf_counter() - t0)

    cmd = (f"python benchmarks/bench_crosslingual.py --k {args.k} --seeds {args.seeds}"
           + (f" --model {args.model}" if args.model else ""))
    meta = run_meta(cmd, args.threads, model=str(model_dir), eval_texts=len(held), mlm_loss=mlm_losses,
                    objective="masked language modelling, head tied to the frozen input embeddings",
                    seconds_total=time.perf_counter() - t_start)
    commit = meta["commit"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crosslingual_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    model_name = "all-MiniLM-L6-v2 (English only)" if not args.model else str(args.model)
    lines = [f"# Cross-lingual transfer, English -> German / Spanish (`{cmd}`)", "",
             f"CPU, {args.threads} threads, torch {torch.__version__}, commit {commit[:10]}, {meta['timestamp']}; "
             f"{model_name}; accuracy on the same {len(held)} held-out test messages in each language "
             f"(chance 0.200); few-shot: mean ± std over {args.seeds} seeds.  Language adapters: MLM "
             f"(tied head), loss per epoch " + ", ".join(f"{k} {v[0]:.2f} -> {v[-1]:.2f}" for k, v in mlm_losses.items())
             + f"; whole run {meta['seconds_total'] / 60:.1f} min.", "",
             "| setting | k per class | en | de | es |", "|---|---|---|---|---|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["setting"], r["k"]), {})[r["language"]] = r
    for (setting, k), by in keyed.items():
        def cell(lang):
            r = by.get(lang)
            if r is None:
                return ""
            return f"{r['accuracy']:.3f}" + (f" ± {r['accuracy_std']:.3f}" if len(r["accuracies"]) > 1 else "")
        lines.append(f"| {setting} | {k} | {cell('en')} | {cell('de')} | {cell('es')} |")
    lines += ["", "![accuracy against k](crosslingual_cpu.png)"]
    (out / "crosslingual_cpu.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "crosslingual_cpu.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
