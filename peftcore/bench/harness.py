"""The shared benchmark harness: environment, the case loop, ratios and JSON.

An op plugs in through a :class:`Bench` (see :mod:`peftcore.bench.lora`): it lists the cases of a
preset and, per case and provider, returns a :class:`Setup` (or raises :class:`Skip`).  The
harness groups the cases of one shape (:func:`plan_groups`), turns each Setup into one callable
per mode, measures its memory (:mod:`peftcore.bench.memory`), times the group's callables in the
same interleaved rounds (:mod:`peftcore.bench.timing`) and fills the rows; ceilings are in
:mod:`peftcore.bench.ceilings`, ``peftcore bench compare`` in :mod:`peftcore.bench.compare`.

Modes:
    ``fwd``   the training forward (autograd records the graph), output dropped.
    ``bwd``   the backward only: one forward runs outside the timed region and every timed call is
              ``torch.autograd.grad(y, inputs, dy, retain_graph=True)``.
    ``full``  forward then ``torch.autograd.grad(y, inputs, dy)``.
``torch.autograd.grad`` is used (not ``.backward()``) so repeated calls do not accumulate into
``.grad``, which would add an elementwise add per parameter that training does not pay per step.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .memory import cpu_peak_memory, peak_memory, saved_bytes  # noqa: F401  (tests use them from here)
from .targets import (  # noqa: F401  (the benches import these from the harness)
    default_vs_baseline,
    find_target,
    shape_matches,
    shape_targets,
    speedup,
    target_row,
)
from .timing import UNSTABLE_SPREAD, ProviderFailed, TimerConfig, interleave, ratio_stats, summarize

MODES = ("fwd", "bwd", "full")


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

    def add_args(self, parser) -> None:
        """Add the op's filters (``--tokens`` ...) to its subparser."""

    def cases(self, args) -> list[Case]:
        """The cases of ``args.preset`` after the filters, one per (dtype, shape, provider)."""
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
        ``floor_shape(shape)``, so it has one row for all shapes that differ only in the keys it
        does not depend on (it is timed with each of them: see plan_groups)."""
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
        """Matmul FLOPs of one call (for TFLOP/s against the GEMM ceiling); None: not reported."""
        return None

    def bytes_moved(self, case: Case, mode: str) -> float | None:
        """Bytes the op must move at least (for GB/s against the copy ceiling); None: not reported."""
        return None

    def gemm_shapes(self, case: Case) -> list[tuple[int, int, int]]:
        """The (m, k, n) GEMMs the case does; the GEMM ceiling is measured on them too."""
        return []

    def finish_row(self, case: Case, mode: str, row: dict) -> None:
        """Add op-specific keys to a measured row (in place)."""

    def meta(self, device: torch.device) -> dict:
        """Op-specific meta keys; a ``notes`` list is appended to the harness's notes."""
        return {}

    def floor_shape(self, shape: dict) -> dict:
        """The shape key of the floor row a shape is compared to."""
        return shape

    def default_provider(self, device: torch.device, dtype: str) -> str | None:
        """The provider the library picks by default here (bold in the tables), or None."""
        return None

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        """meta["targets"]: per shape, the default provider against the floor / baseline."""
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


# ----------------------------------------------------------------------------- callables


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


def free(device: torch.device) -> None:
    """Return a finished case's memory to the device.  Refcounting frees the tensors; a young-
    generation collection catches stray cycles without the ~0.3 s of a full one (transformers
    leaves millions of objects), which would add up over a GPU grid."""
    if device.type == "cuda":
        gc.collect(1)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the loop


def plan_groups(bench: Bench, cases: list[Case]) -> list[list[int]]:
    """Indices of the cases timed together, in the cases' order: per (dtype, shape), every
    provider measured on it plus the floor case of its ``floor_shape``.  A floor shared by several
    shapes is timed again in each of their groups (its row pools those rounds), so every ratio to
    it comes from the same rounds; a floor no other case refers to is a group of its own."""
    groups: dict[tuple, list[int]] = {}
    floors: dict[tuple, int] = {}
    for i, c in enumerate(cases):
        key = (c.dtype, _shape_key(c.shape))
        if bench.floor and c.provider == bench.floor:
            floors.setdefault(key, i)
        else:
            groups.setdefault(key, []).append(i)
    out, used = [], set()
    for (dt, _), members in groups.items():
        f = floors.get((dt, _shape_key(bench.floor_shape(cases[members[0]].shape))))
        out.append(([f] if f is not None else []) + members)
        used.add(f)
    out += [[i] for i in floors.values() if i not in used]
    return out


def run_cases(bench: Bench, cases: list[Case], modes: list[str], device: torch.device,
              cfg: TimerConfig, env: dict, progress: bool = True):
    """Time every (case, mode), the providers of a shape interleaved (see :func:`plan_groups` and
    :mod:`peftcore.bench.timing`); returns (rows, skipped).  Providers that fail are skipped, not
    fatal.  Ratios measured in shared rounds are in the rows; :func:`add_ratios` fills the rest."""
    from tqdm.auto import tqdm

    skipped: dict[tuple[str, str], dict] = {}
    counted: set = set()

    def skip(i: int, reason: str) -> None:
        case = cases[i]
        key = (case.provider, reason)
        if key not in skipped:
            skipped[key] = {"provider": case.provider, "reason": reason, "cases": 0, "dtype": case.dtype}
            bar.write(f"skip {case.provider}: {reason}")
        if (i, key) not in counted:  # a floor in several groups is one case
            counted.add((i, key))
            skipped[key]["cases"] += 1

    groups = plan_groups(bench, cases)
    bar = tqdm(total=sum(len(g) for g in groups) * len(modes), desc=f"bench {bench.op}", unit="case",
               disable=not progress, dynamic_ncols=True)
    timed: dict[tuple[int, str], dict] = {}
    saved: dict[int, int] = {}
    info: dict[int, dict] = {}
    for group in groups:
        bar.set_postfix_str(f"{_shape_str(cases[group[-1]].shape)} {cases[group[-1]].dtype}", refresh=False)
        setups: dict[int, Setup] = {}
        for i in group:  # every provider's callable exists before any is timed
            try:
                setup = bench.setup(cases[i], device)
                if i not in saved:
                    saved[i], info[i] = saved_bytes(setup.forward, setup.params), dict(setup.info)
                setups[i] = setup
            except Skip as e:
                skip(i, str(e))
            except Exception as e:  # a broken provider must not take the run down
                skip(i, f"error in setup: {type(e).__name__}: {e}")
            if i not in setups:
                bar.update(len(modes))
                free(device)
        for mode in modes:
            _time_mode(bench, cases, setups, mode, device, cfg, timed, skip)
            bar.update(len(setups))
        del setups
        free(device)
    bar.close()
    rows = [_row(bench, cases[i], mode, timed[(i, mode)], saved[i], info[i], env, device)
            for i in range(len(cases)) for mode in modes if (i, mode) in timed]
    return rows, list(skipped.values())


def _time_mode(bench: Bench, cases, setups: dict, mode: str, device, cfg: TimerConfig, timed: dict, skip) -> None:
    """One mode of one group: build and warm each callable, measure its memory once, time them all
    in the same rounds, and keep the times and the per-round ratios in ``timed``."""
    fns: dict[int, Callable[[], object]] = {}
    for i, setup in setups.items():
        try:
            fn = make_fn(setup, mode)
            fn()  # compile / autotune / warm the allocator outside both measurements
            if (i, mode) not in timed:
                timed[(i, mode)] = {"times": [], "calls": None, "peak": None, "ratios": {}}
                timed[(i, mode)]["peak"] = peak_memory(fn, device, cpu=bench.cpu_peak_memory)
            fns[i] = fn
        except Exception as e:
            _drop_if_unmeasured(timed, i, mode)
            skip(i, f"error in {mode}: {type(e).__name__}: {str(e)[:300]}")
            free(device)
    res: dict = {}
    while fns:
        try:
            res = interleave(fns, device, cfg)
            break
        except ProviderFailed as e:  # drop it and time the others again, from a fresh warm-up
            skip(e.name, f"error in {mode}: {type(e.error).__name__}: {str(e.error)[:300]}")
            del fns[e.name]
            _drop_if_unmeasured(timed, e.name, mode)
            free(device)
    del fns
    by_prov = {cases[i].provider: i for i in res}
    floor, base = by_prov.get(bench.floor), by_prov.get(bench.baseline)
    stamp = now()
    for i, r in res.items():
        t = timed[(i, mode)]
        t["times"] += r["times_ms"]
        t["calls"] = t["calls"] or r["calls"]
        t["timestamp"] = stamp
        prov = cases[i].provider
        if floor is not None and prov != bench.floor:
            t["ratios"]["ratio_to_floor"] = ratio_stats(r["times_ms"], res[floor]["times_ms"])
        if base is not None and prov != bench.floor and prov != bench.baseline:
            t["ratios"]["ratio_to_baseline"] = ratio_stats(r["times_ms"], res[base]["times_ms"])


def _drop_if_unmeasured(timed: dict, i: int, mode: str) -> None:
    """Forget a (case, mode) that failed before any rounds were kept (a floor timed in an earlier
    group keeps those rounds)."""
    if not timed.get((i, mode), {}).get("times"):
        timed.pop((i, mode), None)


def _ratio_keys(name: str, st: dict | None) -> dict:
    if st is None:
        return {name: None, f"{name}_p20": None, f"{name}_p80": None, f"{name}_spread": None}
    return {name: st["median"], f"{name}_p20": st["p20"], f"{name}_p80": st["p80"], f"{name}_spread": st["spread"]}


IDENTITY = {"median": 1.0, "p20": 1.0, "p80": 1.0, "spread": 0.0}  # a provider against itself


def _row(bench: Bench, case: Case, mode: str, t: dict, saved: int, info: dict, env: dict, device) -> dict:
    """One JSON row from a (case, mode)'s pooled rounds (ratios as measured; see add_ratios)."""
    s = summarize(t["times"])
    flops = bench.flops(case, mode)
    tflops = flops / (s["p50_ms"] * 1e-3) / 1e12 if flops else None
    nbytes = bench.bytes_moved(case, mode)
    gbps = nbytes / (s["p50_ms"] * 1e-3) / 1e9 if nbytes else None
    ratios = dict(t["ratios"])
    if case.provider == bench.floor:
        ratios["ratio_to_floor"] = IDENTITY
    if case.provider == bench.baseline:
        ratios["ratio_to_baseline"] = IDENTITY
    row = {
        "op": bench.op,
        "provider": case.provider,
        "mode": mode,
        "dtype": case.dtype,
        "shape": dict(case.shape),
        **s,
        "samples": len(t["times"]),
        "rounds": len(t["times"]),
        "calls_per_round": t["calls"],
        "timer": "interleaved " + ("cuda events" if device.type == "cuda" else "perf_counter"),
        "peak_mem_bytes": t["peak"],
        "saved_bytes": saved,
        **_ratio_keys("ratio_to_floor", ratios.get("ratio_to_floor")),
        **_ratio_keys("ratio_to_baseline", ratios.get("ratio_to_baseline")),
        "ratio_method": "interleaved" if ratios else None,
        "ratio_spread": None,
        "unstable": False,
        "flops": flops,
        "tflops": tflops,
        "pct_of_gemm_ceiling": None,  # apply_ceilings
        "bytes": nbytes,
        "gbps": gbps,
        "pct_of_copy_ceiling": None,
        "is_default": case.provider == bench.default_provider(device, case.dtype),
        "device": env["device"],
        "device_kind": env["device_kind"],
        "torch": env["torch"],
        "triton": env["triton"],
        "commit": env["commit"],
        "timestamp": t.get("timestamp") or now(),
        **info,
    }
    bench.finish_row(case, mode, row)
    return row


def _shape_key(shape: dict) -> tuple:
    return tuple(sorted(shape.items()))


def _shape_str(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items() if v is not None)


def add_ratios(bench: Bench, rows: list[dict], unstable_spread: float = UNSTABLE_SPREAD) -> None:
    """Complete the ratios of every row (in place).

    A ratio measured in shared rounds (its ``<ratio>_spread`` is set: the median of per-round
    ratios) is kept.  Any other (the partner measured by another command and folded in with
    --merge, or a result file of format 1) is p50 / the partner's p50 for the same shape, dtype
    and mode, with no spread.  Then ``ratio_method`` (``interleaved``, ``p50``, ``mixed`` or None),
    ``ratio_spread`` (the largest spread) and ``unstable`` (a spread above ``unstable_spread``).
    """
    index = {(r["provider"], r["mode"], r["dtype"], _shape_key(r["shape"])): r for r in rows}
    for r in rows:
        floor_key = _shape_key(bench.floor_shape(r["shape"]))
        partners = {
            "ratio_to_floor": index.get((bench.floor, r["mode"], r["dtype"], floor_key)),
            "ratio_to_baseline": (index.get((bench.baseline, r["mode"], r["dtype"], _shape_key(r["shape"])))
                                  if r["provider"] != bench.floor else None),
        }
        methods = set()
        for key, partner in partners.items():
            if r.get(f"{key}_spread") is not None:
                methods.add("interleaved")
                continue
            r.update({key: None, f"{key}_p20": None, f"{key}_p80": None, f"{key}_spread": None})
            if partner is not None:
                r[key] = r["p50_ms"] / partner["p50_ms"]
                methods.add("p50")
        r["ratio_method"] = "mixed" if len(methods) > 1 else next(iter(methods), None)
        spreads = [r[f"{k}_spread"] for k in partners if r.get(f"{k}_spread") is not None]
        r["ratio_spread"] = max(spreads) if spreads else None
        r["unstable"] = bool(spreads) and max(spreads) > unstable_spread


def unstable_rows(rows: list[dict]) -> list[dict]:
    """meta["unstable_rows"]: which rows' per-round ratios spread too widely to trust."""
    return [{"provider": r["provider"], "mode": r["mode"], "dtype": r["dtype"], "shape": r["shape"],
             "ratio_spread": r.get("ratio_spread")} for r in rows if r.get("unstable")]


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
