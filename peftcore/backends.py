"""Backend registry: which implementation of an op runs for a given device and dtype.

An op has up to four backends: ``reference`` (plain PyTorch), ``triton`` (``peftcore.kernels``),
``cpp`` (CPU C++ in ``peftcore._C``) and ``cuda`` (CUDA in ``peftcore._C``).  Per call the
registry picks one from the input's device and dtype:

* ``backend=`` argument, else the ``PEFTCORE_BACKEND`` environment variable, names one explicitly;
  an explicit request for a backend that cannot run these inputs raises ``BackendUnavailable``
  with the reason.
* Otherwise the op's default order for the device is tried; a candidate that cannot run falls
  through to the next, and the fall-back is logged once.

Nothing here probes a device, imports triton or loads the extension at import time: the probes run
on first use and are cached.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch

log = logging.getLogger("peftcore")

BACKENDS = ("reference", "triton", "cpp", "cuda")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@lru_cache(maxsize=None)
def triton_status() -> str | None:
    """None when triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"triton not importable ({type(e).__name__}: {e})"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def native_status(cuda: bool = False) -> str | None:
    """None when peftcore._C is loaded (with its CUDA part if ``cuda``), else why not."""
    from . import native

    return native.unavailable_reason(cuda=cuda)


@dataclass
class OpSpec:
    """The backends of one op: where each lives and which devices and dtypes it takes."""

    name: str
    modules: dict[str, str]  # backend -> module path exposing the op's functions
    dtypes: dict[str, tuple[torch.dtype, ...]]  # backend -> dtypes it accepts
    defaults: dict[str, tuple[str, ...]]  # device type -> preference order
    why_default: dict[str, str] = field(default_factory=dict)  # device type -> the measurement
    # backend -> limits(sizes) -> None or why these sizes are outside what the backend takes; the
    # op passes its sizes (e.g. ``rank=``) to select(), which then falls back to the next backend
    # (or, for a backend asked for by name, says why not).
    limits: dict[str, Callable[[dict], str | None]] = field(default_factory=dict)


NATIVE_MAX_RANK = 1 << 20  # the rank peftcore._C's kernels take (their workspaces index with int32)
TRITON_MAX_RANK = 1024  # the Triton kernels hold a [BLOCK, next_pow2(r)] tile in registers


def rank_limit(most: int) -> Callable[[dict], str | None]:
    """A ``limits`` entry: the op's ``rank`` size must be <= ``most``."""

    def check(sizes: dict) -> str | None:
        r = sizes.get("rank")
        return None if r is None or r <= most else f"rank r={r} is above the {most} this backend takes"

    return check


_OPS: dict[str, OpSpec] = {}
_warned: set[tuple] = set()


def register(spec: OpSpec) -> OpSpec:
    _OPS[spec.name] = spec
    return spec


def ops() -> dict[str, OpSpec]:
    _load_builtin_ops()
    return dict(_OPS)


def _load_builtin_ops() -> None:
    # Specs live beside their ops; importing the ops package registers them.
    importlib.import_module("peftcore.ops")


def why_not(op: str, backend: str, device: torch.device | str, dtype: torch.dtype,
            sizes: dict | None = None) -> str | None:
    """None when ``backend`` can run ``op`` on this device and dtype (and these ``sizes``, when
    given: what the op's ``limits`` check), else the reason."""
    spec = _OPS[op]
    device = torch.device(device)
    if backend not in spec.modules:
        return f"{op} has no {backend} backend"
    if dtype not in spec.dtypes[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in spec.dtypes[backend])
        return f"{backend} takes {names}, got {str(dtype).replace('torch.', '')}"
    if sizes and backend in spec.limits:
        reason = spec.limits[backend](sizes)
        if reason:
            return reason
    if backend == "reference":
        return None
    if backend == "triton":
        reason = triton_status()
        if reason:
            return reason
        if device.type == "cpu" and not triton_interpret():
            return "triton runs on CUDA devices (or on the CPU under TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type}"
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"cpp runs on the CPU, got a {device.type} tensor"
        return native_status(cuda=False)
    if backend == "cuda":
        if device.type != "cuda":
            return f"cuda runs on CUDA devices, got a {device.type} tensor"
        return native_status(cuda=True)
    return f"unknown backend {backend!r}"


def select(op: str, device: torch.device | str, dtype: torch.dtype, backend: str | None = None,
           sizes: dict | None = None) -> str:
    """Name of the backend that runs ``op`` for inputs on ``device`` of ``dtype`` (and ``sizes``,
    checked against each backend's limits)."""
    spec = _OPS[op]
    device = torch.device(device)
    requested = backend or os.environ.get("PEFTCORE_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
        reason = why_not(op, requested, device, dtype, sizes)
        if reason:
            raise BackendUnavailable(f"{op}: backend {requested!r} unavailable: {reason}")
        return requested
    order = spec.defaults.get(device.type, ("reference",))
    for i, name in enumerate(order):
        reason = why_not(op, name, device, dtype, sizes)
        if reason is None:
            return name
        key = (op, name, device.type, dtype, reason)
        if key not in _warned:
            _warned.add(key)
            nxt = order[i + 1] if i + 1 < len(order) else "none"
            log.info("peftcore: %s falls back from %s (%s) to %s", op, name, reason, nxt)
    raise BackendUnavailable(f"{op}: no backend runs on {device.type} with {dtype}")


def implementation(op: str, backend: str) -> Callable | object:
    """The module implementing ``op`` on ``backend`` (imported on first use)."""
    return importlib.import_module(_OPS[op].modules[backend])
