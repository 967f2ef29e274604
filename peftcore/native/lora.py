"""The ``cpp`` (CPU) and ``cuda`` backends of ``lora_linear``, on the kernels of ``peftcore._C``.

Same contract and math as :mod:`peftcore.reference.lora` (2-D views, same dropout mask)::

    lora_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed) -> (y, xa)
    lora_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs) -> (dx, dweight, dbias, da, db)

The base GEMMs (x Wᵀ + b, dy W, dy ᵀx) go through torch.  The extension does what torch cannot do
without materializing the dropout mask and the dropped input, and on the CPU fuses the rank-r
products around it so each pass is one parallel region:

* CPU forward: one pass over x computes ``xa = dropout(x) Aᵀ`` (mask hashed from (seed, m, k)) and
  adds ``scaling · xa Bᵀ`` into torch's ``y = x Wᵀ + b``.
* CPU backward: after torch's ``dx = dy W``, one pass over row chunks computes
  ``g = scaling · dy B``, ``dB = scaling · dyᵀ xa``, ``dx += dropout(g A)`` and
  ``dA = gᵀ dropout(x)``, hashing each mask bit once for both dx and dA.
* CUDA: the kernels do ``xa`` and the ``dx``/``dA`` pair; cuBLAS does the rank-r GEMMs.
* CPU bf16/fp16 (what CPU autocast hands the op): torch's half GEMMs and the C++ dropout-mask
  kernel, the reference's math and roundings (see ``_half_fwd``); the fused fp32 kernels above
  take fp32/fp64 only.

Why fuse on the CPU: every fork/join of a parallel region can wait a scheduler tick when the cores
are shared, and the unfused path has six extra regions per step.  Measured (2-core Zen 4, fp32,
x [2048, 1024], W 1024x1024 + bias, r 16, fwd+bwd, median over rounds where no other process
ran): frozen linear 39.2 ms, cpp 42.7 ms (p 0.1) / 42.9 ms (p 0), reference 136.9 ms (p 0.1) /
43.3 ms (p 0), cpp with torch's GEMMs at p 0 43.2 ms.  With other processes busy on the cores the
fused path kept ~1.3x the floor where the torch-GEMM path went to ~1.7x.

The backend is picked from ``x.device``: CPU tensors run the OpenMP kernels, CUDA tensors the CUDA
kernels on the current stream of x's device.  Every tensor is checked here (dtype, device, shape
against the others, layout) and goes to C++ as a DLPack capsule, which the binding checks again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference.rng import dropout_threshold
from . import (
    check_device_dtype,
    cuda_stream,
    dense,
    dl,
    num_threads,
    require,
    rowwise,
)

CPU_HALF = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.float32, torch.float64) + CPU_HALF
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Whether the kernels also run when p == 0 (no mask to hash), per device type.  CPU: the fused
# passes match torch's separate GEMMs on a quiet machine and beat them on a busy one (module
# docstring); CUDA: not measured on a GPU yet, so cuBLAS does every p == 0 product.
KERNEL_WITHOUT_DROPOUT = {"cpu": True, "cuda": False}


def _check(name: str, t: torch.Tensor, like: torch.Tensor, dims: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {like.dtype}")


KERNEL_CPU_DTYPES = (torch.float32, torch.float64)  # what the C++ kernels themselves take


def _check_x(x: torch.Tensor, cpu_dtypes=KERNEL_CPU_DTYPES) -> None:
    """x: 2-D, unit column stride, a dtype its device's kernels take (``cpu_dtypes`` on the CPU)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [M, K], got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have a unit column stride, got strides {x.stride()}")
    check_device_dtype("lora backend", x, cpu_dtypes, CUDA_DTYPES)


def down_fwd(x: torch.Tensor, lora_a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """xa ``[M, R]`` = dropout(x) ``[M, K]`` @ lora_aᵀ, the mask hashed in the kernel."""
    _check_x(x)
    x = rowwise(x)
    _check("lora_a", lora_a, x)
    M, K = x.shape
    R = lora_a.shape[0]
    if lora_a.shape[1] != K:
        raise ValueError(f"lora_a must be [R, {K}], got {tuple(lora_a.shape)}")
    a = dense(lora_a)
    thr = dropout_threshold(p)
    scale = 1.0 / (1.0 - p)
    xa = torch.empty(M, R, dtype=x.dtype, device=x.device)
    if x.is_cuda:
        ext = require(cuda=True)
        with torch.cuda.device(x.device):
            ext.cuda_down_fwd(dl(x), dl(a), dl(xa), seed, thr, scale, cuda_stream(x))
    else:
        require(cuda=False).down_fwd(dl(x), dl(a), dl(xa), seed, thr, scale, num_threads())
    return xa


def down_bwd(g, lora_a, x, dx, p, seed, need_a: bool):
    """``dx += dropout(g @ lora_a)`` in place (if dx is given) and return
    ``da = gᵀ @ dropout(x)`` ``[R, K]`` (if ``need_a``, else None).

    g ``[M, R]``, lora_a ``[R, K]``, x ``[M, K]`` (unit column stride), dx ``[M, K]`` or None.
    """
    _check_x(x)
    x = rowwise(x)
    _check("g", g, x)
    _check("lora_a", lora_a, x)
    M, K = x.shape
    R = lora_a.shape[0]
    if tuple(g.shape) != (M, R) or lora_a.shape[1] != K:
        raise ValueError(f"shapes: g {tuple(g.shape)}, lora_a {tuple(lora_a.shape)}, x {tuple(x.shape)}")
    if dx is not None:
        _check("dx", dx, x)
        if tuple(dx.shape) != (M, K) or (K > 1 and dx.stride(1) != 1) or (M > 1 and dx.stride(0) < K):
            raise ValueError(f"dx must be a [M, K] tensor with unit column stride, got {tuple(dx.shape)} {dx.stride()}")
    g = dense(g)
    a = dense(lora_a)
    thr = dropout_threshold(p)
    scale = 1.0 / (1.0 - p)
    if x.is_cuda:
        ext = require(cuda=True)
        da32 = torch.empty(R, K, dtype=torch.float32, device=x.device) if need_a else None
        nbytes = ext.cuda_down_bwd_workspace(M, K, R) if need_a else 0
        ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if nbytes else None
        with torch.cuda.device(x.device):
            ext.cuda_down_bwd(dl(g), dl(a), dl(x), dl(dx), dl(da32), seed, thr, scale, dl(ws), cuda_stream(x))
        return da32.to(lora_a.dtype) if need_a else None
    da = torch.empty(R, K, dtype=x.dtype) if need_a else None
    require(cuda=False).down_bwd(dl(g), dl(a), dl(x), dl(dx), dl(da), seed, thr, scale, num_threads())
    return da


def keep_mask(m: int, k: int, p: float, seed: int) -> torch.Tensor:
    """The dropout keep-mask ``[m, k]`` (bool) of the shared counter-based RNG, from the C++ kernel."""
    mask = torch.empty(m, k, dtype=torch.uint8)
    if m and k:
        require(cuda=False).keep_mask(dl(mask), seed, dropout_threshold(p), num_threads())
    return mask.view(torch.bool)


def _dropped(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    # x * keep / (1 - p) with the reference's roundings: the product by keep is exact, the scale rounds once
    return x.mul(keep).mul_(1.0 / (1.0 - p))


# Half precision on the CPU (what CPU autocast hands the op): torch's bf16/fp16 GEMMs (fp32
# accumulation, AVX-512 BF16 where the CPU has it) and the C++ kernel for the dropout mask, built
# once per pass (the reference hashes it with int64 tensor ops: at 2048 x 1024, p 0.1, bf16,
# fwd+bwd 191 ms against 26.7 ms here and 13.6 ms for the frozen linear; benchmarks/results/
# lora_cpu_bf16.md).  Same math and roundings as the reference.


def _half_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed):
    y = F.linear(x, weight, bias)
    xd = _dropped(x, keep_mask(x.shape[0], x.shape[1], p, seed), p) if p else x
    xa = torch.mm(xd, lora_a.t())
    y.addmm_(xa, lora_b.t(), alpha=scaling)
    return y, xa


def _half_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs):
    need_x, need_w, need_bias, need_a, need_b = needs
    dx = dweight = dbias = da = db = None
    keep = keep_mask(x.shape[0], x.shape[1], p, seed) if p and (need_x or need_a) else None
    if need_x or need_a:
        g = torch.mm(dy, lora_b).mul_(scaling)  # [M, R]
    if need_x:
        ga = torch.mm(g, lora_a)
        dx = torch.mm(dy, weight).add_(_dropped(ga, keep, p) if p else ga)
    if need_a:
        da = torch.mm(g.t(), _dropped(x, keep, p) if p else x)
    if need_b:
        db = torch.mm(dy.t(), xa).mul_(scaling)
    if need_w:
        dweight = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dweight, dbias, da, db


def _use_kernel(x: torch.Tensor, p: float) -> bool:
    return p != 0.0 or KERNEL_WITHOUT_DROPOUT["cuda" if x.is_cuda else "cpu"]


def _cpu_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed):
    """One pass over x: xa = dropout(x) Aᵀ and y += scaling · xa Bᵀ, after torch's y = x Wᵀ + b."""
    x = rowwise(x)
    M = x.shape[0]
    R = lora_a.shape[0]
    a, b = dense(lora_a), dense(lora_b)
    y = F.linear(x, weight, bias)
    if not y.is_contiguous():  # F.linear returns a fresh [M, N]; be sure before writing into it
        y = y.contiguous()
    xa = torch.empty(M, R, dtype=x.dtype)
    require(cuda=False).down_fwd(
        dl(x), dl(a), dl(xa), seed, dropout_threshold(p), 1.0 / (1.0 - p), num_threads(), y=dl(y), b=dl(b),
        scaling=float(scaling),
    )
    return y, xa


def _cpu_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, need_x, need_a, need_b):
    """torch's dx = dy W, then one pass for dx += dropout(g A), dA, dB with g = scaling · dy B."""
    K = x.shape[1]
    R, N = lora_a.shape[0], lora_b.shape[0]
    if N > 1 and dy.stride(1) != 1:
        dy = dy.contiguous()
    x, dy = rowwise(x), rowwise(dy)
    xa, a, b = dense(xa), dense(lora_a), dense(lora_b)
    dx = torch.mm(dy, weight) if need_x else None  # fresh and contiguous: the kernel adds into it
    da = torch.empty(R, K, dtype=x.dtype) if need_a else None
    db = torch.empty(N, R, dtype=x.dtype) if need_b else None
    require(cuda=False).lora_bwd(
        dl(dy), dl(b), dl(xa), dl(a), dl(x), dl(dx), dl(da), dl(db), seed, dropout_threshold(p), 1.0 / (1.0 - p),
        float(scaling), num_threads(),
    )
    return dx, da, db


def _check_shapes(x, weight, bias, lora_a, lora_b) -> tuple[int, int, int, int]:
    """(M, K, N, R) after checking weight ``[N, K]``, bias ``[N]`` or None, lora_a ``[R, K]`` and
    lora_b ``[N, R]`` against x ``[M, K]`` (tensors on x's device in x's dtype)."""
    _check("weight", weight, x)
    _check("lora_a", lora_a, x)
    _check("lora_b", lora_b, x)
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must be [N, K={K}] for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if lora_a.shape[1] != K:
        raise ValueError(f"lora_a must be [R, K={K}] for x {tuple(x.shape)}, got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (N, R):
        raise ValueError(f"lora_b must be [N={N}, R={R}] for weight {tuple(weight.shape)} and lora_a "
                         f"{tuple(lora_a.shape)}, got {tuple(lora_b.shape)}")
    if bias is not None:
        _check("bias", bias, x, dims=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must be [N={N}] or None, got {tuple(bias.shape)}")
    return M, K, N, R


def lora_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed):
    """y ``[M, N]`` = x Wᵀ + b + scaling · xa Bᵀ and xa ``[M, R]`` = dropout(x) Aᵀ.

    x ``[M, K]`` (unit column stride), weight ``[N, K]``, bias ``[N]`` or None, lora_a ``[R, K]``,
    lora_b ``[N, R]``, all on one device in one dtype.
    """
    _check_x(x, CPU_DTYPES)
    _check_shapes(x, weight, bias, lora_a, lora_b)
    if not x.is_cuda and x.dtype in CPU_HALF:
        return _half_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed)
    if not _use_kernel(x, p):
        xa = torch.mm(x, lora_a.t())
    elif x.is_cuda:
        xa = down_fwd(x, lora_a, p, seed)
    else:
        return _cpu_fwd(x, weight, bias, lora_a, lora_b, scaling, p, seed)
    y = F.linear(x, weight, bias)
    y.addmm_(xa, lora_b.t(), alpha=scaling)
    return y, xa


def lora_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs):
    """Gradients (dx, dweight, dbias, da, db); a gradient not in ``needs`` is None.

    dy ``[M, N]``, xa ``[M, R]`` from :func:`lora_fwd`, the other tensors as there.
    """
    need_x, need_w, need_bias, need_a, need_b = needs
    dx = dweight = dbias = da = db = None
    _check_x(x, CPU_DTYPES)
    M, K, N, R = _check_shapes(x, weight, None, lora_a, lora_b)
    _check("dy", dy, x)
    _check("xa", xa, x)
    if tuple(dy.shape) != (M, N):
        raise ValueError(f"dy must be [M={M}, N={N}], got {tuple(dy.shape)}")
    if tuple(xa.shape) != (M, R):
        raise ValueError(f"xa must be [M={M}, R={R}], got {tuple(xa.shape)}")
    if not x.is_cuda and x.dtype in CPU_HALF:
        return _half_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, needs)
    if (need_x or need_a or need_b) and x.device.type == "cpu" and _use_kernel(x, p):
        dx, da, db = _cpu_bwd(dy, x, xa, weight, lora_a, lora_b, scaling, p, seed, need_x, need_a, need_b)
    else:
        if need_x or need_a:
            g = torch.mm(dy, lora_b)  # [M, R]
            g.mul_(scaling)
            if need_x:
                dx = torch.mm(dy, weight)  # [M, K], fresh and contiguous: the kernel adds into it
            if _use_kernel(x, p):
                da = down_bwd(g, lora_a, x, dx, p, seed, need_a)
            else:
                if need_x:
                    dx.addmm_(g, lora_a)
                if need_a:
                    da = torch.mm(g.t(), x)
        if need_b:
            db = torch.mm(dy.t(), xa)
            db.mul_(scaling)
    if need_w:
        dweight = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(0)
    return dx, dweight, dbias, da, db
