"""Triton backend of ``distill_kl``: per-row softmax divergences and their student gradient.

Same contract as :mod:`peftcore.reference.distill` (on 2-D views with unit column stride)::

    distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad) -> (loss_rows, grad)

One launch, one program per row, computes the row loss ``T² · D_i`` (fp32) and, when asked, the
weighted gradient ``row_weight[i] · ∂(T² D_i)/∂s_i`` in s's dtype.  With a = s/T, b = t/T,
q = softmax(a) (student), p = softmax(b) (teacher), the program sweeps the row in BLOCK_V chunks:

* sweep 1 (online): running maxima m_a, m_b (one scalar per stream, updated once per chunk) and
  lane-wise sums Z_a = Σ exp(a - m_a), Z_b = Σ exp(b - m_b).  For ``forward`` and ``reverse`` it
  also accumulates the divergence itself online, as an entropy-style sum rescaled when a maximum
  moves::

      forward:  W = Σ exp(b - m_b) · ((b - m_b) - (a - m_a)),   KL(p‖q) = W / Z_b - log Z_b + log Z_a
      reverse:  W = Σ exp(a - m_a) · ((a - m_a) - (b - m_b)),   KL(q‖p) = W / Z_a - log Z_a + log Z_b

  On a maximum update every term's bracket moves by the same Δ, so W ← α (W - Δ · Z_old).  The
  terms are differences of max-shifted logits, never of two large log-normalizers, so a teacher
  that is the student plus a constant gives KL = 0 to rounding even with logits of ±1e4.
  The loss of these two kinds is therefore known after one read of the row: without a gradient
  (evaluation) that is the whole kernel.
* ``forward`` / ``reverse`` gradient sweep: ``T·(q - p)`` and ``T·q·((log q - log p) - KL)``.
* ``jsd`` (m = β p + (1-β) q; loss = β KL(p‖m) + (1-β) KL(q‖m)): log m mixes both normalizers, so
  its sums cannot be rescaled online.  Sweep 2 accumulates the loss, whose (1-β) KL(q‖m) half is
  exactly c = Σ q h with h = ∂loss/∂q = (1-β)(log q - log m); sweep 3 writes ``T·q·(h - c)``.
  log m = logaddexp(log p + log β, log q + log(1-β)) in the log domain: no underflow of m.

Reads per row: forward/reverse 2× (1× without grad), jsd 3× (2× without grad); one grad write.
Rows with ``row_weight == 0`` read nothing: loss 0 and a zero gradient row are stored.

Teacher entries at -inf have p = 0 and contribute nothing (every ``p · (...)`` term is a
``tl.where`` on p > 0, so 0 · (-inf) never makes a NaN).  Math is fp32 after the load whatever the
input dtype; logits of ±1e4 never overflow since every exp takes a max-shifted, non-positive
argument.

Block sizes: ``BLOCK_V`` (power of two) and ``num_warps`` come from a heuristic (up to 4096 lanes
with 16 warps on a GPU, see :func:`_config`; 64 lanes under the interpreter) unless
``PEFTCORE_TRITON_DISTILL_CONFIG`` pins them, e.g. ``"BLOCK_V=8192,num_warps=16"`` (read on every
call; a key left out keeps the heuristic).  No autotuning: the kernel is memory bound, one row
per program, and a heuristic costs no benchmarking on the first call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..reference.distill import KINDS
from .common import FLOATS as _FLOATS
from .common import interpreting, parse_items, store_dtype

CONFIG_ENV = "PEFTCORE_TRITON_DISTILL_CONFIG"
_KEYS = ("BLOCK_V", "num_warps")


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_scaled(ptr, offs, V, inv_t, EVICT: tl.constexpr):
    # Out-of-row lanes read -inf: exp() of them is 0 and every term on them is masked by tl.where.
    x = tl.load(ptr + offs, mask=offs < V, other=float("-inf"), eviction_policy=EVICT)
    return x.to(tl.float32) * inv_t


@triton.jit
def _log_m(lp, lq, log_beta, log_1mbeta):
    # log(β p + (1-β) q) as a logaddexp; NaN only where p = q = 0, which every caller masks.
    x = lp + log_beta
    y = lq + log_1mbeta
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


@triton.jit
def _distill_kl_fwd_kernel(
    s_ptr,  # [N, V] student logits (unit column stride)
    t_ptr,  # [N, V] teacher logits (unit column stride)
    w_ptr,  # [N] fp32 row weights (0 = masked row)
    loss_ptr,  # [N] fp32 out: T² · D_i (0 for masked rows)
    g_ptr,  # [N, V] out: w_i · ∂(T² D_i)/∂s_i (any tensor when NEED_GRAD is False)
    stride_s, stride_t, stride_g,
    V,
    inv_t, temperature, beta, log_beta, log_1mbeta,
    KIND: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    g_row = g_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    w = tl.load(w_ptr + row)

    if w == 0.0:
        if NEED_GRAD:
            zero = tl.zeros((BLOCK_V,), dtype=tl.float32).to(g_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                tl.store(g_row + v0 + cols, zero, mask=v0 + cols < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        # ---- sweep 1: online maxima and sums (and the forward/reverse divergence) -------------
        # A finite sentinel rather than -inf: max-shifts and Δ stay finite (no inf - inf) while a
        # stream has seen only -inf, and exp(-inf - sentinel) is still 0.
        m_a = -1.0e30
        m_b = -1.0e30
        z_a = tl.zeros((BLOCK_V,), dtype=tl.float32)
        z_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            a = _load_scaled(s_row, offs, V, inv_t, "evict_last")
            b = _load_scaled(t_row, offs, V, inv_t, "evict_last")
            m_a_new = tl.maximum(m_a, tl.max(a, axis=0))
            m_b_new = tl.maximum(m_b, tl.max(b, axis=0))
            alpha_a = tl.exp(m_a - m_a_new)
            alpha_b = tl.exp(m_b - m_b_new)
            da = a - m_a_new
            db = b - m_b_new
            e_a = tl.exp(da)
            e_b = tl.exp(db)
            if KIND == "forward":
                shift = (m_b_new - m_b) - (m_a_new - m_a)
                acc = alpha_b * (acc - shift * z_b) + tl.where(e_b > 0.0, e_b * (db - da), 0.0)
            elif KIND == "reverse":
                shift = (m_a_new - m_a) - (m_b_new - m_b)
                acc = alpha_a * (acc - shift * z_a) + tl.where(e_a > 0.0, e_a * (da - db), 0.0)
            z_a = z_a * alpha_a + e_a
            z_b = z_b * alpha_b + e_b
            m_a = m_a_new
            m_b = m_b_new
        log_za = tl.log(tl.sum(z_a, axis=0))
        log_zb = tl.log(tl.sum(z_b, axis=0))
        gscale = temperature * w  # d(T² L)/ds = T · dL/da, times the row weight

        if KIND == "forward":
            kl = tl.sum(acc, axis=0) / tl.exp(log_zb) - log_zb + log_za
            tl.store(loss_ptr + row, kl * temperature * temperature)
            if NEED_GRAD:
                for v0 in range(0, V, BLOCK_V):
                    offs = v0 + cols
                    a = _load_scaled(s_row, offs, V, inv_t, "evict_first")
                    b = _load_scaled(t_row, offs, V, inv_t, "evict_first")
                    q = tl.exp((a - m_a) - log_za)
                    p = tl.exp((b - m_b) - log_zb)
                    g = (q - p) * gscale
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)
        elif KIND == "reverse":
            kl = tl.sum(acc, axis=0) / tl.exp(log_za) - log_za + log_zb
            tl.store(loss_ptr + row, kl * temperature * temperature)
            if NEED_GRAD:
                for v0 in range(0, V, BLOCK_V):
                    offs = v0 + cols
                    a = _load_scaled(s_row, offs, V, inv_t, "evict_first")
                    b = _load_scaled(t_row, offs, V, inv_t, "evict_first")
                    lq = (a - m_a) - log_za
                    lp = (b - m_b) - log_zb
                    q = tl.exp(lq)
                    g = tl.where(q > 0.0, q * ((lq - lp) - kl), 0.0) * gscale
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)
        else:  # jsd
            # ---- sweep 2: both halves of the loss; the student half is also c = Σ q h ----------
            acc_p = tl.zeros((BLOCK_V,), dtype=tl.float32)
            acc_q = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols
                a = _load_scaled(s_row, offs, V, inv_t, "evict_last")
                b = _load_scaled(t_row, offs, V, inv_t, "evict_last")
                lq = (a - m_a) - log_za
                lp = (b - m_b) - log_zb
                q = tl.exp(lq)
                p = tl.exp(lp)
                lm = _log_m(lp, lq, log_beta, log_1mbeta)
                acc_p += tl.where(p > 0.0, p * (lp - lm), 0.0)
                acc_q += tl.where(q > 0.0, q * (lq - lm), 0.0)
            c = (1.0 - beta) * tl.sum(acc_q, axis=0)
            loss = beta * tl.sum(acc_p, axis=0) + c
            tl.store(loss_ptr + row, loss * temperature * temperature)
            if NEED_GRAD:
                # ---- sweep 3: g = T q (h - c), h = (1-β)(log q - log m) ------------------------
                for v0 in range(0, V, BLOCK_V):
                    offs = v0 + cols
                    a = _load_scaled(s_row, offs, V, inv_t, "evict_first")
                    b = _load_scaled(t_row, offs, V, inv_t, "evict_first")
                    lq = (a - m_a) - log_za
                    lp = (b - m_b) - log_zb
                    q = tl.exp(lq)
                    h = (1.0 - beta) * (lq - _log_m(lp, lq, log_beta, log_1mbeta))
                    g = tl.where(q > 0.0, q * (h - c), 0.0) * gscale
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=offs < V)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _parse_pinned(text: str) -> dict[str, int]:
    """``"BLOCK_V=4096,num_warps=8"`` -> {key: int}; raises on unknown keys or a bad BLOCK_V."""
    out = parse_items(text, CONFIG_ENV, _KEYS)
    bv = out.get("BLOCK_V")
    if bv is not None and (bv < 1 or bv & (bv - 1)):
        raise ValueError(f"{CONFIG_ENV}: BLOCK_V must be a power of two, got {bv}")
    return out


def _config(V: int, dtype: torch.dtype) -> dict[str, int]:
    """Launch config for rows of V logits: a heuristic, then the pinned keys of CONFIG_ENV.

    GPU: 8 elements per thread and stream per chunk (one 16-byte load for half), up to
    BLOCK_V = 4096 with 16 warps.  That compiles to about 64 registers (sm_90, no spills), so two
    programs share an SM and one's per-chunk max reductions overlap the other's loads; 16 elements
    per thread (8192 x 16 warps) needs 112-128 registers and leaves one program per SM.  Plain
    loads are not software-pipelined by Triton (num_stages changes nothing here), hence no stages.
    Interpreter: 64 lanes, so small test rows still take several chunks.
    """
    if interpreting():
        cfg = {"BLOCK_V": min(64, triton.next_power_of_2(V)), "num_warps": 4}
    else:
        bv = min(4096, max(128, triton.next_power_of_2(V)))
        cfg = {"BLOCK_V": bv, "num_warps": min(16, max(4, bv // 256))}
    cfg.update(_parse_pinned(os.environ.get(CONFIG_ENV, "")))
    return cfg


def _check(s, t, kind, beta, row_weight):
    for name, x in (("s", s), ("t", t)):
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, V], got shape {tuple(x.shape)}")
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit column stride, got strides {x.stride()}")
        if x.dtype not in _FLOATS:
            raise TypeError(f"{name}: the triton backend takes float32, float16 or bfloat16, got {x.dtype}")
    if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
        raise ValueError(
            f"s and t must match in shape, dtype and device: {tuple(s.shape)} {s.dtype} {s.device} "
            f"vs {tuple(t.shape)} {t.dtype} {t.device}"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta!r}")
    if row_weight.shape != (s.shape[0],):
        raise ValueError(f"row_weight must have shape ({s.shape[0]},), got {tuple(row_weight.shape)}")


def distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad, *, block_v=None, num_warps=None):
    """Row losses and the weighted student gradient in one launch.

    Args:
        s, t: student / teacher logits ``[N, V]``, same dtype (fp32/fp16/bf16) and device, unit
            column stride (any row stride).
        temperature: T > 0.  kind: ``"forward" | "reverse" | "jsd"``; beta: the teacher's weight
            in the jsd mixture (ignored otherwise).
        row_weight: ``[N]`` weight of each row (0 = masked row: no work, loss 0, zero gradient).
        need_grad: compute ``grad``.
        block_v, num_warps: override the launch config (tests, tuning).

    Returns ``(loss_rows, grad)``: fp32 ``[N]`` = ``T² · D_i``, and ``[N, V]`` in s's dtype =
    ``row_weight[i] · ∂loss_rows[i]/∂s[i]`` (None unless ``need_grad``).
    """
    beta = float(beta)
    _check(s, t, kind, beta, row_weight)
    T = float(temperature)
    if not T > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    N, V = s.shape
    loss = torch.empty(N, device=s.device, dtype=torch.float32)
    grad = torch.empty((N, V), device=s.device, dtype=store_dtype(s.dtype, interpreting())) if need_grad else None
    if N > 0 and V > 0:
        w = row_weight.to(device=s.device, dtype=torch.float32).contiguous()
        cfg = _config(V, s.dtype)
        if block_v is not None:
            cfg["BLOCK_V"] = block_v
        if num_warps is not None:
            cfg["num_warps"] = num_warps
        # jsd's beta; a fixed 0.5 elsewhere so the scalars never matter for other kinds.
        b = beta if kind == "jsd" else 0.5
        with torch.cuda.device(s.device) if s.is_cuda else contextlib.nullcontext():
            _distill_kl_fwd_kernel[(N,)](
                s, t, w, loss, grad if need_grad else loss,
                s.stride(0), t.stride(0), grad.stride(0) if need_grad else 0,
                V,
                1.0 / T, T, b, math.log(b), math.log1p(-b),
                KIND=kind, NEED_GRAD=bool(need_grad), BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
            )
    elif N > 0:
        loss.zero_()
    if need_grad:
        grad = grad.to(s.dtype)
    return loss, grad

