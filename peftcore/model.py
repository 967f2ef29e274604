"""Model-level adapter management: apply, activate, disable, merge, count."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from .layers.lora import LoRALinear
from .tuners.lora import LoRAConfig, inject_lora

_CONFIGS = "_peftcore_configs"


def adapter_configs(model: nn.Module) -> dict:
    """``{adapter name: config}`` of the adapters applied to ``model``."""
    return getattr(model, _CONFIGS, {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield n, m


def apply(model: nn.Module, config, name: str = "default", activate: bool = True) -> nn.Module:
    """Add adapter ``name`` described by ``config`` to ``model`` in place and return the model.

    Afterwards only the parameters of adapter ``name`` are trainable (every base parameter and
    every other adapter is frozen); with ``activate`` the new adapter becomes the active one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    if name in adapter_configs(model):
        raise ValueError(f"model already has an adapter named {name!r}")
    if isinstance(config, LoRAConfig):
        targets = inject_lora(model, config, name)
    else:
        raise TypeError(f"config must be a peftcore config such as LoRAConfig, got {type(config).__name__}")
    configs = dict(adapter_configs(model))
    configs[name] = config
    object.__setattr__(model, _CONFIGS, configs)
    object.__setattr__(model, "_peftcore_targets", {**getattr(model, "_peftcore_targets", {}), name: targets})
    mark_trainable(model, name)
    if activate:
        set_active(model, name)
    return model


def mark_trainable(model: nn.Module, name: str) -> None:
    """Freeze everything in ``model`` except the parameters of adapter ``name``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.lora_A[name].weight.requires_grad_(True)
            layer.lora_B[name].weight.requires_grad_(True)


def _names(names) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def set_active(model: nn.Module, names) -> None:
    """Make ``names`` (one adapter name or a list) the active adapters of every layer holding them."""
    names = _names(names)
    known = adapter_configs(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"model has no adapter named {missing[0]!r} (has {sorted(known)})")
    for _, layer in lora_layers(model):
        layer.set_active([n for n in names if n in layer.lora_A])


def active_adapters(model: nn.Module) -> list[str]:
    act: list[str] = []
    for _, layer in lora_layers(model):
        act += [n for n in layer.active if n not in act]
    return act


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block (merged adapters are unmerged and re-merged)."""
    layers = [layer for _, layer in lora_layers(model)]
    remerge = {id(layer): list(layer.merged) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(remerge[id(layer)])


def merge(model: nn.Module, names=None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights; the forward then skips them."""
    for _, layer in lora_layers(model):
        layer.merge(None if names is None else [n for n in _names(names) if n in layer.lora_A])
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: the base weights return to their pre-merge values (up to rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a layer left with no adapter becomes its original module again."""
    if name not in adapter_configs(model):
        raise KeyError(f"model has no adapter named {name!r}")
    for mod_name, layer in list(lora_layers(model)):
        if name in layer.lora_A:
            layer.delete_adapter(name)
            if not layer.lora_A:  # last adapter gone: put the original module back
                parent_name, _, child = mod_name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, layer.base_layer)
    configs = dict(adapter_configs(model))
    del configs[name]
    object.__setattr__(model, _CONFIGS, configs)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
