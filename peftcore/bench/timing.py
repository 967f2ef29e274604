"""Interleaved timing: the providers of one case timed round-robin, ratios from the same rounds.

Timing each provider in its own block lets machine drift (another process, the clock, a thermal
step) land in the ratios between them: on a shared 2-core machine two back-to-back runs of the same
LoRA case gave 1.18x and 1.47x the floor.  So every provider of a case is built and warmed first,
then each round times every provider once (a block of ``calls`` calls), starting with the next
provider each round (A B C, B C A, C A B, ...), so that no provider always runs right after the same
neighbour or always first after the warm-up.  A provider's time is the median over the rounds; a
ratio between two providers is the median of the per-round ratios, whose spread says how far to
trust it (:func:`ratio_stats`, :data:`UNSTABLE_SPREAD`).

CPU: ``time.perf_counter`` around each block (``torch.utils.benchmark`` times one statement at a
time and cannot interleave).  CUDA: the semantics of ``triton.testing.do_bench``: a warm-up of
``warmup_ms`` per provider, then every timed call between two CUDA events with the L2 cache
flushed before it, ``rep_ms`` of timed calls per provider, here spread over the rounds.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

# Relative IQR ((p75 - p25) / median) of a row's per-round ratios above which its ratios are not
# trusted: row["unstable"] = True, flagged in the tables and counted in meta["unstable_rows"].
# The targets sit a few percent apart (1.08x, 1.10x, 1.25x the floor): a ratio whose middle half
# of rounds spans more than 10% of its value cannot tell them apart.
UNSTABLE_SPREAD = 0.10
DEFAULT_ROUNDS = 25
L2_FLUSH_BYTES = 256 * 2**20  # what triton.testing.do_bench zeroes between calls


@dataclass
class TimerConfig:
    """How long and how often to time.

    min_run_time: CPU seconds of timed calls per provider per (case, mode), spread over the rounds
        (a provider slower than ``min_run_time / rounds`` per call still runs once per round).
    warmup_ms, rep_ms: CUDA warm-up and timed milliseconds per provider (do_bench's ``warmup``, ``rep``).
    threads: torch's CPU threads while timing (the CLI sets them for the whole run; recorded only).
    rounds: interleaved rounds per (case, mode).
    unstable_spread: see :data:`UNSTABLE_SPREAD`.
    clock: the CPU clock in seconds (tests inject a fake one).
    """

    min_run_time: float = 1.0
    warmup_ms: int = 25
    rep_ms: int = 100
    threads: int | None = None
    rounds: int = DEFAULT_ROUNDS
    unstable_spread: float = UNSTABLE_SPREAD
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)


class ProviderFailed(Exception):
    """A provider raised while it was warmed or timed; ``name`` says which, ``error`` what."""

    def __init__(self, name: Hashable, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.name = name
        self.error = error


def percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a sorted, non-empty list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict:
    """{p50_ms, p20_ms, p80_ms} over the per-round times of one provider."""
    s = sorted(times_ms)
    return {"p50_ms": percentile(s, 0.5), "p20_ms": percentile(s, 0.2), "p80_ms": percentile(s, 0.8)}


def ratio_stats(num_ms: list[float], den_ms: list[float]) -> dict:
    """Median, p20, p80 and relative IQR (``spread``: (p75 - p25) / median) of the per-round
    ratios ``num[i] / den[i]`` of two providers timed in the same rounds."""
    if len(num_ms) != len(den_ms) or not num_ms:
        raise ValueError("per-round ratios need two series of the same non-zero length")
    r = sorted(a / b for a, b in zip(num_ms, den_ms))
    med = percentile(r, 0.5)
    return {"median": med, "p20": percentile(r, 0.2), "p80": percentile(r, 0.8),
            "spread": (percentile(r, 0.75) - percentile(r, 0.25)) / med if med else None}


def round_orders(names: list, rounds: int) -> list[list]:
    """The order of each round: round i starts with provider i mod n and goes round the list."""
    n = len(names)
    return [names[i % n:] + names[:i % n] for i in range(rounds)]


def interleave(fns: dict[Hashable, Callable[[], object]], device: torch.device, cfg: TimerConfig,
               rounds: int | None = None, calls: dict | None = None) -> dict[Hashable, dict]:
    """Time every callable of ``fns`` in the same rounds (see the module docstring).

    Returns ``{name: {"times_ms": [per-call ms, one per round], "calls": calls per round}}``.  Each
    callable is warmed (and its block size chosen) before the first round, unless ``calls`` gives
    the block sizes of callables the caller has warmed.  A callable that raises stops the
    measurement with :class:`ProviderFailed` naming it, so the caller can drop it and time the
    others again.
    """
    rounds = max(1, int(rounds or cfg.rounds))
    names = list(fns)
    if not names:
        return {}
    cuda = device.type == "cuda"
    if calls is None:
        calls = {n: _warm_cuda(n, fns[n], cfg, rounds, device) if cuda else _warm_cpu(n, fns[n], cfg, rounds)
                 for n in names}
    times: dict = {n: [] for n in names}
    # A collection landing in one provider's block would charge it the whole heap walk
    # (transformers leaves millions of objects); timeit disables gc for the same reason.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if cuda:
            _rounds_cuda(fns, calls, times, device, rounds)
        else:
            _rounds_cpu(fns, calls, times, cfg.clock, rounds)
    finally:
        if was_enabled:
            gc.enable()
    return {n: {"times_ms": times[n], "calls": calls[n]} for n in names}


def _call(name, fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (any provider error: the caller skips that provider)
        raise ProviderFailed(name, e) from e


# ----------------------------------------------------------------------------- CPU


def _warm_cpu(name, fn, cfg: TimerConfig, rounds: int) -> int:
    """Warm one callable and pick its calls per round: enough for ``min_run_time / rounds`` s."""
    clock = cfg.clock
    _call(name, fn)  # first call: allocator, lazy init, autotuning outside the estimate
    n, spent = 1, 0.0
    while True:  # estimate on at least ~1 ms of calls: one fast call is below the clock's noise
        t0 = clock()
        for _ in range(n):
            _call(name, fn)
        spent = clock() - t0
        if spent >= 1e-3 or n >= 1000:
            break
        n *= 10
    per_call = max(spent / n, 1e-9)
    target = cfg.min_run_time / rounds
    return max(1, min(10**6, math.ceil(target / per_call))) if target > 0 else 1


def _rounds_cpu(fns, calls, times, clock, rounds: int) -> None:
    for order in round_orders(list(fns), rounds):
        for name in order:
            fn, n = fns[name], calls[name]
            t0 = clock()
            for _ in range(n):
                _call(name, fn)
            times[name].append((clock() - t0) * 1e3 / n)


# ----------------------------------------------------------------------------- CUDA


_FLUSH: dict = {}


def _l2_flush(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    return _FLUSH[key]


def _warm_cuda(name, fn, cfg: TimerConfig, rounds: int, device: torch.device) -> int:
    """do_bench's warm-up: estimate from 5 calls, run ``warmup_ms`` worth, then pick the calls
    per round so that the rounds hold ``rep_ms`` of timed calls in all."""
    _call(name, fn)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush = _l2_flush(device)
    start.record()
    for _ in range(5):
        flush.zero_()
        _call(name, fn)
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 5, 1e-4)  # ms, the flush included as in do_bench
    for _ in range(max(1, int(cfg.warmup_ms / est))):
        _call(name, fn)
    torch.cuda.synchronize(device)
    return max(1, int(cfg.rep_ms / rounds / est))


def _rounds_cuda(fns, calls, times, device: torch.device, rounds: int) -> None:
    flush = _l2_flush(device)
    events = {n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(calls[n])] for n in fns}
    for order in round_orders(list(fns), rounds):
        for name in order:
            fn = fns[name]
            for start, end in events[name]:
                flush.zero_()  # every call starts from a cold L2, as in do_bench
                start.record()
                _call(name, fn)
                end.record()
        torch.cuda.synchronize(device)  # the events of this round can be read (and recorded again)
        for name in order:
            ev = events[name]
            times[name].append(sum(s.elapsed_time(e) for s, e in ev) / len(ev))


def timer_description(device: torch.device, cfg: TimerConfig) -> str:
    """One line for meta["timer"]: how the rows' times were taken."""
    if device.type == "cuda":
        return (f"interleaved rounds ({cfg.rounds}, start provider rotating): CUDA events around every call, "
                f"L2 flushed before each (triton.testing.do_bench semantics), warmup {cfg.warmup_ms} ms and "
                f"{cfg.rep_ms} ms of timed calls per provider; p20/p50/p80 over the rounds' per-call means")
    threads = cfg.threads or torch.get_num_threads()
    return (f"interleaved rounds ({cfg.rounds}, start provider rotating): time.perf_counter around a block of "
            f"calls per provider per round, ~{cfg.min_run_time} s per provider, {threads} threads, gc off; "
            "p20/p50/p80 over the rounds' per-call means")
