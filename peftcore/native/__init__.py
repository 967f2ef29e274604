"""Lazy loader of the compiled extension ``peftcore._C`` (C++/OpenMP CPU kernels, CUDA kernels).

Importing peftcore never loads the extension: :func:`load` does, on the first op that needs it.
torch is imported before the module is opened so that the module's ``libgomp.so.1`` resolves to the
copy torch already loaded: one OpenMP pool, one thread count, no two pools of spinning threads
fighting over the cores.

* :func:`load` returns the module or None.
* :func:`unavailable_reason` returns None when the CPU kernels (or, with ``cuda=True``, the CUDA
  kernels on a visible GPU) can run, else a sentence saying why not.
* :func:`build_info` is what ``setup.py`` recorded at install time (``peftcore/_build_info.json``)
  plus, once loaded, what the binary reports about itself.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

_INFO_PATH = Path(__file__).resolve().parent.parent / "_build_info.json"
_lock = threading.Lock()
_module = None
_load_error: str | None = None
_loaded = False
_cuda_reason_cache: dict[int, str | None] = {}
_num_threads: int | None = None


def _read_info() -> dict | None:
    try:
        return json.loads(_INFO_PATH.read_text())
    except FileNotFoundError:
        return None
    except Exception as e:  # corrupt file: say so rather than guess
        return {"built": False, "reason": f"unreadable {_INFO_PATH.name}: {e!r}"}


def _omp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped in this process (Linux only; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    names = ("gomp", "libomp", "libiomp")
    libs = {line.split()[-1] for line in maps.splitlines() if "/lib" in line and any(n in line for n in names)}
    return sorted(libs)


def load():
    """The extension module ``peftcore._C``, loaded on first call; None when it cannot load."""
    global _module, _load_error, _loaded
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        if os.environ.get("PEFTCORE_DISABLE_NATIVE", "0") not in ("", "0"):
            _load_error = "disabled by PEFTCORE_DISABLE_NATIVE"
        else:
            import torch  # noqa: F401  (first: share torch's libgomp, see the module docstring)

            # A torch whose bundled libgomp carries a mangled name (libgomp-<hash>.so.1) cannot
            # lend it to us: the module then brings its own pool.  Make that pool sleep as soon as
            # it is idle (libgomp reads this once, when it loads) so it never spins against torch's.
            gomps = [os.path.basename(p) for p in _omp_runtimes() if "gomp" in os.path.basename(p)]
            own_pool = bool(gomps) and "libgomp.so.1" not in gomps
            saved = os.environ.get("OMP_WAIT_POLICY")
            if own_pool and saved is None:
                os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            try:
                from .. import _C  # type: ignore[attr-defined]

                missing = _C.missing_isa() if hasattr(_C, "missing_isa") else ""
                if missing:
                    _load_error = (
                        f"peftcore._C was compiled for another CPU (-march=native at build time) and this CPU "
                        f"lacks {missing}: reinstall with PEFTCORE_NATIVE_ARCH=0"
                    )
                else:
                    _module = _C
            except ImportError as e:
                info = _read_info()
                if info is None:
                    _load_error = (
                        "peftcore._C not built: no build record (peftcore/_build_info.json missing; "
                        "install with `pip install .` or `pip install -e .` to compile it)"
                    )
                elif not info.get("built"):
                    _load_error = f"peftcore._C not built: {info.get('reason') or 'unknown reason'}"
                else:
                    _load_error = f"peftcore._C was built but failed to import: {e}"
            finally:
                if own_pool and saved is None:
                    del os.environ["OMP_WAIT_POLICY"]
        _loaded = True
        return _module


def unavailable_reason(cuda: bool = False) -> str | None:
    """None when the native kernels can run, else why not.

    ``cuda=False``: the CPU kernels (the module loads).  ``cuda=True``: additionally the CUDA part
    was compiled in, torch sees a GPU, and its compute capability is covered by the compiled
    architectures.
    """
    mod = load()
    if mod is None:
        return _load_error
    if not cuda:
        return None
    if not getattr(mod, "CUDA", False):
        info = _read_info() or {}
        why = info.get("cuda_reason") or "CUDA kernels not compiled"
        return f"peftcore._C built without CUDA: {why}"
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    dev = torch.cuda.current_device()
    if dev not in _cuda_reason_cache:
        _cuda_reason_cache[dev] = _arch_reason(mod, dev)
    return _cuda_reason_cache[dev]


def _arch_reason(mod, dev: int) -> str | None:
    import torch

    archs = []
    for a in str(mod.build_config().get("cuda_archs", "")).replace(";", ",").split(","):
        digits = "".join(ch for ch in a if ch.isdigit())
        if digits:
            archs.append(int(digits))
    major, minor = torch.cuda.get_device_capability(dev)
    cc = 10 * major + minor
    # SASS runs within a major version; the embedded PTX of the newest arch JIT-compiles upward.
    if archs and cc < min(archs):
        names = ",".join(str(a) for a in archs)
        return (
            f"GPU {dev} has compute capability {major}.{minor}; peftcore._C was compiled for sm_{names} "
            "(rebuild with PEFTCORE_CUDA_ARCHS)"
        )
    return None


def build_info() -> dict:
    """What the build recorded (``_build_info.json``), plus the binary's own report once loaded."""
    info = _read_info()
    out = dict(info) if info is not None else {"built": False, "reason": "no build record"}
    out["info_file"] = str(_INFO_PATH)
    if _loaded:
        out["loaded"] = _module is not None
        if _module is not None:
            out["binary"] = dict(_module.build_config())
            out["num_threads"] = num_threads()
            out["openmp_runtimes"] = _omp_runtimes()
            out["openmp_shared_with_torch"] = len([p for p in out["openmp_runtimes"] if "gomp" in p]) <= 1
        else:
            out["load_error"] = _load_error
    return out


def set_num_threads(n: int | None) -> None:
    """Threads for the CPU kernels; None follows ``torch.get_num_threads()`` (the default)."""
    global _num_threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    _num_threads = n


def num_threads() -> int:
    """Threads the CPU kernels use for the next call."""
    if _num_threads is not None:
        return _num_threads
    import torch

    return torch.get_num_threads()


__all__ = ["load", "unavailable_reason", "build_info", "set_num_threads", "num_threads"]


def require(cuda: bool):
    """The loaded extension, or a RuntimeError saying why the cpp/cuda backend cannot run."""
    reason = unavailable_reason(cuda=cuda)
    if reason is not None:
        raise RuntimeError(f"peftcore native {'cuda' if cuda else 'cpp'} backend unavailable: {reason}")
    return load()


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# Tensors as the bindings take them: DLPack capsules (the bindings check shape, strides, dtype and
# device themselves), and a stream.

_to_dlpack = None


def dl(t):
    """t as a DLPack capsule for a binding of ``peftcore._C``; None stays None (an output not asked
    for, an absent bias).  The capsule shares t's memory: outputs are written in place."""
    global _to_dlpack
    if t is None:
        return None
    if _to_dlpack is None:
        from torch.utils.dlpack import to_dlpack

        _to_dlpack = to_dlpack
    return _to_dlpack(t)


def dense(t):
    """t when it is contiguous, else a contiguous copy."""
    return t if t.is_contiguous() else t.contiguous()


def rowwise(t):
    """t itself when its rows do not overlap (or repeat one row: stride 0), else a dense copy."""
    if t.dim() == 2 and t.shape[0] > 1 and 0 < t.stride(0) < t.shape[1]:
        return t.contiguous()
    return t


def cuda_stream(t) -> int:
    """The current CUDA stream of t's device, as the address the CUDA entry points take."""
    import torch

    return torch.cuda.current_stream(t.device).cuda_stream


def check_device_dtype(what: str, t, cpu_dtypes, cuda_dtypes) -> None:
    """TypeError/ValueError unless ``t`` is on the CPU or a CUDA device with a dtype ``what`` takes there."""
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"native backends run on cpu or cuda tensors, got {t.device}")
    cpu = t.device.type == "cpu"
    allowed = cpu_dtypes if cpu else cuda_dtypes
    if t.dtype not in allowed:
        names = [dtype_name(d) for d in allowed]
        names = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise TypeError(f"the {'cpp' if cpu else 'cuda'} {what} takes dtype {names}, got {t.dtype}")
