"""``lora_mixed_linear``: one forward, a different LoRA adapter per example (punica's BGMV/SGMV).

See :mod:`peftcore.reference.lora_mixed` for the math and the backend contract.  The kernels are
forward-only (serving); the gradient, when autograd asks for one, is the reference formula
(``peftcore.reference.lora_mixed.lora_mixed_bwd``) whatever backend ran the forward.  The op is
the custom op ``peftcore::lora_mixed_linear`` (see :mod:`peftcore.ops._library`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference.lora_mixed import lora_mixed_bwd
from ._checks import as_rows, check_backend, check_bias, check_floats, check_like_x, check_real_floats, weight_shape
from ._library import absent, autocast, autocasting, implementation, optional, present

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
        limits={
            "triton": lambda s: _kernel_limits(s, backends.TRITON_MAX_RANK),
            "cpp": lambda s: _kernel_limits(s, backends.NATIVE_MAX_RANK),
            "cuda": lambda s: _kernel_limits(s, backends.NATIVE_MAX_RANK),
        },
        why_default={
            "cpu": "cpp: forward 1.09-1.26x faster than the reference loop over adapters, 1.08-1.14x the base "
            "linear alone (fp32, 1024->1024, r 16, 4-16 adapters, AMD EPYC 2 threads; "
            "benchmarks/results/lora_mixed_cpu.md)",
            "cuda": "not yet measured on a GPU: Triton until the GPU benchmark decides",
        },
    )
)


def _kernel_limits(sizes: dict, max_rank: int) -> str | None:
    """The kernels take one adapter or more (with none, every row runs the base: the reference)."""
    if sizes.get("adapters", 1) < 1:
        return "the kernels need at least one adapter (with none every row runs the base layer alone)"
    return backends.rank_limit(max_rank)(sizes)


def _check_index_range(rows: Tensor, num_adapters: int) -> None:
    """Values of ``rows`` in [-1, J): read inside the op (a host read is no part of a traced graph)."""
    if rows.numel():
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < -1 or hi >= num_adapters:
            raise ValueError(
                f"adapter_index values must be in [-1, {num_adapters}) (-1 = base only), got [{lo}, {hi}]"
            )


@torch.library.custom_op("peftcore::lora_mixed_linear", mutates_args=())
def _lora_mixed_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scaling: Tensor,
    rows: Tensor, backend: Optional[str],
) -> Tensor:
    """y ``[M, out]`` on 2-D x with one adapter index per row (int32 ``rows``)."""
    _check_index_range(rows, lora_a.shape[0])
    impl = implementation("lora_mixed", x, backend, rank=lora_a.shape[1], adapters=lora_a.shape[0])
    if impl.__name__ != "peftcore.reference.lora_mixed":
        lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    return impl.lora_mixed_fwd(x, weight, bias, lora_a, lora_b, scaling, rows)


@_lora_mixed_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, rows, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("peftcore::lora_mixed_linear_backward", mutates_args=())
def _lora_mixed_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: Tensor, rows: Tensor,
    needs: list[bool],
) -> list[Tensor]:
    """``[dx, dweight, dbias, da, db]``; an entry not in ``needs`` is an empty tensor."""
    grads = lora_mixed_bwd(dy, x, weight, lora_a, lora_b, scaling.to(x.dtype), rows, tuple(needs))
    return [present(g, x) for g in grads]


@_lora_mixed_backward_op.register_fake
def _(dy, x, weight, lora_a, lora_b, scaling, rows, needs):
    shapes = (x.shape, weight.shape, weight.shape[:1], lora_a.shape, lora_b.shape)
    return [x.new_empty(s) if need else absent(x) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, rows, _ = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scaling, rows)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dy):
    x, weight, lora_a, lora_b, scaling, rows = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2] and ctx.has_bias, n[3], n[4]]
    if dy is None or not any(needs):
        return (None,) * 8
    grads = _lora_mixed_backward_op(dy, x, weight, lora_a, lora_b, scaling, rows, needs)
    return (*(optional(g, need) for g, need in zip(grads, needs)), None, None, None)


torch.library.register_autograd("peftcore::lora_mixed_linear", _backward, setup_context=_setup_context)
autocast("lora_mixed_linear", "lower", keep=(5,))  # F.linear's rule; the fp32 scalings stay fp32
autocast("lora_mixed_linear_backward", "none")


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
    check_like_x(x, same_dtype=not autocasting(x), weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    if not isinstance(scaling, torch.Tensor) or scaling.dim() != 1 or scaling.shape[0] != j:
        raise ValueError(f"scaling must be a 1-D tensor of {j} floats (one per adapter), got {scaling!r}")
    check_real_floats("scaling", scaling)
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dim() != 1:
        raise ValueError("adapter_index must be a 1-D integer tensor with one entry per example")
    if adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_index must be int32 or int64, got {adapter_index.dtype}")
    if adapter_index.shape[0] != x.shape[0]:
        raise ValueError(
            f"adapter_index has {adapter_index.shape[0]} entries but x has batch size {x.shape[0]}"
        )


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

    Returns ``[B, ..., out]``.  The kernels run the forward in one pass over the batch; gradients
    (to x, weight, bias and the stacks) come from the reference formula.  Under ``torch.autocast``
    it runs in the autocast dtype, as ``F.linear`` does.  Index values outside [-1, J) raise
    ValueError inside the op, before any kernel runs.
    """
    _check(x, weight, bias, lora_a, lora_b, scaling, adapter_index)
    check_backend(backend)
    x2, lead = as_rows(x)
    per = x2.shape[0] // x.shape[0] if x.shape[0] else 0
    rows = adapter_index.to(device=x.device, dtype=torch.int32).repeat_interleave(per)
    # The kernels read scaling[j] at unit stride: a strided or expanded (stride-0) view becomes a
    # [J] copy here, for every backend (the native checks refuse a non-contiguous one).
    scaling = scaling.to(device=x.device, dtype=torch.float32).contiguous()
    y2 = _lora_mixed_op(x2, weight, bias, lora_a, lora_b, scaling, rows, backend)
    return y2.reshape(*lead, weight.shape[0])
