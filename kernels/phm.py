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

import functools
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CONFIG_ENV = "PEFTCORE_TRITON_PHM_CONFIG"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)

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
_ALL_KEYS = {"BLOCK_M", "BLOCK_P", "BLOCK_Q", "BLOCK_W", "num_warps", "num_stages"}


def _parse_pinned(text: str) -> dict[str, dict[str, int]]:
    """``"k=v,...;dx:k=v,..."`` -> {kernel or "*": {key: int}}; raises on unknown keys/kernels."""
    out: dict[str, dict[str, int]] = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, body = entry.rpartition(":")
        name = name.strip() or "*"
        if name != "*" and name not in _GPU_CONFIGS:
            raise ValueError(f"{CONFIG_ENV}: unknown kernel {name!r} (one of {', '.join(_GPU_CONFIGS)})")
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, _, val = item.partition("=")
            key = key.strip()
            if key not in _ALL_KEYS:
                raise ValueError(f"{CONFIG_ENV}: unknown key {key!r} (one of {', '.join(sorted(_ALL_KEYS))})")
            try:
                out.setdefault(name, {})[key] = int(val)
            except ValueError:
                raise ValueError(f"{CONFIG_ENV}: {key} must be an integer, got {val.strip()!r}") from None
    return out


def _configs(kernel: str) -> list[triton.Config]:
    base = [_INTERP_CONFIGS[kernel]] if _INTERPRET else _GPU_CONFIGS[kernel]
    pinned = _parse_pinned(os.environ.get(CONFIG_ENV, ""))
    if "*" in pinned or kernel in pinned:
        merged = dict(base[0])
        for src in (pinned.get("*", {}), pinned.get(kernel, {})):
            merged.update({k: v for k, v in src.items() if k in merged})
        base = [merged]
    configs = []
    for c in base:
        c = dict(c)
        warps, stages = c.pop("num_warps"), c.pop("num_stages")
        configs.append(triton.Config(c, num_warps=warps, num_stages=stages))
    return configs


_SMEM_BUDGET = 220 * 1024  # H100: 227 KiB of shared memory per block, less some for layout conversions
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

        def fits(c):
            smem = _smem_bytes(kernel, c.kwargs, c.num_stages, elt, nk_pad)
            return smem <= _SMEM_BUDGET and _tile_regs(kernel, c.kwargs, c.num_warps, n_pad, nk_pad) <= _TILE_REGS

        kept = [c for c in configs if fits(c)]
        if kept:
            return kept
        # Nothing fits: the least register-hungry config, with stages cut until its tiles fit smem.
        c = min(configs, key=lambda c: (_tile_regs(kernel, c.kwargs, c.num_warps, n_pad, nk_pad),
                                        _smem_bytes(kernel, c.kwargs, c.num_stages, elt, nk_pad)))
        stages = c.num_stages
        while stages > 1 and _smem_bytes(kernel, c.kwargs, stages, elt, nk_pad) > _SMEM_BUDGET:
            stages -= 1
        return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages)]

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
        acc = tl.zeros((BLOCK_M, NK_PAD), dtype=tl.float32)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + (a * P + offs_p)[None, :]
        wl_ptrs = wl_ptr + offs_p[:, None] * RANK + wl_cols[None, :]
        for p0 in range(0, P, BLOCK_P):
            mask_p = offs_p < P - p0
            xt = tl.load(x_ptrs, mask=mask_p[None, :], other=0.0)
            wl = tl.load(wl_ptrs, mask=mask_p[:, None] & mask_c[None, :], other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wl = wl.to(tl.float32)
            acc = tl.dot(xt, wl, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_P
            wl_ptrs += BLOCK_P * RANK
        t3 = tl.where((offs_n == a)[None, :, None], acc[:, None, :], t3)

    rows3 = offs_m.to(tl.int64)[:, None, None] * (PHM_N * NK)
    t_ptrs = t_ptr + rows3 + offs_n[None, :, None] * NK + offs_c[None, None, :]
    mask_nc = mask_n[:, None] & mask_c[None, :]
    tl.store(t_ptrs, t3.to(t_ptr.dtype.element_ty), mask=mask_m[:, None, None] & mask_nc[None, :, :])

    rows = offs_m.to(tl.int64)[:, None] * stride_ym
    for b in range(PHM_N):
        u = tl.sum(t3 * _rule_column(rule_ptr, b, offs_n, ci, mask_nc, PHM_N)[None, :, :], axis=1)
        wr_ptrs = wr_ptr + offs_c[:, None] * Q + offs_q[None, :]  # W_right viewed as [n·k, Q]
        for q0 in range(0, Q, BLOCK_Q):
            mask_q = offs_q < Q - q0
            wr = tl.load(wr_ptrs, mask=mask_c[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
            y = _dot_f32(u, wr, tl.zeros((BLOCK_M, BLOCK_Q), dtype=tl.float32), SPLIT, PRECISION)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + b * Q + q0 + offs_q, mask=mask_q, other=0.0)
                y += bias.to(tl.float32)[None, :]
            tl.store(y_ptr + rows + (b * Q + q0 + offs_q)[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & mask_q[None, :])
            wr_ptrs += BLOCK_Q


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
            for q0 in range(0, Q, BLOCK_Q):
                mask_q = offs_q < Q - q0
                g = tl.load(dy_ptrs, mask=mask_q[None, :], other=0.0)
                wrt = tl.load(wrt_ptrs, mask=mask_q[:, None] & mask_c[None, :], other=0.0)
                if UPCAST:
                    g = g.to(tl.float32)
                    wrt = wrt.to(tl.float32)
                du = tl.dot(g, wrt, du, input_precision=PRECISION)
                dy_ptrs += BLOCK_Q
                wrt_ptrs += BLOCK_Q
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
                for p0 in range(0, P, BLOCK_P):
                    mask_p = offs_p < P - p0
                    wlt = tl.load(wlt_ptrs, mask=mask_c[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
                    dx = _dot_f32(dt, wlt, tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32), SPLIT, PRECISION)
                    tl.store(dx_ptr + rows + (a * P + p0 + offs_p)[None, :], dx.to(dx_ptr.dtype.element_ty),
                             mask=mask_m[:, None] & mask_p[None, :])
                    wlt_ptrs += BLOCK_P * RANK


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


def _precision(dtype: torch.dtype, input_precision: str | None) -> str:
    if input_precision is not None and input_precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"input_precision must be 'ieee', 'tf32' or 'tf32x3', got {input_precision!r}")
    if dtype != torch.float32:
        return "tf32"  # ignored by tl.dot for half operands; one value avoids a second compile
    if input_precision is None:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return input_precision


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype in (torch.float16, torch.bfloat16)


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    # The interpreter truncates fp32 -> bf16 in-kernel casts, which doubles the rounding error;
    # there the kernels store fp32 and torch rounds.
    return torch.float32 if _INTERPRET and dtype == torch.bfloat16 else dtype


def _pow2(n: int, least: int) -> int:
    return max(least, triton.next_power_of_2(n))


def _m_bucket(m: int) -> int:
    # Autotune key: configs are re-tuned per power-of-two bucket of M, not per exact M.
    return min(_pow2(m, 16), 1 << 20)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so that tests see several row splits


def _dw_rows_per_split(rows: int, width: int, device: torch.device) -> int:
    """Rows per program of the weight-gradient kernel: enough programs for ~2 waves."""
    gran = 16 if _INTERPRET else 128
    w_blocks = triton.cdiv(width, min(c.kwargs["BLOCK_W"] for c in _phm_dw_bwd_kernel.configs))
    splits = max(1, triton.cdiv(2 * _num_sms(device), w_blocks))
    return max(gran, triton.cdiv(triton.cdiv(rows, splits), gran) * gran)


def _check_2d(name: str, t, rows_hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{rows_hint}], got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride, got strides {t.stride()}")


def _check_factors(x, rule, w_left, w_right, **others):
    """Shapes, dtypes and devices of x, the factors and ``others`` (bias or dy: dtype and device
    only); returns contiguous factors and (n, P, k, Q)."""
    _check_2d("x", x, "M, in")
    if x.dtype not in FLOATS:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"x is on {x.device}: the Triton kernels run on CUDA devices "
                         "(or on the CPU with TRITON_INTERPRET=1 set before triton is imported)")
    for name, t in (("rule", rule), ("w_left", w_left), ("w_right", w_right), *others.items()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all inputs must share a dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must share a device")
    if rule.dim() != 3 or not (rule.shape[0] == rule.shape[1] == rule.shape[2]) or rule.shape[0] < 1:
        raise ValueError(f"rule must be [n, n, n] with n = phm_dim >= 1, got shape {tuple(rule.shape)}")
    n = rule.shape[0]
    if w_left.dim() != 3 or w_left.shape[0] != n or w_left.shape[2] < 1:
        raise ValueError(f"w_left must be [n={n}, in/n, rank], got shape {tuple(w_left.shape)}")
    p, k = w_left.shape[1], w_left.shape[2]
    if w_right.dim() != 3 or w_right.shape[0] != n or w_right.shape[1] != k:
        raise ValueError(f"w_right must be [n={n}, rank={k}, out/n], got shape {tuple(w_right.shape)}")
    if x.shape[1] != n * p:
        raise ValueError(f"x must be [M, n·P = {n}·{p} = {n * p}] (w_left is {tuple(w_left.shape)}), "
                         f"got shape {tuple(x.shape)}")
    # The factors are tiny next to x: copying a non-contiguous one costs nothing measurable.
    return rule.contiguous(), w_left.contiguous(), w_right.contiguous(), (n, p, k, w_right.shape[2])


def _pads(n: int, k: int) -> tuple[int, int]:
    # n is padded to 2 at least so that no register tile has a dimension of size 1.
    return _pow2(n, 2), _pow2(n * k, 16)


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
    prec = _precision(x.dtype, input_precision)
    M = x.shape[0]
    sdt = _store_dtype(x.dtype)
    y = torch.empty((M, n * Q), device=x.device, dtype=sdt)
    t = torch.empty((M, n, n, k), device=x.device, dtype=sdt)
    if M > 0:
        n_pad, nk_pad = _pads(n, k)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
        _phm_fwd_kernel[grid](
            x, rule, w_left, w_right, bias if bias is not None else y, y, t,
            x.stride(0), y.stride(0),
            M, P, Q, _m_bucket(M),
            PHM_N=n, RANK=k, N_PAD=n_pad, NK_PAD=nk_pad,
            HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype), SPLIT=x.dtype != torch.float32, PRECISION=prec,
        )
    return y.to(x.dtype), t.to(x.dtype)


def phm_bwd(dy, x, t, rule, w_left, w_right, needs, *, input_precision=None):
    """Backward: returns ``(dx, drule, dw_left, dw_right, dbias)``, None where ``needs`` is False.

    dy ``[M, n·Q]`` (unit column stride); x, rule, w_left, w_right as given to :func:`phm_fwd` and
    t ``[M, n, n, k]`` as it returned.  ``needs`` = (x, rule, w_left, w_right, bias).  dx is in x's
    dtype, each factor's gradient in that factor's dtype, dbias in dy's.
    """
    rule, w_left, w_right, (n, P, k, Q) = _check_factors(x, rule, w_left, w_right, dy=dy)
    _check_2d("dy", dy, "M, out")
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
    prec, split = _precision(x.dtype, input_precision), x.dtype != torch.float32
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
    dx_buf = torch.empty((M, n * P), device=dev, dtype=_store_dtype(x.dtype)) if need_x else None
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
        M, P, Q, _m_bucket(M),
        PHM_N=n, RANK=k, N_PAD=n_pad, NK_PAD=nk_pad,
        NEED_X=need_x, STORE_DT=need_wl, STORE_U=need_wr, NEED_RULE=need_rule,
        UPCAST=_upcast(x.dtype), SPLIT=split, PRECISION=prec,
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
        rows, width, _m_bucket(rows), per_split,
        PHM_N=n, RANK=k, NK_PAD=_pads(n, k)[1], SPLIT=split, PRECISION=prec,
    )
    return part[0] if splits == 1 else part.sum(0)
