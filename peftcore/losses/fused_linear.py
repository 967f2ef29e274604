"""``fused_linear_distill``: LM-head projection + distillation (+ hard-label CE) without ``[N, V]`` logits.

The loss of a student LM head against a teacher LM head,

    alpha · CE(h_s W_sᵀ + b_s, labels) + (1 − alpha) · distill_kl(h_s W_sᵀ + b_s, h_t W_tᵀ + b_t, T),

is computed over chunks of rows.  Per chunk the forward pass forms both logits, gets the loss and
``∂loss/∂s`` from the softmax-KL backend (``peftcore.losses.distill``: cpp on CPU, Triton on GPU,
the reference anywhere) plus the closed-form CE gradient, and immediately turns that gradient into
the chunk's ``grad_hidden`` rows and a contribution to ``grad_head``; the chunk's logits are then
dropped.  The backward pass only scales the stored gradients by ``grad_output`` (as Liger-Kernel's
fused-linear losses do).  The teacher gets no gradient.

Chunking by a memory budget.  Every chunk re-reads both heads and, with a head gradient, re-reads
and re-writes the ``[V, H]`` head-gradient accumulator (``8·V·H`` bytes for fp32), so the number of
chunks is a cost, not a free parameter: Liger's fused-linear JSD always cuts N into about N/(V/H)
rows (32 chunks at V/H = 32) and on an H100 at N = 1024 runs at 0.23x of plain PyTorch, its
head-gradient GEMMs memory-bound on that accumulator.  Here a chunk is as many rows as a memory
budget for its ``[rows, V]`` buffers (student + teacher logits + the backend's gradient, plus
CE's fp32 buffer and casts; see ``plan_chunks``) allows: by default 256 MiB on CUDA, raised to at
least 256 rows (1024 with a head gradient) where GEMMs stop being memory-bound (``MIN_ROWS``), and
128 MiB on CPU.  Override with ``memory_budget=`` (bytes), ``$PEFTCORE_FUSED_LINEAR_BUDGET_MB``
or a fixed ``chunk_size=`` (rows).  Chunks are balanced (N = 1025 under a 1024-row budget gives
two of ~513, not 1024 + 1).  For fp16/bf16 heads a multi-chunk run needs an fp32 ``[V, H]``
accumulator; when the whole batch's buffers cost no more than budget + that accumulator, one
chunk is used instead (less memory, and no accumulator traffic).  The ``[rows, V]`` buffers are
allocated once per call and reused by every chunk (on the CPU a fresh buffer of that size is an
mmap whose pages fault in again on every chunk).

CPU numbers behind the 128 MiB (2-core Zen 4, fp32, V = 32000, Hs 512 / Ht 768, T = 2, frozen head,
forward + backward, median of 3): fp32 GEMMs of 171 rows run at ~72% of their 1024-row rate and
344 rows at ~88%; 64 MiB (171 rows) made the op 1.30x the time of unfused distill_kl at N = 1024,
128 MiB (344 rows) 1.00-1.09x (N = 1024 / 4096) at 15% / 4% of eager PyTorch's peak memory and
0.7x / 0.46x its time.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from ..ops._checks import check_backend
from ..ops._library import no_aux_grads, absent, autocast, is_one, present
from ..reference.distill import KINDS
from .distill import SPEC as _DISTILL_SPEC  # noqa: F401  (registers the distill_kl backends)
from .distill import check_temperature

BUDGET_ENV = "PEFTCORE_FUSED_LINEAR_BUDGET_MB"
DEFAULT_BUDGET = {"cuda": 256 << 20, "cpu": 128 << 20}
_HALF = (torch.float16, torch.bfloat16)
# Floor (rows) under the default budget's chunk on CUDA, from flop/byte ratios (H100 bf16:
# F ≈ 700 TFLOP/s, BW 3.35 TB/s; not yet measured, the GPU benchmark checks it), whatever V and H:
# * every chunk re-reads both heads (2·V·H bytes each) against 2·rows·V·H flops per GEMM:
#   memory-bound below rows ≈ F/BW ≈ 210;
# * with a head gradient, the dW GEMM (K = rows) also reads and writes the fp32 [V, H] accumulator
#   (8·V·H bytes): memory-bound below rows ≈ 4·F/BW ≈ 850.
MIN_ROWS = {"cuda": (256, 1024)}  # device type -> (frozen head, head gradient)
_NO_MIXED_MM: set[str] = set()  # device types whose torch lacks a half x half -> fp32 (add)mm


class ChunkPlan(NamedTuple):
    rows: int  # rows per chunk (the last one may be shorter)
    chunks: int
    bytes_per_row: int  # bytes of [1, V] chunk buffers the budget counts
    head_acc: torch.dtype | None  # dtype of the separate [V, H] head-gradient accumulator, if any


def _default_budget(device: torch.device) -> int:
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of MiB, got {env!r}") from None
        if not mb > 0:
            raise ValueError(f"{BUDGET_ENV} must be positive, got {env!r}")
        return int(mb * (1 << 20))
    return DEFAULT_BUDGET.get(device.type, DEFAULT_BUDGET["cuda"])


def plan_chunks(n, v, h, student_dtype, teacher_dtype, device, *, alpha=0.0, head_grad=True,
                chunk_size=None, memory_budget=None) -> ChunkPlan:
    """How ``fused_linear_distill`` splits N rows (see the module docstring); exposed for benchmarks."""
    device = torch.device(device)
    kl, ce = alpha < 1, alpha > 0
    common = torch.promote_types(student_dtype, teacher_dtype)
    wide = torch.float64 if common == torch.float64 else torch.float32
    size = lambda d: torch.empty((), dtype=d).element_size()  # noqa: E731
    per_elem = size(student_dtype)  # the student logits
    if ce:
        per_elem += size(wide)  # log-softmax, turned in place into the CE gradient
    if kl:  # teacher logits, their casts to the common dtype, the backend's gradient
        per_elem += size(teacher_dtype) + size(common)
        per_elem += sum(size(common) for d in (student_dtype, teacher_dtype) if d != common)
    grad_dtype = wide if ce else common
    if grad_dtype != student_dtype:
        per_elem += size(student_dtype)  # the gradient cast back for the GEMMs
    bytes_per_row = max(per_elem * v, 1)
    half_acc = head_grad and student_dtype in _HALF
    if n <= 0:
        return ChunkPlan(0, 0, bytes_per_row, None)
    if chunk_size is not None:
        rows = min(int(chunk_size), n)
    else:
        if memory_budget is not None:
            budget = int(memory_budget)
        elif os.environ.get(BUDGET_ENV):
            budget = _default_budget(device)
        else:
            floor = MIN_ROWS.get(device.type, (1, 1))[bool(head_grad)]
            budget = max(_default_budget(device), floor * bytes_per_row)
        acc_bytes = 4 * v * h if half_acc else 0
        if n * bytes_per_row <= budget + acc_bytes:
            rows = n  # one chunk costs no more than budget + the accumulator several would need
        else:
            cap = max(budget // bytes_per_row, 1)
            chunks = math.ceil(n / cap)
            rows = math.ceil(n / chunks)
            if rows > 8 and (r8 := -(-rows // 8) * 8) <= cap:
                rows = r8
    chunks = math.ceil(n / rows)
    return ChunkPlan(rows, chunks, bytes_per_row, torch.float32 if half_acc and chunks > 1 else None)


def _mm_into(out, a, b, accumulate):
    """out (+)= a @ b, with fp32 ``out`` for fp16/bf16 ``a``, ``b`` (GEMM accumulates in fp32 either way)."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    dev = out.device.type
    if dev not in _NO_MIXED_MM:
        try:  # cuBLAS half x half -> fp32 GEMM (torch >= 2.8): no [V, H] half temporary
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _NO_MIXED_MM.add(dev)  # e.g. CPU: aten::mm.dtype has no CPU kernel
    if accumulate:
        out.add_(torch.mm(a, b))
    else:
        out.copy_(torch.mm(a, b))


def _check_label_values(labels, v: int, ignore_index: int) -> None:
    """Labels in [0, V) or ignore_index: a host read, so it runs inside the op, not in a traced graph."""
    bad = ((labels < 0) | (labels >= v)) & (labels != ignore_index)
    if labels.numel() and bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must be in [0, V) = [0, {v}) or ignore_index ({ignore_index}); found {first}")


@torch.library.custom_op("peftcore::fused_linear_distill", mutates_args=())
def _fused_linear_distill_op(
    hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, bs: Optional[Tensor], bt: Optional[Tensor],
    labels: Optional[Tensor], temperature: float, alpha: float, kind: str, beta: float, ignore_index: int,
    rows: int, half_acc: bool, needs: list[bool], backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, grad_hidden, grad_head, grad_bias)``; a gradient not in ``needs`` is an empty tensor."""
    if labels is not None:
        _check_label_values(labels, ws.shape[0], ignore_index)
    impl = None
    if alpha < 1:
        common = torch.promote_types(hs.dtype, ht.dtype)
        impl = backends.implementation("distill_kl", backends.select("distill_kl", hs.device, common, backend))
    need_h, need_w, need_b = needs
    loss, grads = _fused_forward(hs, ws, ht, wt, bs, bt, labels, temperature, alpha, kind, beta, ignore_index,
                                 rows, half_acc, need_h, need_w, need_b, impl)
    return (loss, *(present(g, hs) for g in grads))


@_fused_linear_distill_op.register_fake
def _(hs, ws, ht, wt, bs, bt, labels, temperature, alpha, kind, beta, ignore_index, rows, half_acc, needs,
      backend):
    wide = torch.float64 if torch.float64 in (hs.dtype, ht.dtype) else torch.float32
    grads = [hs.new_empty(hs.shape) if needs[0] else absent(hs), ws.new_empty(ws.shape) if needs[1] else absent(hs),
             bs.new_empty(bs.shape) if needs[2] and bs is not None else absent(hs)]
    return (hs.new_empty((), dtype=wide), *grads)


def _setup_context(ctx, inputs, output):
    ctx.needs = inputs[14]
    ctx.save_for_backward(*output[1:])
    no_aux_grads(ctx, output[1:])


def _backward(ctx, go, *_):
    if go is None:
        return (None,) * 16
    grads = [g if need else None for g, need in zip(ctx.saved_tensors, ctx.needs)]
    if type(go) is not torch.Tensor or torch.compiler.is_compiling():  # traced: no host read, no in-place
        grads = [None if g is None else g * go.to(g.dtype) for g in grads]
    elif not is_one(go):
        # In place, as Liger does: no second [V, H] copy.  A second backward through a retained
        # graph then fails autograd's saved-tensor version check instead of scaling twice.
        for g in grads:
            if g is not None:
                g.mul_(go.to(g.dtype))
    gh, gw, gb = grads
    return (gh, gw, None, None, gb) + (None,) * 11


torch.library.register_autograd("peftcore::fused_linear_distill", _backward, setup_context=_setup_context)
# The wrapper casts under autocast (F.linear's rule for both heads' matmuls) before planning the
# chunks; the op body runs with autocast excluded.
autocast("fused_linear_distill", "none")


def _fused_forward(hs, ws, ht, wt, bs, bt, labels, temperature, alpha, kind, beta, ignore_index, rows, half_acc,
                   need_h, need_w, need_b, impl):
    n, v = hs.shape[0], ws.shape[0]
    need_b = bs is not None and need_b
    need_grad = need_h or need_w or need_b
    kl, ce = alpha < 1, alpha > 0
    wide = torch.float64 if torch.float64 in (hs.dtype, ht.dtype) else torch.float32
    common = torch.promote_types(hs.dtype, ht.dtype)

    if labels is not None:
        live = labels != ignore_index
        safe = torch.where(live, labels, torch.zeros_like(labels))
    else:
        live = torch.ones(n, dtype=torch.bool, device=hs.device)
    weight = live.to(wide) / live.sum().clamp_min(1).to(wide)  # batchmean over live rows
    w_kl, w_ce = weight * (1.0 - alpha), weight * alpha

    grad_h = torch.empty_like(hs, memory_format=torch.contiguous_format) if need_h else None
    grad_w = acc_w = acc_b = None
    head_acc = torch.float32 if half_acc and n > rows else None  # ChunkPlan.head_acc
    if need_w and head_acc is None:
        grad_w = acc_w = torch.empty(ws.shape, dtype=ws.dtype, device=ws.device)
    elif need_w:
        acc_w = torch.empty(ws.shape, dtype=head_acc, device=ws.device)
    if need_b:
        acc_b = torch.zeros(v, dtype=torch.promote_types(bs.dtype, torch.float32), device=bs.device)
    loss = torch.zeros((), dtype=torch.float64, device=hs.device)

    # One set of [rows, V] buffers reused by every chunk (matmuls and log-softmax write into
    # them): on the CPU a fresh tensor this size is an mmap whose pages fault in on every chunk.
    rows = max(min(rows, n), 1)
    s_buf = torch.empty(rows, v, dtype=hs.dtype, device=hs.device) if n else None
    t_buf = torch.empty(rows, v, dtype=ht.dtype, device=hs.device) if n and kl else None
    ce_buf = torch.empty(rows, v, dtype=wide, device=hs.device) if n and ce else None
    for c, i in enumerate(range(0, n, rows)):
        j = min(i + rows, n)
        h = hs[i:j]
        s = s_buf[: j - i]
        if bs is None:
            torch.mm(h, ws.t(), out=s)
        else:
            torch.addmm(bs, h, ws.t(), out=s)
        ds = None
        if ce:
            logp = torch.log_softmax(s, -1, dtype=wide, out=ce_buf[: j - i])
            y, wc = safe[i:j, None], w_ce[i:j]
            loss += (logp.gather(1, y).squeeze(1).to(torch.float64) * wc).sum().neg()
            if need_grad:  # softmax − onehot, weighted, in place
                ds = logp.exp_().mul_(wc[:, None]).scatter_add_(1, y, -wc[:, None].to(logp.dtype))
        if kl:
            t = t_buf[: j - i]
            if bt is None:
                torch.mm(ht[i:j], wt.t(), out=t)
            else:
                torch.addmm(bt, ht[i:j], wt.t(), out=t)
            sc = s if s.dtype == common else s.to(common)
            tc = t if t.dtype == common else t.to(common)
            wk = w_kl[i:j]
            rows_loss, g = impl.distill_fwd(sc, tc, temperature, kind, beta, wk, need_grad)
            del sc, tc
            loss += (rows_loss.to(torch.float64) * wk).sum()
            if need_grad:
                ds = g if ds is None else ds.add_(g)
            del g, rows_loss
        if not need_grad:
            continue
        ds = ds if ds.dtype == hs.dtype else ds.to(hs.dtype)
        if need_h:
            torch.mm(ds, ws, out=grad_h[i:j])
        if need_w:
            _mm_into(acc_w, ds.t(), h, accumulate=c > 0)
        if need_b:
            acc_b += ds.sum(0, dtype=acc_b.dtype)
        del ds
    del s_buf, t_buf, ce_buf

    if need_w and n == 0:
        acc_w.zero_()
    if need_w and grad_w is None:
        grad_w = acc_w.to(ws.dtype)
    del acc_w
    grad_b = acc_b.to(bs.dtype) if need_b else None
    return loss.to(wide), (grad_h, grad_w, grad_b)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(hs, ws, ht, wt, bs, bt, labels, temperature, alpha, chunk_size, kind, beta, ignore_index, memory_budget):
    named = (("student_hidden", hs), ("student_head", ws), ("teacher_hidden", ht), ("teacher_head", wt),
             ("student_bias", bs), ("teacher_bias", bt))
    for name, x in named:
        if x is None and name.endswith("bias"):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (float32, float16, bfloat16 or float64), got {x.dtype}")
        if x.device != hs.device:
            raise ValueError(f"{name} is on {x.device} but student_hidden on {hs.device}")
    if ws.dim() == 2 and wt.dim() == 2 and ws.shape[0] != wt.shape[0]:
        raise ValueError(f"student_head has V = {ws.shape[0]} rows but teacher_head {wt.shape[0]}: "
                         "the vocabularies must match")
    for side, h, w, b in (("student", hs, ws, bs), ("teacher", ht, wt, bt)):
        if h.dim() < 1:
            raise ValueError(f"{side}_hidden must be [..., H], got a 0-d tensor")
        if w.dim() != 2:
            raise ValueError(f"{side}_head must be 2-D [V, H], got shape {tuple(w.shape)}")
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"{side}_hidden has H = {h.shape[-1]} but {side}_head is [V, H] = "
                             f"{tuple(w.shape)}: H must match")
        if w.dtype != h.dtype:
            raise TypeError(f"{side}_head has dtype {w.dtype} but {side}_hidden has {h.dtype}; they must match")
        if b is not None and (b.shape != (w.shape[0],) or b.dtype != w.dtype):
            raise ValueError(f"{side}_bias must be [V] = [{w.shape[0]}] of dtype {w.dtype}, "
                             f"got shape {tuple(b.shape)} and dtype {b.dtype}")
    if ws.shape[0] < 1:
        raise ValueError("the heads must have V >= 1 rows")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(hs.shape)} and teacher_hidden {tuple(ht.shape)} must have the "
                         f"same leading (row) dimensions")
    check_temperature(temperature)
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not (_is_number(beta) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got {chunk_size!r}")
    if memory_budget is not None and (not _is_number(memory_budget) or not memory_budget > 0
                                      or not math.isfinite(memory_budget)):
        raise ValueError(f"memory_budget must be a finite positive number of bytes or None, got {memory_budget!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if labels is None:
        if alpha > 0:
            raise ValueError(f"alpha = {alpha} > 0 weighs a cross-entropy on labels, but labels is None")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (class indices), got {labels.dtype}")
    if labels.device != hs.device:
        raise ValueError(f"labels is on {labels.device} but student_hidden on {hs.device}")
    if labels.shape != hs.shape[:-1] and not (labels.dim() == 1 and labels.numel() == hs.numel() // hs.shape[-1]):
        raise ValueError(f"labels must have shape {tuple(hs.shape[:-1])} (the rows of student_hidden), "
                         f"got {tuple(labels.shape)}")


def fused_linear_distill(student_hidden, student_head, teacher_hidden, teacher_head, labels=None,
                         temperature=1.0, alpha=0.0, chunk_size=None, kind="forward", beta=0.5,
                         student_bias=None, teacher_bias=None, ignore_index=-100, backend=None,
                         memory_budget=None):
    """Distillation loss through the LM heads, chunked over rows so no ``[N, V]`` logits exist.

    ``alpha · cross_entropy(s, labels, ignore_index) + (1 − alpha) · distill_kl(s, t, T, kind)``
    with ``s = student_hidden @ student_headᵀ + student_bias`` and ``t`` likewise for the teacher;
    both terms average over the rows whose label is not ``ignore_index`` (all rows when labels is
    None), and the KL keeps distill_kl's T² factor.  Gradients reach ``student_hidden``,
    ``student_head`` and ``student_bias`` (only those that require grad; a frozen head gets no
    ``[V, H]`` buffer at all); the teacher is treated as constant.  All rows ignored gives 0.

    Args:
        student_hidden: ``[..., Hs]``; student_head: ``[V, Hs]``; student_bias: ``[V]`` or None.
        teacher_hidden: ``[..., Ht]`` (same leading dims); teacher_head: ``[V, Ht]``; teacher_bias.
            fp32/fp16/bf16 (fp64 on the reference backend); each side's hidden, head and bias share
            a dtype; the matmuls run in it (fp32 accumulation, as torch), the loss math in fp32.
        labels: integer ``[...]`` class ids in ``[0, V)`` or ``ignore_index``; required when alpha > 0.
        temperature: T > 0, finite, of the KL term (the CE term uses the raw logits); numerics and
            non-finite logits as in :func:`peftcore.losses.distill_kl`.
        alpha: weight of the hard-label CE, in [0, 1]; 0 skips the CE, 1 skips the teacher.
        chunk_size: rows per chunk; None picks it from ``memory_budget`` (see below).
        kind, beta: ``"forward"`` KL(teacher‖student), ``"reverse"`` or ``"jsd"`` (beta on the teacher).
        backend: the distill_kl backend for the softmax-KL part, None for the registry's choice.
        memory_budget: a finite number of bytes > 0 for one chunk's ``[rows, V]`` buffers (student and teacher logits, the
            gradient, CE's fp32 buffer); default ``$PEFTCORE_FUSED_LINEAR_BUDGET_MB``, else 256 MiB
            on CUDA (at least 256 rows, 1024 with a head gradient) and 128 MiB on CPU.  The budget,
            not V/H, sets the chunk: every chunk re-reads the heads and the ``[V, H]`` head-gradient
            accumulator, so many small chunks (Liger's N/32) leave the GEMMs memory-bound (0.23x
            of PyTorch at N = 1024 on an H100).  Extra memory is about the budget + the ``[N, H]``
            and ``[V, H]`` gradients (+ an fp32 ``[V, H]`` accumulator for a half-precision head
            split into several chunks).

    Under ``torch.autocast`` the fp32 inputs are cast to the autocast dtype first, as F.linear's are.

    Returns a 0-d fp32 tensor (fp64 for fp64 inputs).  The gradients are computed in the forward
    pass; backward scales them by grad_output in place, so a retained graph backpropagates once
    with a grad_output other than 1.
    """
    dev = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(dev):
        # Like F.linear under autocast: both sides' matmuls run in the autocast dtype (fp32 master
        # weights get their gradient back through the cast).
        ad = torch.get_autocast_dtype(dev)
        low = (torch.float32,) + _HALF
        student_hidden, student_head, teacher_hidden, teacher_head, student_bias, teacher_bias = (
            x.to(ad) if isinstance(x, torch.Tensor) and x.dtype in low else x
            for x in (student_hidden, student_head, teacher_hidden, teacher_head, student_bias, teacher_bias))
    _check(student_hidden, student_head, teacher_hidden, teacher_head, student_bias, teacher_bias, labels,
           temperature, alpha, chunk_size, kind, beta, ignore_index, memory_budget)
    hs_shape = student_hidden.shape
    hs = student_hidden.reshape(-1, hs_shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n, v = hs.shape[0], student_head.shape[0]
    y = labels.reshape(n).long() if labels is not None else None
    check_backend(backend)
    head_grad = torch.is_grad_enabled() and student_head.requires_grad
    plan = plan_chunks(n, v, hs.shape[1], hs.dtype, ht.dtype, hs.device, alpha=float(alpha), head_grad=head_grad,
                       chunk_size=chunk_size, memory_budget=memory_budget)
    tb = teacher_bias.detach() if teacher_bias is not None else None
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and hs.requires_grad, head_grad,
             grad_on and student_bias is not None and student_bias.requires_grad]
    loss = _fused_linear_distill_op(
        hs, student_head, ht, teacher_head.detach(), student_bias, tb, y, float(temperature), float(alpha), kind,
        float(beta), int(ignore_index), plan.rows, plan.head_acc is not None, needs, backend)[0]
    return loss
