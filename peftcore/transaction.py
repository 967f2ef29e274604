"""All-or-nothing changes to a model: ``apply``, ``load_adapter`` and ``delete_adapter`` run inside
:func:`transaction`, so an exception at any point leaves the model exactly as it was.

What a model-changing call can touch, and how each is put back:

* the module tree, hooks and every attribute of every module (the ``_modules``, ``_parameters``,
  ``_buffers`` and hook dicts, a host's per-adapter dicts and lists, ``training``): each module's
  ``__dict__`` and the containers in it are copied one level deep on entry and restored **in
  place** on error (the same dict objects, so a hook's ``RemovableHandle`` taken before still
  removes it);
* ``requires_grad`` of every parameter reachable on entry;
* the attributes of a transformers model's ``config`` (and of the sub-configs it holds), which
  prefix tuning changes;
* base weights changed in place while the transaction runs (PiSSA moves the top singular
  directions out of W): the first in-place change of a tensor inside a transaction calls
  :func:`before_inplace`, which keeps a copy of it until the transaction ends; on error the copy
  is written back.  Only tensors changed in place are copied, so a LoRA ``apply`` costs no
  weight memory; a PiSSA ``apply`` holds one copy of each target weight until it returns.

Cost on entry: one shallow copy per module (a few hundred dicts for a 7B transformer), no tensor
copy.  A transaction nested in one that covers the same model joins it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

_state = threading.local()
_CONTAINERS = (dict, list, set)


def _copy(value):
    if isinstance(value, dict):
        return dict(value)
    return list(value) if isinstance(value, list) else set(value)


def _restore(obj, items) -> None:
    obj.clear()
    if isinstance(obj, dict):
        obj.update(items)
    elif isinstance(obj, list):
        obj.extend(items)
    else:
        obj.update(items)


class _Snapshot:
    def __init__(self, model: nn.Module):
        self.modules = []
        for m in model.modules():
            d = m.__dict__
            containers = {k: (v, _copy(v)) for k, v in d.items() if isinstance(v, _CONTAINERS)}
            self.modules.append((m, dict(d), containers))
        self.ids = {id(m) for m, _, _ in self.modules}
        # Objects beside the modules that a method changes: a transformers model's config (prefix
        # tuning switches its attention implementation) and the sub-configs it holds.
        self.objects: dict[int, tuple[object, dict]] = {}
        for m, saved, _ in self.modules:
            cfg = saved.get("config")
            if cfg is None or isinstance(cfg, (nn.Module, torch.Tensor)) or not hasattr(cfg, "__dict__"):
                continue
            for obj in [cfg] + [v for v in vars(cfg).values() if type(v).__name__.endswith("Config")]:
                if hasattr(obj, "__dict__"):
                    self.objects.setdefault(id(obj), (obj, dict(vars(obj))))
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.saved_data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def restore(self) -> None:
        with torch.no_grad():
            for t, copy in self.saved_data.values():
                t.copy_(copy)
        for m, saved, containers in self.modules:
            d = m.__dict__
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v
            for obj, items in containers.values():
                _restore(obj, items)
        for obj, saved in self.objects.values():
            d = vars(obj)
            for k in [k for k in d if k not in saved]:
                del d[k]
            d.update(saved)
        for p, flag in self.flags:
            p.requires_grad_(flag)


_MISSING = object()


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[None]:
    """Run the block; if it raises, put ``model`` back as it was on entry and re-raise."""
    stack = _stack()
    if stack and id(model) in stack[-1].ids:  # nested in one that covers this model: it restores
        yield
        return
    snap = _Snapshot(model)
    stack.append(snap)
    try:
        yield
    except BaseException:
        snap.restore()
        raise
    finally:
        stack.pop()


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def before_inplace(t: torch.Tensor) -> None:
    """Call before changing ``t`` in place: inside a transaction its value is kept for an undo."""
    for snap in _stack():
        if id(t) not in snap.saved_data:
            snap.saved_data[id(t)] = (t, t.detach().clone())
