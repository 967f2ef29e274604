"""Putting LoRA layers into an existing model in place, without editing its source."""

from __future__ import annotations

from torch import nn

from ...layers.base import AdapterHost
from ...layers.lora import LoRALinear
from ..targets import is_linear, resolve_targets
from .config import LoRAConfig


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_lora(model: nn.Module, config: LoRAConfig, name: str) -> list[str]:
    """Add adapter ``name`` to every module ``config`` targets; returns their qualified names.

    A targeted ``nn.Linear``/``Conv1D`` is replaced by a :class:`LoRALinear` wrapping it; a target
    that already is one gets the new adapter beside its others.  Nothing changes unless every
    target is valid.
    """
    # Other methods' adapter modules (bottleneck projections, prefix MLPs) are never LoRA targets.
    inside = tuple(f"{n}." for n, m in model.named_modules()
                   if isinstance(m, AdapterHost) and not isinstance(m, LoRALinear))
    names = []
    for n in resolve_targets(model, config.target_modules, config.exclude_modules):
        if inside and n.startswith(inside):
            continue
        # Once wrapped, a layer's inner modules match the rules too: target the wrapper itself.
        parts = n.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            continue
        n = n.removesuffix(".base_layer")
        if n not in names:
            names.append(n)
    if not names:
        sample = [n for n, m in model.named_modules() if is_linear(m)][:8]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}; "
            f"its linear layers include {sample}"
        )
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LoRALinear):
            if name in m.lora_A:
                raise ValueError(f"adapter {name!r} already exists on {n}")
        elif not is_linear(m):
            raise TypeError(f"target {n} is a {type(m).__name__}; LoRA supports nn.Linear and Conv1D")
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, LoRALinear):
            fan = config.fan_in_fan_out
            if fan is None:
                fan = type(m).__name__ == "Conv1D"
            wrapped = LoRALinear(m, fan_in_fan_out=fan)
            parent, child = _parent(model, n)
            setattr(parent, child, wrapped)
            m = wrapped
        m.add_adapter(name, config)
    return names
