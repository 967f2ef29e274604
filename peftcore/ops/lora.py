"""``lora_linear``: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ, with backend dispatch.

Saved for backward: x (its 2-D view), the rank-r intermediate xa = dropout(x) Aᵀ and the integer
seed.  No dropout output and no mask are kept: the backward pass regenerates the mask.

The op is ``peftcore::lora_linear`` (forward) and ``peftcore::lora_linear_backward``, custom ops
with fake implementations and a registered autograd formula (see :mod:`peftcore.ops._library`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference.rng import check_seed, dropout_threshold, new_seed
from ._checks import as_rows, check_backend, check_bias, check_floats, check_like_x, check_scale, weight_shape
from ._library import no_aux_grads, absent, autocast, autocasting, implementation, optional, present

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

SPEC = backends.register(
    backends.OpSpec(
        name="lora_linear",
        modules={
            "reference": "peftcore.reference.lora",
            "triton": "peftcore.kernels.lora",
            "cpp": "peftcore.native.lora",
            "cuda": "peftcore.native.lora",
        },
        dtypes={
            "reference": FLOATS + (torch.float64,),
            "triton": FLOATS,
            "cpp": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
            "cuda": FLOATS,
        },
        defaults={"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")},
        limits={
            "triton": backends.rank_limit(backends.TRITON_MAX_RANK),
            "cpp": backends.rank_limit(backends.NATIVE_MAX_RANK),
            "cuda": backends.rank_limit(backends.NATIVE_MAX_RANK),
        },
        why_default={
            "cpu": "cpp: fwd+bwd 1.12x the frozen linear vs reference 7.1x at p=0.1, 1.15x vs 1.19x at p=0 "
            "(fp32, 2048x1024->1024, r=16, AMD EPYC 2 threads; benchmarks/results/lora_cpu.md); bf16 (CPU autocast): "
            "fwd+bwd 1.89x the frozen bf16 linear vs reference 13.9x at p=0.1, 1.30x vs 1.36x at p=0 "
            "(benchmarks/results/lora_cpu_bf16.md)",
            "cuda": "not yet measured on a GPU: Triton until the GPU benchmark decides",
        },
    )
)


@torch.library.custom_op("peftcore::lora_linear", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _lora_linear_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scaling: float,
    p: float, seed: int, backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y [M, N], xa [M, R], seed)`` on 2-D x; seed < 0 with p > 0 draws one (inside the op: no
    host sync in the traced path, and compiled and eager runs draw the same)."""
    impl = implementation("lora_linear", x, backend, rank=lora_a.shape[0])
    if p > 0.0 and seed < 0:
        seed = new_seed()
    y, xa = impl.lora_fwd(x, weight, bias, lora_a, lora_b, scaling, p, max(seed, 0))
    return y, xa, torch.tensor(max(seed, 0), dtype=torch.int64)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, p, seed, backend):
    m = x.shape[0]
    return (x.new_empty(m, weight.shape[0]), x.new_empty(m, lora_a.shape[0]),
            torch.empty((), dtype=torch.int64))


@torch.library.custom_op("peftcore::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dy: Tensor, x: Tensor, xa: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
    p: float, seed: Tensor, needs: list[bool], backend: Optional[str],
) -> list[Tensor]:
    """``[dx, dweight, dbias, da, db]``; an entry not in ``needs`` is an empty tensor."""
    impl = implementation("lora_linear", x, backend, rank=lora_a.shape[0])
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    grads = impl.lora_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, int(seed), tuple(needs))
    return [present(g, x) for g in grads]


@_lora_linear_backward_op.register_fake
def _(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs, backend):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return [x.new_empty(s) if need else absent(x) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, p, _, backend = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, output[2])
    no_aux_grads(ctx, output[1:])
    ctx.scaling, ctx.p, ctx.backend, ctx.has_bias = scaling, p, backend, bias is not None


def _backward(ctx, dy, _dxa, _dseed):
    x, xa, weight, lora_a, lora_b, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2] and ctx.has_bias, n[3], n[4]]
    if dy is None or not any(needs):
        return (None,) * 9
    grads = _lora_linear_backward_op(dy, x, xa, weight, lora_a, lora_b, ctx.scaling, ctx.p, seed, needs, ctx.backend)
    return (*(optional(g, need) for g, need in zip(grads, needs)), None, None, None, None)


torch.library.register_autograd("peftcore::lora_linear", _backward, setup_context=_setup_context)
autocast("lora_linear", "lower")  # F.linear's rule: the op runs in the autocast dtype
autocast("lora_linear_backward", "none")


def _check(x, weight, bias, lora_a, lora_b, scaling, dropout_p):
    check_floats(("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b))
    out_f, in_f = weight_shape(weight)
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(
            f"x must have last dim {in_f} (weight is [out={out_f}, in={in_f}]), got shape {tuple(x.shape)}"
        )
    if lora_a.dim() != 2 or lora_a.shape[1] != in_f:
        raise ValueError(f"lora_a must be [r, in={in_f}], got shape {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got lora_a with r = {r}")
    if lora_b.dim() != 2 or tuple(lora_b.shape) != (out_f, r):
        raise ValueError(f"lora_b must be [out={out_f}, r={r}], got shape {tuple(lora_b.shape)}")
    check_bias(bias, out_f)
    check_like_x(x, same_dtype=not autocasting(x), weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    check_scale("scaling", scaling)
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_threshold(float(dropout_p))


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None, backend=None):
    """Fused LoRA linear: ``x Wᵀ + b + scaling · (dropout(x) lora_aᵀ) lora_bᵀ``.

    Args:
        x: ``[..., in]``; any leading dims, any strides.
        weight: ``[out, in]`` frozen base weight (gets a gradient only if it requires one).
        bias: ``[out]`` or None.
        lora_a: ``[r, in]``; lora_b: ``[out, r]``; 1 <= r.
        scaling: alpha / r (alpha / sqrt(r) for rsLoRA).
        dropout_p: dropout on the LoRA branch's input, in [0, 1).
        seed: int in [0, 2**31) fixing the dropout mask; None draws one from torch's generator.
        backend: ``"reference" | "triton" | "cpp" | "cuda"`` or None for the registry's choice.

    Returns ``[..., out]`` in x's dtype; accumulation is fp32 for half inputs.  Under
    ``torch.autocast`` the inputs are cast as ``F.linear``'s are and the result has the autocast
    dtype.  A ``torch.library`` custom op (``peftcore::lora_linear``): ``torch.compile`` traces it
    without a graph break, and the backend is chosen inside it, at run time.
    """
    _check(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    check_backend(backend)
    p = float(dropout_p)
    if seed is not None:
        check_seed(seed)  # checked even when p == 0 makes it unused: a wrong seed is a wrong call
    seed = 0 if p == 0.0 else (-1 if seed is None else seed)
    x2, lead = as_rows(x)
    y2 = _lora_linear_op(x2, weight, bias, lora_a, lora_b, float(scaling), p, seed, backend)[0]
    return y2.reshape(*lead, weight.shape[0])
