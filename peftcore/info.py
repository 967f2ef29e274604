"""``peftcore info``: versions, devices, the extension build and, per op, which backends can run."""

from __future__ import annotations

import importlib
import os
import platform

import torch

from . import backends


def _version(mod: str) -> str:
    try:
        return getattr(importlib.import_module(mod), "__version__", "installed")
    except Exception as e:  # the reason is the information here
        return f"not available ({type(e).__name__})"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report() -> str:
    from . import __version__, native

    lines = ["peftcore " + __version__, "", "versions:"]
    lines.append(f"  python        {platform.python_version()}")
    for mod in ("torch", "triton", "numpy", "safetensors", "transformers", "peft"):
        lines.append(f"  {mod:<13} {_version(mod)}")
    lines += ["", "devices:", f"  cpu   {cpu_name()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"]
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
        devices.append("cuda")
    else:
        lines.append("  cuda  none (torch.cuda.is_available() is False)")
    lines += ["", "extension peftcore._C:"]
    reason = native.unavailable_reason(cuda=False)
    lines.append("  cpu part:  " + ("loaded" if reason is None else reason))
    creason = native.unavailable_reason(cuda=True)
    lines.append("  cuda part: " + ("loaded" if creason is None else creason))
    info = getattr(native, "build_info", lambda: {})() or {}
    for k, v in info.items():
        lines.append(f"    {k}: {v}")
    lines += ["", "backends per op (float32; triton on the CPU only under TRITON_INTERPRET=1):"]
    for name, spec in backends.ops().items():
        lines.append(f"  {name}:")
        for dev in devices:
            dtype = torch.float32
            chosen = backends.select(name, dev, dtype)
            lines.append(f"    {dev}: default {chosen}  ({spec.why_default.get(dev, '')})")
            for b in spec.modules:
                why = backends.why_not(name, b, dev, dtype)
                lines.append(f"      {b:<10} {'available' if why is None else 'unavailable: ' + why}")
    return "\n".join(lines)
