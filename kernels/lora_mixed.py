"""Triton backend of ``lora_mixed_linear``: one LoRA adapter per example (punica's SGMV), forward only.

Contract of :mod:`peftcore.reference.lora_mixed` (2-D views)::

    lora_mixed_fwd(x [M, K], weight [N, K], bias [N] | None, lora_a [J, R, K], lora_b [J, N, R],
                   scaling fp32 [J], rows int32 [M]) -> y [M, N]

    y[m] = x[m] Wᵀ + b + scaling[j] · (x[m] A[j]ᵀ) B[j]ᵀ,   j = rows[m]  (j = -1: base only)

The base GEMM stays with torch (cuBLAS); two kernels add the low-rank delta in place.  The batch
is described by the tile table of :func:`peftcore.native.lora_mixed.plan` (int32 [T, 3]: rows
``[first, end)`` of one segment of equal adapter index, at most ``BLOCK_M`` of them, and the
adapter).  Each program reads its tile's adapter with a scalar load and offsets the A/B pointers
by it, so any mix of adapters is one launch of each kernel:

* ``_lora_mixed_shrink_kernel``, grid (tiles, K splits, rank blocks): fp32 partials of
  ``x_tile A[j]ᵀ`` over its K range, stored per tile in a ``[SPLIT, T, BLOCK_M, R_PAD]`` buffer.
  The K split gives a decode batch (a few one-row tiles) enough programs to fill the GPU.
* ``_lora_mixed_expand_kernel``, grid (tiles, N blocks): sums the partials in split order
  (deterministic, no atomics), scales by ``scaling[j]``, and adds ``xa B[j]ᵀ`` into y (load,
  add in fp32, store).

Why not fused per tile: the expand runs over all N for every tile, so one program per tile would
serialize N / BLOCK_N dot products and leave most SMs idle for small batches; two launches keep
both products parallel over (tile, N block) at the cost of an M x R fp32 round trip (tiny).

Numerics: fp32 accumulation; ``xa`` stays fp32 (not rounded to the input dtype) and the expand's
``tl.dot`` is fp32 (``input_precision`` "ieee" when ``torch.get_float32_matmul_precision()`` is
"highest", else "tf32"; for half inputs tf32, which holds B exactly).  R is padded to a power of two
>= 16 for ``tl.dot``.  Under the interpreter half operands are upcast to fp32 before ``tl.dot`` and
bf16 outputs are accumulated in an fp32 copy of y (the interpreter cannot multiply or round bf16).

Tiles: ``BLOCK_M`` is fixed per call by :func:`~peftcore.native.lora_mixed.plan` (the tile table
depends on it); ``BLOCK_K`` (shrink) and ``BLOCK_N`` (expand) and warps are autotuned from small
lists, or pinned with ``PEFTCORE_TRITON_LORA_MIXED_CONFIG`` (read at import), e.g.
``"shrink:BLOCK_K=64,num_warps=4;expand:BLOCK_N=128,num_warps=4"``.  The GPU lists are guesses for
H100, not yet measured there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..native.lora_mixed import check_inputs, plan
from .common import FLOATS as DTYPES
from .common import INTERPRET as _INTERPRET
from .common import Tuning, num_sms, pow2, precision, store_dtype, upcast, upcast_dot

CONFIG_ENV = "PEFTCORE_TRITON_LORA_MIXED_CONFIG"

# Tile heights: 16 for decode-like batches (one-row segments), 64 for prefill; plan() picks.  The
# interpreter gets 16 only, smaller than the test segments, so multi-tile segments are exercised.
BLOCK_MS = (16,) if _INTERPRET else (16, 32, 64)

_GPU_CONFIGS = {
    "shrink": [
        {"BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
        {"BLOCK_K": 32, "num_warps": 4, "num_stages": 4},
    ],
    "expand": [
        {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 256, "num_warps": 8, "num_stages": 2},
    ],
}
_INTERP_CONFIGS = {
    "shrink": {"BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
    "expand": {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
}
_TUNING = Tuning(CONFIG_ENV, _GPU_CONFIGS, _INTERP_CONFIGS)
_parse_pinned = _TUNING.parse  # "shrink:k=v,...;expand:k=v" (unprefixed: both kernels)
_configs = _TUNING.configs


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs("shrink"), key=["K", "R_PAD", "BLOCK_M"])
@triton.jit
def _lora_mixed_shrink_kernel(
    x_ptr,  # [M, K] input
    a_ptr,  # [J, R, K] stacked lora_a
    tiles_ptr,  # [T, 3] int32: first row, end row, adapter
    part_ptr,  # [SPLIT, T, BLOCK_M, R_PAD] fp32 out: x_tile A[j]ᵀ over each K split
    stride_xm, stride_xk, stride_aj, stride_ar, stride_ak,
    K, R, NUM_TILES, k_per_split,
    R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    sp = tl.program_id(1)
    r0 = tl.program_id(2) * BLOCK_R
    row0 = tl.load(tiles_ptr + t * 3)
    row1 = tl.load(tiles_ptr + t * 3 + 1)
    j = tl.load(tiles_ptr + t * 3 + 2)
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = row0 + offs_i
    mask_m = offs_m < row1
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = sp * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_lo + offs_k)[None, :] * stride_xk
    # Aᵀ tile [BLOCK_K, BLOCK_R] of adapter j: the scalar j moves the base pointer.
    at_ptrs = (a_ptr + j.to(tl.int64) * stride_aj + offs_r[None, :] * stride_ar
               + (k_lo + offs_k)[:, None] * stride_ak)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        mask_k = offs_k < k_hi - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(at_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = upcast_dot(x, at, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
    # The whole tile is stored: rows past the tile and ranks past R hold zeros (masked loads).
    tile = (sp * NUM_TILES + t).to(tl.int64)
    part_ptrs = part_ptr + (tile * BLOCK_M + offs_i[:, None]) * R_PAD + offs_r[None, :]
    tl.store(part_ptrs, acc)


@triton.autotune(configs=_configs("expand"), key=["N", "R_PAD", "BLOCK_M"], restore_value=["y_ptr"])
@triton.jit
def _lora_mixed_expand_kernel(
    part_ptr,  # [SPLIT, T, BLOCK_M, R_PAD] fp32 partial xa
    b_ptr,  # [J, N, R] stacked lora_b
    scaling_ptr,  # [J] fp32
    tiles_ptr,  # [T, 3] int32: first row, end row, adapter
    y_ptr,  # [M, N] in/out: y += scaling[j] · xa B[j]ᵀ on the tile's rows
    stride_bj, stride_bn, stride_br, stride_ym, stride_yn,
    N, R, NUM_TILES, SPLIT,
    R_PAD: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    row0 = tl.load(tiles_ptr + t * 3)
    row1 = tl.load(tiles_ptr + t * 3 + 1)
    j = tl.load(tiles_ptr + t * 3 + 2)
    s = tl.load(scaling_ptr + j)
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = row0 + offs_i
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    split_stride = NUM_TILES * BLOCK_M * R_PAD
    p_ptrs = part_ptr + (t.to(tl.int64) * BLOCK_M + offs_i[:, None]) * R_PAD + offs_r[None, :]
    bt_ptrs = b_ptr + j.to(tl.int64) * stride_bj + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        xa = tl.load(p_ptrs)
        for sp in range(1, SPLIT):
            xa += tl.load(p_ptrs + sp * split_stride)
        bt = tl.load(bt_ptrs, mask=(offs_r < R - r0)[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xa, bt.to(tl.float32), acc, input_precision=PRECISION)
        p_ptrs += BLOCK_R
        bt_ptrs += BLOCK_R * stride_br
    mask = (offs_m < row1)[:, None] & mask_n[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + s * acc).to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def _k_splits(num_programs: int, K: int, device: torch.device) -> tuple[int, int]:
    """(splits, K columns per split): ~2 waves of shrink programs, each split >= a minimum of K."""
    gran, min_k = (16, 16) if _INTERPRET else (64, 256)
    n = max(1, min(triton.cdiv(2 * num_sms(device), max(num_programs, 1)), K // min_k))
    per = triton.cdiv(triton.cdiv(K, n), gran) * gran
    return triton.cdiv(K, per), per


def lora_mixed_fwd(x, weight, bias, lora_a, lora_b, scaling, rows, *, input_precision=None):
    """y ``[M, N]`` = x Wᵀ + b + scaling[j] · (x A[j]ᵀ) B[j]ᵀ per row, j = rows[m] (-1: base only).

    x ``[M, K]`` (unit column stride, any row stride), weight ``[N, K]``, bias ``[N]`` or None,
    lora_a ``[J, R, K]`` and lora_b ``[J, N, R]`` (any strides), all fp32/fp16/bf16 of one dtype;
    scaling fp32 ``[J]`` and rows int32 ``[M]`` contiguous on x's device.  ``input_precision``
    ("ieee" | "tf32" | "tf32x3") applies to fp32 inputs.  Forward only: y carries no graph.
    """
    check_inputs(x, weight, bias, lora_a, lora_b, scaling, rows, contiguous_stacks=False)
    if x.dtype not in DTYPES:
        raise TypeError(f"the triton lora_mixed backend takes float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type not in ("cuda", "cpu") or (x.device.type == "cpu" and not _INTERPRET):
        raise ValueError(f"triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got {x.device}")
    K = x.shape[1]
    N = weight.shape[0]
    J, R = lora_a.shape[:2]
    tiles, bm = plan(rows, J, BLOCK_MS)
    with torch.no_grad():
        y = F.linear(x, weight, bias).to(store_dtype(x.dtype))
    T = tiles.shape[0]
    if T == 0 or N == 0 or K == 0 or R == 0:
        return y.to(x.dtype)
    r_pad = pow2(R)
    block_r = min(r_pad, 16 if _INTERPRET else 64)
    r_blocks = r_pad // block_r
    splits, k_per = _k_splits(T * r_blocks, K, x.device)
    part = torch.empty((splits, T, bm, r_pad), device=x.device, dtype=torch.float32)
    prec = precision(x.dtype, input_precision)
    _lora_mixed_shrink_kernel[(T, splits, r_blocks)](
        x, lora_a, tiles, part,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        K, R, T, k_per,
        R_PAD=r_pad, BLOCK_R=block_r, UPCAST=upcast(x.dtype), PRECISION=prec, BLOCK_M=bm,
    )
    grid = lambda meta: (T, triton.cdiv(N, meta["BLOCK_N"]))
    _lora_mixed_expand_kernel[grid](
        part, lora_b, scaling, tiles, y,
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        N, R, T, splits,
        R_PAD=r_pad, BLOCK_R=block_r, PRECISION="tf32" if x.dtype != torch.float32 else prec, BLOCK_M=bm,
    )
    return y.to(x.dtype)
