"""Benchmarks of peftcore's ops against the floor and the baselines: ``peftcore bench <op> ...``.

``main(argv)`` is the CLI entry (``peftcore bench lora --preset cpu``, ``peftcore bench distill``,
``peftcore bench fused-distill``, ``peftcore bench phm``, ``peftcore bench lora-mixed``,
``peftcore bench --list``, ``peftcore bench compare OLD.json NEW.json``, ``peftcore bench render
FILE.json``); ``benchmarks/bench_<op>.py`` are thin scripts around it.  Output:
``<out>/<stem>.json`` (rows), ``<stem>.md`` (tables, targets) and ``<stem>.png``; the formats and
the timing method (interleaved rounds) are documented in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

from . import compare, timing

_BENCHES = {  # CLI name -> module with a BENCH
    "lora": "peftcore.bench.lora",
    "distill": "peftcore.bench.distill",
    "fused-distill": "peftcore.bench.fused_distill",
    "phm": "peftcore.bench.phm",
    "lora-mixed": "peftcore.bench.lora_mixed",
    "qlora": "peftcore.bench.qlora",
    "compile": "peftcore.bench.compile",
}


def _bench(op: str):
    return importlib.import_module(_BENCHES[op]).BENCH


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftcore bench", description="Benchmark peftcore ops.")
    p.add_argument("--list", action="store_true", help="list ops, providers and presets, then exit")
    sub = p.add_subparsers(dest="op", metavar="OP")
    for op in _BENCHES:
        b = _bench(op)
        sp = sub.add_parser(op, help=f"benchmark {op}")
        sp.add_argument("--preset", choices=sorted(b.presets), default=None,
                        help="shape set (default: gpu when CUDA is available, else cpu)")
        sp.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the preset's, else auto)")
        sp.add_argument("--dtype", type=lambda s: s.replace(",", " ").split(), default=None,
                        help="dtypes, e.g. bf16,fp16 (replaces the preset's)")
        sp.add_argument("--providers", type=lambda s: s.replace(",", " ").split(), default=None,
                        help=f"subset of {','.join(b.providers)}")
        sp.add_argument("--modes", type=lambda s: s.replace(",", " ").split(), default=None,
                        help="subset of fwd,bwd,full")
        sp.add_argument("--out", type=Path, default=None,
                        help="output directory (default: benchmarks/results of the checkout)")
        sp.add_argument("--name", default=None,
                        help="file stem (default: <op>_<device kind>, plus _<preset> unless cpu/gpu)")
        sp.add_argument("--min-run-time", type=float, default=None,
                        help="CPU: seconds of timed calls per provider per case and mode, spread over the "
                             "rounds (default: 1.0; smoke 0.02); a slower call still runs once per round")
        sp.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved rounds per case and mode (default: the preset's, else "
                             f"{timing.DEFAULT_ROUNDS})")
        sp.add_argument("--unstable-spread", type=float, default=timing.UNSTABLE_SPREAD,
                        help="flag a row unstable when the relative IQR of its per-round ratios exceeds "
                             f"this (default: {timing.UNSTABLE_SPREAD})")
        sp.add_argument("--warmup", type=int, default=25, help="GPU: warm-up ms per provider (default: 25)")
        sp.add_argument("--rep", type=int, default=100,
                        help="GPU: ms of timed calls per provider, spread over the rounds (default: 100)")
        sp.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
        sp.add_argument("--ceilings", action=argparse.BooleanOptionalAction, default=None,
                        help="measure copy GB/s and GEMM TFLOP/s ceilings (default: on, off for smoke)")
        sp.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNG")
        sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="tqdm progress bar")
        sp.add_argument("--merge", action="store_true",
                        help="merge into an existing <stem>.json (same device): rows measured now replace "
                             "rows of the same provider/mode/dtype/shape, the others are kept")
        sp.add_argument("--print", dest="print_table", action=argparse.BooleanOptionalAction, default=True,
                        help="print the markdown at the end")
        b.add_args(sp)
    compare.add_parser(sub)
    rp = sub.add_parser("render", help="write the markdown (and PNG) of a result file again")
    rp.add_argument("file", type=Path, help="a result JSON written by peftcore bench")
    rp.add_argument("--out", type=Path, default=None, help="output directory (default: the JSON's)")
    rp.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the PNG")
    rp.add_argument("--print", dest="print_table", action=argparse.BooleanOptionalAction, default=False,
                    help="print the markdown")
    return p


def list_benches() -> str:
    lines = []
    for op in _BENCHES:
        b = _bench(op)
        lines.append(f"{op}: providers {', '.join(b.providers)} (floor: {b.floor or 'none'}, baseline: {b.baseline})")
        for name, ps in b.presets.items():
            n = 1
            for key, vals in ps.items():  # every list-valued entry is one axis of the grid
                if isinstance(vals, (list, tuple)):
                    n *= max(len(vals), 1)
            desc = ", ".join(f"{k}={v}" for k, v in ps.items() if k != "device")
            lines.append(f"  --preset {name}: {n} shape(s) per provider; {desc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry of ``peftcore bench``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print(list_benches())
        return 0
    if not args.op:
        parser.print_help()
        return 2
    if args.op == "compare":
        return compare.run(args)
    if args.op == "render":
        return render_file(args)
    return run(args, argv)


def _bench_of(op: str | None):
    """The Bench whose ``op`` (``fused_distill``, ...) wrote a result file, or None."""
    for name in _BENCHES:
        b = _bench(name)
        if b.op == op:
            return b
    return None


def render_file(args) -> int:
    """``peftcore bench render FILE.json``: the markdown (and PNG) of a result file, old formats too."""
    from . import harness, render

    try:
        meta, rows = harness.read_json(args.file)
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    bench = _bench_of(meta.get("op"))
    providers = bench.providers if bench else ()
    extra = bench.extra_cols if bench else ()
    out = args.out or args.file.parent
    stem = args.file.stem
    md = render.markdown(meta, rows, providers, extra)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(md)
    wrote = [out / f"{stem}.md"]
    if args.plot and render.plot(meta, rows, out / f"{stem}.png", providers, mode=meta.get("plot_mode", "full")):
        wrote.append(out / f"{stem}.png")
    if args.print_table:
        print(md)
    print("wrote " + ", ".join(str(p) for p in wrote))
    return 0


def run(args, argv: list[str]) -> int:
    """Run the parsed ``peftcore bench <op>`` command (sets torch's thread count for its duration)."""
    import torch

    bench = _bench(args.op)
    cuda = torch.cuda.is_available()
    if args.preset is None:
        args.preset = "gpu" if cuda else "cpu"
    preset = bench.presets[args.preset]
    device = torch.device(args.device or preset.get("device") or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and not cuda:
        print(f"preset {args.preset} wants a CUDA device and none is available; use --device cpu "
              "or --preset cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.threads is None and args.preset == "smoke" and device.type == "cpu":
        # Tiny shapes gain nothing from threads, and an OpenMP team on a busy machine waits on its
        # descheduled members (a 64x40 matmul measured 24 ms with 2 threads, 8 us with 1).
        args.threads = 1
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv, bench, device)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv, bench, device) -> int:
    import torch

    from . import ceilings as ceil
    from . import harness, render

    modes = args.modes or list(harness.MODES)
    bad = [m for m in modes if m not in harness.MODES]
    if bad:
        print(f"unknown mode(s) {bad}; choose from {', '.join(harness.MODES)}", file=sys.stderr)
        return 2
    smoke = args.preset == "smoke"
    rounds = args.rounds or bench.presets[args.preset].get("rounds", timing.DEFAULT_ROUNDS)
    if rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    cfg = timing.TimerConfig(
        min_run_time=args.min_run_time if args.min_run_time is not None else (0.02 if smoke else 1.0),
        warmup_ms=args.warmup, rep_ms=args.rep, threads=args.threads or torch.get_num_threads(),
        rounds=rounds, unstable_spread=args.unstable_spread,
    )
    cases = bench.cases(args)
    env = harness.environment(device)
    out = args.out or harness.default_out_dir()
    suffix = "" if args.preset in ("cpu", "gpu") else f"_{args.preset}"
    stem = args.name or f"{bench.op}_{env['device_kind']}{suffix}"
    json_path, md_path, png_path = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"
    old = None
    if args.merge and json_path.exists():
        old = harness.read_json(json_path)
        if old[0].get("device") != env["device"]:
            print(f"--merge: {json_path} holds rows from {old[0].get('device')!r}, not {env['device']!r}; "
                  "use another --name", file=sys.stderr)
            return 2
    dtypes = sorted({c.dtype for c in cases})
    started = harness.now()

    ceilings = {}
    if args.ceilings if args.ceilings is not None else not smoke:
        # In the run's threads and dtypes, on the cases' own GEMM shapes too (see bench.ceilings).
        ccfg = timing.TimerConfig(min_run_time=0.3, warmup_ms=25, rep_ms=100, threads=cfg.threads, rounds=5)
        shapes: dict = {}
        for c in cases:
            shapes.setdefault(c.dtype, []).extend(bench.gemm_shapes(c))
        need_gemm = any(bench.flops(c, m) for c in cases for m in modes)
        ceilings = ceil.measure_ceilings(device, dtypes, ccfg, gemm_shapes=shapes, gemm=need_gemm)

    rows, skipped = harness.run_cases(bench, cases, modes, device, cfg, env, progress=args.progress)
    harness.add_ratios(bench, rows, cfg.unstable_spread)

    timer = timing.timer_description(device, cfg)
    notes = []
    if device.type != "cuda" and bench.cpu_peak_memory:
        notes.append("peak_mem_bytes on CPU: peak of the running sum of the CPU allocations and frees "
                     "made during one call (torch.profiler, profile_memory=True); what was allocated "
                     "before the call (inputs, weights, for bwd the retained graph) is not counted")
    elif device.type != "cuda":
        notes.append("peak_mem_bytes is null on CPU (no allocator statistics); saved_bytes is the "
                     "activation-memory metric on every device")
    else:
        notes.append("peak_mem_bytes: torch.cuda.max_memory_allocated during one call minus the "
                     "allocation before it (inputs, weights and, for bwd, the retained graph excluded)")
    extra = dict(bench.meta(device))
    notes += extra.pop("notes", [])
    meta = {
        "op": bench.op,
        "format": 2,
        "plot_mode": bench.plot_mode,
        "preset": args.preset,
        "command": "peftcore bench " + shlex.join(argv),
        "modes": modes,
        **env,
        "timestamp": started,
        "finished": harness.now(),
        "timer": timer,
        "timing": {
            "method": "interleaved",
            "rounds": cfg.rounds,
            "start": "rotating",
            "ratios": "median of per-round ratios",
            "spread": "(p75 - p25) / median of the per-round ratios",
            "unstable_spread": cfg.unstable_spread,
            "min_run_time_s": cfg.min_run_time if device.type != "cuda" else None,
            "warmup_ms": cfg.warmup_ms if device.type == "cuda" else None,
            "rep_ms": cfg.rep_ms if device.type == "cuda" else None,
        },
        "ceilings": ceilings,
        "default_backend": {dt: bench.default_provider(device, dt) for dt in dtypes},
        "floor": bench.floor,
        "baseline": bench.baseline,
        "skipped": skipped,
        "notes": notes,
        **extra,
    }
    meta["runs"] = [{"command": meta["command"], "timestamp": started, "commit": env["commit"]}]
    if old is not None:
        harness.merge_into(meta, rows, *old)
        harness.add_ratios(bench, rows, cfg.unstable_spread)
    ceil.apply_ceilings(rows, meta["ceilings"])
    meta["unstable_rows"] = harness.unstable_rows(rows)
    meta["unstable"] = bool(meta["unstable_rows"])
    meta["targets"] = bench.targets(rows, meta)

    harness.write_json(json_path, meta, rows)
    md = render.markdown(meta, rows, bench.providers, bench.extra_cols)
    md_path.write_text(md)
    wrote = [json_path, md_path]
    if args.plot:
        if render.plot(meta, rows, png_path, bench.providers, mode=bench.plot_mode):
            wrote.append(png_path)
        else:
            print("no PNG: matplotlib not importable or no full-mode rows", file=sys.stderr)
    if args.print_table:
        print(md)
    if meta["unstable"]:
        print(f"{len(meta['unstable_rows'])} row(s) unstable: per-round ratio spread > "
              f"{cfg.unstable_spread:.0%} (marked in the tables); rerun on a quieter machine", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in wrote))
    return 0


__all__ = ["main", "list_benches", "run", "render_file"]
