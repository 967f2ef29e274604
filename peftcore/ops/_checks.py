"""Input checks and the 2-D view every op in :mod:`peftcore.ops` shares.

Each op keeps its own shape checks (they say what its arguments mean); the checks that read the
same in every op live here, so their error messages stay identical across ops.
"""

from __future__ import annotations

import math

import torch

from .. import backends


def check_floats(*named: tuple[str, object]) -> None:
    """Each ``(name, value)`` is a floating-point torch.Tensor, checked in order."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_scale(name: str, value) -> float:
    """``value`` as a float: a real Python number (not bool, complex or a tensor) that is finite and
    within float32's range, where every backend computes it (so no backend returns NaN/inf for it
    while another raises).  Returns ``float(value)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real Python float, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v) or abs(v) > FLOAT32_MAX:
        raise ValueError(f"{name} must be finite and within float32's range (|{name}| <= {FLOAT32_MAX:.4g}), got {value!r}")
    return v


def check_real_floats(name: str, t) -> None:
    """``t`` is a real floating-point tensor (not complex, not integer)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")


def weight_shape(weight: torch.Tensor) -> tuple[int, int]:
    """``(out, in)`` of a base layer's ``weight``, which must be 2-D ``[out, in]``."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    return out_features, in_features


def check_bias(bias, out_features: int) -> None:
    """``bias`` is None or a tensor of shape ``[out_features]``."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [out={out_features}], got shape {tuple(bias.shape)}")


def check_like_x(x: torch.Tensor, same_dtype: bool = True, **tensors) -> None:
    """Every tensor given by name (None ones are skipped) is on x's device and, with ``same_dtype``,
    has x's dtype (under autocast mixed dtypes are legal: the op casts them, as F.linear does)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must share a device")
        if same_dtype and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all inputs must share a dtype")


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """``x [..., in]`` as ``[rows, in]`` with a unit last stride, and its leading dims."""
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])  # explicit rows: reshape(-1, 0) is ambiguous
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, lead


def check_backend(backend) -> None:
    """``backend`` is None or a backend name (whether it can run is decided inside the op)."""
    if backend is not None and backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(backends.BACKENDS)} or None, got {backend!r}")
