"""``peftcore bench compare OLD.json NEW.json``: per-case NEW / OLD between two result files.

Rows are matched by (op, provider, mode, dtype, shape); rows in only one file are listed.  The
metric is ``p50_ms`` by default (a time ratio above 1 is a slowdown); ``--metric ratio_to_floor``
compares each row's ratio to the floor instead, which cancels most of the difference between two
machines' states (each file's ratios were measured against a floor timed in the same rounds).  A
geometric mean summarises all matched rows and each provider.  With ``--threshold T`` the command
exits 1 when any matched row's NEW / OLD exceeds T: a regression check across commits.  Files of
every format load (a row needs only provider, mode, dtype, shape and the metric).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

METRICS = ("p50_ms", "ratio_to_floor", "ratio_to_baseline", "peak_mem_bytes", "saved_bytes")


def add_parser(sub) -> None:
    """Register ``compare`` on the ``peftcore bench`` subparsers."""
    p = sub.add_parser("compare", help="NEW / OLD per case between two result files (regression check)",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("old", type=Path, help="the earlier result JSON")
    p.add_argument("new", type=Path, help="the later result JSON")
    p.add_argument("--metric", choices=METRICS, default="p50_ms",
                   help="row value to compare (default: p50_ms; lower is better for all)")
    p.add_argument("--threshold", type=float, default=None,
                   help="exit 1 when a matched case's NEW / OLD exceeds this, e.g. 1.10")
    p.add_argument("--modes", type=lambda s: s.replace(",", " ").split(), default=None,
                   help="only these modes (default: all)")
    p.add_argument("--providers", type=lambda s: s.replace(",", " ").split(), default=None,
                   help="only these providers (default: all)")


def load(path: Path) -> tuple[dict, list[dict]]:
    """(meta, rows) of a result file; a bare list of rows is accepted too."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return {}, data
    return data.get("meta") or {}, data.get("rows") or []


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


def case_key(meta: dict, row: dict) -> tuple:
    """(op, provider, mode, dtype, shape items): what makes two rows the same case."""
    shape = tuple(sorted((k, _freeze(v)) for k, v in (row.get("shape") or {}).items()))
    return (row.get("op") or meta.get("op"), row["provider"], row["mode"], row["dtype"], shape)


def _label(key: tuple, row: dict | None = None) -> list[str]:
    """op, dtype, shape, mode, provider as table cells (the shape in the row's own key order)."""
    op, prov, mode, dtype, shape = key
    items = (row.get("shape") or {}).items() if row else shape
    return [str(op), dtype, " ".join(f"{k}={v}" for k, v in items if v is not None), mode, prov]


def geomean(values: list[float]) -> float | None:
    """Geometric mean of positive values (None for none)."""
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def compare(old: tuple[dict, list[dict]], new: tuple[dict, list[dict]], metric: str = "p50_ms",
            threshold: float | None = None, modes=None, providers=None) -> dict:
    """Match the rows of two files and compute NEW / OLD of ``metric`` per matched case.

    Returns ``{"matched": [(key, old, new, ratio or None, flag)], "only_old": [key], "only_new":
    [key], "geomean": float | None, "by_provider": {provider: geomean}, "regressions": [key],
    "rows": {key: a row}}``; flag holds ``REGRESSED`` (ratio > threshold) and/or ``unstable``
    (either row flagged: its ratios spread too widely to trust).
    """
    def index(meta, rows):
        out = {}
        for r in rows:
            if (modes and r["mode"] not in modes) or (providers and r["provider"] not in providers):
                continue
            out[case_key(meta, r)] = r
        return out

    a, b = index(*old), index(*new)
    matched, regressions = [], []
    for key in [k for k in b if k in a]:
        va, vb = a[key].get(metric), b[key].get(metric)
        ratio = vb / va if (va and vb is not None) else None
        flags = []
        if ratio is not None and threshold is not None and ratio > threshold:
            flags.append("REGRESSED")
            regressions.append(key)
        if a[key].get("unstable") or b[key].get("unstable"):
            flags.append("unstable")
        matched.append((key, va, vb, ratio, ", ".join(flags)))
    by_prov: dict[str, list[float]] = {}
    for key, _, _, ratio, _ in matched:
        if ratio is not None:
            by_prov.setdefault(key[1], []).append(ratio)
    return {
        "matched": matched,
        "only_old": [k for k in a if k not in b],
        "only_new": [k for k in b if k not in a],
        "geomean": geomean([m[3] for m in matched if m[3] is not None]),
        "by_provider": {p: geomean(v) for p, v in by_prov.items()},
        "regressions": regressions,
        "rows": {**a, **b},
    }


def _num(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report(res: dict, old_path, new_path, old_meta: dict, new_meta: dict, metric: str,
           threshold: float | None) -> str:
    """The comparison as markdown: the files, one row per matched case, the summary, the rest."""
    def describe(path, meta):
        return (f"`{path}`: {meta.get('device', '?')}, commit `{str(meta.get('commit', '?'))[:12]}`, "
                f"{meta.get('timestamp', '?')}")

    out = [f"# compare {metric}: NEW / OLD", "", f"- old: {describe(old_path, old_meta)}",
           f"- new: {describe(new_path, new_meta)}"]
    if old_meta.get("device") and new_meta.get("device") and old_meta["device"] != new_meta["device"]:
        out.append("- **the files come from different devices**: ratios compare machines, not commits")
    out.append("")
    head = ["op", "dtype", "shape", "mode", "provider", "old", "new", "new/old", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for key, va, vb, ratio, flag in res["matched"]:
        out.append("| " + " | ".join(_label(key, res["rows"].get(key)) + [_num(va), _num(vb), _f3(ratio), flag])
                   + " |")
    out.append("")
    n = sum(1 for m in res["matched"] if m[3] is not None)
    out.append(f"geometric mean of new/old over {n} matched case(s): {_f3(res['geomean'])}")
    if res["by_provider"]:
        out.append("per provider: " + ", ".join(f"{p} {_f3(g)}" for p, g in res["by_provider"].items()))
    for name, keys in (("OLD", res["only_old"]), ("NEW", res["only_new"])):
        if keys:
            out += ["", f"only in {name} ({len(keys)}):"]
            out += ["- " + " ".join(_label(k, res["rows"].get(k))) for k in keys]
    if threshold is not None:
        out += ["", f"{len(res['regressions'])} case(s) regressed beyond {threshold:g}x"]
    return "\n".join(out) + "\n"


def _f3(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def run(args) -> int:
    """Entry of ``peftcore bench compare``: print the report; 1 on a regression, 2 on bad input."""
    try:
        old, new = load(args.old), load(args.new)
    except (OSError, ValueError) as e:
        print(f"cannot read a result file: {e}", file=sys.stderr)
        return 2
    try:
        res = compare(old, new, args.metric, args.threshold, args.modes, args.providers)
    except KeyError as e:
        print(f"a row lacks the key {e}: not a peftcore bench result file?", file=sys.stderr)
        return 2
    print(report(res, args.old, args.new, old[0], new[0], args.metric, args.threshold), end="")
    return 1 if res["regressions"] else 0
