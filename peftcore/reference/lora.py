"""Pure-PyTorch LoRA linear: the CPU fallback and the oracle of every equivalence test.

Every LoRA backend exposes the same two functions on 2-D views (leading dims flattened by the op):

``lora_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed) -> (y, xa)``
    x ``[M, K]`` (last dim contiguous), weight ``[N, K]``, bias ``[N]`` or None, lora_a ``[R, K]``,
    lora_b ``[N, R]``.  Returns y ``[M, N]`` = x Wᵀ + b + scaling · xa Bᵀ and the rank-r
    intermediate xa ``[M, R]`` = dropout(x) Aᵀ, which is saved for the backward pass.

``lora_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs) -> (dx, dweight, dbias, da, db)``
    dy ``[M, N]``; ``needs`` is a 5-tuple of bools for (x, weight, bias, lora_a, lora_b); a gradient
    that is not needed is returned as None.  The dropout mask is regenerated from ``seed``
    (see :mod:`peftcore.reference.rng`), never saved.

dropout(x) = x ⊙ keep / (1 − p); with p == 0 it is the identity and ``seed`` is ignored.
"""

from __future__ import annotations

import torch

from .rng import keep_mask


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Deterministic inverted dropout of a 2-D tensor, mask from the shared counter-based RNG."""
    if p == 0.0:
        return x
    keep = keep_mask(x.shape[0], x.shape[1], seed, p, device=x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def lora_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed):
    xa = dropout(x, p, seed) @ lora_a.t()
    y = torch.nn.functional.linear(x, weight, bias)
    y = torch.addmm(y, xa, lora_b.t(), alpha=scaling)
    return y, xa


def lora_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs):
    need_x, need_w, need_bias, need_a, need_b = needs
    dx = dweight = dbias = da = db = None
    if need_x or need_a:
        dyb = (dy @ lora_b) * scaling  # [M, R]
    if need_x:
        dx = dy @ weight + dropout(dyb @ lora_a, p, seed)
    if need_a:
        da = dyb.t() @ dropout(x, p, seed)
    if need_b:
        db = (dy.t() @ xa) * scaling
    if need_w:
        dweight = dy.t() @ x
    if need_bias:
        dbias = dy.sum(0)
    return dx, dweight, dbias, da, db


def lora_linear_formula(x, weight, bias, lora_a, lora_b, scaling, p=0.0, seed=0):
    """Differentiable closed form, for tests: autograd through plain ops, mask built explicitly."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    y = x2 @ weight.t() + scaling * (dropout(x2, p, seed) @ lora_a.t()) @ lora_b.t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
