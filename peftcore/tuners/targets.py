"""Which modules of a model an adapter goes into: PEFT's ``target_modules`` rules.

* a string is a regular expression full-matched against the module's qualified name;
* a list matches a name exactly or as a dotted suffix (``"q_proj"`` matches ``layers.0.attn.q_proj``);
* ``"all-linear"`` means every linear layer (``nn.Linear`` or transformers' ``Conv1D``) but the
  model's output head.

Patterns come from files other people wrote (adapter_config.json), so matching is bounded: a
pattern is checked with Python's ``re`` (PEFT's semantics; an invalid one is an error naming the
field) and matched with the ``regex`` module under a time budget (:data:`MATCH_BUDGET_S` for all
the matching one injection does; see :func:`match_budget`), so a pattern with catastrophic
backtracking (``"(.|.|.)*(.|.|.)*Z"``) is a clear :class:`PatternTimeout` instead of a hang.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from typing import Iterable, Iterator

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
    """nn.Linear, a transformers Conv1D (weight stored [in, out]) or peftcore's NF4Linear."""
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "NF4Linear")


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


MATCH_BUDGET_S = 2.0  # seconds of regex matching one injection (or one call outside one) may take
_budget = threading.local()


class PatternTimeout(ValueError):
    """A module-name regex took longer than the matching budget (catastrophic backtracking)."""


@contextlib.contextmanager
def match_budget(seconds: float = MATCH_BUDGET_S) -> Iterator[None]:
    """Every regex match in the block shares one deadline ``seconds`` away (a nested block joins the
    outer one), so the matching of one injection is bounded however many modules the model has."""
    if getattr(_budget, "deadline", None) is not None:
        yield
        return
    _budget.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _budget.deadline = None


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, field: str):
    try:
        re.compile(pattern)  # PEFT's semantics decide what is valid
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"{field}: {pattern!r} is not a valid regular expression: {e}") from None
    try:
        import regex
    except ImportError:  # pragma: no cover - regex is a dependency
        return None
    try:
        return regex.compile(pattern)
    except Exception:  # a construct regex spells differently: fall back to re, with the budget unenforced
        return None


def _bounded(op: str, pattern: str, name: str, field: str):
    compiled = _compile(pattern, field)
    if compiled is None:
        return getattr(re, op)(pattern, name)
    deadline = getattr(_budget, "deadline", None)
    timeout = MATCH_BUDGET_S if deadline is None else max(deadline - time.monotonic(), 1e-3)
    try:
        return getattr(compiled, op)(name, timeout=timeout)
    except TimeoutError:
        raise PatternTimeout(
            f"{field}: matching the regex {pattern!r} against module names took more than the "
            f"{MATCH_BUDGET_S:g} s budget (e.g. on {name!r}; catastrophic backtracking?): simplify the "
            f"pattern or give a list of module names"
        ) from None


def bounded_fullmatch(pattern: str, name: str, field: str = "target_modules"):
    """``re.fullmatch(pattern, name)`` under the matching budget (see :func:`match_budget`)."""
    return _bounded("fullmatch", pattern, name, field)


def bounded_match(pattern: str, name: str, field: str = "pattern"):
    """``re.match(pattern, name)`` under the matching budget."""
    return _bounded("match", pattern, name, field)


def matches(name: str, target_modules: str | Iterable[str], field: str = "target_modules") -> bool:
    if isinstance(target_modules, str):
        return bounded_fullmatch(target_modules, name, field) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Qualified names of the modules ``target_modules`` selects in ``model``, in model order."""
    with match_budget():
        return _resolve_targets(model, target_modules, exclude_modules)


def _resolve_targets(model: nn.Module, target_modules, exclude_modules) -> list[str]:
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
        names = [n for n in names if not matches(n, exclude_modules, "exclude_modules")]
    return names


def layer_index(name: str, layers_pattern=None) -> int | None:
    """The block index in a module's qualified name, PEFT's rule: the number after one of
    ``layers_pattern`` (e.g. ``"layers"``, ``"h"``), else the first numbered segment."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # our own pattern: linear time
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = bounded_match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name, "layers_pattern")
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
