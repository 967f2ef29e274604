"""The adapter rows of ``peftcore demo``: which peftcore config each one applies to the encoder.

Every row starts from the same pre-trained encoder; ``peftcore.apply`` injects the method in
place and freezes the encoder, so only the adapter (and the demo's new linear head) trains.
"""

from __future__ import annotations

ADAPTER_METHODS = ("lora", "bottleneck", "compacter", "compacter++", "prompt")
PROMPT_INIT_TEXT = "classify the intent of this request:"


class MethodError(RuntimeError):
    """A method cannot be applied to this encoder with these options (shown as a usage error)."""


def display_names(args) -> dict[str, str]:
    return {
        "lora": "lora (fused)",
        "bottleneck": f"bottleneck adapter (houlsby, 1/{args.adapter_reduction})",
        "compacter": f"compacter (houlsby, phm n={args.phm_dim})",
        "compacter++": f"compacter++ (pfeiffer, phm n={args.phm_dim})",
        "prompt": f"prompt tuning ({args.prompt_tokens} tokens)",
    }


def adapter_config(method: str, args, model_dir):
    """The peftcore config of ``method`` from the demo's options."""
    import peftcore as pc

    if method == "lora":
        return pc.LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                             target_modules=args.lora_targets)
    if method == "bottleneck":
        return pc.BottleneckConfig(placement="houlsby", reduction_factor=args.adapter_reduction,
                                   non_linearity="relu")
    if method in ("compacter", "compacter++"):
        cls = pc.CompacterConfig if method == "compacter" else pc.CompacterPlusPlusConfig
        return cls(reduction_factor=args.compacter_reduction, phm_dim=args.phm_dim)
    if method == "prompt":
        # Text init (Lester et al.): start the virtual tokens from real, task-related embeddings.
        return pc.PromptTuningConfig(num_virtual_tokens=args.prompt_tokens, init="text",
                                     init_text=PROMPT_INIT_TEXT, tokenizer_name_or_path=str(model_dir))
    raise ValueError(f"not an adapter method: {method!r}")


def apply_method(encoder, method: str, args, model_dir):
    """Inject ``method`` into ``encoder`` (in place); only its adapter parameters stay trainable."""
    import peftcore as pc

    try:
        pc.apply(encoder, adapter_config(method, args, model_dir), name=method)
    except (ValueError, TypeError) as e:
        hint = " (choose layers with --lora-targets)" if method == "lora" else ""
        raise MethodError(f"{method}: {e}{hint}") from None
    if not any(p.requires_grad for p in encoder.parameters()):
        raise MethodError(f"{method}: the configuration left nothing trainable")
    return encoder


# --------------------------------------------------------------------------------------------
# transfer-learning rows: run by peftcore.transfer's training loop (the one `peftcore finetune` uses)

TRANSFER_METHODS = ("top", "unfreeze", "lora-task")


def transfer_display_names(args) -> dict[str, str]:
    k = args.top_layers
    return {
        "top": f"top-layer fine-tune (top {k} block{'s' if k != 1 else ''} + head)",
        "unfreeze": f"gradual unfreezing, layer-wise lr x{args.layer_decay:g} (ULMFiT)",
        "lora-task": "lora + R-Drop + EDA augmentation",
    }


def transfer_config(method: str, args, cfg: dict):
    """The :class:`~peftcore.transfer.TaskConfig` of a transfer row from the demo's options."""
    from .transfer.task import TaskConfig

    common = dict(epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], max_length=args.max_length,
                  seed=args.seed)
    if method == "top":  # freeze_to(-(k + 1)): the top k blocks and the head group train
        return TaskConfig.for_method("freeze", freeze_to=-(args.top_layers + 1), **common)
    if method == "unfreeze":  # one more block from the top each epoch; slanted triangular rates
        return TaskConfig.for_method("unfreeze", layer_decay=args.layer_decay, **common)
    if method == "lora-task":
        return TaskConfig.for_method("lora", lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                                     lora_dropout=args.lora_dropout, regularizer="r_drop", augment="eda", **common)
    raise ValueError(f"not a transfer row: {method!r}")


def run_transfer(method: str, args, cfg: dict, model_dir, texts, labels, names, device, desc):
    """Train a transfer row on the demo's train split; ``(classifier, training state)``."""
    from .transfer.finetune import fit
    from .transfer.textdata import TextData

    task = transfer_config(method, args, cfg)
    targets = args.lora_targets if method == "lora-task" else None
    try:
        clf, _, state, _ = fit(TextData(list(texts), list(labels), list(names)), None, task, model_dir=model_dir,
                               targets=targets, progress=args.progress, device=device, say=lambda *a: None,
                               desc=desc)
    except ValueError as e:
        raise MethodError(f"{method}: {e}") from None
    return clf, state
