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


def pooling_mask(encoder, attention_mask, hidden):
    """The mask to pool ``hidden`` with: prompt tuning puts virtual tokens in front of the text."""
    if hidden.shape[1] == attention_mask.shape[1]:
        return attention_mask
    import peftcore as pc

    return pc.extend_prompt_mask(encoder, attention_mask)
