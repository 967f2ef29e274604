"""``nf4_lora_linear``: QLoRA's y = x · dequant(Wq)ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ on an NF4 weight.

The weight stays 4-bit: every backend dequantizes it a panel at a time inside the GEMMs of the
forward and of dx (no gradient for W), so no full-precision copy of W is ever in memory.  Saved for
backward: x, xa = dropout(x) Aᵀ and the seed, as ``lora_linear``.  Without ``lora_a``/``lora_b``
it is the quantized linear alone (what :class:`peftcore.quant.NF4Linear` runs).

Custom ops ``peftcore::nf4_lora_linear`` and ``peftcore::nf4_lora_linear_backward`` with fake
implementations, a registered autograd formula and F.linear's autocast rule (the fp32 absmax is
never lowered).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..quant.nf4 import NF4State, QuantError, check_state
from ..reference.rng import check_seed, dropout_threshold, new_seed
from ._checks import as_rows, check_backend, check_bias, check_floats, check_like_x, check_scale
from ._library import absent, autocast, autocasting, implementation, no_aux_grads, optional, present

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

SPEC = backends.register(
    backends.OpSpec(
        name="nf4_lora_linear",
        modules={"reference": "peftcore.reference.nf4_lora", "cpp": "peftcore.native.nf4_lora"},
        dtypes={"reference": FLOATS + (torch.float64,), "cpp": (torch.float32, torch.float64)},
        defaults={"cpu": ("cpp", "reference"), "cuda": ("reference",)},
        limits={"cpp": backends.rank_limit(backends.NATIVE_MAX_RANK)},
        why_default={"cpu": "cpp: the adapter's dropout and rank-r passes fused as in lora_linear's cpp backend; "
                            "the panel GEMMs are the reference's (benchmarks/results/qlora_cpu.md)",
                     "cuda": "the only GPU path so far (panel-wise dequantization in PyTorch)"},
    )
)


@torch.library.custom_op("peftcore::nf4_lora_linear", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _op(x: Tensor, packed: Tensor, absmax: Tensor, n: int, k: int, blocksize: int, bias: Optional[Tensor],
        lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float, p: float, seed: int,
        backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    impl = implementation("nf4_lora_linear", x, backend, rank=0 if lora_a is None else lora_a.shape[0])
    if p > 0.0 and seed < 0:
        seed = new_seed()
    y, xa = impl.nf4_lora_fwd(x, packed, absmax, n, k, blocksize, bias, lora_a, lora_b, scaling, p, max(seed, 0))
    return y, xa, torch.tensor(max(seed, 0), dtype=torch.int64)


@_op.register_fake
def _(x, packed, absmax, n, k, blocksize, bias, lora_a, lora_b, scaling, p, seed, backend):
    r = 0 if lora_a is None else lora_a.shape[0]
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], r), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("peftcore::nf4_lora_linear_backward", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, xa: Tensor, packed: Tensor, absmax: Tensor, n: int, k: int, blocksize: int,
            lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float, p: float, seed: Tensor,
            needs: list[bool], backend: Optional[str]) -> list[Tensor]:
    """``[dx, dbias, da, db]``; an entry not in ``needs`` is an empty tensor."""
    impl = implementation("nf4_lora_linear", x, backend, rank=0 if lora_a is None else lora_a.shape[0])
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    grads = impl.nf4_lora_bwd(dy, x, xa, packed, absmax, n, k, blocksize, lora_a, lora_b, scaling, p, int(seed),
                              tuple(needs))
    return [present(g, x) for g in grads]


@_bwd_op.register_fake
def _(dy, x, xa, packed, absmax, n, k, blocksize, lora_a, lora_b, scaling, p, seed, needs, backend):
    shapes = (x.shape, (n,), None if lora_a is None else lora_a.shape, None if lora_b is None else lora_b.shape)
    return [x.new_empty(s) if need and s is not None else absent(x) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, packed, absmax, n, k, blocksize, bias, lora_a, lora_b, scaling, p, _, backend = inputs
    ctx.save_for_backward(x, output[1], packed, absmax, lora_a, lora_b, output[2])
    no_aux_grads(ctx, output[1:])
    ctx.n, ctx.k, ctx.blocksize = n, k, blocksize
    ctx.scaling, ctx.p, ctx.backend, ctx.has_bias = scaling, p, backend, bias is not None
    ctx.has_lora = lora_a is not None


def _backward(ctx, dy, _dxa, _dseed):
    x, xa, packed, absmax, lora_a, lora_b, seed = ctx.saved_tensors
    g = ctx.needs_input_grad
    needs = [g[0], g[6] and ctx.has_bias, g[7] and ctx.has_lora, g[8] and ctx.has_lora]
    if dy is None or not any(needs):
        return (None,) * 13
    grads = _bwd_op(dy, x, xa, packed, absmax, ctx.n, ctx.k, ctx.blocksize, lora_a, lora_b, ctx.scaling, ctx.p,
                    seed, needs, ctx.backend)
    dx, dbias, da, db = (optional(t, need) for t, need in zip(grads, needs))
    return dx, None, None, None, None, None, dbias, da, db, None, None, None, None


torch.library.register_autograd("peftcore::nf4_lora_linear", _backward, setup_context=_setup_context)
autocast("nf4_lora_linear", "lower", keep=(2,))  # the fp32 absmax stays fp32
autocast("nf4_lora_linear_backward", "none")


def _unpack(weight):
    """``(packed, NF4State)`` from an NF4Linear or a ``(packed, state)`` pair."""
    from ..quant.layer import NF4Linear

    if isinstance(weight, NF4Linear):
        return weight.weight_packed, weight.state, weight.block_absmax
    if isinstance(weight, (tuple, list)) and len(weight) == 2 and isinstance(weight[1], NF4State):
        return weight[0], weight[1], lambda: weight[1].block_absmax().float()
    raise QuantError(f"weight: expected an NF4Linear or a (packed, NF4State) pair, got {type(weight).__name__}")


def nf4_lora_linear(x, weight, bias=None, lora_a=None, lora_b=None, scaling=1.0, dropout_p=0.0, seed=None,
                    backend=None):
    """QLoRA linear: ``x · dequant(W)ᵀ + b + scaling · (dropout(x) lora_aᵀ) lora_bᵀ``.

    Args:
        x: ``[..., in]`` float32/bf16/fp16 (any leading dims).
        weight: an :class:`~peftcore.quant.NF4Linear` or ``(packed, state)`` from
            :func:`~peftcore.quant.quantize_nf4` of a ``[out, in]`` weight (frozen: no gradient).
        bias: ``[out]`` or None.
        lora_a ``[r, in]``, lora_b ``[out, r]``: the adapter, or both None for the quantized linear alone.
        scaling, dropout_p, seed, backend: as :func:`peftcore.ops.lora_linear`.

    Returns ``[..., out]`` in x's dtype (the autocast dtype under ``torch.autocast``).  The weight
    is dequantized a panel at a time into x's dtype, in the forward and again for dx.
    """
    packed, state, block_absmax = _unpack(weight)
    check_state(packed, state, "weight")
    if len(state.shape) != 2:
        raise QuantError(f"weight: expected a quantized 2-D [out, in] weight, got shape {tuple(state.shape)}")
    n, k = (int(s) for s in state.shape)
    check_floats(("x", x))
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have last dim {k} (weight is [out={n}, in={k}]), got shape {tuple(x.shape)}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b: pass both (an adapter) or neither (the quantized linear alone)")
    if lora_a is not None:
        check_floats(("lora_a", lora_a), ("lora_b", lora_b))
        if lora_a.dim() != 2 or lora_a.shape[1] != k or lora_a.shape[0] < 1:
            raise ValueError(f"lora_a must be [r, in={k}] with r >= 1, got shape {tuple(lora_a.shape)}")
        r = lora_a.shape[0]
        if lora_b.dim() != 2 or tuple(lora_b.shape) != (n, r):
            raise ValueError(f"lora_b must be [out={n}, r={r}], got shape {tuple(lora_b.shape)}")
    check_bias(bias, n)
    check_like_x(x, same_dtype=not autocasting(x), lora_a=lora_a, lora_b=lora_b, bias=bias)
    if packed.device != x.device:
        raise ValueError(f"weight: on {packed.device}, x on {x.device}; move the layer to x's device")
    check_scale("scaling", scaling)
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_threshold(float(dropout_p))
    check_backend(backend)
    p = float(dropout_p) if lora_a is not None else 0.0
    if seed is not None:
        check_seed(seed)
    seed = 0 if p == 0.0 else (-1 if seed is None else seed)
    absmax = block_absmax()
    x2, lead = as_rows(x)
    y2 = _op(x2, packed, absmax, n, k, state.blocksize, bias, lora_a, lora_b, float(scaling), p, seed, backend)[0]
    return y2.reshape(*lead, n)
