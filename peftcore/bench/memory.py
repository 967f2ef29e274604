"""Memory of one provider call: the allocator's peak during it (CUDA, or the profiler's on CPU) and
the activation memory autograd keeps for the backward (``saved_bytes``)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable

import torch


def peak_memory(fn: Callable[[], object], device: torch.device, cpu: bool = False) -> int | None:
    """Peak bytes allocated by one call above what was allocated before it.

    CUDA: the caching allocator's statistics.  CPU: None unless ``cpu``; then one call runs under
    ``torch.profiler`` with ``profile_memory=True`` and the peak of the running sum of its CPU
    allocation events is returned (allocations torch makes, C++ extensions' torch tensors
    included; memory a library mallocs itself is not seen).
    """
    if device.type != "cuda":
        return cpu_peak_memory(fn) if cpu else None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (kineto logs profiler start/stop there from C++; KINETO_LOG_LEVEL
    is read only when torch loads).  Errors inside still propagate as Python exceptions."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_memory(fn: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocations and frees during one call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == cpu]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


def saved_bytes(forward: Callable[[], torch.Tensor], params: Iterable[torch.Tensor]) -> int:
    """Bytes autograd keeps alive for the backward after one forward (the activation memory).

    Every tensor packed by ``saved_tensors_hooks`` (``save_for_backward`` of custom Functions
    included) is counted once per storage; storages of ``params`` (weights saved by reference)
    are excluded.  Counting whole storages means a saved view costs what it keeps alive.
    """
    exclude = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in exclude and ptr not in seen:
                seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward()
    del y
    return int(sum(seen.values()))
