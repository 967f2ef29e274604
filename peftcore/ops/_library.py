"""torch.library plumbing every op shares: autocast kernels, backend dispatch inside the op, and
the stand-in for an output that is not there.

Every op of :mod:`peftcore.ops` (and the distillation losses) is a ``torch.library`` custom op
(``peftcore::<name>``) with a fake (meta) implementation and a registered autograd formula, as
flash-attention's and torchao's ops are.  That is what lets ``torch.compile(fullgraph=True)``
trace a model holding peftcore layers without a graph break: dynamo sees one opaque node per call,
and everything that cannot be traced (the registry's choice of backend, importing a backend
module, loading the extension, thread counts, drawing a dropout seed, pybind calls) runs inside
the op's real implementation, at run time, never in the traced path.

Autocast.  A custom op has no autocast rule of its own (autocast's fallthrough would hand it the
caller's mixed dtypes).  :func:`autocast` registers one per op on the AutocastCPU and AutocastCUDA
keys, read at call time (and at trace time under compile), with one of three policies:

* ``"lower"``: as ``F.linear``: every floating input but float64 is cast to the autocast dtype
  (``torch.get_autocast_dtype``), so the op runs, and returns, in bf16/fp16;
* ``"promote"``: the floating inputs are cast to their widest dtype and nothing is lowered (the
  losses: their kernels accumulate in fp32 whatever they read, so an fp32 copy of bf16 logits would
  only cost memory, and they return fp32 as autocast's fp32 ops do);
* ``"none"``: no cast (backward ops, which receive what the forward produced).

In every case the op body runs with autocast excluded, so torch calls inside a backend (the base
GEMM of LoRA on the C++ backend, say) cannot silently change dtype under it: that is how a bf16
buffer once met an fp32 kernel (a memory-corrupting bug, now impossible).
"""

from __future__ import annotations

import torch

from .. import backends

NAMESPACE = "peftcore"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # keeps the autocast kernels registered
_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA
)
POLICIES = ("lower", "promote", "none")


def _castable(a, device_type: str) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and a.is_floating_point()
        and a.dtype != torch.float64
        and a.device.type == device_type
    )


def _cast_args(args: tuple, device_type: str, policy: str, keep: tuple[int, ...] = ()) -> tuple:
    if policy == "none":
        return args
    cast = [i not in keep and _castable(a, device_type) for i, a in enumerate(args)]
    if policy == "lower":
        dtype = torch.get_autocast_dtype(device_type)
    else:
        floats = [a.dtype for a, c in zip(args, cast) if c]
        if not floats:
            return args
        dtype = floats[0]
        for d in floats[1:]:
            dtype = torch.promote_types(dtype, d)
    return tuple(a.to(dtype) if c and a.dtype != dtype else a for a, c in zip(args, cast))


def autocast(name: str, policy: str, keep: tuple[int, ...] = ()) -> None:
    """Register ``peftcore::<name>``'s autocast rule (``policy`` in :data:`POLICIES`) on CPU and CUDA.

    ``keep``: positions of floating arguments the rule leaves as they are (per-adapter scalings,
    row weights: parameters of the math, not activations).
    """
    if policy not in POLICIES:
        raise ValueError(f"autocast policy must be one of {POLICIES}, got {policy!r}")
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):

        def kernel(_keyset, *args, _device_type=device_type):
            args = _cast_args(args, _device_type, policy, keep)
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
                return op(*args)

        _LIB.impl(name, kernel, key, with_keyset=True)


def autocasting(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device type (inputs of mixed dtypes are then legal).

    False on device types autocast does not know (``meta``: shape inference runs the op's fake
    implementation, as it runs ``F.linear``'s)."""
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:
        return False


def implementation(op: str, like: torch.Tensor, backend: str | None, **sizes):
    """The backend module that runs ``op`` on tensors like ``like`` and of these ``sizes`` (called
    inside the op, at run time)."""
    return backends.implementation(op, backends.select(op, like.device, like.dtype, backend, sizes))


def no_aux_grads(ctx, aux) -> None:
    """The op's extra outputs (saved intermediates, the seed, precomputed gradients) get no gradient,
    and autograd passes None rather than a zero tensor the size of each (a [N, V] zero fill per
    backward of distill_kl, otherwise)."""
    ctx.mark_non_differentiable(*[t for t in aux if t.is_floating_point()])
    ctx.set_materialize_grads(False)


def is_one(t: torch.Tensor) -> bool:
    """True when ``t`` is a real one-element tensor equal to 1 (an eager ``loss.backward()``'s seed).

    Under tracing (dynamo, or AOTAutograd tracing a registered backward, where
    ``torch.compiler.is_compiling()`` is False) tensors are fake or functional subclasses whose
    value cannot be read: then False, and the caller takes the general path."""
    return (
        type(t) is torch.Tensor
        and not torch.compiler.is_compiling()
        and t.numel() == 1
        and float(t) == 1.0
    )


def absent(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor an op returns in place of a gradient nobody asked for (ops return tensors only)."""
    return like.new_empty(0)


def present(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``t``, or :func:`absent` when it is None."""
    return absent(like) if t is None else t


def optional(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
    """Back from an op's output: None where the gradient was not asked for."""
    return t if needed else None
