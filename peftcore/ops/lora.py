"""``lora_linear``: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ, with backend dispatch.

Saved for backward: x (its 2-D view), the rank-r intermediate xa = dropout(x) Aᵀ and the integer
seed.  No dropout output and no mask are kept: the backward pass regenerates the mask.
"""

from __future__ import annotations

import torch

from .. import backends
from ..reference.rng import check_seed, dropout_threshold, new_seed
from ._checks import as_rows, check_bias, check_floats, check_like_x, weight_shape

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
            "cpp": (torch.float32, torch.float64),
            "cuda": FLOATS,
        },
        defaults={"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")},
        why_default={
            "cpu": "cpp: fwd+bwd 1.07x the frozen linear vs reference 3.28x at p=0.1, 1.08x vs 1.10x at p=0 "
            "(fp32, 2048x1024->1024, r=16, AMD EPYC 2 threads; benchmarks/results/lora_cpu.md)",
            "cuda": "not yet measured on a GPU: Triton until the GPU benchmark decides",
        },
    )
)


class _LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, lora_a, lora_b, scaling, p, seed, impl):
        y2, xa = impl.lora_fwd(x2, weight, bias, lora_a, lora_b, scaling, p, seed)
        ctx.save_for_backward(x2, xa, weight, lora_a, lora_b)
        ctx.scaling, ctx.p, ctx.seed, ctx.impl = scaling, p, seed, impl
        ctx.has_bias = bias is not None
        return y2

    @staticmethod
    def backward(ctx, dy2):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[1], n[2] and ctx.has_bias, n[3], n[4])
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        dx, dw, db, da, dbl = ctx.impl.lora_bwd(
            dy2, x2, xa, weight, lora_a, lora_b, ctx.scaling, ctx.p, ctx.seed, needs
        )
        return dx, dw, db, da, dbl, None, None, None, None


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
    check_like_x(x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a Python float, got {type(scaling).__name__}")
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

    Returns ``[..., out]`` in x's dtype; accumulation is fp32 for half inputs.
    """
    _check(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    p = float(dropout_p)
    seed = 0 if p == 0.0 else (new_seed() if seed is None else check_seed(seed))
    name = backends.select("lora_linear", x.device, x.dtype, backend)
    impl = backends.implementation("lora_linear", name)
    x2, lead = as_rows(x)
    y2 = _LoRALinearFn.apply(x2, weight, bias, lora_a, lora_b, float(scaling), p, seed, impl)
    return y2.reshape(*lead, weight.shape[0])
