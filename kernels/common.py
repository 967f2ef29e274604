"""What the Triton kernels of :mod:`peftcore.kernels` share: interpreter switches, dot precision
(and :func:`upcast_dot`, the one device helper), autotune config lists pinnable from the
environment, the shared-memory pruning fallback, and the small sizing helpers (power-of-two pads,
autotune buckets, row splits).

``INTERPRET`` is read once, at import, like ``triton.jit`` reads ``TRITON_INTERPRET``;
:func:`interpreting` reads it again on every call (for launchers that pick their config per call).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set now."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


INTERPRET = interpreting()
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("ieee", "tf32", "tf32x3")

# H100: 227 KiB of shared memory per block, less some for the epilogue and layout conversions.
SMEM_BUDGET = 220 * 1024


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------


def check_precision(input_precision: str | None) -> str | None:
    """``input_precision`` itself when it is None or one of :data:`PRECISIONS`, else ValueError."""
    if input_precision is not None and input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be 'ieee', 'tf32' or 'tf32x3', got {input_precision!r}")
    return input_precision


def precision(dtype: torch.dtype, input_precision: str | None) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype`` (checked for fp32 only).

    fp32: ``input_precision``, by default "ieee" when ``torch.get_float32_matmul_precision()`` is
    "highest", else "tf32".  Half dtypes: "tf32", which tl.dot ignores for them (one value, one compile).
    """
    if dtype != torch.float32:
        return "tf32"
    if check_precision(input_precision) is None:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return input_precision


def upcast(dtype: torch.dtype) -> bool:
    """Whether half tiles must be cast to fp32 before ``tl.dot`` (the interpreter cannot multiply bf16)."""
    return INTERPRET and dtype in (torch.float16, torch.bfloat16)


@triton.jit
def upcast_dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` by ``tl.dot``; with UPCAST (see :func:`upcast`) both tiles are cast to fp32 first."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def store_dtype(dtype: torch.dtype, interpret: bool | None = None) -> torch.dtype:
    """The dtype a kernel stores an output of ``dtype`` in (``interpret`` defaults to :data:`INTERPRET`).

    The interpreter truncates fp32 -> bf16 in-kernel casts (its round-to-nearest path is broken
    too), which doubles the rounding error; there the kernels store fp32 and torch rounds.
    """
    interpret = INTERPRET if interpret is None else interpret
    return torch.float32 if interpret and dtype == torch.bfloat16 else dtype


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


def pow2(n: int, least: int = 16) -> int:
    """The next power of two >= n, at least ``least``."""
    return max(least, triton.next_power_of_2(n))


def m_bucket(m: int) -> int:
    """Autotune key: configs are re-tuned per power-of-two bucket of M, not per exact M."""
    return min(pow2(m, 16), 1 << 20)


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 on the CPU, so tests under the interpreter
    see several row or K splits."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def rows_per_split(rows: int, col_blocks: int, device: torch.device) -> int:
    """Rows per program of a kernel parallel over ``col_blocks`` column blocks and row splits that
    write partial sums: enough (column block, row split) programs for ~2 waves, a multiple of 128
    rows (16 under the interpreter)."""
    gran = 16 if INTERPRET else 128
    splits = max(1, triton.cdiv(2 * num_sms(device), col_blocks))
    return max(gran, triton.cdiv(triton.cdiv(rows, splits), gran) * gran)


# ---------------------------------------------------------------------------------------------
# Autotune configs
# ---------------------------------------------------------------------------------------------


def parse_items(body: str, env: str, keys) -> dict[str, int]:
    """``"k=v,k=v"`` -> {key: int}; ValueError (naming ``env``) on a key not in ``keys`` or a non-integer."""
    out: dict[str, int] = {}
    for item in filter(None, (i.strip() for i in body.split(","))):
        key, _, val = item.partition("=")
        key = key.strip()
        if key not in keys:
            raise ValueError(f"{env}: unknown key {key!r} (one of {', '.join(sorted(keys))})")
        try:
            out[key] = int(val)
        except ValueError:
            raise ValueError(f"{env}: {key} must be an integer, got {val.strip()!r}") from None
    return out


@dataclass(frozen=True)
class Tuning:
    """The autotune configs of one module's kernels, pinnable from the environment variable ``env``.

    ``gpu``: kernel name -> list of configs (dicts of meta-parameters plus ``num_warps`` and
    ``num_stages``); ``interp``: kernel name -> the one config used under the interpreter.  ``env``
    holds ``"k=v,...;kernel:k=v,..."``: unprefixed entries apply to every kernel, prefixed ones to
    that kernel only; a pinned value replaces the list by its first config with the value set, and
    keys a kernel's config lacks are ignored.
    """

    env: str
    gpu: dict[str, list[dict]]
    interp: dict[str, dict]
    keys: frozenset = field(init=False)

    def __post_init__(self):
        keys = {k for cs in self.gpu.values() for c in cs for k in c} | {k for c in self.interp.values() for k in c}
        object.__setattr__(self, "keys", frozenset(keys))

    def parse(self, text: str) -> dict[str, dict[str, int]]:
        """``"k=v,...;fwd:k=v,..."`` -> {kernel or "*": {key: int}}; raises on unknown keys/kernels."""
        out: dict[str, dict[str, int]] = {}
        for entry in filter(None, (e.strip() for e in text.split(";"))):
            name, _, body = entry.rpartition(":")
            name = name.strip() or "*"
            if name != "*" and name not in self.gpu:
                raise ValueError(f"{self.env}: unknown kernel {name!r} (one of {', '.join(self.gpu)})")
            items = parse_items(body, self.env, self.keys)
            if items:
                out.setdefault(name, {}).update(items)
        return out

    def configs(self, kernel: str) -> list[triton.Config]:
        """``kernel``'s configs (read ``env`` now): the GPU list, the interpreter's one, or the pinned one."""
        base = [self.interp[kernel]] if INTERPRET else self.gpu[kernel]
        pinned = self.parse(os.environ.get(self.env, ""))
        if "*" in pinned or kernel in pinned:
            merged = dict(base[0])
            for src in (pinned.get("*", {}), pinned.get(kernel, {})):
                merged.update({k: v for k, v in src.items() if k in merged})
            base = [merged]
        configs = []
        for c in base:
            c = dict(c)
            warps, stages = c.pop("num_warps"), c.pop("num_stages")
            configs.append(triton.Config(c, num_warps=warps, num_stages=stages))
        return configs


def prune_to_budget(configs, fits, rank, smem) -> list[triton.Config]:
    """The body of an ``early_config_prune``: the configs for which ``fits(config)`` holds; if none
    does, the one least by ``rank(config)``, with stages cut until ``smem(config, stages)`` (bytes)
    is within :data:`SMEM_BUDGET`."""
    kept = [c for c in configs if fits(c)]
    if kept:
        return kept
    c = min(configs, key=rank)
    stages = c.num_stages
    while stages > 1 and smem(c, stages) > SMEM_BUDGET:
        stages -= 1
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages)]
