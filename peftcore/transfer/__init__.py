"""Transfer-learning workflows: what a user does around the layers and kernels.

One file per concern (names resolve lazily, so ``import peftcore.transfer`` loads nothing heavy):

* ``features``     ``FeatureCache``: a frozen backbone's features computed once, keyed on weights,
                   pooling, tokenizer/transform and data, stored atomically.
* ``groups``       ``layer_groups``, ``freeze_to``: the model's parameters from the input to the head.
* ``unfreeze``     ``GradualUnfreezing`` (ULMFiT), from a plain loop or as a transformers callback.
* ``rates``        ``param_groups``: layer-wise learning-rate decay and weight-decay groups.
* ``schedules``    ``slanted_triangular``: ULMFiT's learning-rate schedule as a torch scheduler.
* ``regularizers`` ``L2SP``, ``r_drop_loss``, ``Mixout``/``apply_mixout``: toward the pre-trained model.
* ``augment``      seeded text augmentation (swap, deletion, insertion) and embedding cutoff.
* ``task``         ``TaskConfig``: one place for a task's settings, shared by the CLI and the API.
* ``finetune``     ``finetune``: the library behind ``peftcore finetune`` (``checkpoint``: exact resume;
                   ``report``: the curves' plot; ``textdata``: the user's CSV/JSONL; ``classifier``).
* ``predict``      ``predict``: the library behind ``peftcore predict``.
* ``prompts``      ``Template``, ``Verbalizer``, ``EncoderScorer``, ``CausalLMScorer``, ``select_template``:
                   zero- and few-shot classification by scoring label words with a pre-trained model.
* ``crosslingual`` ``train_language_adapter`` (MLM through ``TiedMLMHead``), ``mask_tokens``: MAD-X
                   language adapters on real text (``textdata``: ``content_groups``/``group_split``).
"""

from __future__ import annotations

import importlib

_NAMES = {
    "FeatureCache": "features",
    "layer_groups": "groups",
    "freeze_to": "groups",
    "LayerGroup": "groups",
    "GradualUnfreezing": "unfreeze",
    "GradualUnfreezingCallback": "unfreeze",
    "param_groups": "rates",
    "slanted_triangular": "schedules",
    "L2SP": "regularizers",
    "r_drop_loss": "regularizers",
    "Mixout": "regularizers",
    "apply_mixout": "regularizers",
    "TextAugmenter": "augment",
    "random_swap": "augment",
    "random_deletion": "augment",
    "random_insertion": "augment",
    "token_cutoff": "augment",
    "span_cutoff": "augment",
    "TaskConfig": "task",
    "finetune": "finetune",
    "predict": "predict",
    "load_text_file": "textdata",
    "TextClassifier": "classifier",
    "remove_mixout": "regularizers",
    "per_class_sample": "textdata",
    "content_groups": "textdata",
    "group_split": "textdata",
    "train_language_adapter": "crosslingual",
    "TiedMLMHead": "crosslingual",
    "mask_tokens": "crosslingual",
    "Template": "prompts",
    "Verbalizer": "prompts",
    "EncoderScorer": "prompts",
    "CausalLMScorer": "prompts",
    "PromptClassifier": "prompts",
    "select_template": "prompts",
    "PromptError": "prompts",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'peftcore.transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
