"""DoRA's weight norm without the full-size update: ‖W + s·BA‖ per output row from rank-r products.

    ‖W_i + s·(BA)_i‖² = ‖W_i‖² + 2s·⟨W_i, (BA)_i⟩ + s²·‖(BA)_i‖²
    ⟨W_i, (BA)_i⟩ = Σ_r B_ir (W Aᵀ)_ir          ‖(BA)_i‖² = (B (A Aᵀ))_i · B_i

``W Aᵀ`` is ``[out, r]`` and ``A Aᵀ`` is ``[r, r]``: no ``[out, in]`` tensor besides W itself is
ever formed (PEFT builds BA through an identity matrix, peft#2651).  ‖W‖² per row is cached per
weight (W is frozen; a merge changes it and a new cache entry follows from its version).  An NF4
base is read a panel at a time.  Everything in float32 (float64 for float64 weights), without
gradient: DoRA detaches the norm.
"""

from __future__ import annotations

import torch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nf4_panels(layer, dtype):
    from ..reference.nf4_lora import panels

    base = layer.base_layer
    yield from panels(base.weight_packed, base.block_absmax(), base.out_features, base.in_features,
                      base.blocksize, dtype, base.weight_packed.device)


@torch.no_grad()
def weight_sq_norms(layer) -> torch.Tensor:
    """``[out]``: ‖W_i‖² of the layer's base weight, cached while the weight is unchanged."""
    if layer.quantized:
        key = ("nf4", layer.base_layer.weight_packed.data_ptr())
    else:
        w = layer.base_layer.weight
        key = (w.data_ptr(), w._version, w.dtype)
    cached = getattr(layer, "_dora_w2", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if layer.quantized:
        out = torch.empty(layer.out_features, dtype=torch.float32, device=layer.base_layer.weight_packed.device)
        for s, e, w in _nf4_panels(layer, torch.float32):
            out[s:e] = (w * w).sum(1)
    else:
        w = layer.weight_out_in()
        out = w.to(_acc_dtype(w.dtype)).square().sum(1)
    layer._dora_w2 = (key, out)
    return out


@torch.no_grad()
def weight_times_a(layer, a: torch.Tensor) -> torch.Tensor:
    """``W Aᵀ`` ``[out, r]`` in the accumulation dtype."""
    acc = _acc_dtype(a.dtype)
    a = a.detach().to(acc)
    if layer.quantized:
        out = torch.empty(layer.out_features, a.shape[0], dtype=acc, device=a.device)
        for s, e, w in _nf4_panels(layer, acc):
            out[s:e] = w @ a.t()
        return out
    return layer.weight_out_in().to(acc) @ a.t()


@torch.no_grad()
def weight_norm(layer, name: str) -> torch.Tensor:
    """``‖W + s·BA‖`` per output row ``[out]`` (detached) of adapter ``name``."""
    a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    s = layer.scaling[name]
    acc = _acc_dtype(a.dtype)
    a32, b32 = a.to(acc), b.to(acc)
    cross = (b32 * weight_times_a(layer, a32)).sum(1)
    ba2 = ((b32 @ (a32 @ a32.t())) * b32).sum(1)
    sq = weight_sq_norms(layer).to(acc) + 2.0 * s * cross + (s * s) * ba2
    return sq.clamp_min(0).sqrt()


def scale(layer, name: str, dtype: torch.dtype) -> torch.Tensor:
    """``m / ‖W + s·BA‖`` ``[out]``: differentiable in m, the norm detached."""
    m = layer.lora_magnitude_vector[name]
    return m.to(dtype) / weight_norm(layer, name).to(dtype)
