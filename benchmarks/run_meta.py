"""The ``meta`` block every standalone benchmark script writes beside its rows (DESIGN.md's
benchmark conventions: device, threads, torch, commit, timestamp and the command that made them)."""

from __future__ import annotations

import platform
import subprocess
import time

import torch


def run_meta(command: str, threads: int, **extra) -> dict:
    """``{"device", "threads", "torch", "commit", "timestamp", "command", **extra}`` for a result file."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"device": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
            "commit": commit, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
            **extra}
