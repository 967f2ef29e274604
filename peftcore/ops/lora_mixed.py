"""``lora_mixed_linear``: one forward, a different LoRA adapter per example (punica's BGMV/SGMV).

See :mod:`peftcore.reference.lora_mixed` for the math and the backend contract.  The kernels are
forward-only (serving); when autograd needs a gradient the op runs the differentiable reference.
"""

from __future__ import annotations

import torch

from .. import backends
from ._checks import as_rows, check_bias, check_floats, check_like_x, weight_shape

FLOATS = (torch.float32, torch.float16, torch.bfloat16)

SPEC = backends.register(
    backends.OpSpec(
        name="lora_mixed",
        modules={
            "reference": "peftcore.reference.lora_mixed",
            "triton": "peftcore.kernels.lora_mixed",
            "cpp": "peftcore.native.lora_mixed",
            "cuda": "peftcore.native.lora_mixed",
        },
        dtypes={
            "reference": FLOATS + (torch.float64,),
            "triton": FLOATS,
            "cpp": (torch.float32, torch.float64),
            "cuda": FLOATS,
        },
        defaults={"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")},
        why_default={
            "cpu": "cpp: forward 1.08-1.25x faster than the reference loop over adapters, 1.03-1.13x the base "
            "linear alone (fp32, 1024->1024, r 16, 4-16 adapters, AMD EPYC 2 threads; "
            "benchmarks/results/lora_mixed_cpu.md)",
            "cuda": "not yet measured on a GPU: Triton until the GPU benchmark decides",
        },
    )
)


def _check(x, weight, bias, lora_a, lora_b, scaling, adapter_index):
    check_floats(("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b))
    out_f, in_f = weight_shape(weight)
    if x.dim() < 2 or x.shape[-1] != in_f:
        raise ValueError(
            f"x must be [batch, ..., in={in_f}] (weight is [out={out_f}, in={in_f}]), got shape {tuple(x.shape)}"
        )
    if lora_a.dim() != 3 or lora_a.shape[2] != in_f or lora_a.shape[1] < 1:
        raise ValueError(f"lora_a must be [adapters, r, in={in_f}], got shape {tuple(lora_a.shape)}")
    j, r = lora_a.shape[:2]
    if lora_b.dim() != 3 or tuple(lora_b.shape) != (j, out_f, r):
        raise ValueError(f"lora_b must be [adapters={j}, out={out_f}, r={r}], got shape {tuple(lora_b.shape)}")
    check_bias(bias, out_f)
    check_like_x(x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if not isinstance(scaling, torch.Tensor) or scaling.dim() != 1 or scaling.shape[0] != j:
        raise ValueError(f"scaling must be a 1-D tensor of {j} floats (one per adapter), got {scaling!r}")
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dim() != 1:
        raise ValueError("adapter_index must be a 1-D integer tensor with one entry per example")
    if adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_index must be int32 or int64, got {adapter_index.dtype}")
    if adapter_index.shape[0] != x.shape[0]:
        raise ValueError(
            f"adapter_index has {adapter_index.shape[0]} entries but x has batch size {x.shape[0]}"
        )
    if adapter_index.numel():
        lo, hi = int(adapter_index.min()), int(adapter_index.max())
        if lo < -1 or hi >= j:
            raise ValueError(f"adapter_index values must be in [-1, {j}) (-1 = base only), got [{lo}, {hi}]")


def lora_mixed_linear(x, weight, bias, lora_a, lora_b, scaling, adapter_index, backend=None):
    """Per-example LoRA: example e gets adapter ``adapter_index[e]`` from the stacks.

    Args:
        x: ``[B, ..., in]``; any strides.
        weight: ``[out, in]``; bias: ``[out]`` or None.
        lora_a: ``[J, R, in]`` and lora_b: ``[J, out, R]``, J adapters stacked, lower ranks
            zero-padded to R.
        scaling: ``[J]`` per-adapter scaling (any float dtype; used in fp32).
        adapter_index: ``[B]`` int32/int64, each in [-1, J); -1 runs the base layer alone.
        backend: ``"reference" | "triton" | "cpp" | "cuda"`` or None for the registry's choice.

    Returns ``[B, ..., out]``.  Without gradients the kernels run in one pass over the batch; with
    autograd recording and any input requiring grad, the differentiable reference loop runs.
    """
    _check(x, weight, bias, lora_a, lora_b, scaling, adapter_index)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)
    )
    name = "reference" if grad else backends.select("lora_mixed", x.device, x.dtype, backend)
    if grad and backend is not None:
        backends.select("lora_mixed", x.device, x.dtype, backend)  # still validate the request
    impl = backends.implementation("lora_mixed", name)
    x2, lead = as_rows(x)
    per = x2.shape[0] // x.shape[0] if x.shape[0] else 0
    rows = adapter_index.to(device=x.device, dtype=torch.int32).repeat_interleave(per)
    scaling = scaling.to(device=x.device, dtype=torch.float32)
    if name != "reference":
        lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    y2 = impl.lora_mixed_fwd(x2, weight, bias, lora_a, lora_b, scaling, rows)
    return y2.reshape(*lead, weight.shape[0])
