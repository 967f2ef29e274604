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


def panels(packed, absmax, n, k, blocksize, dtype, device, fill=None):
    """Yield ``(start, stop, W[start:stop] in dtype)``, one reused buffer for every panel.

    ``fill(w [rows, k], start)`` dequantizes rows ``[start, start + rows)`` into ``w`` (a backend's
    kernel); None: :func:`~peftcore.quant.nf4.dequantize_range` in PyTorch."""
    rows = panel_rows(n, k, blocksize)
    buf = torch.empty(rows * k, dtype=dtype, device=device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        w = buf[: (e - s) * k].view(e - s, k)
        if fill is None:
            dequantize_range(packed, absmax, blocksize, s * k, e * k, out=w.view(-1))
        else:
            fill(w, s)
        yield s, e, w


def base_forward(x, weight_panels, n, bias):
    """``x · Wᵀ + b`` ``[M, n]`` from W's panels (the forward's base GEMM, one panel at a time)."""
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for s, e, w in weight_panels:
        y[:, s:e] = x @ w.t()
    if bias is not None:
        y += bias
    return y


def base_dx(dy, x, weight_panels):
    """``dy · W`` ``[M, k]`` (fresh, contiguous) from W's panels."""
    dx = torch.zeros_like(x, memory_format=torch.contiguous_format)
    for s, e, w in weight_panels:
        dx.addmm_(dy[:, s:e], w)
    return dx


def nf4_lora_fwd(x, packed, absmax, n, k, blocksize, bias, lora_a, lora_b, scaling, p, seed):
    y = base_forward(x, panels(packed, absmax, n, k, blocksize, x.dtype, x.device), n, bias)
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
        dx = base_dx(dy, x, panels(packed, absmax, n, k, blocksize, dy.dtype, dy.device))
        if has_lora:
            dx += dropout(dyb @ lora_a, p, seed)
    if has_lora and need_a:
        da = dyb.t() @ dropout(x, p, seed)
    if has_lora and need_b:
        db = (dy.t() @ xa) * scaling
    if need_bias:
        dbias = dy.sum(0)
    return dx, dbias, da, db
