"""Model-level adapter management for every method: apply, activate, train, disable, merge, delete.

Everything here goes through the adapter hosts of a model (modules that are
:class:`~peftcore.layers.base.AdapterHost`: LoRA layers, bottleneck slots, prompt encoders) and the
method registry (:mod:`peftcore.tuners`), so it works the same for LoRA, bottleneck adapters,
Compacter, prompt and prefix tuning, and for several of them on one model.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .integrations.transformers import install_save_pretrained, uninstall_save_pretrained
from .layers.base import AdapterHost, Stack, filter_spec
from .layers.lora import LoRALinear
from .layers.saved import ModulesToSave
from .tuners import method_for_config
from .transaction import transaction
from .tuners.lora import LoRAConfig

_CONFIGS = "_peftcore_configs"
_ACTIVE = "_peftcore_active"
_BASE_GRAD = "_peftcore_base_requires_grad"  # [(parameter, requires_grad)] before the first adapter
BASE = "__base__"  # in adapter_batch: this example runs the base model alone


def adapter_configs(model: nn.Module) -> dict:
    """``{adapter name: config}`` of the adapters applied to ``model``."""
    return getattr(model, _CONFIGS, {})


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """``(qualified name, module)`` of every adapter host in ``model``."""
    for n, m in model.named_modules():
        if isinstance(m, AdapterHost):
            yield n, m


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield n, m


def _set_configs(model: nn.Module, configs: dict) -> None:
    object.__setattr__(model, _CONFIGS, configs)


def apply(model: nn.Module, config, name: str = "default", activate: bool = True) -> nn.Module:
    """Add adapter ``name`` described by ``config`` to ``model`` in place and return the model.

    ``config`` is any peftcore config (:class:`LoRAConfig`, :class:`BottleneckConfig`,
    :class:`CompacterConfig`, :class:`PromptTuningConfig`, :class:`PrefixTuningConfig`).
    Afterwards only the parameters of adapter ``name`` are trainable (every base parameter and
    every other adapter is frozen); with ``activate`` the new adapter becomes the active one.  The
    new modules take the train/eval mode of the modules they go into (a model in ``eval()`` runs
    no adapter dropout until ``model.train()``).

    All or nothing: if anything fails (a config the model cannot take, memory), the model is left
    exactly as it was (modules, hooks, state-dict keys, ``requires_grad``; see
    :mod:`peftcore.transaction`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise ValueError(f"adapter name must be a non-empty string without dots (not {BASE!r}), got {name!r}")
    if name in adapter_configs(model):
        raise ValueError(f"model already has an adapter named {name!r}")
    method = method_for_config(config)
    with transaction(model):
        if not adapter_configs(model):  # what delete_adapter of the last adapter gives back
            object.__setattr__(model, _BASE_GRAD, [(p, p.requires_grad) for p in model.parameters()])
        before = {id(m) for m in model.modules()}
        targets = method.inject(model, config, name)
        take_host_mode(model, before)
        install_save_pretrained(model)  # save_pretrained writes the adapters too (PEFT's layout)
        _set_configs(model, {**adapter_configs(model), name: config})
        object.__setattr__(model, "_peftcore_targets", {**getattr(model, "_peftcore_targets", {}), name: targets})
        train_adapter(model, name)
        if activate:
            set_active(model, name)
    return model


def _restore_base_grad(model: nn.Module) -> None:
    """The last adapter is gone: every base parameter gets back the requires_grad it had before
    the first adapter was applied."""
    for p, flag in model.__dict__.pop(_BASE_GRAD, []):
        p.requires_grad_(flag)


def take_host_mode(model: nn.Module, before: set[int]) -> None:
    """Every module added to ``model`` since ``before`` (ids of its modules then) takes the train/eval
    mode of the module it was inserted into; modules that were there keep theirs.

    A new module starts in training mode, but a model from ``from_pretrained`` is in eval mode:
    without this, an adapter added to it would run dropout at inference.
    """

    def visit(module: nn.Module, mode: bool) -> None:
        for child in module.children():
            if id(child) in before:
                visit(child, child.training)
            else:
                child.training = mode
                visit(child, mode)

    visit(model, model.training)


def _names(names, what: str = "names") -> list[str]:
    if isinstance(names, str):
        return [names]
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    raise TypeError(f"{what} must be an adapter name, a list of names or a Stack, got {names!r}")


def _check_known(model: nn.Module, names) -> None:
    known = adapter_configs(model)
    missing = [n for n in names if n not in known]
    if missing:
        raise KeyError(f"model has no adapter named {missing[0]!r} (has {sorted(known)})")


def train_adapter(model: nn.Module, names) -> None:
    """Make the parameters of adapters ``names`` (one name, a list or a Stack) the only trainable ones.

    Everything else (the base model and every other adapter) is frozen: train a task adapter on
    top of a frozen language adapter with ``train_adapter(model, "task")`` after
    ``set_active(model, Stack("lang_en", "task"))``.
    """
    names = _names(names)
    _check_known(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, host in hosts(model):
        for n in names:
            if n in host.adapter_names():
                for p in host.trainable_tensors(n).values():
                    p.requires_grad_(True)
    configs = adapter_configs(model)
    for n in names:  # base tensors a method trains with its adapter (LoRA's bias="all" / "lora_only")
        for p in method_for_config(configs[n]).extra_tensors(model, configs[n], n).values():
            p.requires_grad_(True)


def set_active(model: nn.Module, names) -> None:
    """Make ``names`` the active adapters: one name, a list, or a :class:`Stack`.

    Each host receives the specification restricted to the adapters it holds: LoRA terms add up,
    bottleneck adapters of a Stack run one after another (``Stack("lang_de", "task")`` swaps the
    language under a task adapter: zero-shot cross-lingual transfer), and at most one prompt or
    prefix adapter can be active.  An empty list deactivates every adapter.
    """
    spec = names if isinstance(names, Stack) else _names(names)
    _check_known(model, spec)
    # A merged adapter is part of the base weight: one that is no longer active is unmerged first
    # (PEFT's set_adapter does the same), so the forward runs exactly the adapters named.
    for _, layer in lora_layers(model):
        layer.unmerge([n for n in layer.merged if n not in spec])
    for _, host in hosts(model):
        host.set_active(filter_spec(spec, host.adapter_names()))
    object.__setattr__(model, _ACTIVE, spec)


def active_adapters(model: nn.Module):
    """The active adapters as last set: a list of names, or the :class:`Stack` given."""
    spec = getattr(model, _ACTIVE, None)
    if spec is not None:
        return spec
    act: list[str] = []
    for _, host in hosts(model):
        act += [n for n in host.active if n not in act]
    return act


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model alone inside the block (merged LoRA adapters are unmerged and re-merged)."""
    all_hosts = [host for _, host in hosts(model)]
    remerge = {id(h): list(h.merged) for h in all_hosts if isinstance(h, LoRALinear)}
    for h in all_hosts:
        if isinstance(h, LoRALinear):
            h.unmerge()
        h.disabled = True
    try:
        yield model
    finally:
        for h in all_hosts:
            h.disabled = False
            if isinstance(h, LoRALinear):
                h.merge(remerge[id(h)])


def _lora_only(model: nn.Module, names, what: str) -> None:
    configs = adapter_configs(model)
    other = [n for n in names if not isinstance(configs[n], LoRAConfig)]
    if other:
        raise ValueError(
            f"{what} works on LoRA adapters only; {other[0]!r} is a {type(configs[other[0]]).__name__} adapter"
        )


def merge(model: nn.Module, names=None) -> nn.Module:
    """Fold LoRA adapters (default: the active ones) into the base weights; the forward then skips them.

    Adapters with a non-linearity (bottleneck, Compacter) and prompts cannot be folded into a weight:
    naming one is an error; with ``names=None`` they simply stay active.
    """
    if names is not None:
        names = _names(names)
        _check_known(model, names)
        _lora_only(model, names, "merge")
    layers = [(layer, None if names is None else [n for n in names if n in layer.lora_A])
              for _, layer in lora_layers(model)]
    for layer, here in layers:  # every layer checked before any weight changes
        layer.to_merge(here)
    for layer, here in layers:
        layer.merge(here)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: the base weights return to their pre-merge values (up to rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a host left with no adapter leaves the model (LoRA layers become
    their original modules again, hooks are removed).  Once the last adapter is gone every base
    parameter has the ``requires_grad`` it had before the first :func:`apply`.  All or nothing:
    on any error (a merged adapter must be unmerged first) the model is unchanged."""
    if name not in adapter_configs(model):
        raise KeyError(f"model has no adapter named {name!r}")
    with transaction(model):
        for path, host in list(hosts(model)):
            if name in host.adapter_names():
                host.delete_adapter(name)
                if not host.has_adapters():
                    host.detach_from(model, path)
        configs = dict(adapter_configs(model))
        del configs[name]
        _set_configs(model, configs)
        targets = dict(getattr(model, "_peftcore_targets", {}))
        targets.pop(name, None)
        object.__setattr__(model, "_peftcore_targets", targets)
        spec = getattr(model, _ACTIVE, None)
        if spec is not None and name in spec:
            kept = [n for n in spec if n != name]
            object.__setattr__(model, _ACTIVE, Stack(*kept) if isinstance(spec, Stack) and kept else kept)
        if not configs:  # the model is a plain model again
            for attr in (_CONFIGS, _ACTIVE, "_peftcore_targets"):
                model.__dict__.pop(attr, None)
            uninstall_save_pretrained(model)
            _restore_base_grad(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active LoRA adapters into the base weights and take every peftcore module out:
    ``model`` (changed in place, and returned) is a plain model again, e.g. a transformers model
    whose ``save_pretrained`` output any ``from_pretrained`` loads with the same logits.

    Each LoRA layer becomes its base layer with the active adapters merged (inactive ones are
    dropped); a modules_to_save wrapper becomes its active adapter's trained copy (the original
    when none is active).  Adapters that cannot be folded into a weight (bottleneck, Compacter,
    prompt and prefix tuning) are an error naming them, checked before anything changes: delete
    them first (or keep the model adapted and save the adapters instead).
    """
    configs = adapter_configs(model)
    other = [n for n, c in configs.items() if not isinstance(c, LoRAConfig)]
    if other:
        raise ValueError(
            f"merge_and_unload folds LoRA adapters into weights; adapter {other[0]!r} is a "
            f"{type(configs[other[0]]).__name__} adapter, which no weight can hold: delete it first"
        )
    for _, layer in lora_layers(model):  # every layer checked before any weight changes
        layer.to_merge()
    for path, host in list(hosts(model)):
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(host, LoRALinear):
            host.merge()
            setattr(parent, child, host.base_layer)
        elif isinstance(host, ModulesToSave):
            setattr(parent, child, host.running())
    for attr in (_CONFIGS, _ACTIVE, "_peftcore_targets"):
        model.__dict__.pop(attr, None)
    uninstall_save_pretrained(model)
    _restore_base_grad(model)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names):
    """Inside the block, example ``e`` of each forward runs LoRA adapter ``names[e]``.

    ``names`` has one entry per example of the batch (dim 0 of the inputs): a LoRA adapter name, or
    ``"__base__"`` (or None) for the base model alone.  Every LoRA layer gathers each example's
    adapter from a stack of the adapters named, in one kernel (:func:`peftcore.ops.lora_mixed_linear`,
    punica's BGMV/SGMV idea) rather than a Python loop over adapters.  A layer an adapter does not
    target runs the base for that adapter's examples.

    For serving: the stacks are copies made on entry (no gradient reaches the adapters, no dropout),
    and merged adapters are refused.  Adapters of other kinds keep their usual activation.
    """
    if isinstance(names, (list, tuple)):
        names = [BASE if n is None else n for n in names]
    names = _names(names)
    if not names:
        raise ValueError("adapter_batch needs one adapter name per example, got an empty list")
    used = [n for n in dict.fromkeys(names) if n != BASE]
    _check_known(model, used)
    _lora_only(model, used, "adapter_batch")
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapter_batch needs unmerged adapters: call peftcore.unmerge(model) first")
    if any(layer.mixed is not None for layer in layers):
        raise RuntimeError("adapter_batch blocks cannot be nested")
    try:
        for layer in layers:
            here = [n for n in used if n in layer.lora_A]
            if not here:  # no adapter of this batch targets the layer: every example runs the base
                layer.mixed = ()
                continue
            pos = {n: j for j, n in enumerate(here)}
            a, b, s = layer.stack_adapters(here)
            index = torch.tensor([pos.get(n, -1) for n in names], dtype=torch.int64, device=a.device)
            layer.mixed = (a, b, s, index)
        yield model
    finally:
        for layer in layers:
            layer.mixed = None
