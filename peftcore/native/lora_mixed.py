"""The ``cpp`` (CPU) and ``cuda`` backends of ``lora_mixed_linear``, on the kernels of ``peftcore._C``.

Contract of :mod:`peftcore.reference.lora_mixed` (forward only, 2-D views)::

    lora_mixed_fwd(x [M, K], weight [N, K], bias [N] | None, lora_a [J, R, K], lora_b [J, N, R],
                   scaling fp32 [J], rows int32 [M]) -> y [M, N]

    y[m] = x[m] Wᵀ + b + scaling[j] · (x[m] A[j]ᵀ) B[j]ᵀ,   j = rows[m]  (j = -1: base only)

The base GEMM ``x Wᵀ + b`` stays with torch (MKL / cuBLAS); the kernels add the per-row low-rank
delta in place into the ``y`` torch returned.  Rows of one example are consecutive, so the batch is
described by its runs of equal adapter index (punica's SGMV "segments"): :func:`segments` (CPU)
and :func:`plan` (GPU: segments cut into tiles of at most ``block_m`` rows) compute them with a
handful of torch ops, no Python loop over segments and one host sync.

* CPU: the segments go to C++ as they come from ``torch.unique_consecutive`` (adapter, length),
  and C++ cuts them into work items of at most 32 rows.  One OpenMP region: every adapter the
  batch uses gets ``B[j]ᵀ`` once, then per work item and group of up to four rows
  ``xa = s · x A[j]ᵀ`` (SIMD dot products read straight from x) and ``y += xa B[j]ᵀ`` (SIMD row
  updates), all in registers.
* CUDA: the tile table of :func:`plan` (block_m 16 or 64); a shrink kernel (a block per (tile, rank
  block, K split) writes fp32 partials of ``x A[j]ᵀ``) and an expand kernel (a block per (tile,
  N block) sums the partials in order, scales and adds ``xa B[j]ᵀ`` into y).  The K split keeps
  decode batches (a handful of one-row tiles) from running on a handful of SMs.

Measured on the CPU (AMD EPYC Zen 4, fp32, K = N = 1024, r 16, example 0 base-only, the rest
random adapters; through ``lora_mixed_linear`` under no_grad; one thread, CPU time of the calling
thread (the two cores were shared with other jobs, so wall times were not reproducible), best of
5 rounds of ``torch.utils.benchmark`` medians; "floor" is ``F.linear`` alone):

==================================  =========  ===================  ====================
batch                               floor      cpp (delta)          reference (delta)
==================================  =========  ===================  ====================
8 examples x 256 tokens, 4 adapt.   38.5 ms    40.2 ms (+1.7)       44.0 ms (+5.5)
32 examples x 256 tokens, 8 adapt.  166.6 ms   176.1 ms (+9.5)      305.6 ms (+139.0)
32 examples x 1 token, 8 adapters   0.698 ms   0.810 ms (+0.11)     0.947 ms (+0.25)
==================================  =========  ===================  ====================

cpp costs 1.04-1.16x the floor, the reference 1.14-1.83x: it pays a gather, a scatter and a full
copy of y (``index_add`` is out of place) per adapter.  The kernel's prefill delta runs at ~70
GFLOP/s on one core, against ~87 for MKL doing the same two GEMMs for one adapter and no gather;
in decode the per-call transposes of each ``B[j]`` are a large part of it (kernel alone: 8 rows
over 8 adapters 38 us, 32 rows of one adapter 25 us).

:func:`plan` and :func:`check_inputs` are plain torch and shared with the Triton launcher
(:mod:`peftcore.kernels.lora_mixed`), so every backend sees the same tiles and the same errors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import (
    check_device_dtype,
    cuda_stream,
    dl,
    dtype_name,
    num_threads,
    require,
    rowwise,
)

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tile heights the CUDA kernels are compiled for (see lora_mixed_cuda.h).
CUDA_BLOCK_MS = (16, 64)


def _is_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_inputs(x, weight, bias, lora_a, lora_b, scaling, rows, *, contiguous_stacks: bool = True) -> None:
    """Raise TypeError/ValueError naming the first argument that breaks the backend contract.

    Shapes: x ``[M, K]`` with unit column stride, weight ``[N, K]``, bias ``[N]`` or None,
    lora_a ``[J, R, K]``, lora_b ``[J, N, R]`` (contiguous when ``contiguous_stacks``), scaling
    float32 ``[J]`` and rows int32 ``[M]``, both contiguous; all on x's device, the float tensors
    in x's dtype.  The values of ``rows`` are checked by :func:`plan`.
    """
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b),
                    ("scaling", scaling), ("rows", rows)):
        _is_tensor(name, t)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    if K > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have a unit column stride, got strides {x.stride()}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K={K}], got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    if lora_a.dim() != 3 or lora_a.shape[2] != K:
        raise ValueError(f"lora_a must be [J, R, K={K}], got shape {tuple(lora_a.shape)}")
    J, R = lora_a.shape[:2]
    if lora_b.dim() != 3 or tuple(lora_b.shape) != (J, N, R):
        raise ValueError(f"lora_b must be [J={J}, N={N}, R={R}], got shape {tuple(lora_b.shape)}")
    floats = {"weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        floats["bias"] = _is_tensor("bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be [N={N}] or None, got shape {tuple(bias.shape)}")
    for name, t in floats.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
    if contiguous_stacks:
        for name in ("lora_a", "lora_b"):
            if not floats[name].is_contiguous():
                raise ValueError(f"{name} must be contiguous (the kernels index the stack by adapter), "
                                 f"got strides {floats[name].stride()}")
    for name, t, dtype, n in (("scaling", scaling, torch.float32, J), ("rows", rows, torch.int32, M)):
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype_name(dtype)}, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _check_range(lo: int, hi: int, num_adapters: int) -> None:
    if lo < -1 or hi >= num_adapters:
        raise ValueError(f"rows values must be in [-1, {num_adapters}) (-1 = base only), got [{lo}, {hi}]")


def segments(rows: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The runs of equal ``rows``: ``(adapter int32 [S], length int64 [S])``, in order, -1 runs kept.

    Raises ValueError when a value of ``rows`` is outside [-1, num_adapters).
    """
    vals, counts = torch.unique_consecutive(rows, return_counts=True)
    if vals.numel():
        lo, hi = torch.aminmax(vals)
        _check_range(int(lo), int(hi), num_adapters)
    return vals, counts


def plan(rows: torch.Tensor, num_adapters: int, block_ms: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """Tile table of a batch: ``(tiles int32 [T, 3], block_m)``, on rows' device.

    Each tile is ``(first, end, adapter)``: rows ``[first, end)``, at most ``block_m`` consecutive
    rows of one segment (a maximal run of equal ``rows``); kernels with a fixed tile height mask
    rows with ``end``.  Segments of index -1 get no tiles.  ``block_m`` is the largest of
    ``block_ms`` whose tiles are at least half full on average (the smallest when none is): tall
    tiles for prefill, short ones for decode.

    Raises ValueError when a value of ``rows`` is outside [-1, num_adapters).  One host sync.
    """
    dev = rows.device
    if rows.numel() == 0:
        return torch.empty(0, 3, dtype=torch.int32, device=dev), min(block_ms)
    vals, counts = torch.unique_consecutive(rows, return_counts=True)
    active = vals >= 0
    used = torch.where(active, counts, 0)
    per_bm = [torch.where(active, (counts + (bm - 1)) // bm, 0) for bm in block_ms]
    stats = torch.stack([vals.min().long(), vals.max().long(), used.sum()] + [n.sum() for n in per_bm])
    lo, hi, n_rows, *n_tiles = stats.tolist()
    _check_range(lo, hi, num_adapters)
    pick = min(range(len(block_ms)), key=block_ms.__getitem__)
    for i, bm in enumerate(block_ms):
        if n_tiles[i] * bm <= 2 * n_rows and bm > block_ms[pick]:
            pick = i
    if not n_rows:
        return torch.empty(0, 3, dtype=torch.int32, device=dev), block_ms[pick]
    bm, ntiles, total = block_ms[pick], per_bm[pick], n_tiles[pick]
    ends = counts.cumsum(0)
    starts = ends - counts
    seg = torch.repeat_interleave(torch.arange(vals.shape[0], device=dev), ntiles, output_size=total)
    first_tile = ntiles.cumsum(0) - ntiles
    row0 = starts[seg] + (torch.arange(total, device=dev) - first_tile[seg]) * bm
    row1 = torch.minimum(row0 + bm, ends[seg])
    return torch.stack([row0, row1, vals[seg].long()], 1).to(torch.int32).contiguous(), bm


def lora_mixed_fwd(x, weight, bias, lora_a, lora_b, scaling, rows):
    """y ``[M, N]`` = x Wᵀ + b + scaling[j] · (x A[j]ᵀ) B[j]ᵀ per row, j = rows[m] (-1: base only).

    x ``[M, K]`` (unit column stride), weight ``[N, K]``, bias ``[N]`` or None, lora_a
    ``[J, R, K]`` and lora_b ``[J, N, R]`` contiguous, scaling float32 ``[J]``, rows int32 ``[M]``.
    CPU tensors: float32/float64 (OpenMP kernels); CUDA tensors: float32/float16/bfloat16 (CUDA
    kernels on the current stream of x's device).  Forward only: y carries no autograd graph.
    """
    check_inputs(x, weight, bias, lora_a, lora_b, scaling, rows)
    check_device_dtype("lora_mixed backend", x, CPU_DTYPES, CUDA_DTYPES)
    M, K = x.shape
    N = weight.shape[0]
    J, R = lora_a.shape[:2]
    ext = require(cuda=x.is_cuda)
    if x.is_cuda:
        batch, bm = plan(rows, J, CUDA_BLOCK_MS)
    else:
        batch = segments(rows, J)
    with torch.no_grad():
        y = F.linear(x, weight, bias)
    if not y.is_contiguous():
        y = y.contiguous()
    if M == 0 or N == 0 or K == 0 or R == 0 or batch[0].shape[0] == 0:
        return y
    x = rowwise(x)  # overlapping rows: fine to read, but the binding wants ld >= K
    stacks = (dl(x), dl(lora_a), dl(lora_b), dl(scaling))
    if not x.is_cuda:
        adapter, length = batch
        ext.lora_mixed_fwd(*stacks, dl(adapter), dl(length), dl(y), num_threads())
        return y
    T = batch.shape[0]
    nbytes = ext.cuda_lora_mixed_workspace(T, bm, K, R)
    ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if nbytes else None
    with torch.cuda.device(x.device):
        ext.cuda_lora_mixed_fwd(*stacks, dl(batch), bm, dl(y), dl(ws), cuda_stream(x))
    return y
