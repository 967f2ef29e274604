"""Measured ceilings (dense GEMM TFLOP/s per dtype, copy GB/s) and the rows' percentages of them.

A ceiling is what the machine does at best, so no provider may measure above it.  The first
harness timed one 1024³ (8192³ on CUDA) matmul once, by its median, before the cases: smaller and
shaped differently from the cases' own GEMMs (2048x1024x1024 runs faster than 1024³ on a CPU) and
exposed to whatever the machine did at that moment, it read below what the LoRA floor then
achieved (164% of "peak").  Now, in the run's thread count and dtype:

* the candidates are square GEMMs of several sizes *and* every GEMM shape of the cases
  (``Bench.gemm_shapes``), each in the layouts the ops use (``a @ b``, ``a @ bᵀ`` as ``F.linear``,
  ``aᵀ @ b`` as a weight gradient);
* they are timed interleaved (:func:`peftcore.bench.timing.interleave`) in several attempts, and
  the ceiling is the best median TFLOP/s of any candidate in any attempt;
* if a row still measures above it (the machine was busier during the ceilings than during that
  case), :func:`apply_ceilings` raises the ceiling to that row's value and records it in
  ``ceilings["raised"]``, so a percentage never exceeds 100.
"""

from __future__ import annotations

import math
import time
from typing import Iterable

import torch

from .harness import dtype_name, dtype_of
from .timing import ProviderFailed, TimerConfig, interleave

ATTEMPTS = 3
BUDGET_S = 10.0  # seconds of rounds per ceiling (copy, each dtype's GEMMs) before rounds are cut
SQUARES = {"cpu": (512, 1024, 2048), "cuda": (4096, 8192, 16384)}
COPY_BYTES = {"cpu": (32 * 2**20, 128 * 2**20), "cuda": (256 * 2**20, 1024 * 2**20)}
LAYOUTS = ("nn", "nt", "tn")


def gemm_candidates(device: torch.device, shapes: Iterable[tuple[int, int, int]] = ()) -> list[tuple]:
    """(m, k, n, layout) to time: the cases' shapes in every layout, then squares in nn and nt."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    out: list[tuple] = []
    for m, k, n in dict.fromkeys(tuple(int(v) for v in s) for s in shapes):
        out += [(m, k, n, lay) for lay in LAYOUTS]
    for s in SQUARES[kind]:
        out += [(s, s, s, lay) for lay in ("nn", "nt") if (s, s, s, lay) not in out]
    return out


def _gemm_fn(m: int, k: int, n: int, layout: str, dt: torch.dtype, device: torch.device):
    """A callable computing one [m, k] x [k, n] product in ``layout`` (inputs made once)."""
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dt)

    if layout == "nn":
        a, b = rand(m, k), rand(k, n)
        return lambda: a @ b
    if layout == "nt":  # F.linear's forward: x @ Wᵀ with W [n, k]
        a, b = rand(m, k), rand(n, k)
        return lambda: a @ b.t()
    if layout == "tn":  # a weight gradient: dyᵀ @ x with dy stored [k, m]
        a, b = rand(k, m), rand(k, n)
        return lambda: a.t() @ b
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _one_call_s(fn, device: torch.device) -> float:
    """Warm a candidate, then the seconds of one call (synchronized on CUDA)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _best(fns: dict, device, cfg: TimerConfig, attempts: int, value, budget_s: float) -> tuple[float, object]:
    """Max over attempts and candidates of ``value(name, median ms of the attempt)``: (best, name).

    The candidates are timed interleaved; the rounds are cut into ``attempts`` consecutive
    attempts.  Rounds are cut down (to one per attempt at least) when a round of all candidates
    would overrun ``budget_s``: a large case GEMM on a small CPU takes most of a second.
    """
    est = {}
    for name, fn in list(fns.items()):
        try:
            est[name] = _one_call_s(fn, device)
        except (RuntimeError, MemoryError):  # out of memory for its output: not a candidate here
            continue
    fns = {n: fns[n] for n in est}
    if device.type == "cuda":  # interleave's do_bench-like warm-up picks the blocks: rep / rounds ms
        calls, block = None, {n: max(est[n], cfg.rep_ms * 1e-3 / cfg.rounds) for n in fns}
    else:  # warmed above
        calls = {n: max(1, math.ceil(cfg.min_run_time / cfg.rounds / max(est[n], 1e-9))) for n in fns}
        block = {n: calls[n] * est[n] for n in fns}
    per_round = max(sum(block.values()), 1e-9)
    total = int(max(attempts, min(attempts * cfg.rounds, budget_s / per_round)))
    chunk = max(1, total // attempts)
    res: dict = {}
    while fns:
        try:
            res = interleave(fns, device, cfg, rounds=chunk * attempts,
                             calls={n: calls[n] for n in fns} if calls else None)
            break
        except ProviderFailed as e:  # a candidate that cannot run here (out of memory) is no ceiling
            del fns[e.name]
    best, best_name = 0.0, None
    for name, r in res.items():
        for a in range(attempts):
            part = sorted(r["times_ms"][a * chunk:(a + 1) * chunk])
            v = value(name, part[len(part) // 2])
            if v > best:
                best, best_name = v, name
    return best, best_name


def measure_ceilings(device: torch.device, dtypes: Iterable[str], cfg: TimerConfig,
                     gemm_shapes: dict | None = None, attempts: int = ATTEMPTS, gemm: bool = True,
                     budget_s: float | None = None) -> dict:
    """Copy GB/s and, with ``gemm``, dense GEMM TFLOP/s per dtype (``gemm_shapes``: dtype ->
    the cases' (m, k, n)); see the module docstring.  Keys: ``copy_gbps``, ``copy_bytes`` (the
    best size), ``gemm_tflops_<dtype>``, ``gemm_shape_<dtype>`` (``"MxKxN layout"`` of the best
    candidate), ``gemm_candidates_<dtype>``, ``attempts``, ``raised`` (filled by apply_ceilings).
    ``budget_s`` (default :data:`BUDGET_S`) bounds the rounds of each ceiling."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget_s = BUDGET_S if budget_s is None else budget_s
    out: dict = {"attempts": attempts}
    bufs, fns = [], {}
    for nbytes in COPY_BYTES[kind]:
        a = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        b = torch.empty_like(a)
        bufs.append((a, b))
        fns[nbytes] = (lambda a=a, b=b: b.copy_(a))
    gbps, nbytes = _best(fns, device, cfg, attempts, lambda nb, ms: 2 * nb / (ms * 1e-3) / 1e9, budget_s)
    out["copy_gbps"], out["copy_bytes"] = round(gbps, 1), nbytes
    del bufs, fns
    for name in dtypes if gemm else ():
        dt = dtype_of(name)
        cands = gemm_candidates(device, (gemm_shapes or {}).get(dtype_name(name), ()))
        fns = {}
        for c in cands:
            try:
                fns[c] = _gemm_fn(*c, dt, device)
            except (RuntimeError, MemoryError):  # too large for this device: not a candidate
                continue
        tflops, best = _best(fns, device, cfg, attempts,
                             lambda c, ms: 2.0 * c[0] * c[1] * c[2] / (ms * 1e-3) / 1e12, budget_s)
        key = dtype_name(name)
        out[f"gemm_tflops_{key}"] = round(tflops, 3)
        out[f"gemm_shape_{key}"] = f"{best[0]}x{best[1]}x{best[2]} {best[3]}" if best else None
        out[f"gemm_candidates_{key}"] = len(cands)
        del fns
    out["raised"] = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def apply_ceilings(rows: list[dict], ceilings: dict | None) -> None:
    """Fill ``pct_of_gemm_ceiling`` / ``pct_of_copy_ceiling`` of every row (in place, None without a
    ceiling).  A row above a ceiling raises that ceiling to the row's value first: the entry
    ``{"key", "measured", "raised_to", "provider", "mode", "dtype", "shape"}`` goes to
    ``ceilings["raised"]`` (the highest row per key; earlier entries of the key are replaced)."""
    ceilings = ceilings if ceilings is not None else {}
    if ceilings:
        ceilings.setdefault("raised", [])

    def key_of(r, metric):
        return f"gemm_tflops_{r['dtype']}" if metric == "tflops" else "copy_gbps"

    for metric in ("tflops", "gbps"):
        top: dict = {}
        for r in rows:
            k = key_of(r, metric)
            v = r.get(metric)
            if v and ceilings.get(k) and v > ceilings[k] and v > top.get(k, (0, None))[0]:
                top[k] = (v, r)
        for k, (v, r) in top.items():
            earlier = [e for e in ceilings["raised"] if e["key"] == k]
            measured = earlier[0]["measured"] if earlier else ceilings[k]
            ceilings["raised"] = [e for e in ceilings["raised"] if e["key"] != k]
            ceilings["raised"].append({"key": k, "measured": measured, "raised_to": v, "provider": r["provider"],
                                       "mode": r["mode"], "dtype": r["dtype"], "shape": dict(r["shape"])})
            ceilings[k] = v
    for r in rows:
        for metric, pct in (("tflops", "pct_of_gemm_ceiling"), ("gbps", "pct_of_copy_ceiling")):
            v, c = r.get(metric), ceilings.get(key_of(r, metric))
            r[pct] = 100.0 * v / c if (v and c) else None
