"""``distill_kl``: temperature softmax-KL distillation loss with backend dispatch.

The backend computes the loss and the gradient with respect to the student logits in one pass
(forward); the backward pass only scales that stored gradient by the upstream gradient.

T² convention: the loss is ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over rows, as in
Hinton et al. (2015), so that soft-label gradients keep their size as T grows and the loss can be
mixed with a hard-label cross-entropy at the same weight for any T.  Libraries disagree here:
torchdistill and TextBrewer drop T² in places, and Liger's and TRL's GKD losses never apply it; to
compare with those, divide our value by T².
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..ops._checks import check_backend
from ..ops._library import no_aux_grads, absent, autocast, autocasting, implementation, is_one, present
from ..reference.distill import KINDS

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("batchmean", "sum", "mean", "none")

SPEC = backends.register(
    backends.OpSpec(
        name="distill_kl",
        modules={
            "reference": "peftcore.reference.distill",
            "triton": "peftcore.kernels.distill",
            "cpp": "peftcore.native.distill",
            "cuda": "peftcore.native.distill",
        },
        dtypes={
            "reference": FLOATS + (torch.float64,),
            "triton": FLOATS,
            "cpp": (torch.float32,),
            "cuda": FLOATS,
        },
        defaults={"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")},
        why_default={
            "cpu": "cpp: fwd+bwd 256 ms vs torch eager 2416 ms, reference 6490 ms, torch.compile 411 ms "
            "([4096, 32000] fp32, AMD EPYC 2 threads; benchmarks/results/distill_cpu.md)",
            "cuda": "not yet measured on a GPU: Triton until the GPU benchmark decides",
        },
    )
)


@torch.library.custom_op("peftcore::distill_kl", mutates_args=())
def _distill_kl_op(
    s: Tensor, t: Tensor, row_weight: Tensor, temperature: float, kind: str, beta: float, per_row: bool,
    need_grad: bool, backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    """``(loss, grad)``: per-row losses ``[N]`` (``per_row``) or their ``row_weight``-weighted sum,
    and ``∂(Σ row_weight · loss_rows)/∂s`` ``[N, V]`` (empty unless ``need_grad``)."""
    impl = implementation("distill_kl", s, backend)
    loss_rows, grad = impl.distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad)
    if not per_row:
        loss_rows = (loss_rows.double() * row_weight.double()).sum().to(loss_rows.dtype)
    return loss_rows, present(grad, s)


@_distill_kl_op.register_fake
def _(s, t, row_weight, temperature, kind, beta, per_row, need_grad, backend):
    dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    loss = s.new_empty(s.shape[:1] if per_row else (), dtype=dtype)
    return loss, s.new_empty(s.shape) if need_grad else absent(s)


def _setup_context(ctx, inputs, output):
    ctx.per_row, ctx.need_grad = inputs[6], inputs[7]
    ctx.save_for_backward(output[1] if ctx.need_grad else None)
    no_aux_grads(ctx, output[1:])


def _backward(ctx, g, _dgrad):
    (grad,) = ctx.saved_tensors
    if g is None or not ctx.need_grad or not ctx.needs_input_grad[0]:
        return (None,) * 9
    if ctx.per_row:
        dg = grad * g.to(grad.dtype)[:, None]
    elif is_one(g):
        dg = grad  # the usual eager loss.backward(): nothing to scale, no [N, V] copy
    else:
        dg = grad * g.to(grad.dtype)
    return (dg,) + (None,) * 8


torch.library.register_autograd("peftcore::distill_kl", _backward, setup_context=_setup_context)
# A loss: nothing is lowered (the kernels accumulate in fp32 whatever they read, and return fp32,
# as autocast's fp32 ops do); mixed student/teacher dtypes meet at the wider one.  The row weights
# (position 2) stay as the wrapper made them.
autocast("distill_kl", "promote", keep=(2,))


def check_temperature(temperature) -> None:
    """``temperature`` is a finite number > 0 (the one check of every distillation loss and backend).

    ValueError otherwise: for a non-number (a bool or a tensor included), T <= 0, NaN or ±inf
    (at T = inf every row is uniform: there is nothing to distill, and T² · KL's limit, the
    logit-matching loss, is not this op)."""
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not (math.isfinite(temperature) and temperature > 0)):
        raise ValueError(f"temperature must be a positive number, got {temperature!r} (T must be finite and > 0)")


def _check(student_logits, teacher_logits, temperature, reduction, mask, kind, beta):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (float32, float16 or bfloat16), got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] < 1:
            raise ValueError(f"{name} must be [..., V] with V >= 1, got shape {tuple(x.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits is on {teacher_logits.device} but student_logits on {student_logits.device}")
    if teacher_logits.dtype != student_logits.dtype and not autocasting(student_logits):
        raise TypeError(f"teacher_logits has dtype {teacher_logits.dtype} but student_logits has {student_logits.dtype}")
    if teacher_logits.requires_grad:
        raise ValueError("teacher_logits requires grad; the teacher is fixed here: pass teacher_logits.detach()")
    check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not (isinstance(beta, (int, float)) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape {tuple(student_logits.shape[:-1])}, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask must have shape {tuple(student_logits.shape[:-1])} (the logits' rows), got {tuple(mask.shape)}")


def distill_kl(student_logits, teacher_logits, temperature=1.0, reduction="batchmean", mask=None,
               backend=None, kind="forward", beta=0.5):
    """Soft-label distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

    Args:
        student_logits, teacher_logits: ``[..., V]``, same shape and dtype (fp32/fp16/bf16); the
            teacher gets no gradient (pass it detached).
        temperature: T > 0, finite (ValueError otherwise).  The loss
            keeps its relative accuracy (~1e-7 in fp32 against float64) at any T from 1e-2 to 1e4
            and beyond, and is never negative: it is summed from non-negative terms formed from
            log p − log q directly (at large T it is O(1/T²) of log V, see
            :func:`peftcore.reference.distill.distill_terms`).
        reduction: ``"batchmean"`` (mean over unmasked rows, the default), ``"sum"`` (over rows),
            ``"mean"`` (over unmasked rows and V, like ``F.kl_div(reduction="mean")``) or
            ``"none"`` (per-row ``[...]`` losses, 0 where masked).
        mask: bool ``[...]``; False rows are left out (padding, prompt tokens).
        kind: ``"forward"`` KL(teacher‖student), ``"reverse"`` KL(student‖teacher) or ``"jsd"``,
            the generalized Jensen-Shannon divergence with weight ``beta`` on the teacher.
        backend: ``"reference" | "triton" | "cpp" | "cuda"`` or None for the registry's choice.

    Non-finite logits: -inf entries are probabilities of 0 (a masked vocabulary); an infinite
    divergence (forward KL with a student -inf where the teacher has mass, reverse KL the other way
    round) is +inf.  A row with a NaN or +inf logit, or with every logit -inf, in either input has
    no softmax: its loss and its gradient row are NaN, as torch's ``log_softmax`` would make them,
    on every backend (no host sync to check; masked rows are never read, so they stay 0).

    Returns a scalar (fp32) or, with ``reduction="none"``, per-row losses.  Under ``torch.autocast``
    nothing is lowered (the math is fp32 whatever the logits' dtype); student and teacher logits of
    different dtypes meet at the wider one.  The custom op ``peftcore::distill_kl`` (compiles
    without a graph break).  Test vector: student
    [1, 2, 3], teacher [3, 2, 1], T = 2 gives 1.280627 (0.320157 before the T²).
    """
    _check(student_logits, teacher_logits, temperature, reduction, mask, kind, beta)
    check_backend(backend)
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    n = student_logits.numel() // v
    s2 = student_logits.reshape(n, v)
    t2 = teacher_logits.reshape(n, v)
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    live = torch.ones(n, dtype=torch.bool, device=s2.device) if mask is None else mask.reshape(n).to(s2.device)
    wdtype = torch.float64 if s2.dtype == torch.float64 else torch.float32
    count = live.sum().clamp_min(1).to(wdtype)
    weight = live.to(wdtype)
    if reduction == "batchmean":
        weight = weight / count
    elif reduction == "mean":
        weight = weight / (count * v)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    out = _distill_kl_op(s2, t2, weight, float(temperature), kind, float(beta), reduction == "none", need_grad,
                         backend)[0]
    return out.reshape(lead) if reduction == "none" else out
