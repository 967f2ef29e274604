"""Which modules of a model an adapter goes into: PEFT's ``target_modules`` rules.

* a string is a regular expression full-matched against the module's qualified name;
* a list matches a name exactly or as a dotted suffix (``"q_proj"`` matches ``layers.0.attn.q_proj``);
* ``"all-linear"`` means every linear layer (``nn.Linear`` or transformers' ``Conv1D``) but the
  model's output head.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

ALL_LINEAR = "all-linear"

# Defaults when a config names no target_modules, by transformers model_type (as PEFT does).
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or a transformers Conv1D (weight stored [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _output_head_names(model: nn.Module) -> set[str]:
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except Exception:  # models without a head may raise NotImplementedError
            head = None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    names.update(n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head")
    return names


def matches(name: str, target_modules: str | Iterable[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Qualified names of the modules ``target_modules`` selects in ``model``, in model order."""
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                "target_modules is None and there is no default for model_type "
                f"{model_type!r}: name the modules, e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'"
            )
        target_modules = DEFAULT_TARGETS[model_type]
    if target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        names = [n for n, m in model.named_modules() if is_linear(m) and n not in heads]
    else:
        names = [n for n, _ in model.named_modules() if n and matches(n, target_modules)]
    if exclude_modules:
        names = [n for n in names if not matches(n, exclude_modules)]
    return names


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The block index in a module's qualified name, PEFT's rule: the number after one of
    ``layers_pattern`` (e.g. ``"layers"``, ``"h"``), else the first numbered segment."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def in_layers(name: str, layers_to_transform, layers_pattern=None) -> bool:
    """Whether ``name`` lies in one of the blocks ``layers_to_transform`` selects (None: all)."""
    if layers_to_transform is None or layers_to_transform == []:
        return True
    idx = layer_index(name, layers_pattern)
    if idx is None:
        return False
    return idx == layers_to_transform if isinstance(layers_to_transform, int) else idx in layers_to_transform


def inside_any(name: str, modules) -> bool:
    """``name`` is one of ``modules`` (names or dotted suffixes) or inside one (PEFT's rule that keeps
    adapters out of modules_to_save modules)."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules or ())
