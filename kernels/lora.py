"""Triton backend of ``lora_linear``: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ, forward and backward.

Same contract as :mod:`peftcore.reference.lora` (on 2-D views, x with unit column stride):

``lora_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed) -> (y, xa)``
``lora_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs) -> (dx, dweight, dbias, da, db)``

Kernels (shapes: x [M, K], weight [N, K], lora_a [R, K], lora_b [N, R]):

* ``_lora_xa_fwd_kernel``: xa = dropout(x) Aᵀ [M, R], once per row block.  The dropout mask is
  generated from (seed, m, k) in registers and never stored.  Memory bound: one read of x.
* ``_lora_fwd_kernel``: one GEMM.  Its accumulator starts as s · xa Bᵀ (a prologue of ceil(R/64)
  extra MMA steps reading the small xa and B), then the main loop adds x Wᵀ; bias and the cast to
  the output dtype happen on store.  Putting the rank-r term first rather than in the epilogue
  folds the scaling into the accumulator without a second [BLOCK_M, BLOCK_N] register tile.
* ``_lora_dx_bwd_kernel``: dx = dy W + (s/(1-p)) · ((dy B) A) ⊙ keep, same prologue trick: the
  rank-r product is masked (mask regenerated from x's (m, k) indices) and scaled in the
  accumulator before the main loop over N adds dy W.
* ``_lora_da_bwd_kernel``: dA = (s/(1-p)) · (dy B)ᵀ (x ⊙ keep), parallel over K blocks and over
  M splits that write fp32 partial sums, added afterwards by torch (deterministic, no atomics).

dy B [M, R], dB = s · dyᵀ xa, dW = dyᵀ x and dbias = Σ dy are plain torch calls: they are either
tiny or a GEMM cuBLAS already does at roofline.

Numerics: fp32 accumulation everywhere; fp32 ``tl.dot`` uses ``input_precision`` (default from
``torch.get_float32_matmul_precision()``: "highest" -> "ieee", otherwise "tf32").  Under the
interpreter (``TRITON_INTERPRET=1``, read when this module is imported, like ``triton.jit`` does)
half operands are upcast to fp32 before ``tl.dot`` because the interpreter cannot multiply bf16.

Tiles: ``BLOCK_M``/``BLOCK_N`` are a GEMM's output tile and ``BLOCK_K`` its reduction step, for
every kernel.  ``PEFTCORE_TRITON_LORA_CONFIG`` (read at import) pins one config instead of
autotuning, e.g. ``"BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=8,num_stages=3"``;
entries separated by ``;`` may be prefixed by a kernel name (``fwd:``, ``dx:``, ``xa:``, ``da:``)
to apply to that kernel only; keys a kernel does not have are ignored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.rng import dropout_threshold as threshold
from . import common
from .common import m_bucket, pow2, precision, store_dtype, upcast, upcast_dot
from .rng import _keep_mask, _row_keys, seed_key

_INTERPRET, _SMEM_BUDGET = common.INTERPRET, common.SMEM_BUDGET
CONFIG_ENV = "PEFTCORE_TRITON_LORA_CONFIG"

# ---------------------------------------------------------------------------------------------
# Configs.  The GPU lists are educated guesses for H100 (bf16: 128x128x64 tiles, 3-4 stages);
# they are meant to be re-measured on a GPU.  The interpreter gets one small config whose tiles
# are smaller than the test shapes, so every boundary path runs.
# ---------------------------------------------------------------------------------------------

_GPU_CONFIGS = {
    "fwd": [
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},  # fp32
    ],
    "xa": [
        {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},  # more programs when M is small
        {"BLOCK_M": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 4},  # large R
    ],
    "da": [
        {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},  # large R in fp32
    ],
}
# dx holds a uint32 hash tile beside the accumulator while it masks the rank-r term, so 4 warps
# on a 128x128 tile spill (ptxas, sm_90): it gets 8 warps on 128x128 and no 128x256 tile.
_GPU_CONFIGS["dx"] = [
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 4},
    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},  # fp32
]
_INTERP_CONFIGS = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
    "dx": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 1},
    "xa": {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    "da": {"BLOCK_M": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
}
_TUNING = common.Tuning(CONFIG_ENV, _GPU_CONFIGS, _INTERP_CONFIGS)
_parse_pinned = _TUNING.parse  # "k=v,...;fwd:k=v,..." -> {kernel or "*": {key: int}}
_configs = _TUNING.configs


def _smem_bytes(kernel: str, meta: dict, stages: int, elt: int, r_pad: int) -> int:
    """Shared memory of a config's pipelined operand tiles (the dominant term)."""
    if kernel in ("fwd", "dx"):
        red = max(meta["BLOCK_K"], min(r_pad, 64))  # the rank-r prologue steps by BLOCK_R
        return stages * (meta["BLOCK_M"] + meta["BLOCK_N"]) * red * elt
    if kernel == "xa":
        return stages * (meta["BLOCK_M"] + r_pad) * meta["BLOCK_K"] * elt
    return stages * meta["BLOCK_M"] * (meta["BLOCK_K"] + r_pad) * elt  # da


def _pruner(kernel: str, ptr: str):
    """early_config_prune dropping configs whose tiles overflow shared memory for this dtype and R."""

    def prune(configs, named_args, **kwargs):
        elt = named_args[ptr].element_size()
        r_pad = kwargs.get("R_PAD") or kwargs.get("BLOCK_R") or 16

        def smem(c, stages):
            return _smem_bytes(kernel, c.kwargs, stages, elt, r_pad)

        def fits(c):
            spills = kernel == "dx" and elt == 4 and c.num_warps < 8  # 4 warps spill in fp32 (ptxas, sm_90)
            return smem(c, c.num_stages) <= _SMEM_BUDGET and not spills

        # Nothing fits: the config with the smallest tiles, with stages cut until they fit.
        return common.prune_to_budget(configs, fits, lambda c: smem(c, c.num_stages), smem)

    return {"early_config_prune": prune}


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gemm_pid(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks share their column blocks while those are in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.autotune(configs=_configs("xa"), prune_configs_by=_pruner("xa", "x_ptr"), key=["M_BUCKET", "K", "R_PAD"])
@triton.jit(do_not_specialize=["seed_key", "threshold"])
def _lora_xa_fwd_kernel(
    x_ptr,  # [M, K] input
    a_ptr,  # [R, K] lora_a
    xa_ptr,  # [M, R] out: dropout(x) lora_aᵀ, in x's dtype
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
    M, K, R, M_BUCKET,
    seed_key, threshold, keep_scale,
    R_PAD: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    at_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # Aᵀ tile [BLOCK_K, R_PAD]
    if DROPOUT:
        row_keys = _row_keys(offs_m, seed_key)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(at_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DROPOUT:
            # The 1/(1-p) factor is applied once to the fp32 result, not to every element.
            x = tl.where(_keep_mask(row_keys, offs_k + k0, threshold), x, tl.zeros_like(x))
        acc = upcast_dot(x, at, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    if DROPOUT:
        acc = acc * keep_scale
    xa_ptrs = xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :] * stride_xar
    tl.store(xa_ptrs, acc.to(xa_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.autotune(configs=_configs("fwd"), prune_configs_by=_pruner("fwd", "x_ptr"),
                 key=["M_BUCKET", "N", "K", "BLOCK_R"])
@triton.jit
def _lora_fwd_kernel(
    x_ptr,  # [M, K] input
    w_ptr,  # [N, K] base weight
    bias_ptr,  # [N] bias, any stride (0 when expanded); any tensor when HAS_BIAS is False
    xa_ptr,  # [M, R] dropout(x) lora_aᵀ
    b_ptr,  # [N, R] lora_b
    y_ptr,  # [M, N] out
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bias, stride_xam, stride_xar, stride_bn, stride_br,
    stride_ym, stride_yn,
    M, N, K, R, M_BUCKET,
    scaling,
    BLOCK_R: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _gemm_pid(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/cols past the edge are wrapped rather than masked on load: they only feed outputs that
    # are never stored, and unmasked M/N loads pipeline better.  Only the reduction dim is masked.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)

    # Prologue: acc = s · xa Bᵀ (rank-r term, R padded to BLOCK_R with zeros).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa_ptrs = xa_ptr + rm[:, None] * stride_xam + offs_r[None, :] * stride_xar
    bt_ptrs = b_ptr + offs_r[:, None] * stride_br + rn[None, :] * stride_bn  # Bᵀ tile [BLOCK_R, BLOCK_N]
    for r0 in range(0, R, BLOCK_R):
        mask_r = offs_r < R - r0
        xa = tl.load(xa_ptrs, mask=mask_r[None, :], other=0.0)
        bt = tl.load(bt_ptrs, mask=mask_r[:, None], other=0.0)
        acc = upcast_dot(xa, bt, acc, UPCAST, PRECISION)
        xa_ptrs += BLOCK_R * stride_xar
        bt_ptrs += BLOCK_R * stride_br
    acc = acc * scaling

    # Main loop: acc += x Wᵀ.
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wt_ptrs = w_ptr + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn  # Wᵀ tile [BLOCK_K, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
        wt = tl.load(wt_ptrs, mask=mask_k[:, None], other=0.0)
        acc = upcast_dot(x, wt, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk

    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n.to(tl.int64) * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.autotune(configs=_configs("dx"), prune_configs_by=_pruner("dx", "dy_ptr"),
                 key=["M_BUCKET", "N", "K", "BLOCK_R"])
@triton.jit(do_not_specialize=["seed_key", "threshold"])
def _lora_dx_bwd_kernel(
    dy_ptr,  # [M, N] gradient of y
    w_ptr,  # [N, K] base weight
    dyb_ptr,  # [M, R] dy lora_b (unscaled)
    a_ptr,  # [R, K] lora_a
    dx_ptr,  # [M, K] out
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    M, N, K, R, M_BUCKET,
    seed_key, threshold, lora_scale,
    BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tile [BLOCK_M, BLOCK_N] covers (rows of x, columns k of x); BLOCK_K steps over N.
    pid_m, pid_c = _gemm_pid(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)
    rc = (offs_c % K).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_K)

    # Prologue: acc = (s/(1-p)) · ((dy B) A) ⊙ keep, the mask regenerated from x's (m, k).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_ptrs = dyb_ptr + rm[:, None] * stride_gm + offs_r[None, :] * stride_gr
    a_ptrs = a_ptr + offs_r[:, None] * stride_ar + rc[None, :] * stride_ak  # A tile [BLOCK_R, BLOCK_N]
    for r0 in range(0, R, BLOCK_R):
        mask_r = offs_r < R - r0
        g = tl.load(g_ptrs, mask=mask_r[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_r[:, None], other=0.0)
        acc = upcast_dot(g, a, acc, UPCAST, PRECISION)
        g_ptrs += BLOCK_R * stride_gr
        a_ptrs += BLOCK_R * stride_ar
    acc = acc * lora_scale
    if DROPOUT:
        acc = tl.where(_keep_mask(_row_keys(offs_m, seed_key), offs_c, threshold), acc, 0.0)

    # Main loop: acc += dy W.
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + rc[None, :] * stride_wk  # W tile [BLOCK_K, BLOCK_N]
    for n0 in range(0, N, BLOCK_K):
        mask_n = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=mask_n[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        acc = upcast_dot(dy, w, acc, UPCAST, PRECISION)
        dy_ptrs += BLOCK_K * stride_dyn
        w_ptrs += BLOCK_K * stride_wn

    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_c[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_c < K)[None, :])


@triton.autotune(configs=_configs("da"), prune_configs_by=_pruner("da", "x_ptr"), key=["M_BUCKET", "K", "R_PAD"])
@triton.jit(do_not_specialize=["seed_key", "threshold", "rows_per_split"])
def _lora_da_bwd_kernel(
    x_ptr,  # [M, K] input
    dyb_ptr,  # [M, R] dy lora_b (unscaled)
    part_ptr,  # [SPLIT, R, K] out: fp32 partial sums of (dy B)ᵀ (x ⊙ keep) over each row split
    stride_xm, stride_xk, stride_gm, stride_gr,
    M, K, R, M_BUCKET, rows_per_split,
    seed_key, threshold,
    R_PAD: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_k = offs_k < K
    mask_r = offs_r < R
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    # Computed transposed, dAᵀ tile [BLOCK_K, R_PAD]: the long K block is the MMA's M dimension.
    acc = tl.zeros((BLOCK_K, R_PAD), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        rows = offs_m.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        g = tl.load(dyb_ptr + rows * stride_gm + offs_r[None, :] * stride_gr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_keep_mask(_row_keys(offs_m, seed_key), offs_k, threshold), x, tl.zeros_like(x))
        acc = upcast_dot(tl.trans(x), g, acc, UPCAST, PRECISION)
    part_ptrs = part_ptr + pid_s.to(tl.int64) * R * K + offs_r[None, :] * K + offs_k[:, None]
    tl.store(part_ptrs, acc, mask=mask_k[:, None] & mask_r[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _da_rows_per_split(m: int, k: int, device: torch.device) -> int:
    """Rows per program of the dA kernel: enough (K block, row split) programs for ~2 waves."""
    k_blocks = triton.cdiv(k, 16 if _INTERPRET else 128)  # fewest K blocks any config makes
    return common.rows_per_split(m, k_blocks, device)


def _check_2d(name: str, t: torch.Tensor, unit_col: bool = False) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if unit_col and t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {t.stride()}")


def lora_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed, *, input_precision=None):
    """Forward: returns ``(y [M, N], xa [M, R])`` with y = x Wᵀ + b + s · xa Bᵀ, xa = dropout(x) Aᵀ.

    x ``[M, K]`` (unit column stride, any row stride), weight ``[N, K]``, bias ``[N]`` or None,
    lora_a ``[R, K]``, lora_b ``[N, R]`` (weight, bias and the factors in any strides, stride 0
    included: every pointer goes to the kernels with its strides), all one dtype (fp32/fp16/bf16); y and xa in that dtype.
    ``p`` in [0, 1) and ``seed`` fix the dropout mask (ignored when p == 0).
    ``input_precision`` ("ieee" | "tf32" | "tf32x3") applies to fp32 inputs only.
    """
    _check_2d("x", x, unit_col=True)
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=store_dtype(x.dtype))
    if M == 0:
        return y, torch.empty((0, R), device=x.device, dtype=x.dtype)
    xa = _lora_xa(x, lora_a, p, seed, input_precision)
    if N == 0:
        return y.to(x.dtype), xa
    prec, up, mb = precision(x.dtype, input_precision), upcast(x.dtype), m_bucket(M)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else y, xa, lora_b, y,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        xa.stride(0), xa.stride(1), lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        M, N, K, R, mb,
        float(scaling),
        BLOCK_R=min(pow2(R), 64), HAS_BIAS=bias is not None, UPCAST=up, PRECISION=prec,
    )
    return y.to(x.dtype), xa


def _lora_xa(x, lora_a, p, seed, input_precision):
    M, K = x.shape
    R = lora_a.shape[0]
    xa = torch.empty((M, R), device=x.device, dtype=store_dtype(x.dtype))
    dropout = p > 0.0
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _lora_xa_fwd_kernel[grid](
        x, lora_a, xa,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), xa.stride(0), xa.stride(1),
        M, K, R, m_bucket(M),
        seed_key(seed) if dropout else 0, threshold(p), 1.0 / (1.0 - p),
        R_PAD=pow2(R), DROPOUT=dropout, UPCAST=upcast(x.dtype),
        PRECISION=precision(x.dtype, input_precision),
    )
    return xa.to(x.dtype)


def lora_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs, *, input_precision=None):
    """Backward: returns ``(dx, dweight, dbias, da, db)``, None where ``needs`` is False.

    dy ``[M, N]`` (unit column stride); x, xa, weight, lora_a, lora_b as saved by :func:`lora_fwd`.
    ``needs`` = (x, weight, bias, lora_a, lora_b).  The dropout mask is regenerated from ``seed``.
    """
    need_x, need_w, need_bias, need_a, need_b = needs
    _check_2d("dy", dy, unit_col=True)
    _check_2d("x", x, unit_col=True)
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    s = float(scaling)
    dropout = p > 0.0
    keep_scale = 1.0 / (1.0 - p)
    prec, up, mb = precision(x.dtype, input_precision), upcast(x.dtype), m_bucket(M)
    sk, thr = (seed_key(seed) if dropout else 0), threshold(p)
    dx = dweight = dbias = da = db = None
    empty = M == 0 or K == 0  # nothing for the kernels to do (and no grid to launch)

    dyb = dy @ lora_b if (need_x or need_a) and not empty else None  # [M, R], unscaled
    if need_x:
        dx = torch.empty((M, K), device=x.device, dtype=store_dtype(x.dtype))
        if not empty:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            _lora_dx_bwd_kernel[grid](
                dy, weight, dyb, lora_a, dx,
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
                dyb.stride(0), dyb.stride(1), lora_a.stride(0), lora_a.stride(1),
                dx.stride(0), dx.stride(1),
                M, N, K, R, mb,
                sk, thr, s * keep_scale if dropout else s,
                BLOCK_R=min(pow2(R), 64), DROPOUT=dropout, UPCAST=up, PRECISION=prec,
            )
        dx = dx.to(x.dtype)
    if need_a:
        if empty:
            da = torch.zeros_like(lora_a)
        else:
            rows = _da_rows_per_split(M, K, x.device)
            splits = triton.cdiv(M, rows)
            part = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
            grid = lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits)
            _lora_da_bwd_kernel[grid](
                x, dyb, part,
                x.stride(0), x.stride(1), dyb.stride(0), dyb.stride(1),
                M, K, R, mb, rows,
                sk, thr,
                R_PAD=pow2(R), DROPOUT=dropout, UPCAST=up, PRECISION=prec,
            )
            total = part[0] if splits == 1 else part.sum(0)
            da = total.mul_(s * keep_scale if dropout else s).to(lora_a.dtype)
    if need_b:
        db = (dy.t() @ xa).mul_(s)
    if need_w:
        dweight = dy.t() @ x
    if need_bias:
        dbias = dy.sum(0)
    return dx, dweight, dbias, da, db
