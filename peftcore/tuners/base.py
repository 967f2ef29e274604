"""The registry of adapter methods: how ``apply``, ``save_adapter`` and ``load_adapter`` reach them.

Each method package (``peftcore.tuners.lora``, ``.bottleneck``, ``.prompt``, ...) registers one
:class:`Method`: its config class, the function that injects it into a model, and the conversion of
its config to and from the JSON written beside the weights (``adapter_config.json``, whose
``peft_type`` names the method).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .targets import match_budget


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Attributes:
        peft_type: the ``peft_type`` written in adapter_config.json (PEFT's name where PEFT has one).
        config: the config class users construct.
        inject: ``inject(model, config, name) -> list[str]`` adds adapter ``name`` in place and
            returns the qualified names of the modules it touched; it changes nothing on error.
        to_json: ``to_json(config, model, name) -> dict`` for adapter_config.json (with peft_type).
        from_json: ``from_json(d, source) -> config``; ``source`` names the file for errors.
        for_load: ``for_load(config) -> config``, what :func:`peftcore.load_adapter` injects when
            saved weights are about to replace the initialization (skip an init that rewrites the
            base model or needs files, e.g. PiSSA or a text-initialized prompt); default: as is.
        extra_tensors: ``extra_tensors(model, config, name) -> {key: Parameter}``: tensors of the
            base model that train and are saved with adapter ``name`` (LoRA's ``bias="all"`` /
            ``"lora_only"``), keyed by their path in the model; default none.
    """

    peft_type: str
    config: type
    inject: Callable[[nn.Module, Any, str], list[str]]
    to_json: Callable[[Any, nn.Module, str], dict]
    from_json: Callable[[dict, str], Any]
    for_load: Callable[[Any], Any] = lambda config: config
    extra_tensors: Callable[[nn.Module, Any, str], dict] = lambda model, config, name: {}


_BY_TYPE: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register ``method`` (its injection runs under one regex-matching budget: see
    :func:`peftcore.tuners.targets.match_budget`); returns the registered Method."""
    inner = method.inject

    @functools.wraps(inner)
    def inject(model, config, name):
        with match_budget():
            return inner(model, config, name)

    method = dataclasses.replace(method, inject=inject)
    _BY_TYPE[method.peft_type] = method
    return method


def methods() -> dict[str, Method]:
    return dict(_BY_TYPE)


def method_for_config(config) -> Method:
    for cls in type(config).__mro__:  # a config subclass (Compacter++) uses its base's method
        for m in _BY_TYPE.values():
            if cls is m.config:
                return m
    known = ", ".join(m.config.__name__ for m in _BY_TYPE.values())
    raise TypeError(f"config must be a peftcore config ({known}), got {type(config).__name__}")


def method_for_type(peft_type, source: str) -> Method:
    if not isinstance(peft_type, str) or peft_type not in _BY_TYPE:
        raise ValueError(
            f"{source}: peft_type {peft_type!r} is not a method peftcore loads (knows {sorted(_BY_TYPE)})"
        )
    return _BY_TYPE[peft_type]


LIBRARY = "peftcore"  # adapter_config.json's "library" for peftcore's own (non-PEFT) formats


def dataclass_to_json(config, peft_type: str) -> dict:
    """A dataclass config as JSON: its fields, ``peft_type`` and ``library`` ("peftcore": the file is
    peftcore's own format, which PEFT cannot read, and a reader can tell it from PEFT's)."""
    return {"peft_type": peft_type, "library": LIBRARY, **dataclasses.asdict(config)}


def dataclass_from_json(cls, d: dict, peft_type: str, source: str):
    """Rebuild a dataclass config from :func:`dataclass_to_json`; unknown keys are an error."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if d.get("peft_type") != peft_type:
        raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}, expected {peft_type!r}")
    if d.get("library", LIBRARY) != LIBRARY or ("library" not in d and ("peft_version" in d or "task_type" in d)):
        raise ValueError(
            f"{source}: a {peft_type} adapter in Hugging Face PEFT's format, which peftcore does not read "
            f"(peftcore reads PEFT's LORA adapters, and its own {peft_type} files, marked \"library\": \"peftcore\")"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    rest = {k: v for k, v in d.items() if k not in ("peft_type", "library")}
    unknown = sorted(set(rest) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} keys {unknown} (written by a newer peftcore?)")
    try:
        return cls(**rest)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: invalid {cls.__name__}: {e}") from e
