"""Putting LoRA layers into an existing model in place, without editing its source."""

from __future__ import annotations

import torch
from torch import nn

from ...layers.base import AdapterHost
from ...layers.lora import LoRALinear
from ...layers.saved import ModulesToSave
from ...quant.layer import NF4Linear
from .._validate import check_fits
from ..targets import in_layers, inside_any, is_linear, matches, resolve_targets
from .config import TASK_HEADS, LoRAConfig


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def heads_to_save(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The module names that train in full with this adapter: the config's modules_to_save and its
    task type's heads; with neither, a transformers ``*ForSequenceClassification`` model's head
    (its ``score``/``classifier`` is new: frozen it would never learn)."""
    heads = config.heads_to_save()
    if not heads and config.task_type is None and type(model).__name__.endswith("ForSequenceClassification"):
        heads = list(TASK_HEADS["SEQ_CLS"])
    return heads


def _saved_modules(model: nn.Module, config: LoRAConfig, heads: list[str]) -> list[str]:
    """Qualified names of the modules ``heads`` selects (names or dotted suffixes, as target_modules;
    an existing wrapper counts as the module it wraps, never its insides)."""
    found: list[str] = []
    for n, _ in model.named_modules():
        parts = n.split(".")
        if not n or "original_module" in parts or "modules_to_save" in parts:
            continue
        if matches(n, heads) and not any(n.startswith(f"{f}.") for f in found):
            found.append(n)
    explicit = [h for h in (config.modules_to_save or []) if not any(matches(n, [h]) for n in found)]
    if explicit:
        raise ValueError(f"modules_to_save={explicit!r} matched no module of {type(model).__name__}")
    return found


def _check_fan_in_fan_out(model: nn.Module, config: LoRAConfig, names: list[str]) -> None:
    """fan_in_fan_out says how the base weight is stored: ``[in, out]`` is GPT-2's Conv1D, ``[out, in]``
    nn.Linear.  A value that contradicts the module would run the weights transposed."""
    if config.fan_in_fan_out is None:
        return
    for n in names:
        m = model.get_submodule(n)
        base = m.base_layer if isinstance(m, LoRALinear) else m
        conv1d = type(base).__name__ == "Conv1D"
        if config.fan_in_fan_out != conv1d:
            raise ValueError(
                f"LoRAConfig.fan_in_fan_out={config.fan_in_fan_out} does not fit module {n!r}, a "
                f"{type(base).__name__} (weight stored {'[in, out]' if conv1d else '[out, in]'}): fan_in_fan_out is "
                f"true exactly for GPT-2's Conv1D; leave it None to detect it"
            )


def inject_lora(model: nn.Module, config: LoRAConfig, name: str) -> list[str]:
    """Add adapter ``name`` to every module ``config`` targets; returns their qualified names.

    A targeted ``nn.Linear``/``Conv1D`` is replaced by a :class:`LoRALinear` wrapping it; a target
    that already is one gets the new adapter beside its others.  Each module of modules_to_save
    gets a trainable copy for this adapter (:class:`~peftcore.layers.saved.ModulesToSave`).
    rank_pattern / alpha_pattern set each layer's rank and alpha; layers_to_transform (with a list
    of target_modules, PEFT's rule) keeps the adapter to the blocks it names.  Nothing changes
    unless every target is valid.
    """
    heads = heads_to_save(model, config)
    saved = _saved_modules(model, config, heads)
    # Other methods' adapter modules (bottleneck projections, prefix MLPs) are never LoRA targets,
    # nor are the modules that train in full (PEFT keeps adapters out of them too).
    inside = tuple(f"{n}." for n, m in model.named_modules()
                   if isinstance(m, AdapterHost) and not isinstance(m, LoRALinear))
    names = []
    by_list = not isinstance(config.target_modules, str) and config.target_modules is not None
    for n in resolve_targets(model, config.target_modules, config.exclude_modules):
        if inside and n.startswith(inside):
            continue
        if inside_any(n, saved) or inside_any(n, heads):
            continue
        if by_list and not in_layers(n, config.layers_to_transform, config.layers_pattern):
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
            raise TypeError(f"target {n} is a {type(m).__name__}; LoRA supports nn.Linear, Conv1D and NF4Linear")
    for n in saved:
        m = model.get_submodule(n)
        if isinstance(m, ModulesToSave) and name in m.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of {n}")
    _check_fan_in_fan_out(model, config, names)
    numel, weight = 0, None
    device, itemsize = None, 4
    for n in names:  # every size is known: refuse before allocating one that cannot fit
        m = model.get_submodule(n)
        base = m.base_layer if isinstance(m, LoRALinear) else m
        if isinstance(base, NF4Linear):  # a 4-bit base: the adapter is in its compute dtype
            shape, device = (base.out_features, base.in_features), base.weight_packed.device
            itemsize = torch.empty((), dtype=base.compute_dtype).element_size()
        else:
            shape, device, itemsize = base.weight.shape, base.weight.device, base.weight.element_size()
        numel += config.rank_and_alpha(n)[0] * (shape[0] + shape[1])
    check_fits("LoRAConfig.r (with rank_pattern)", numel, itemsize, device)
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
        r, alpha = config.rank_and_alpha(n)
        m.add_adapter(name, config, r=r, alpha=alpha)
    for n in saved:
        m = model.get_submodule(n)
        if not isinstance(m, ModulesToSave):
            wrapper = ModulesToSave(m)
            parent, child = _parent(model, n)
            setattr(parent, child, wrapper)
            m = wrapper
        m.add_adapter(name)
    return names + saved
