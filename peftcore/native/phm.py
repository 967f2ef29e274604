"""The ``cpp`` (CPU) and ``cuda`` backends of ``phm_linear``, on the kernels of ``peftcore._C``.

Same contract and intermediates as :mod:`peftcore.reference.phm` (2-D views)::

    phm_fwd(x, rule, w_left, w_right, bias) -> (y, t)
    phm_bwd(dy, x, t, rule, w_left, w_right, needs) -> (dx, drule, dw_left, dw_right, dbias)

with n = phm_dim, P = in/n, Q = out/n, k = rank, x ``[M, n·P]``, rule ``[n, n, n]``, w_left
``[n, P, k]``, w_right ``[n, k, Q]``, bias ``[n·Q]`` or None, y ``[M, n·Q]``, t ``[M, n, n, k]``.

Design: the Kronecker weight H ``[in, out]`` is never built.  Per row, x is split into n segments
of P; ``t[a][i][r]`` is the dot of segment a with column r of ``W_left[i]``; the rule mixes the
segments, ``u[b][i][r] = Σ_a rule[i][a][b] t[a][i][r]``; segment b of y is ``bias_b + Σ_{i,r}
u[b][i][r] W_right[i][r][:]``.  That is n·k·(in + out) multiply-adds per row forward and twice
that backward, against in·out and 2·in·out for a dense layer: for Compacter's factors (n 4, k 1)
the op is bound by reading x and dy.

* CPU forward: OpenMP over 4-row blocks; the dots run against a zero-padded transposed copy of
  W_left ``[n·k, P]`` so each is a unit-stride SIMD loop, y is written by a 4-row axpy over
  W_right starting from the bias, and t ``[M, n, n, k]`` is written for the backward.
* CPU backward: OpenMP over row chunks fixed by the shape.  Per 4-row block, one sweep over dy
  gives ``du = dy · W_rightᵀ`` per segment while the rows sit in L1 for the second sweep
  (``dW_right += uᵀ dy``, ``dbias += dy``); ``drule += t du``; ``dt`` is the rule mix of du; then
  one sweep over x writes dx (axpy over the transposed W_left) and adds ``dtᵀ x`` into dW_left.
  The weight gradients are summed per chunk and the chunks are added in a fixed order, so the
  result does not depend on the thread count.  Only what ``needs`` asks for is computed.
* CUDA: the same factorization, a 256-thread block per tile of rows; t, u, du, dt and the rule in
  shared memory, W_left/W_right staged there too when they fit (else read through the read-only
  cache); fp32 accumulation for half inputs; the weight gradients as fp32 per-chunk partials in a
  workspace, summed in chunk order by a second kernel (deterministic, no atomics).  t and the
  gradients are returned in the input dtype, as the reference does.

Measured with ``python -m tests.test_native_phm 2`` (2-core AMD EPYC Zen 4 VM shared with other
jobs, load average 0.9 during the run; fp32, M = 2048, fwd+bwd with x and every parameter
requiring grad; torch.utils.benchmark medians, providers interleaved over 5 rounds; ms):

===================  ===============  ======  =========  =========  =============
in -> out (n, k)     dense nn.Linear  cpp     reference  cpp/dense  reference/cpp
===================  ===============  ======  =========  =========  =============
1024 -> 32 (4, 1)    5.45             2.23    11.9       0.41       5.3
32 -> 1024 (4, 1)    5.52             1.59    5.74       0.29       3.6
768 -> 48 (4, 1)     5.33             1.85    8.19       0.35       4.4
4096 -> 4096 (4, 8)  1902             65.1    161        0.03       2.5
===================  ===============  ======  =========  =========  =============

The target (within 1.1x of the dense layer) holds with room: the op reads x and dy once each and
writes y and dx once, as the dense layer does, with 1/8 of its arithmetic or less.  Over four runs
at load 0.9 to 2.3, cpp/dense ranged 0.29 to 0.58 for the three Compacter shapes: the fresh
8 MB output of a call sometimes comes from new pages, and faulting them in costs about as much as
the kernel (32 -> 1024 alone, quiet: forward 0.32 ms, backward 0.57 ms at the median, 3 ms at the
90th percentile of single-thread forwards).

The backend is picked from ``x.device``: CPU tensors run the OpenMP kernels, CUDA tensors the CUDA
kernels on the current stream of x's device.  Every tensor is checked (type, dtype, device,
shape, layout) before it goes to C++ as a DLPack capsule, which the binding checks again.
"""

from __future__ import annotations

import torch

from . import (
    check_device_dtype,
    cuda_stream,
    dense,
    dl,
    num_threads,
    require,
    rowwise,
)

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_like(name: str, t, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    """t is a tensor on x's device, in x's dtype, of ``shape``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must share a device")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all inputs must share a dtype")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_rows_2d(name: str, t) -> None:
    """t is a 2-D tensor whose columns are unit-stride (any row stride)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, features], got shape {list(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have a unit column stride (last dim contiguous), got strides {t.stride()}")


def _dims(x, rule, w_left, w_right) -> tuple[int, int, int, int, int]:
    """(M, n, P, Q, k) after checking x and the factors."""
    check_rows_2d("x", x)
    check_device_dtype("phm_linear backend", x, CPU_DTYPES, CUDA_DTYPES)
    if not isinstance(rule, torch.Tensor) or rule.dim() != 3 or not rule.shape[0] == rule.shape[1] == rule.shape[2]:
        raise ValueError(f"rule must be a [n, n, n] tensor, got {getattr(rule, 'shape', type(rule).__name__)}")
    n = rule.shape[0]
    if n < 1:
        raise ValueError("rule must be [n, n, n] with n = phm_dim >= 1, got n = 0")
    if not isinstance(w_left, torch.Tensor) or w_left.dim() != 3 or w_left.shape[0] != n:
        raise ValueError(f"w_left must be [n={n}, in/n, rank], got {getattr(w_left, 'shape', type(w_left).__name__)}")
    P, k = w_left.shape[1], w_left.shape[2]
    if k < 1:
        raise ValueError(f"w_left must have rank >= 1, got shape {list(w_left.shape)}")
    if x.shape[1] != n * P:
        raise ValueError(f"x must be [M, n·P = {n * P}] for w_left {list(w_left.shape)}, got {list(x.shape)}")
    if not isinstance(w_right, torch.Tensor) or w_right.dim() != 3 or tuple(w_right.shape[:2]) != (n, k):
        raise ValueError(f"w_right must be [n={n}, rank={k}, out/n], got {getattr(w_right, 'shape', type(w_right).__name__)}")
    Q = w_right.shape[2]
    for name, t in (("rule", rule), ("w_left", w_left), ("w_right", w_right)):
        check_like(name, t, x, tuple(t.shape))
    return x.shape[0], n, P, Q, k


def phm_fwd(x, rule, w_left, w_right, bias):
    """y ``[M, n·Q]`` = x H + bias and t ``[M, n, n, k]`` (see the module docstring).

    x ``[M, n·P]`` with a unit column stride; rule ``[n, n, n]``; w_left ``[n, P, k]``; w_right
    ``[n, k, Q]``; bias ``[n·Q]`` or None; all on one device in one dtype.
    """
    M, n, P, Q, k = _dims(x, rule, w_left, w_right)
    if bias is not None:
        check_like("bias", bias, x, (n * Q,))
        bias = dense(bias)
    x = rowwise(x)
    rule, w_left, w_right = dense(rule), dense(w_left), dense(w_right)
    y = torch.empty(M, n * Q, dtype=x.dtype, device=x.device)
    t = torch.empty(M, n, n, k, dtype=x.dtype, device=x.device)
    if x.is_cuda:
        ext = require(cuda=True)
        wlt = w_left.transpose(1, 2).contiguous()  # [n, k, P]: unit-stride reads in the kernels
        with torch.cuda.device(x.device):
            ext.cuda_phm_fwd(dl(x), dl(rule), dl(wlt), dl(w_right), dl(bias), dl(y), dl(t), cuda_stream(x))
    else:
        require(cuda=False).phm_fwd(dl(x), dl(rule), dl(w_left), dl(w_right), dl(bias), dl(y), dl(t), num_threads())
    return y, t


def phm_bwd(dy, x, t, rule, w_left, w_right, needs):
    """Gradients ``(dx, drule, dw_left, dw_right, dbias)`` of :func:`phm_fwd`.

    dy ``[M, n·Q]`` (unit column stride), x and the factors as in :func:`phm_fwd`, t
    ``[M, n, n, k]`` from it; ``needs`` is 5 bools for (x, rule, w_left, w_right, bias) and a
    gradient not needed comes back as None.  Shapes and dtypes are those of the inputs.
    """
    if len(needs) != 5:
        raise ValueError(f"needs must be 5 bools for (x, rule, w_left, w_right, bias), got {needs!r}")
    need_x, need_rule, need_wl, need_wr, need_bias = (bool(v) for v in needs)
    M, n, P, Q, k = _dims(x, rule, w_left, w_right)
    check_rows_2d("dy", dy)
    check_like("dy", dy, x, (M, n * Q))
    check_like("t", t, x, (M, n, n, k))
    if not (need_x or need_rule or need_wl or need_wr or need_bias):
        return None, None, None, None, None
    x, dy = rowwise(x), rowwise(dy)
    t, rule, w_left, w_right = dense(t), dense(rule), dense(w_left), dense(w_right)
    opts = {"dtype": x.dtype, "device": x.device}
    dx = torch.empty(M, n * P, **opts) if need_x else None
    drule = torch.empty(n, n, n, **opts) if need_rule else None
    dwl = torch.empty(n, P, k, **opts) if need_wl else None
    dwr = torch.empty(n, k, Q, **opts) if need_wr else None
    dbias = torch.empty(n * Q, **opts) if need_bias else None
    outs = (dl(dx), dl(drule), dl(dwl), dl(dwr), dl(dbias))
    if x.is_cuda:
        ext = require(cuda=True)
        wlt = w_left.transpose(1, 2).contiguous() if need_x else None
        weights = need_rule or need_wl or need_wr or need_bias
        nbytes = ext.cuda_phm_bwd_workspace(M, n, P, Q, k) if weights else 0
        ws = torch.empty(nbytes, dtype=torch.uint8, device=x.device) if nbytes else None
        with torch.cuda.device(x.device):
            ext.cuda_phm_bwd(dl(dy), dl(x), dl(t), dl(rule), dl(wlt), dl(w_right), *outs, dl(ws), cuda_stream(x))
    else:
        require(cuda=False).phm_bwd(dl(dy), dl(x), dl(t), dl(rule), dl(w_left), dl(w_right), *outs, num_threads())
    return dx, drule, dwl, dwr, dbias
