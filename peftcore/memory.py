"""Peak memory of a block of work: CUDA allocations, or the process RSS sampled by a thread."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading


_PROC = []


def _rss_bytes():
    """Current resident set size in bytes, or None when it cannot be read."""
    try:
        if not _PROC:
            import psutil

            _PROC.append(psutil.Process())
        return _PROC[0].memory_info().rss
    except Exception:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


def release_memory():
    """Return freed heap to the OS so that the next method's RSS growth is not hidden by reuse."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a block, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry.  CPU: a thread
    samples the process RSS every 5 ms; the result is the peak above the RSS at entry (falls back
    to ``resource.getrusage`` max RSS growth when RSS cannot be sampled).
    """

    def __init__(self, device):
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def describe(device) -> str:
        if device.type == "cuda":
            return "peak CUDA memory allocated above the start of training (torch.cuda.max_memory_allocated)"
        if _rss_bytes() is None:
            return "growth of the process max RSS (resource.getrusage); 0 when an earlier phase peaked higher"
        how = "psutil" if _PROC else "/proc/self/statm"
        return f"peak process RSS above its value at the start of training, sampled every 5 ms ({how})"

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        release_memory()
        self._base = _rss_bytes()
        if self._base is None:
            import resource

            self._base_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return self
        self._peak = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                r = _rss_bytes()
                if r is not None and r > self._peak:
                    self._peak = r
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is None:
            import resource

            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base_ru
            self.peak_mb = max(grown, 0) / 1024  # ru_maxrss is in KiB on Linux
        else:
            self._stop.set()
            self._thread.join()
            r = _rss_bytes()
            self._peak = max(self._peak, r or 0)
            self.peak_mb = (self._peak - self._base) / 2**20
        return False
