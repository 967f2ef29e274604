"""The shared benchmark harness: environment, timing, memory, the case loop, ratios and JSON.

An op plugs in through a :class:`Bench` (see :mod:`peftcore.bench.lora`): it lists the cases of a
preset and, per case and provider, returns a :class:`Setup` (or raises :class:`Skip`).  The
harness turns a Setup into one callable per mode, times it, measures memory, and fills the rows.

Modes:
    ``fwd``   the training forward (autograd records the graph), output dropped.
    ``bwd``   the backward only: one forward runs outside the timed region and every timed call is
              ``torch.autograd.grad(y, inputs, dy, retain_graph=True)``.
    ``full``  forward then ``torch.autograd.grad(y, inputs, dy)``.
``torch.autograd.grad`` is used (not ``.backward()``) so repeated calls do not accumulate into
``.grad``, which would add an elementwise add per parameter that training does not pay per step.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .targets import (  # noqa: F401  (the benches import these from the harness)
    default_vs_baseline,
    find_target,
    shape_matches,
    shape_targets,
    target_row,
)

MODES = ("fwd", "bwd", "full")
QUANTILES = (0.5, 0.2, 0.8)


class Skip(Exception):
    """A provider cannot run a case; the message is the reason recorded in the JSON."""


@dataclass
class Setup:
    """What a provider needs to be timed on one case.

    forward: runs the op once on the case's tensors with autograd recording; returns the output.
    inputs: tensors the backward differentiates with respect to (x and the trainable parameters).
    params: every weight of the provider (frozen or trainable); their storages are excluded from
        ``saved_bytes`` because autograd saves them by reference, they cost no activation memory.
    """

    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]
    params: list[torch.Tensor] = field(default_factory=list)
    loss: bool = False  # forward returns a scalar loss: the backward is seeded with 1, as loss.backward()
    info: dict = field(default_factory=dict)  # extra keys copied into every row of this setup


@dataclass
class Case:
    """One measurement point: a shape (op-specific keys), a dtype name and a provider."""

    shape: dict
    dtype: str
    provider: str


class Bench:
    """Interface an op implements (see peftcore.bench.lora.LoRABench)."""

    op: str = ""
    floor: str = "floor"  # provider every other one is compared to
    baseline: str = ""  # the library we must beat (HF PEFT for LoRA)
    providers: tuple[str, ...] = ()
    presets: dict = {}
    cpu_peak_memory: bool = False  # also measure peak_mem_bytes on the CPU (profiler; see peak_memory)
    extra_cols: tuple = ()  # (row key, header, format) columns the markdown tables add
    plot_mode: str = "full"  # the mode the plot and the targets use (a forward-only op: "fwd")

    def add_args(self, parser) -> None:  # op-specific filters
        pass

    def cases(self, args) -> list[Case]:
        raise NotImplementedError

    def chosen_providers(self, args) -> list[str]:
        """The providers ``--providers`` names (default: all), each checked against ``providers``."""
        providers = args.providers or list(self.providers)
        for name in providers:
            if name not in self.providers:
                raise SystemExit(f"unknown provider {name!r}; choose from {', '.join(self.providers)}")
        return providers

    def grid_cases(self, grid: Iterable[tuple[str, dict]], providers: list[str]) -> list[Case]:
        """A case per (dtype, shape) of ``grid`` and provider, in that order.  The floor runs on
        ``floor_shape(shape)``, so it is measured once for all shapes that differ only in the keys
        it does not depend on."""
        cases: list[Case] = []
        seen = set()
        for dt, shape in grid:
            for prov in providers:
                s = self.floor_shape(shape) if prov == self.floor else shape
                key = (prov, dt, tuple(s.items()))
                if key not in seen:
                    seen.add(key)
                    cases.append(Case(shape=dict(s), dtype=dt, provider=prov))
        return cases

    def setup(self, case: Case, device: torch.device) -> Setup:
        raise NotImplementedError

    def flops(self, case: Case, mode: str) -> float | None:
        return None

    def bytes_moved(self, case: Case, mode: str) -> float | None:
        """Bytes the op must move at least (for GB/s against the copy ceiling); None: not reported."""
        return None

    def finish_row(self, case: Case, mode: str, row: dict) -> None:
        """Add op-specific keys to a measured row (in place)."""

    def meta(self, device: torch.device) -> dict:
        """Op-specific meta keys; a ``notes`` list is appended to the harness's notes."""
        return {}

    def floor_shape(self, shape: dict) -> dict:
        """The shape key of the floor row a shape is compared to."""
        return shape

    def default_provider(self, device: torch.device, dtype: str) -> str | None:
        return None

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        return []


# ----------------------------------------------------------------------------- environment


def dtype_of(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}
    name = aliases.get(name, name)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def dtype_name(name: str) -> str:
    return str(dtype_of(name)).replace("torch.", "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_kind(device: torch.device) -> str:
    """Short tag used in result file names: ``cpu`` or the GPU model, e.g. ``h100``."""
    if device.type != "cuda":
        return device.type
    words = torch.cuda.get_device_name(device).replace("NVIDIA", "").split()
    return (words[0] if words else "cuda").lower().replace("/", "-")


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def git_commit() -> tuple[str, bool | None]:
    """(HEAD of the checkout peftcore runs from, whether the tree is dirty); ("unknown", None) off git."""
    root = repo_root()
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown", None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def default_out_dir() -> Path:
    """benchmarks/results of the checkout when peftcore runs from one, else ./benchmarks/results."""
    bench = repo_root() / "benchmarks"
    if bench.is_dir():
        return bench / "results"
    return Path.cwd() / "benchmarks" / "results"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(device: torch.device) -> dict:
    commit, dirty = git_commit()
    try:  # the installed version, without importing peft (and transformers): seconds saved
        from importlib.metadata import version

        peft_version = version("peft")
    except Exception:
        peft_version = None
    return {
        "device": device_name(device),
        "device_kind": device_kind(device),
        "device_type": device.type,
        "num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "peft": peft_version,
        "python": platform.python_version(),
        "commit": commit,
        "commit_dirty": dirty,
    }


# ----------------------------------------------------------------------------- timing


@dataclass
class TimerConfig:
    min_run_time: float = 1.0  # CPU: seconds per blocked_autorange
    warmup_ms: int = 25  # GPU: do_bench warmup
    rep_ms: int = 100  # GPU: do_bench repetitions
    threads: int | None = None  # CPU: torch threads while timing (None: torch's current)
    min_samples: int = 5  # CPU: at least this many block means behind the percentiles


def _percentile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), on a sorted list."""
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], device: torch.device, cfg: TimerConfig) -> dict:
    """{p50_ms, p20_ms, p80_ms, timer, samples} for one callable."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except Exception:
            do_bench = None
        if do_bench is not None:
            p50, p20, p80 = do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, quantiles=list(QUANTILES))
            return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "timer": "triton.testing.do_bench", "samples": None}
    from torch.utils import benchmark

    threads = cfg.threads or torch.get_num_threads()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=cfg.min_run_time)
    raw = list(m.times)  # each is the mean over m.number_per_run calls
    while len(raw) < cfg.min_samples:  # a call slower than min_run_time leaves too few for quantiles
        raw += timer.timeit(m.number_per_run).times
    times = sorted(t * 1e3 for t in raw)
    return {
        "p50_ms": _percentile(times, 0.5),
        "p20_ms": _percentile(times, 0.2),
        "p80_ms": _percentile(times, 0.8),
        "timer": f"torch.utils.benchmark.blocked_autorange(min_run_time={cfg.min_run_time})",
        "samples": len(times),
    }


def make_fn(setup: Setup, mode: str) -> Callable[[], object]:
    """The timed callable of one mode (see the module docstring)."""
    if mode == "fwd":
        def fwd():
            setup.forward()

        return fwd
    y = setup.forward()
    dy = torch.ones_like(y) if setup.loss else torch.randn_like(y)
    inputs = setup.inputs
    if mode == "bwd":
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
    if mode == "full":
        del y
        return lambda: torch.autograd.grad(setup.forward(), inputs, dy)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


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


def free(device: torch.device) -> None:
    """Return a finished case's memory to the device.  Refcounting frees the tensors; a young-
    generation collection catches stray cycles without the ~0.3 s of a full one (transformers
    leaves millions of objects), which would add up over a GPU grid."""
    if device.type == "cuda":
        gc.collect(1)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device, dtypes: Iterable[str], cfg: TimerConfig) -> dict:
    """Measured copy bandwidth (GB/s) and dense GEMM throughput (TFLOP/s) per dtype."""
    out: dict = {}
    n_copy = (256 if device.type == "cuda" else 32) * 2**20  # bytes
    a = torch.empty(n_copy, dtype=torch.uint8, device=device)
    a.fill_(1)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, cfg)["p50_ms"]
    out["copy_gbps"] = round(2 * n_copy / (t * 1e-3) / 1e9, 1)
    out["copy_bytes"] = n_copy
    del a, b
    n = 8192 if device.type == "cuda" else 1024
    out["gemm_n"] = n
    for name in dtypes:
        dt = dtype_of(name)
        x = torch.randn(n, n, device=device).to(dt)
        w = torch.randn(n, n, device=device).to(dt)
        t = time_fn(lambda: x @ w, device, cfg)["p50_ms"]
        out[f"gemm_tflops_{dtype_name(name)}"] = round(2 * n**3 / (t * 1e-3) / 1e12, 3)
        del x, w
    free(device)
    return out


# ----------------------------------------------------------------------------- the loop


def run_cases(bench: Bench, cases: list[Case], modes: list[str], device: torch.device,
              cfg: TimerConfig, env: dict, ceilings: dict, progress: bool = True):
    """Time every (case, mode); returns (rows, skipped).  Providers that fail are skipped, not fatal."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    skipped: dict[tuple[str, str], dict] = {}

    def skip(case: Case, reason: str) -> None:
        key = (case.provider, reason)
        if key not in skipped:
            skipped[key] = {"provider": case.provider, "reason": reason, "cases": 0, "dtype": case.dtype}
            bar.write(f"skip {case.provider}: {reason}")
        skipped[key]["cases"] += 1

    bar = tqdm(total=len(cases) * len(modes), desc=f"bench {bench.op}", unit="case",
               disable=not progress, dynamic_ncols=True)
    for case in cases:
        bar.set_postfix_str(f"{case.provider} {_shape_str(case.shape)} {case.dtype}", refresh=False)
        try:
            setup = bench.setup(case, device)
            saved = saved_bytes(setup.forward, setup.params)
        except Skip as e:
            skip(case, str(e))
            bar.update(len(modes))
            continue
        except Exception as e:  # a broken provider must not take the run down
            skip(case, f"error in setup: {type(e).__name__}: {e}")
            bar.update(len(modes))
            free(device)
            continue
        for mode in modes:
            try:
                fn = make_fn(setup, mode)
                fn()  # compile / autotune / warm the allocator outside both measurements
                peak = peak_memory(fn, device, cpu=bench.cpu_peak_memory)
                t = time_fn(fn, device, cfg)
            except Exception as e:
                skip(case, f"error in {mode}: {type(e).__name__}: {str(e)[:300]}")
                bar.update(1)
                fn = None
                free(device)
                continue
            del fn
            flops = bench.flops(case, mode)
            tflops = flops / (t["p50_ms"] * 1e-3) / 1e12 if flops else None
            ceiling = ceilings.get(f"gemm_tflops_{case.dtype}") if ceilings else None
            nbytes = bench.bytes_moved(case, mode)
            gbps = nbytes / (t["p50_ms"] * 1e-3) / 1e9 if nbytes else None
            copy = ceilings.get("copy_gbps") if ceilings else None
            rows.append({
                "op": bench.op,
                "provider": case.provider,
                "mode": mode,
                "dtype": case.dtype,
                "shape": dict(case.shape),
                "p50_ms": t["p50_ms"],
                "p20_ms": t["p20_ms"],
                "p80_ms": t["p80_ms"],
                "samples": t["samples"],
                "timer": t["timer"],
                "peak_mem_bytes": peak,
                "saved_bytes": saved,
                "ratio_to_floor": None,
                "ratio_to_baseline": None,
                "flops": flops,
                "tflops": tflops,
                "pct_of_gemm_ceiling": (100.0 * tflops / ceiling) if (tflops and ceiling) else None,
                "bytes": nbytes,
                "gbps": gbps,
                "pct_of_copy_ceiling": (100.0 * gbps / copy) if (gbps and copy) else None,
                "is_default": case.provider == bench.default_provider(device, case.dtype),
                "device": env["device"],
                "device_kind": env["device_kind"],
                "torch": env["torch"],
                "triton": env["triton"],
                "commit": env["commit"],
                "timestamp": now(),
                **setup.info,
            })
            bench.finish_row(case, mode, rows[-1])
            bar.update(1)
        del setup
        free(device)
    bar.close()
    return rows, list(skipped.values())


def _shape_key(shape: dict) -> tuple:
    return tuple(sorted(shape.items()))


def _shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if v is not None)


def add_ratios(bench: Bench, rows: list[dict]) -> None:
    """Fill ratio_to_floor (p50 / floor's p50) and ratio_to_baseline (p50 / baseline's p50)."""
    index = {(r["provider"], r["mode"], r["dtype"], _shape_key(r["shape"])): r for r in rows}
    for r in rows:
        r["ratio_to_floor"] = r["ratio_to_baseline"] = None
        floor = index.get((bench.floor, r["mode"], r["dtype"], _shape_key(bench.floor_shape(r["shape"]))))
        if floor is not None:
            r["ratio_to_floor"] = r["p50_ms"] / floor["p50_ms"]
        base = index.get((bench.baseline, r["mode"], r["dtype"], _shape_key(r["shape"])))
        if base is not None and r["provider"] != bench.floor:
            r["ratio_to_baseline"] = r["p50_ms"] / base["p50_ms"]


def row_key(r: dict) -> tuple:
    return (r["provider"], r["mode"], r["dtype"], _shape_key(r["shape"]))


def merge_into(meta: dict, rows: list[dict], old_meta: dict, old_rows: list[dict]) -> None:
    """Fold an earlier result file of the same device into this run (in place): rows measured now
    win, the earlier runs are listed in meta["runs"], skipped entries and ceilings are united."""
    fresh = {row_key(r) for r in rows}
    rows[:0] = [r for r in old_rows if row_key(r) not in fresh]
    meta["runs"] = old_meta.get("runs", []) + meta["runs"]
    have = {(s["provider"], s["reason"], s["dtype"]) for s in meta["skipped"]}
    measured = {r["provider"] for r in rows}
    for s in old_meta.get("skipped", []):
        if (s["provider"], s["reason"], s["dtype"]) not in have and s["provider"] not in measured:
            meta["skipped"].append(s)
    meta["ceilings"] = meta.get("ceilings") or old_meta.get("ceilings") or {}
    meta["default_backend"] = {**old_meta.get("default_backend", {}), **meta.get("default_backend", {})}
    meta["modes"] = [m for m in MODES if m in set(meta["modes"]) | set(old_meta.get("modes", []))]


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> tuple[dict, list[dict]]:
    with open(path) as f:
        data = json.load(f)
    return data["meta"], data["rows"]


def csv(cast):
    """argparse type: a comma- or space-separated list of ``cast`` values."""
    def parse(s: str):
        return [cast(v) for v in str(s).replace(",", " ").split() if v]

    return parse


def parse_bool(s: str) -> bool:
    """argparse type: 0/1 (or yes/no, true/false)."""
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise ValueError(f"expected 0/1, got {s!r}")


def require_backend(op: str, backend: str, device, dtype) -> None:
    """Raise Skip (with the registry's reason) unless peftcore's ``backend`` of ``op`` can be timed here."""
    from .. import backends

    if backend == "triton" and device.type == "cpu":
        raise Skip("triton on CPU runs only under the interpreter (TRITON_INTERPRET=1), "
                   "which is a correctness path, not a performance path")
    reason = backends.why_not(op, backend, device, dtype)
    if reason:
        raise Skip(reason)
    try:
        backends.implementation(op, backend)
    except ImportError as e:
        raise Skip(f"{backend} backend does not import: {e}") from None


def registry_default(op: str, device, dtype: str, registers: str = "peftcore.ops") -> str | None:
    """The backend peftcore's registry picks for ``op`` on ``device`` in ``dtype``, or None when
    none can run there (the tables then show none); importing ``registers`` registers the op."""
    importlib.import_module(registers)
    from .. import backends

    try:
        return backends.select(op, device, dtype_of(dtype))
    except Exception:  # noqa: BLE001  (no backend for this device/dtype)
        return None


# ----------------------------------------------------------------------------- targets
