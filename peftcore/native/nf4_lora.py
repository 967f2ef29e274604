"""The ``cpp`` (CPU) backend of ``nf4_lora_linear``: panel GEMMs on the 4-bit weight, with the
adapter's passes on the fused kernels of ``peftcore._C``.

Same contract as :mod:`peftcore.reference.nf4_lora`.  The base part: the C++ kernel
``nf4_dequant_rows`` dequantizes a panel of rows (at most 1/16 of the weight, one reused buffer)
and torch's GEMM multiplies it (blocked BLAS calls; measured on 2 cores, 2048 x 1024 -> 1024,
fp32: 16 panel GEMMs 46.7 ms against 46.1 ms for the whole product).  The adapter is :mod:`peftcore.native.lora`'s kernels: in the forward one
pass over x computes xa = dropout(x) Aᵀ (mask hashed from the seed) and adds scaling · xa Bᵀ into
y; in the backward one pass adds dropout(g A) into dx and computes dA and dB.  fp32 and fp64 (what
the kernels take); the registry sends half precision to the reference.
"""

from __future__ import annotations

import torch

from ..reference import nf4_lora as reference
from ..reference.rng import dropout_threshold
from . import dense, dl, num_threads, require, rowwise

CPU_DTYPES = (torch.float32, torch.float64)


def _check(x: torch.Tensor, *named) -> None:
    if x.device.type != "cpu" or x.dtype not in CPU_DTYPES:
        raise ValueError(f"cpp nf4_lora_linear takes CPU float32/float64 x, got {x.dtype} on {x.device}")
    for name, t in named:
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"{name} must be on {x.device} in {x.dtype}, got {t.dtype} on {t.device}")


def panels(packed, absmax, n, k, blocksize, dtype, device):
    """The reference's panels, dequantized by the C++ kernel."""
    ext = require(cuda=False)
    flat, a = dense(packed).view(-1), dense(absmax)
    nthreads = num_threads()

    def fill(w, start):
        ext.nf4_dequant_rows(dl(flat), dl(a), dl(w), n, start, blocksize, nthreads)

    return reference.panels(packed, absmax, n, k, blocksize, dtype, device, fill)


def nf4_lora_fwd(x, packed, absmax, n, k, blocksize, bias, lora_a, lora_b, scaling, p, seed):
    _check(x, ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b))
    x = rowwise(x)
    y = reference.base_forward(x, panels(packed, absmax, n, k, blocksize, x.dtype, x.device), n, bias)
    if lora_a is None:
        return y, x.new_empty(x.shape[0], 0)
    a, b = dense(lora_a), dense(lora_b)
    xa = torch.empty(x.shape[0], a.shape[0], dtype=x.dtype)
    require(cuda=False).down_fwd(dl(x), dl(a), dl(xa), seed, dropout_threshold(p), 1.0 / (1.0 - p), num_threads(),
                                 y=dl(y), b=dl(b), scaling=float(scaling))
    return y, xa


def nf4_lora_bwd(dy, x, xa, packed, absmax, n, k, blocksize, lora_a, lora_b, scaling, p, seed, needs):
    _check(x, ("dy", dy), ("xa", xa if lora_a is not None else None), ("lora_a", lora_a), ("lora_b", lora_b))
    need_x, need_bias, need_a, need_b = needs
    dy, x = rowwise(dense(dy)), rowwise(x)
    dx = None
    if need_x:
        dx = reference.base_dx(dy, x, panels(packed, absmax, n, k, blocksize, dy.dtype, dy.device))
    dbias = dy.sum(0) if need_bias else None
    if lora_a is None or not (need_x or need_a or need_b):
        return dx, dbias, None, None
    a, b, xa = dense(lora_a), dense(lora_b), dense(xa)
    da = torch.empty_like(a) if need_a else None
    db = torch.empty_like(b) if need_b else None
    require(cuda=False).lora_bwd(dl(dy), dl(b), dl(xa), dl(a), dl(x), dl(dx), dl(da), dl(db), seed,
                                 dropout_threshold(p), 1.0 / (1.0 - p), float(scaling), num_threads())
    return dx, dbias, da, db
