"""Pure-PyTorch mixed-adapter LoRA: each row of a batch gets its own adapter from a stack.

    y[m] = x[m] Wᵀ + b + scaling[j] · (x[m] A[j]ᵀ) B[j]ᵀ      with j = rows[m]  (j = -1: base only)

The stacked adapters are ``lora_a [J, R, in]`` and ``lora_b [J, out, R]``; adapters of lower rank
are zero-padded to R.  Every backend exposes, on 2-D views:

``lora_mixed_fwd(x, weight, bias, lora_a, lora_b, scaling, rows) -> y``
    x ``[M, in]`` (last dim contiguous), weight ``[out, in]``, bias ``[out]`` or None,
    scaling fp32 ``[J]``, rows int32 ``[M]`` with values in [-1, J).  Rows of one example are
    consecutive and share an adapter, so kernels may work on runs of equal ``rows`` (punica's SGMV)
    or gather per row (BGMV); both must give the same result.

``lora_mixed_bwd(dy, x, weight, lora_a, lora_b, scaling, rows, needs) -> (dx, dweight, dbias, da, db)``
    the gradients (``needs`` a 5-tuple of bools; None where not needed); scaling and rows get none.
    Every backend's op shares this one (the kernels are forward-only: this is the serving path).

No dropout (this is the serving path).  This reference is the loop over adapters that the kernels
replace: one masked gather, two small GEMMs and one scatter per adapter present in the batch.
"""

from __future__ import annotations

import torch


def lora_mixed_fwd(x, weight, bias, lora_a, lora_b, scaling, rows):
    y = torch.nn.functional.linear(x, weight, bias)
    rows = rows.long()
    for j in torch.unique(rows).tolist():
        if j < 0:
            continue
        idx = (rows == j).nonzero().squeeze(1)
        xa = x.index_select(0, idx) @ lora_a[j].t()
        delta = (xa @ lora_b[j].t()) * scaling[j].to(x.dtype)
        y = y.index_add(0, idx, delta.to(y.dtype))
    return y


def lora_mixed_bwd(dy, x, weight, lora_a, lora_b, scaling, rows, needs):
    need_x, need_w, need_bias, need_a, need_b = needs
    rows = rows.long()
    dx = dy @ weight if need_x else None
    da = torch.zeros_like(lora_a) if need_a else None
    db = torch.zeros_like(lora_b) if need_b else None
    if need_x or need_a or need_b:
        for j in torch.unique(rows).tolist():
            if j < 0:
                continue
            idx = (rows == j).nonzero().squeeze(1)
            xj, dyj = x.index_select(0, idx), dy.index_select(0, idx)
            s = scaling[j].to(x.dtype)
            g = (dyj @ lora_b[j]) * s  # [m_j, R]
            if need_x:
                dx.index_add_(0, idx, g @ lora_a[j])
            if need_a:
                da[j] = g.t() @ xj
            if need_b:
                db[j] = (dyj.t() @ (xj @ lora_a[j].t())) * s
    dweight = dy.t() @ x if need_w else None
    dbias = dy.sum(0) if need_bias else None
    return dx, dweight, dbias, da, db
