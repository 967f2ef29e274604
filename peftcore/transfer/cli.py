"""``peftcore finetune`` and ``peftcore predict``: thin argparse layers over the library."""

from __future__ import annotations

import argparse

from .finetune import FinetuneError

METHODS = ("head", "freeze", "unfreeze", "lora", "bottleneck", "compacter", "prompt", "full")
# flag -> TaskConfig field; the flags' defaults are None, so only what the user gives overrides
# the method's defaults (TaskConfig.for_method) or the --config file.
_FIELDS = {
    "epochs": int, "lr": float, "batch_size": int, "max_length": int, "schedule": str, "warmup_ratio": float,
    "weight_decay": float, "layer_decay": float, "dropout": float, "regularizer": str,
    "regularizer_weight": float, "augment": str, "augment_rate": float, "freeze_to": int,
    "unfreeze_every": int, "seed": int, "lora_r": int, "lora_alpha": float, "lora_dropout": float,
    "adapter_reduction": int, "prompt_tokens": int,
}


def finetune_parser(prog="peftcore finetune"):
    p = argparse.ArgumentParser(prog=prog, description=(
        "Fine-tune a local transformers encoder (default: the packaged all-MiniLM-L6-v2) on your own "
        "labelled CSV or JSONL file, keep the best epoch, and write the adapter (or head, or weights), "
        "metrics.json and curves.png to --out."))
    p.add_argument("--model", metavar="DIR", help="local transformers encoder directory")
    p.add_argument("--train", required=True, metavar="FILE", help="CSV/TSV (header row) or JSONL with text and label")
    p.add_argument("--eval", metavar="FILE", help="evaluation file (same columns); the best epoch on it is kept")
    p.add_argument("--method", choices=METHODS, default="lora", help="what trains (default lora)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--json", metavar="FILE", help="also write the metrics to FILE")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--config", metavar="FILE", help="a TaskConfig JSON file (flags override its fields)")
    p.add_argument("--text-column", default="text", metavar="NAME")
    p.add_argument("--label-column", default="label", metavar="NAME")
    p.add_argument("--lora-targets", metavar="LIST", help="comma-separated LoRA target module names")
    p.add_argument("--save-every", type=int, default=50, metavar="N", help="steps between checkpoints (default 50)")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache of --method head (default: $PEFTCORE_CACHE "
                   "or ~/.cache/peftcore/features; a second run on the same model and data is instant)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false")
    for field, kind in _FIELDS.items():
        p.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=None,
                       help=argparse.SUPPRESS if field in ("warmup_ratio",) else f"TaskConfig.{field}")
    return p


def default_cache_dir():
    from ..assets import cache_root

    return cache_root() / "features"


def task_config(args):
    from .task import TaskConfig

    given = {f: getattr(args, f) for f in _FIELDS if getattr(args, f) is not None}
    if args.config:
        base = TaskConfig.from_json(args.config).to_dict()
        base.update(given, method=args.method)
        return TaskConfig.from_dict(base, source=args.config)
    return TaskConfig.for_method(args.method, **given)


def finetune_main(argv=None, prog="peftcore finetune") -> int:
    from ..assets import DemoError
    from .finetune import finetune

    parser = finetune_parser(prog)
    args = parser.parse_args(argv)
    if args.save_every < 0:
        parser.error(f"--save-every must be >= 0, got {args.save_every}")
    if args.threads is not None:
        import torch

        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        cfg = task_config(args)
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
        finetune(args.train, eval=args.eval, model=args.model, config=cfg, out=args.out, resume=args.resume,
                 overwrite=args.overwrite, text_column=args.text_column, label_column=args.label_column,
                 targets=targets, save_every=args.save_every, progress=args.progress, json_path=args.json,
                 plot=args.plot, device=args.device, cache_dir=args.cache_dir or default_cache_dir())
    except (FinetuneError, DemoError, ValueError, TypeError) as e:
        parser.error(str(e))
    return 0


def predict_main(argv=None, prog="peftcore predict") -> int:
    from ..assets import DemoError
    from .predict import predict

    p = argparse.ArgumentParser(prog=prog, description="Label a text file with a peftcore finetune run.")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the --out directory of peftcore finetune")
    p.add_argument("--input", required=True, metavar="FILE", help="CSV or JSONL with a text column")
    p.add_argument("--model", metavar="DIR", help="the base encoder (default: the one the run used)")
    p.add_argument("--output", metavar="FILE", help=".csv or .jsonl to write (default: JSONL on stdout)")
    p.add_argument("--text-column", default="text", metavar="NAME")
    p.add_argument("--label-column", default="label", metavar="NAME")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        predict(args.adapter, args.input, model=args.model, output=args.output, text_column=args.text_column,
                label_column=args.label_column, device=args.device)
    except (FinetuneError, DemoError, ValueError, TypeError) as e:
        p.error(str(e))
    return 0
