"""Pure-PyTorch mixed-adapter LoRA: each row of a batch gets its own adapter from a stack.

    y[m] = x[m] Wᵀ + b + scaling[j] · (x[m] A[j]ᵀ) B[j]ᵀ      with j = rows[m]  (j = -1: base only)

The stacked adapters are ``lora_a [J, R, in]`` and ``lora_b [J, out, R]``; adapters of lower rank
are zero-padded to R.  Every backend exposes, on 2-D views:

``lora_mixed_fwd(x, weight, bias, lora_a, lora_b, scaling, rows) -> y``
    x ``[M, in]`` (last dim contiguous), weight ``[out, in]``, bias ``[out]`` or None,
    scaling fp32 ``[J]``, rows int32 ``[M]`` with values in [-1, J).  Rows of one example are
    consecutive and share an adapter, so kernels may work on runs of equal ``rows`` (punica's SGMV)
    or gather per row (BGMV); both must give the same result.

No dropout (this is the serving path).  This reference is the loop over adapters that the kernels
replace: one masked gather, two small GEMMs and one scatter per adapter present in the batch.  It
is differentiable (autograd through plain ops), so the op uses it whenever a gradient is needed.
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
