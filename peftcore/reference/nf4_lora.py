"""Pure-PyTorch QLoRA linear on an NF4 weight, a panel of rows at a time.

``nf4_lora_fwd(x, packed, absmax, n, k, blocksize, bias, lora_a, lora_b, scaling, p, seed) -> (y, xa)``
    x ``[M, K]``; the weight ``[N, K]`` is ``packed`` (uint8 NF4 codes, bitsandbytes' order) with
    fp32 ``absmax`` per block of ``blocksize`` flat elements.  y = x · dequant(W)ᵀ + b + s · xa Bᵀ,
    xa = dropout(x) Aᵀ (empty without an adapter: lora_a and lora_b None).

``nf4_lora_bwd(dy, x, xa, packed, absmax, n, k, blocksize, lora_a, lora_b, scaling, p, seed, needs)
-> (dx, dbias, da, db)``
    ``needs``: bools for (x, bias, lora_a, lora_b).  No gradient for the quantized weight.

The weight is dequantized into one reusable ``[rows, K]`` panel (:func:`panel_rows`: at most
1/16 of the weight) for each GEMM, forward and backward: no full-precision copy of W exists.
"""

from __future__ import annotations

import torch

from ..quant.nf4 import dequantize_range
from .lora import dropout

PANEL_FRACTION = 16  # a panel holds at most 1/16 of the weight's rows
PANEL_MIN_ELEMENTS = 1 << 16  # ... but at least this many (256 KiB in fp32): fewer, larger GEMMs for small W


def panel_rows(n: int, k: int, blocksize: int = 1) -> int:
    """Rows per panel: about 1/16 of the weight (at least PANEL_MIN_ELEMENTS elements), rounded
    to whole quantization blocks where the row length allows (the fast dequantization path)."""
    import math

    rows = max(1, min(n, max(-(-n // PANEL_FRACTION), -(-PANEL_MIN_ELEMENTS // max(k, 1)))))
    unit = blocksize // math.gcd(k, blocksize)  # rows * k is a multiple of blocksize iff unit | rows
    if unit > 1 and rows > unit:
        rows -= rows % unit
    return rows


def panels(packed, absmax, n, k, blocksize, dtype, device):
    """Yield ``(start, stop, W[start:stop] in dtype)``, one reused buffer for every panel."""
    rows = panel_rows(n, k, blocksize)
    buf = torch.empty(rows * k, dtype=dtype, device=device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        w = buf[: (e - s) * k]
        dequantize_range(packed, absmax, blocksize, s * k, e * k, out=w)
        yield s, e, w.view(e - s, k)


def nf4_lora_fwd(x, packed, absmax, n, k, blocksize, bias, lora_a, lora_b, scaling, p, seed):
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for s, e, w in panels(packed, absmax, n, k, blocksize, x.dtype, x.device):
        y[:, s:e] = x @ w.t()
    if bias is not None:
        y += bias
    if lora_a is None:
        return y, x.new_empty(x.shape[0], 0)
    xa = dropout(x, p, seed) @ lora_a.t()
    y.addmm_(xa, lora_b.t(), alpha=scaling)
    return y, xa


def nf4_lora_bwd(dy, x, xa, packed, absmax, n, k, blocksize, lora_a, lora_b, scaling, p, seed, needs):
    need_x, need_bias, need_a, need_b = needs
    dx = dbias = da = db = None
    has_lora = lora_a is not None
    if has_lora and (need_x or need_a):
        dyb = (dy @ lora_b) * scaling  # [M, R]
    if need_x:
        dx = torch.zeros_like(x)
        for s, e, w in panels(packed, absmax, n, k, blocksize, dy.dtype, dy.device):
            dx.addmm_(dy[:, s:e], w)
        if has_lora:
            dx += dropout(dyb @ lora_a, p, seed)
    if has_lora and need_a:
        da = dyb.t() @ dropout(x, p, seed)
    if has_lora and need_b:
        db = (dy.t() @ xa) * scaling
    if need_bias:
        dbias = dy.sum(0)
    return dx, dbias, da, db
