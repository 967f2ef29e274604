"""The ``cpp`` (CPU) and ``cuda`` backends of ``distill_kl``, on the kernels of ``peftcore._C``.

Same contract and math as :mod:`peftcore.reference.distill`::

    distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad) -> (loss_rows, grad)

``s``, ``t``: ``[N, V]`` logits (student, teacher); ``row_weight``: fp32 ``[N]``; ``loss_rows``:
fp32 ``[N]`` = ``T² · divergence`` (0 where the weight is 0); ``grad``: ``row_weight[i] ·
∂loss_rows[i]/∂s[i]`` in s's dtype, or None unless ``need_grad``.  One kernel call computes both.

* CPU (float32): one OpenMP region over rows; per row a few SIMD passes while the row sits in
  L2 (max and min; exps and row sums; loss terms; gradient), two exps per element.  The math is
  the reference's: r = log p - log q formed without subtracting log-normalizers, the loss a sum of
  non-negative terms (series near r = 0), so it is accurate at any finite T > 0.  Rows where the
  classic one-pass sums give a divergence >= 1e4 times a bound on their rounding (moderate T:
  most training rows) use them as they are; JSD adds one exp, one division and one atanh series
  per element.  Masked rows (weight 0) cost nothing beyond zeroing their gradient.
* CUDA (float32/float16/bfloat16, fp32 math): one block per row, online max/sum-exp over both
  streams, then one (KL) or two (JSD) more reads of the row for the gradient.  Not yet run on a GPU.

Kernel alone (csrc/distill_cpu.cpp called from C++, 2 threads on a 2-core AVX-512 machine that
another job was also using, so times are ~2.5x a quiet machine's; [4096, 32000] fp32 randn * 2
logits, T = 2; median over interleaved rounds of each version's time and of the per-round ratio):

==========  ==========  ==========  ================  ==================  ====================
kind        before      after       after / before    after / before      after / one-pass
                                    (2 thr, wall)     (1 thr, CPU time)   (2 thr, wall)
==========  ==========  ==========  ================  ==================  ====================
forward     0.152 s     0.136 s     0.914             0.950               1.08
fwd + grad  0.192 s     0.176 s     0.918             0.957               1.06
reverse     0.140 s     0.136 s     0.969             0.963               1.07
rev + grad  0.185 s     0.164 s     0.872             0.876               0.93
jsd         0.288 s     0.244 s     0.836             0.819               1.04
jsd + grad  0.328 s     0.268 s     0.840             0.860               1.02
==========  ==========  ==========  ================  ==================  ====================

"before": the first accurate-at-any-T kernel (commit 312699f); "one-pass": the earlier kernel
that was not accurate at high T (6238eeb).  End to end, ``distill_kl(...).backward()`` adds the first touch of the fresh 524 MB gradient (page faults:
0.14 s into a fresh buffer vs 0.06 s into one already touched).

The backend is picked from ``s.device``; every tensor is checked (type, dtype, device, shape,
layout) before it goes to C++ as a DLPack capsule, which the binding checks again.
"""

from __future__ import annotations

import math

import torch

from ..reference.distill import KINDS
from . import (
    check_device_dtype,
    cuda_stream,
    dl,
    num_threads,
    require,
    rowwise,
)

CPU_DTYPES = (torch.float32,)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _layout(t: torch.Tensor) -> torch.Tensor:
    """t when its columns are unit-stride and its rows do not overlap (or repeat one row), else a copy."""
    if t.shape[1] > 1 and t.stride(1) != 1:
        return t.contiguous()
    return rowwise(t)


def _check(s, t, temperature, kind, beta, row_weight):
    for name, x in (("s", s), ("t", t)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, V], got shape {tuple(x.shape)}")
    if s.shape != t.shape:
        raise ValueError(f"s and t must have the same shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[1] < 1:
        raise ValueError(f"V (the last dimension) must be >= 1, got shape {tuple(s.shape)}")
    if t.device != s.device:
        raise ValueError(f"t is on {t.device} but s is on {s.device}")
    if t.dtype != s.dtype:
        raise TypeError(f"t has dtype {t.dtype} but s has {s.dtype}")
    check_device_dtype("distill kernel", s, CPU_DTYPES, CUDA_DTYPES)
    if not isinstance(row_weight, torch.Tensor):
        raise TypeError(f"row_weight must be a torch.Tensor, got {type(row_weight).__name__}")
    if row_weight.dtype != torch.float32:
        raise TypeError(f"row_weight must be float32, got {row_weight.dtype}")
    if row_weight.shape != (s.shape[0],):
        raise ValueError(f"row_weight must have shape ({s.shape[0]},), got {tuple(row_weight.shape)}")
    if row_weight.device != s.device:
        raise ValueError(f"row_weight is on {row_weight.device} but s is on {s.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta!r}")


def distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad):
    """Row losses fp32 ``[N]`` and, if ``need_grad``, the weighted gradient ``[N, V]`` (s's dtype).

    s, t: ``[N, V]`` student and teacher logits; row_weight: fp32 ``[N]``.
    """
    _check(s, t, temperature, kind, beta, row_weight)
    n, v = s.shape
    loss = torch.empty(n, dtype=torch.float32, device=s.device)
    grad = torch.empty(n, v, dtype=s.dtype, device=s.device) if need_grad else None
    if n == 0:
        return loss, grad
    s, t = _layout(s), _layout(t)
    w = row_weight.contiguous()
    beta = float(beta) if kind == "jsd" else 0.5
    args = (dl(s), dl(t), dl(w), dl(loss), dl(grad), float(temperature), kind, beta)
    if s.is_cuda:
        ext = require(cuda=True)
        with torch.cuda.device(s.device):
            ext.cuda_distill_fwd(*args, cuda_stream(s))
    else:
        require(cuda=False).distill_fwd(*args, num_threads())
    return loss, grad
