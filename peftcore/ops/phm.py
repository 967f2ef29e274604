"""``phm_linear``: y = x H + b with H = Σᵢ kron(rule[i], W_left[i] W_right[i]), never built.

See :mod:`peftcore.reference.phm` for the contraction every backend computes and the backend
contract.  Saved for backward: x (its 2-D view) and the small intermediate t ``[M, n, n, k]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference.phm import check_factors
from ._checks import as_rows, check_backend, check_bias, check_floats, check_like_x
from ._library import no_aux_grads, absent, autocast, autocasting, implementation, optional, present

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

SPEC = backends.register(
    backends.OpSpec(
        name="phm_linear",
        modules={
            "reference": "peftcore.reference.phm",
            "triton": "peftcore.kernels.phm",
            "cpp": "peftcore.native.phm",
            "cuda": "peftcore.native.phm",
        },
        dtypes={
            "reference": FLOATS + (torch.float64,),
            "triton": FLOATS,
            "cpp": (torch.float32, torch.float64),
            "cuda": FLOATS,
        },
        defaults={"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")},
        why_default={
            "cpu": "cpp: fwd+bwd 0.50-0.56x a dense nn.Linear of the same shape and 2.4-5.0x faster than "
            "reference (fp32, 2048 tokens, 1024->32->1024 block, 1024->32, 32->1024, n 4, k 1, AMD EPYC 2 threads; "
            "benchmarks/results/phm_cpu.md)",
            "cuda": "not yet measured on a GPU: Triton until the GPU benchmark decides",
        },
    )
)


@torch.library.custom_op("peftcore::phm_linear", mutates_args=())
def _phm_linear_op(
    x: Tensor, rule: Tensor, w_left: Tensor, w_right: Tensor, bias: Optional[Tensor], backend: Optional[str]
) -> tuple[Tensor, Tensor]:
    """``(y [M, out], t [M, n, n, k])`` on 2-D x, the backend chosen here, at run time."""
    return implementation("phm_linear", x, backend).phm_fwd(x, rule, w_left, w_right, bias)


@_phm_linear_op.register_fake
def _(x, rule, w_left, w_right, bias, backend):
    n, k = rule.shape[0], w_left.shape[2]
    return x.new_empty(x.shape[0], n * w_right.shape[2]), x.new_empty(x.shape[0], n, n, k)


@torch.library.custom_op("peftcore::phm_linear_backward", mutates_args=())
def _phm_linear_backward_op(
    dy: Tensor, x: Tensor, t: Tensor, rule: Tensor, w_left: Tensor, w_right: Tensor, needs: list[bool],
    backend: Optional[str],
) -> list[Tensor]:
    """``[dx, drule, dw_left, dw_right, dbias]``; an entry not in ``needs`` is an empty tensor."""
    impl = implementation("phm_linear", x, backend)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    return [present(g, x) for g in impl.phm_bwd(dy, x, t, rule, w_left, w_right, tuple(needs))]


@_phm_linear_backward_op.register_fake
def _(dy, x, t, rule, w_left, w_right, needs, backend):
    shapes = (x.shape, rule.shape, w_left.shape, w_right.shape, dy.shape[1:])
    return [x.new_empty(s) if need else absent(x) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, rule, w_left, w_right, bias, backend = inputs
    ctx.save_for_backward(x, output[1], rule, w_left, w_right)
    no_aux_grads(ctx, output[1:])
    ctx.backend, ctx.has_bias = backend, bias is not None


def _backward(ctx, dy, _dt):
    x, t, rule, w_left, w_right = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[4] and ctx.has_bias]
    if dy is None or not any(needs):
        return (None,) * 6
    grads = _phm_linear_backward_op(dy, x, t, rule, w_left, w_right, needs, ctx.backend)
    return (*(optional(g, need) for g, need in zip(grads, needs)), None)


torch.library.register_autograd("peftcore::phm_linear", _backward, setup_context=_setup_context)
autocast("phm_linear", "lower")  # a linear layer: F.linear's rule
autocast("phm_linear_backward", "none")


def check_phm_shapes(in_features: int, out_features: int, phm_dim: int, what: str = "phm_dim") -> None:
    """Clear error when ``phm_dim`` does not divide both widths (configs and the op share it)."""
    for side, width in (("in_features", in_features), ("out_features", out_features)):
        if width % phm_dim:
            raise ValueError(
                f"{what}={phm_dim} must divide {side}={width} (PHM splits each width into {what} blocks)"
            )


def _check(x, rule, w_left, w_right, bias):
    check_floats(("x", x), ("rule", rule), ("w_left", w_left), ("w_right", w_right))
    n, p, _, q = check_factors(rule, w_left, w_right)
    if x.dim() < 1 or x.shape[-1] != n * p:
        if x.dim() >= 1 and x.shape[-1] % n:
            raise ValueError(f"phm_dim={n} must divide x's last dim {x.shape[-1]}")
        raise ValueError(
            f"x must have last dim in = n·P = {n}·{p} = {n * p} (w_left is {tuple(w_left.shape)}), "
            f"got shape {tuple(x.shape)}"
        )
    check_bias(bias, n * q)
    check_like_x(x, same_dtype=not autocasting(x), rule=rule, w_left=w_left, w_right=w_right, bias=bias)


def phm_linear(x, rule, w_left, w_right, bias=None, backend=None):
    """PHM linear (Compacter): ``x @ Σᵢ kron(rule[i], w_left[i] @ w_right[i]) + bias``.

    Args:
        x: ``[..., in]``; any leading dims, any strides.
        rule: ``[n, n, n]`` (n = phm_dim), usually shared by every PHM layer of an adapter.
        w_left: ``[n, in/n, rank]``; w_right: ``[n, rank, out/n]``.
        bias: ``[out]`` or None.
        backend: ``"reference" | "triton" | "cpp" | "cuda"`` or None for the registry's choice.

    Returns ``[..., out]`` in x's dtype (fp32 accumulation for half inputs).  Gradients flow to x,
    rule, w_left, w_right and bias; the Kronecker product H ``[in, out]`` is never formed.  Under
    ``torch.autocast`` it runs in the autocast dtype, as ``F.linear`` does; it is the custom op
    ``peftcore::phm_linear`` (compiles without a graph break).
    """
    _check(x, rule, w_left, w_right, bias)
    check_backend(backend)
    x2, lead = as_rows(x)
    # The factors are small: hand the kernels contiguous copies (autograd sees through it).
    rule, w_left, w_right = rule.contiguous(), w_left.contiguous(), w_right.contiguous()
    y2 = _phm_linear_op(x2, rule, w_left, w_right, bias, backend)[0]
    return y2.reshape(*lead, rule.shape[0] * w_right.shape[2])
