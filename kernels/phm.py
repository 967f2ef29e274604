"""Triton backend of ``phm_linear`` (Compacter's PHM layer): y = x H + b, H never built.

Same contract as :mod:`peftcore.reference.phm` (on 2-D views; x and dy with unit column stride):

``phm_fwd(x, rule, w_left, w_right, bias) -> (y, t)``
``phm_bwd(dy, x, t, rule, w_left, w_right, needs) -> (dx, drule, dw_left, dw_right, dbias)``

With n = phm_dim, P = in/n, Q = out/n, k = rank and c = i·k + r indexing the n·k columns of the
factors (x viewed as [M, n, P] with block a, y as [M, n, Q] with block b):

    t[m,a,c] = Σ_p x[m,a,p] W_left[i,p,r]     u[m,b,c] = Σ_a rule[i,a,b] t[m,a,c]
    y[m,b,q] = Σ_c u[m,b,c] W_right[i,r,q] + bias

Kernels:

* ``_phm_fwd_kernel``: one program per BLOCK_M rows.  For each input block a it contracts x's
  block with W_left viewed as [P, n·k] (``tl.dot`` over BLOCK_P chunks, n·k padded to >= 16) and
  places the result in slot a of a register tile t3 [BLOCK_M, n, n·k].  Then for each output
  block b it mixes u_b = Σ_a rule[:, a, b] ⊙ t3[:, a, :] (n·n·k multiply-adds per row, in
  registers) and runs y_b = u_b W_right over BLOCK_Q chunks, bias and the cast on store.  t is
  stored once (it is the only intermediate saved for backward).  x is read once and y written
  once, which is all the traffic there is for Compacter's rank-1 factors; one fused kernel rather
  than a t kernel and a y kernel saves writing t in fp32 and reading it back n times.
* ``_phm_dx_bwd_kernel``: one program per BLOCK_M rows.  For each output block b:
  du_b = dy_b W_rightᵀ (over BLOCK_Q chunks), dt3 += rule[:, :, b] ⊙ du_b (register tile like t3);
  with t3 loaded from the forward it also writes u_b (for dW_right) and the program's partial sum
  Σ_m t[m,a,c] du_b[m,c] (drule before the sum over r).  Then for each input block a it writes dt_a
  (for dW_left) and dx_a = dt_a W_leftᵀ over BLOCK_P chunks.
* ``_phm_dw_bwd_kernel``: dW_left [c, p] = Σ_{m,a} dt[m,a,c] x[m,a,p] and dW_right [c, q] =
  Σ_{m,b} u[m,b,c] dy[m,b,q], the same kernel over the (m, block) row pairs: parallel over column
  blocks and over row splits that write fp32 partial sums, added by torch afterwards
  (deterministic, no atomics).  The per-program drule partials are summed the same way.

dbias = Σ dy is a torch call.  Only what ``needs`` asks for is computed and stored.

Registers: t3 / dt3 hold BLOCK_M·n_pad·nk_pad fp32 (64 per row for n = 4, k = 1; 128 for n = 4,
k = 8).  The pruner keeps the configs whose tiles fit a register budget; for very large n·n·k
(n = 16, k = 8) only BLOCK_M = 16 with 8 warps survives, which compiles at the 255-register
limit (sm_90, no local memory): slower, still one kernel, so no t/y split was needed.  A single
[BLOCK_M, n·n·k] tile with a block-diagonal W_left would hold 4x fewer registers for n = 4,
k = 1 at the same MMA work, but multiplies each x element by n·n·k columns instead of n·k
padded to 16: up to n times the MMA work from k = 2 on.

Numerics: fp32 accumulation everywhere and fp32 intermediates (t3, u, du, dt never rounded to the
input dtype; t is rounded once, on store, exactly as the reference returns it).  Contractions
of two input-dtype tiles (x W_left, dy W_rightᵀ) are native ``tl.dot``.  Contractions of an fp32
intermediate with a factor (u W_right, dt W_leftᵀ, dtᵀ x, uᵀ dy) are fp32 dots: for fp32 inputs
at ``input_precision`` (default from ``torch.get_float32_matmul_precision()``: "highest" ->
"ieee", otherwise "tf32"); for half inputs the fp32 operand is split into a TF32 head and an
fp32 tail (two TF32 dots: half values are exact in TF32, so the product is good to ~2^-21)
rather than rounded to the half dtype, which would double the output's rounding error.  Under the
interpreter (``TRITON_INTERPRET=1``, read at import) half tiles are upcast before ``tl.dot``.

Tiles: ``BLOCK_M`` rows per program; ``BLOCK_P`` / ``BLOCK_Q`` the chunk of a block's width;
``BLOCK_W`` the column block of the weight-gradient kernel.  ``PEFTCORE_TRITON_PHM_CONFIG``
(read at import) pins one config instead of autotuning, e.g.
``"BLOCK_M=64,BLOCK_P=64,BLOCK_Q=64,num_warps=4,num_stages=3"``; entries separated by ``;`` may
be prefixed by a kernel name (``fwd:``, ``dx:``, ``dw:``); keys a kernel lacks are ignored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..native.phm import check_like, check_rows_2d
from ..reference.phm import check_factors
from . import common
from .common import m_bucket, pow2, precision, store_dtype, upcast, upcast_dot

_INTERPRET, _SMEM_BUDGET = common.INTERPRET, common.SMEM_BUDGET
CONFIG_ENV = "PEFTCORE_TRITON_PHM_CONFIG"
FLOATS = common.FLOATS

# ---------------------------------------------------------------------------------------------
# Configs.  Educated guesses for H100, to be re-measured: the op is bound by reading x / dy, so
# the lists trade rows per program (fewer W_left / W_right re-reads, more registers for t3)
# against programs in flight.  Every config the pruner keeps for n·k in {1·1, 2·2, 3·3, 4·1, 4·8,
# 12·1, 16·8} compiles for sm_90 (Triton 3.9, ahead of time) without local memory.  The
# interpreter gets one config with tiles smaller than the test shapes, so every boundary path runs.
# ---------------------------------------------------------------------------------------------

_GPU_CONFIGS = {
    "fwd": [
        {"BLOCK_M": 64, "BLOCK_P": 64, "BLOCK_Q": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_P": 64, "BLOCK_Q": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 32, "BLOCK_P": 128, "BLOCK_Q": 128, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 16, "BLOCK_P": 128, "BLOCK_Q": 128, "num_warps": 4, "num_stages": 3},  # small M, large n·k
        {"BLOCK_M": 16, "BLOCK_P": 64, "BLOCK_Q": 64, "num_warps": 8, "num_stages": 2},  # very large n·n·k
    ],
    "dw": [
        {"BLOCK_M": 64, "BLOCK_W": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 128, "BLOCK_W": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_W": 128, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 32, "BLOCK_W": 128, "num_warps": 4, "num_stages": 4},
    ],
}
_GPU_CONFIGS["dx"] = [dict(c) for c in _GPU_CONFIGS["fwd"]]
_INTERP_CONFIGS = {
    "fwd": {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16, "num_warps": 4, "num_stages": 1},
    "dx": {"BLOCK_M": 16, "BLOCK_P": 16, "BLOCK_Q": 16, "num_warps": 4, "num_stages": 1},
    "dw": {"BLOCK_M": 16, "BLOCK_W": 16, "num_warps": 4, "num_stages": 1},
}
_TUNING = common.Tuning(CONFIG_ENV, _GPU_CONFIGS, _INTERP_CONFIGS)
_parse_pinned = _TUNING.parse  # "k=v,...;dx:k=v,..." -> {kernel or "*": {key: int}}
_configs = _TUNING.configs
_TILE_REGS = 96  # fp32 registers per thread the t3 / dt3 tiles may take before the kernel spills


def _smem_bytes(kernel: str, meta: dict, stages: int, elt: int, nk_pad: int) -> int:
    """Shared memory of a config's pipelined operand tiles (the dominant term)."""
    if kernel == "dw":
        return stages * meta["BLOCK_M"] * (meta["BLOCK_W"] * elt + nk_pad * 4)
    width = max(meta["BLOCK_P"], meta["BLOCK_Q"])
    return stages * (meta["BLOCK_M"] + nk_pad) * width * elt


def _tile_regs(kernel: str, meta: dict, warps: int, n_pad: int, nk_pad: int) -> int:
    """fp32 registers per thread of the [BLOCK_M, n_pad, nk_pad] tiles (t3; t3 and dt3 in dx)."""
    if kernel == "dw":
        return 0
    tiles = 2 if kernel == "dx" else 1
    return tiles * meta["BLOCK_M"] * n_pad * nk_pad // (32 * warps)


def _pruner(kernel: str, ptr: str):
    """early_config_prune: drop configs whose tiles overflow shared memory or the register budget."""

    def prune(configs, named_args, **kwargs):
        elt = named_args[ptr].element_size()
        n_pad, nk_pad = kwargs.get("N_PAD", 2), kwargs.get("NK_PAD", 16)

        def smem(c, stages):
            return _smem_bytes(kernel, c.kwargs, stages, elt, nk_pad)

        def regs(c):
            return _tile_regs(kernel, c.kwargs, c.num_warps, n_pad, nk_pad)

        def fits(c):
            return smem(c, c.num_stages) <= _SMEM_BUDGET and regs(c) <= _TILE_REGS

        # Nothing fits: the least register-hungry config, with stages cut until its tiles fit smem.
        return common.prune_to_budget(configs, fits, lambda c: (regs(c), smem(c, c.num_stages)), smem)

    return {"early_config_prune": prune}


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tf32_head(v):
    # Zeroing the low 13 mantissa bits leaves a TF32-exact head with v == head + (v - head) exactly.
    return (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot_f32(a, b, acc, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    # acc + a @ b for fp32 tiles.  With SPLIT, b holds upcast half values (exact in TF32) and a is
    # split in head + tail so that two TF32 dots give a nearly fp32-exact product.
    if SPLIT:
        head = _tf32_head(a)
        acc = tl.dot(head, b, acc, input_precision="tf32")
        acc = tl.dot(a - head, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _block_in(a_ptrs, f_ptrs, width, offs_w, mask_c, acc, F_STEP: tl.constexpr, BLOCK: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # acc [BLOCK_M, NK_PAD] + a block of rows [BLOCK_M, width] (a_ptrs: its first BLOCK columns) times
    # a factor [width, NK_PAD] (f_ptrs: its first BLOCK rows, F_STEP elements apart), BLOCK at a time.
    for w0 in range(0, width, BLOCK):
        mask_w = offs_w < width - w0
        a = tl.load(a_ptrs, mask=mask_w[None, :], other=0.0)
        f = tl.load(f_ptrs, mask=mask_w[:, None] & mask_c[None, :], other=0.0)
        acc = upcast_dot(a, f, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK
        f_ptrs += BLOCK * F_STEP
    return acc


@triton.jit
def _block_out(v, f_ptrs, out_rows, bias_ptr, col0, width, offs_w, mask_m, mask_c, F_STEP: tl.constexpr,
               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
               PRECISION: tl.constexpr):
    # Stores columns [col0, col0 + width) of out_rows (pointers to the rows' starts) = v [BLOCK_M, NK_PAD]
    # (fp32) times a factor [NK_PAD, width] (f_ptrs: its first BLOCK columns, F_STEP elements apart)
    # + bias, BLOCK columns at a time.  Output addresses are recomputed per chunk, not carried.
    for w0 in range(0, width, BLOCK):
        mask_w = offs_w < width - w0
        f = tl.load(f_ptrs, mask=mask_c[:, None] & mask_w[None, :], other=0.0).to(tl.float32)
        out = _dot_f32(v, f, tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32), SPLIT, PRECISION)
        if HAS_BIAS:
            out += tl.load(bias_ptr + col0 + w0 + offs_w, mask=mask_w, other=0.0).to(tl.float32)[None, :]
        tl.store(out_rows + (col0 + w0 + offs_w)[None, :], out.to(out_rows.dtype.element_ty),
                 mask=mask_m[:, None] & mask_w[None, :])
        f_ptrs += BLOCK * F_STEP


@triton.jit
def _rule_column(rule_ptr, b, offs_n, ci, mask_nc, PHM_N: tl.constexpr):
    # [N_PAD, NK_PAD] tile of rule[i, a, b] for one b, rows a and columns c = i·k + r (i = ci).
    return tl.load(rule_ptr + ci[None, :] * (PHM_N * PHM_N) + offs_n[:, None] * PHM_N + b,
                   mask=mask_nc, other=0.0).to(tl.float32)


@triton.autotune(configs=_configs("fwd"), prune_configs_by=_pruner("fwd", "x_ptr"),
                 key=["M_BUCKET", "P", "Q", "PHM_N", "RANK"])
@triton.jit
def _phm_fwd_kernel(
    x_ptr,  # [M, n·P] input, unit column stride
    rule_ptr,  # [n, n, n] rule
    wl_ptr,  # [n, P, k] W_left
    wr_ptr,  # [n, k, Q] W_right
    bias_ptr,  # [n·Q] bias (any tensor when HAS_BIAS is False)
    y_ptr,  # [M, n·Q] out
    t_ptr,  # [M, n, n, k] out: t[m, a, i, r] = Σ_p x[m, a, p] W_left[i, p, r]
    stride_xm, stride_ym,
    M, P, Q, M_BUCKET,
    PHM_N: tl.constexpr, RANK: tl.constexpr, N_PAD: tl.constexpr, NK_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    NK: tl.constexpr = PHM_N * RANK
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # Rows past the edge are wrapped rather than masked on load: they only feed unstored outputs.
    rm = (offs_m % M).to(tl.int64)
    offs_c = tl.arange(0, NK_PAD)
    mask_c = offs_c < NK
    ci = offs_c // RANK
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < PHM_N
    offs_p = tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    wl_cols = ci * (P * RANK) + offs_c % RANK  # W_left viewed as [P, n·k]: column c at i·P·k + r

    t3 = tl.zeros((BLOCK_M, N_PAD, NK_PAD), dtype=tl.float32)
    for a in range(PHM_N):
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (a * P + offs_p)[None, :]
        wl_ptrs = wl_ptr + offs_p[:, None] * RANK + wl_cols[None, :]
        acc = _block_in(x_ptrs, wl_ptrs, P, offs_p, mask_c, tl.zeros((BLOCK_M, NK_PAD), dtype=tl.float32),
                        RANK, BLOCK_P, UPCAST, PRECISION)
        t3 = tl.where((offs_n == a)[None, :, None], acc[:, None, :], t3)

    rows3 = offs_m.to(tl.int64)[:, None, None] * (PHM_N * NK)
    t_ptrs = t_ptr + rows3 + offs_n[None, :, None] * NK + offs_c[None, None, :]
    mask_nc = mask_n[:, None] & mask_c[None, :]
    tl.store(t_ptrs, t3.to(t_ptr.dtype.element_ty), mask=mask_m[:, None, None] & mask_nc[None, :, :])

    rows = offs_m.to(tl.int64)[:, None] * stride_ym
    for b in range(PHM_N):
        u = tl.sum(t3 * _rule_column(rule_ptr, b, offs_n, ci, mask_nc, PHM_N)[None, :, :], axis=1)
        wr_ptrs = wr_ptr + offs_c[:, None] * Q + offs_q[None, :]  # W_right viewed as [n·k, Q]
        _block_out(u, wr_ptrs, y_ptr + rows, bias_ptr, b * Q, Q, offs_q, mask_m, mask_c, 1, HAS_BIAS,
                   BLOCK_M, BLOCK_Q, SPLIT, PRECISION)


@triton.autotune(configs=_configs("dx"), prune_configs_by=_pruner("dx", "dy_ptr"),
                 key=["M_BUCKET", "P", "Q", "PHM_N", "RANK", "NEED_X", "STORE_DT", "STORE_U", "NEED_RULE"])
@triton.jit
def _phm_dx_bwd_kernel(
    dy_ptr,  # [M, n·Q] gradient of y, unit column stride
    t_ptr,  # [M, n, n·k] t from the forward (any float dtype)
    rule_ptr,  # [n, n, n] rule
    wl_ptr,  # [n, P, k] W_left
    wr_ptr,  # [n, k, Q] W_right
    dx_ptr,  # [M, n·P] out (NEED_X)
    dt_ptr,  # [M, n, n·k] fp32 out (STORE_DT): dt[m, a, c] = Σ_b rule[i, a, b] du[m, b, c]
    u_ptr,  # [M, n, n·k] fp32 out (STORE_U): u[m, b, c] = Σ_a rule[i, a, b] t[m, a, c]
    rpart_ptr,  # [programs, n, n, n·k] fp32 out (NEED_RULE): this program's Σ_m t[m, a, c] du[m, b, c]
    stride_dym, stride_dxm,
    M, P, Q, M_BUCKET,
    PHM_N: tl.constexpr, RANK: tl.constexpr, N_PAD: tl.constexpr, NK_PAD: tl.constexpr,
    NEED_X: tl.constexpr, STORE_DT: tl.constexpr, STORE_U: tl.constexpr, NEED_RULE: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    NK: tl.constexpr = PHM_N * RANK
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rm = (offs_m % M).to(tl.int64)
    offs_c = tl.arange(0, NK_PAD)
    mask_c = offs_c < NK
    ci = offs_c // RANK
    offs_n = tl.arange(0, N_PAD)
    mask_n = offs_n < PHM_N
    mask_nc = mask_n[:, None] & mask_c[None, :]
    offs_p = tl.arange(0, BLOCK_P)
    offs_q = tl.arange(0, BLOCK_Q)
    rows3 = offs_m.to(tl.int64)[:, None] * (PHM_N * NK)  # row offset into t, dt and u
    mask_mc = mask_m[:, None] & mask_c[None, :]

    if STORE_U or NEED_RULE:
        # Rows past M load as zeros, so they add nothing to the drule partial sums.
        t3 = tl.load(t_ptr + rows3[:, :, None] + offs_n[None, :, None] * NK + offs_c[None, None, :],
                     mask=mask_m[:, None, None] & mask_nc[None, :, :], other=0.0).to(tl.float32)
    dt3 = tl.zeros((BLOCK_M, N_PAD, NK_PAD), dtype=tl.float32)
    for b in range(PHM_N):
        du = tl.zeros((BLOCK_M, NK_PAD), dtype=tl.float32)
        if NEED_X or STORE_DT or NEED_RULE:  # u alone needs no pass over dy
            dy_ptrs = dy_ptr + rm[:, None] * stride_dym + (b * Q + offs_q)[None, :]
            wrt_ptrs = wr_ptr + offs_q[:, None] + offs_c[None, :] * Q  # W_rightᵀ tile [BLOCK_Q, NK_PAD]
            du = _block_in(dy_ptrs, wrt_ptrs, Q, offs_q, mask_c, du, 1, BLOCK_Q, UPCAST, PRECISION)
        rule_b = _rule_column(rule_ptr, b, offs_n, ci, mask_nc, PHM_N)  # [a, c]
        if NEED_X or STORE_DT:
            dt3 += du[:, None, :] * rule_b[None, :, :]
        if NEED_RULE:
            part = tl.sum(t3 * du[:, None, :], axis=0)  # [a, c]
            part_ptrs = rpart_ptr + pid.to(tl.int64) * (PHM_N * PHM_N * NK) + b * NK
            tl.store(part_ptrs + offs_n[:, None] * (PHM_N * NK) + offs_c[None, :], part, mask=mask_nc)
        if STORE_U:
            u = tl.sum(t3 * rule_b[None, :, :], axis=1)
            tl.store(u_ptr + rows3 + b * NK + offs_c[None, :], u, mask=mask_mc)

    if NEED_X or STORE_DT:
        wl_cols = ci * (P * RANK) + offs_c % RANK
        rows = offs_m.to(tl.int64)[:, None] * stride_dxm
        for a in range(PHM_N):
            dt = tl.sum(tl.where((offs_n == a)[None, :, None], dt3, 0.0), axis=1)
            if STORE_DT:
                tl.store(dt_ptr + rows3 + a * NK + offs_c[None, :], dt, mask=mask_mc)
            if NEED_X:
                wlt_ptrs = wl_ptr + wl_cols[:, None] + offs_p[None, :] * RANK  # W_leftᵀ tile [NK_PAD, BLOCK_P]
                _block_out(dt, wlt_ptrs, dx_ptr + rows, dx_ptr, a * P, P, offs_p, mask_m, mask_c, RANK, False,
                           BLOCK_M, BLOCK_P, SPLIT, PRECISION)


@triton.autotune(configs=_configs("dw"), prune_configs_by=_pruner("dw", "a_ptr"),
                 key=["R_BUCKET", "W", "PHM_N", "RANK"])
@triton.jit(do_not_specialize=["rows_per_split"])
def _phm_dw_bwd_kernel(
    a_ptr,  # [M, n·W] x (for dW_left, W = P) or dy (for dW_right, W = Q), unit column stride
    g_ptr,  # [M, n, n·k] fp32: dt (for dW_left) or u (for dW_right)
    part_ptr,  # [splits, n·k, W] fp32 out: Σ over the split's rows (m, j) of g[m, j, c] a[m, j·W + w]
    stride_am,
    ROWS, W, R_BUCKET, rows_per_split,
    PHM_N: tl.constexpr, RANK: tl.constexpr, NK_PAD: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # Rows are the ROWS = M·n pairs (m, j); a row of g is contiguous, a row of `a` is block j of row m.
    NK: tl.constexpr = PHM_N * RANK
    pid_w = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_w = offs_w < W
    offs_c = tl.arange(0, NK_PAD)
    mask_c = offs_c < NK
    lo = pid_s * rows_per_split
    hi = tl.minimum(lo + rows_per_split, ROWS)
    # Computed transposed, [NK_PAD, BLOCK_W]: the fp32 operand comes first, where _dot_f32 splits it.
    acc = tl.zeros((NK_PAD, BLOCK_W), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        mask_r = offs_r < hi
        m = (offs_r // PHM_N).to(tl.int64)
        j = offs_r % PHM_N
        av = tl.load(a_ptr + (m * stride_am + j * W)[:, None] + offs_w[None, :],
                     mask=mask_r[:, None] & mask_w[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs_r.to(tl.int64)[:, None] * NK + offs_c[None, :],
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        acc = _dot_f32(tl.trans(g), av, acc, SPLIT, PRECISION)
    part_ptrs = part_ptr + pid_s.to(tl.int64) * NK * W + offs_c[:, None] * W + offs_w[None, :]
    tl.store(part_ptrs, acc, mask=mask_c[:, None] & mask_w[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _dw_rows_per_split(rows: int, width: int, device: torch.device) -> int:
    """Rows per program of the weight-gradient kernel: enough programs for ~2 waves."""
    w_blocks = triton.cdiv(width, min(c.kwargs["BLOCK_W"] for c in _phm_dw_bwd_kernel.configs))
    return common.rows_per_split(rows, w_blocks, device)


def _check_factors(x, rule, w_left, w_right, **others):
    """Shapes, dtypes and devices of x, the factors and ``others`` (bias or dy: dtype and device
    only); returns contiguous factors and (n, P, k, Q).  The 2-D and same-dtype/device checks are
    the native backend's (:mod:`peftcore.native.phm`), so both backends raise the same errors."""
    check_rows_2d("x", x)
    if x.dtype not in FLOATS:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"x is on {x.device}: the Triton kernels run on CUDA devices "
                         "(or on the CPU with TRITON_INTERPRET=1 set before triton is imported)")
    for name, t in (("rule", rule), ("w_left", w_left), ("w_right", w_right), *others.items()):
        check_like(name, t, x, tuple(getattr(t, "shape", ())))  # shapes are checked below
    n, p, k, q = check_factors(rule, w_left, w_right)
    if x.shape[1] != n * p:
        raise ValueError(f"x must be [M, n·P = {n}·{p} = {n * p}] (w_left is {tuple(w_left.shape)}), "
                         f"got shape {tuple(x.shape)}")
    # The factors are tiny next to x: copying a non-contiguous one costs nothing measurable.
    return rule.contiguous(), w_left.contiguous(), w_right.contiguous(), (n, p, k, q)


def _pads(n: int, k: int) -> tuple[int, int]:
    # n is padded to 2 at least so that no register tile has a dimension of size 1.
    return pow2(n, 2), pow2(n * k, 16)


def phm_fwd(x, rule, w_left, w_right, bias, *, input_precision=None):
    """Forward: returns ``(y [M, n·Q], t [M, n, n, k])``, both in x's dtype.

    x ``[M, n·P]`` (unit column stride, any row stride), rule ``[n, n, n]``, w_left ``[n, P, k]``,
    w_right ``[n, k, Q]``, bias ``[n·Q]`` or None, all one dtype (fp32/fp16/bf16).  y = x H + bias
    with H = Σᵢ kron(rule[i], w_left[i] w_right[i]) (never built); t[m, a, i, r] =
    Σ_p x[m, a·P + p] w_left[i, p, r] is the intermediate :func:`phm_bwd` takes back.
    ``input_precision`` ("ieee" | "tf32" | "tf32x3") applies to fp32 inputs only.
    """
    others = {} if bias is None else {"bias": bias}
    rule, w_left, w_right, (n, P, k, Q) = _check_factors(x, rule, w_left, w_right, **others)
    if bias is not None:
        if tuple(bias.shape) != (n * Q,):
            raise ValueError(f"bias must be [out = n·Q = {n * Q}] or None, got shape {tuple(bias.shape)}")
        bias = bias.contiguous()
    prec = precision(x.dtype, common.check_precision(input_precision))
    M = x.shape[0]
    sdt = store_dtype(x.dtype)
    y = torch.empty((M, n * Q), device=x.device, dtype=sdt)
    t = torch.empty((M, n, n, k), device=x.device, dtype=sdt)
    if M > 0:
        n_pad, nk_pad = _pads(n, k)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
        _phm_fwd_kernel[grid](
            x, rule, w_left, w_right, bias if bias is not None else y, y, t,
            x.stride(0), y.stride(0),
            M, P, Q, m_bucket(M),
            PHM_N=n, RANK=k, N_PAD=n_pad, NK_PAD=nk_pad,
            HAS_BIAS=bias is not None, UPCAST=upcast(x.dtype), SPLIT=x.dtype != torch.float32, PRECISION=prec,
        )
    return y.to(x.dtype), t.to(x.dtype)


def phm_bwd(dy, x, t, rule, w_left, w_right, needs, *, input_precision=None):
    """Backward: returns ``(dx, drule, dw_left, dw_right, dbias)``, None where ``needs`` is False.

    dy ``[M, n·Q]`` (unit column stride); x, rule, w_left, w_right as given to :func:`phm_fwd` and
    t ``[M, n, n, k]`` as it returned.  ``needs`` = (x, rule, w_left, w_right, bias).  dx is in x's
    dtype, each factor's gradient in that factor's dtype, dbias in dy's.
    """
    rule, w_left, w_right, (n, P, k, Q) = _check_factors(x, rule, w_left, w_right, dy=dy)
    check_rows_2d("dy", dy)
    M = x.shape[0]
    if tuple(dy.shape) != (M, n * Q):
        raise ValueError(f"dy must be [M={M}, out = n·Q = {n * Q}], got shape {tuple(dy.shape)}")
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (M, n, n, k) or not t.is_floating_point():
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"t must be a float tensor [M={M}, n={n}, n={n}, k={k}] from phm_fwd, got {got}")
    if t.device != x.device:
        raise ValueError(f"t is on {t.device} but x is on {x.device}")
    if len(needs) != 5:
        raise ValueError(f"needs must be 5 bools (x, rule, w_left, w_right, bias), got {needs!r}")
    need_x, need_rule, need_wl, need_wr, need_bias = (bool(v) for v in needs)
    t = t.contiguous()
    prec, split = precision(x.dtype, common.check_precision(input_precision)), x.dtype != torch.float32
    dev, f32 = x.device, torch.float32
    dx = drule = dwl = dwr = dbias = None

    if need_bias:
        dbias = dy.sum(0, dtype=f32).to(dy.dtype)  # fp32 accumulation without an fp32 copy of dy
    if not (need_x or need_rule or need_wl or need_wr):
        return dx, drule, dwl, dwr, dbias
    if M == 0:
        zero = lambda w, need: torch.zeros_like(w) if need else None
        return zero(x, need_x), zero(rule, need_rule), zero(w_left, need_wl), zero(w_right, need_wr), dbias

    n_pad, nk_pad = _pads(n, k)
    dx_buf = torch.empty((M, n * P), device=dev, dtype=store_dtype(x.dtype)) if need_x else None
    dt = torch.empty((M, n, n * k), device=dev, dtype=f32) if need_wl else None
    u = torch.empty((M, n, n * k), device=dev, dtype=f32) if need_wr else None
    max_programs = triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in _phm_dx_bwd_kernel.configs))
    rpart = torch.empty((max_programs, n, n, n * k), device=dev, dtype=f32) if need_rule else None
    launched = []

    def grid(meta):
        # The last call is the launch that counts (autotuning may launch every config first).
        launched.append(triton.cdiv(M, meta["BLOCK_M"]))
        return (launched[-1],)

    spare = x  # stands in for the outputs that are not asked for (never written)
    _phm_dx_bwd_kernel[grid](
        dy, t, rule, w_left, w_right,
        dx_buf if need_x else spare, dt if need_wl else spare, u if need_wr else spare,
        rpart if need_rule else spare,
        dy.stride(0), dx_buf.stride(0) if need_x else 0,
        M, P, Q, m_bucket(M),
        PHM_N=n, RANK=k, N_PAD=n_pad, NK_PAD=nk_pad,
        NEED_X=need_x, STORE_DT=need_wl, STORE_U=need_wr, NEED_RULE=need_rule,
        UPCAST=upcast(x.dtype), SPLIT=split, PRECISION=prec,
    )
    if need_x:
        dx = dx_buf.to(x.dtype)
    if need_rule:
        # [programs, a, b, (i, r)] -> Σ over programs and r -> [i, a, b]
        total = rpart[: launched[-1]].sum(0).view(n, n, n, k).sum(-1)
        drule = total.permute(2, 0, 1).contiguous().to(rule.dtype)
    if need_wl:
        dwl = _dw(x, dt, n, k, P, prec, split).view(n, k, P).transpose(1, 2).contiguous().to(w_left.dtype)
    if need_wr:
        dwr = _dw(dy, u, n, k, Q, prec, split).view(n, k, Q).to(w_right.dtype)
    return dx, drule, dwl, dwr, dbias


def _dw(a, g, n, k, width, prec, split):
    """[n·k, width] fp32: Σ_{m, j} g[m, j, c] a[m, j·width + w] (deterministic split-M partial sums)."""
    rows = g.shape[0] * n
    if width == 0:
        return torch.zeros((n * k, 0), device=a.device, dtype=torch.float32)
    per_split = _dw_rows_per_split(rows, width, a.device)
    splits = triton.cdiv(rows, per_split)
    part = torch.empty((splits, n * k, width), device=a.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(width, meta["BLOCK_W"]), splits)
    _phm_dw_bwd_kernel[grid](
        a, g, part,
        a.stride(0),
        rows, width, m_bucket(rows), per_split,
        PHM_N=n, RANK=k, NK_PAD=_pads(n, k)[1], SPLIT=split, PRECISION=prec,
    )
    return part[0] if splits == 1 else part.sum(0)
