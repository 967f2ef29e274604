"""``phm_linear``: y = x H + b with H = Σᵢ kron(rule[i], W_left[i] W_right[i]), never built.

See :mod:`peftcore.reference.phm` for the contraction every backend computes and the backend
contract.  Saved for backward: x (its 2-D view) and the small intermediate t ``[M, n, n, k]``.
"""

from __future__ import annotations

import torch

from .. import backends
from ..reference.phm import check_factors
from ._checks import as_rows, check_bias, check_floats, check_like_x

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
            "cpu": "cpp: fwd+bwd 0.27-0.33x a dense nn.Linear of the same shape and 2.7-7.5x faster than "
            "reference (fp32, 2048 tokens, 1024->32->1024 block, 1024->32, 32->1024, n 4, k 1, AMD EPYC 2 threads; "
            "benchmarks/results/phm_cpu.md)",
            "cuda": "not yet measured on a GPU: Triton until the GPU benchmark decides",
        },
    )
)


class _PHMLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, rule, w_left, w_right, bias, impl):
        y2, t = impl.phm_fwd(x2, rule, w_left, w_right, bias)
        ctx.save_for_backward(x2, t, rule, w_left, w_right)
        ctx.impl, ctx.has_bias = impl, bias is not None
        return y2

    @staticmethod
    def backward(ctx, dy2):
        x2, t, rule, w_left, w_right = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], n[2], n[3], n[4] and ctx.has_bias)
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        dx, drule, dwl, dwr, db = ctx.impl.phm_bwd(dy2, x2, t, rule, w_left, w_right, needs)
        return dx, drule, dwl, dwr, db, None


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
    check_like_x(x, rule=rule, w_left=w_left, w_right=w_right, bias=bias)


def phm_linear(x, rule, w_left, w_right, bias=None, backend=None):
    """PHM linear (Compacter): ``x @ Σᵢ kron(rule[i], w_left[i] @ w_right[i]) + bias``.

    Args:
        x: ``[..., in]``; any leading dims, any strides.
        rule: ``[n, n, n]`` (n = phm_dim), usually shared by every PHM layer of an adapter.
        w_left: ``[n, in/n, rank]``; w_right: ``[n, rank, out/n]``.
        bias: ``[out]`` or None.
        backend: ``"reference" | "triton" | "cpp" | "cuda"`` or None for the registry's choice.

    Returns ``[..., out]`` in x's dtype (fp32 accumulation for half inputs).  Gradients flow to x,
    rule, w_left, w_right and bias; the Kronecker product H ``[in, out]`` is never formed.
    """
    _check(x, rule, w_left, w_right, bias)
    name = backends.select("phm_linear", x.device, x.dtype, backend)
    impl = backends.implementation("phm_linear", name)
    x2, lead = as_rows(x)
    # The factors are small: hand the kernels contiguous copies (autograd sees through it).
    rule, w_left, w_right = rule.contiguous(), w_left.contiguous(), w_right.contiguous()
    y2 = _PHMLinearFn.apply(x2, rule, w_left, w_right, bias, impl)
    return y2.reshape(*lead, rule.shape[0] * w_right.shape[2])
