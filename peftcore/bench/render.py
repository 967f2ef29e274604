"""Markdown tables and a PNG plot from benchmark rows (the JSON written by the harness)."""

from __future__ import annotations

from pathlib import Path

_MODE_ORDER = {"full": 0, "fwd": 1, "bwd": 2}


def _f(v, fmt="{:.3f}", none="–"):
    return none if v is None else fmt.format(v)


def _bytes(n):
    if n is None:
        return "–"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _shape_cols(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r["shape"]:
            if k not in cols:
                cols.append(k)
    return cols


def _sort_key(providers: tuple[str, ...]):
    order = {p: i for i, p in enumerate(providers)}

    def key(r):
        s = r["shape"]
        vals = tuple((v is not None, v if v is not None else 0) for v in s.values())
        return (r["dtype"], vals[:3], r["provider"] != "floor", vals[3:], order.get(r["provider"], 99))

    return key


def table(rows: list[dict], providers: tuple[str, ...] = (), mode: str | None = None) -> str:
    """One markdown table of the rows of ``mode`` (all modes when None)."""
    rows = [r for r in rows if mode is None or r["mode"] == mode]
    if not rows:
        return "_no rows_\n"
    cols = _shape_cols(rows)
    head = ["dtype", *cols, "mode", "provider", "p50 ms", "p20–p80 ms", "× floor", "× hf_peft",
            "TFLOP/s", "% GEMM peak", "peak mem", "saved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in sorted(rows, key=lambda r: (_MODE_ORDER.get(r["mode"], 9), _sort_key(providers)(r))):
        s = r["shape"]
        name = f"**{r['provider']}**" if r.get("is_default") else r["provider"]
        cells = [
            r["dtype"], *[_f(s.get(c), "{}") for c in cols], r["mode"], name,
            _f(r["p50_ms"]), f"{_f(r['p20_ms'])}–{_f(r['p80_ms'])}",
            _f(r["ratio_to_floor"], "{:.2f}"), _f(r["ratio_to_baseline"], "{:.2f}"),
            _f(r["tflops"], "{:.3g}"), _f(r.get("pct_of_gemm_ceiling"), "{:.0f}%"), _bytes(r["peak_mem_bytes"]), _bytes(r["saved_bytes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets_table(targets: list[dict]) -> str:
    if not targets:
        return "_no targets evaluated_\n"
    cols = _shape_cols(targets)
    head = ["dtype", *cols, "default backend", "full × floor", "speedup vs hf_peft", "target", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for t in targets:
        want = []
        if t.get("max_ratio_to_floor") is not None:
            want.append(f"≤ {t['max_ratio_to_floor']:.2f}× floor")
        if t.get("min_speedup_vs_baseline") is not None:
            want.append(f"≥ {t['min_speedup_vs_baseline']:.2f}× vs hf_peft")
        cells = [t["dtype"], *[_f(t["shape"].get(c), "{}") for c in cols], _f(t["default_backend"], "{}"),
                 _f(t["ratio_to_floor"], "{:.3f}"), _f(t["speedup_vs_baseline"], "{:.2f}×"),
                 ", ".join(want) or "–", t["status"] or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(meta: dict, rows: list[dict], providers: tuple[str, ...] = ()) -> str:
    m = meta
    out = [f"# {m['op']} benchmark: {m['device']}", ""]
    out.append(f"- command: `{m['command']}`")
    out.append(f"- preset `{m['preset']}`, modes {', '.join(m['modes'])}; torch {m['torch']}, "
               f"triton {m['triton']}, peft {m['peft']}, python {m['python']}")
    dirty = " (uncommitted changes)" if m.get("commit_dirty") else ""
    out.append(f"- peftcore commit `{m['commit']}`{dirty}; {m['timestamp']}")
    out.append(f"- timer: {m['timer']}")
    if m.get("default_backend"):
        out.append("- default backend: " + ", ".join(f"{k}: {v}" for k, v in m["default_backend"].items()))
    if m.get("ceilings"):
        out.append("- measured ceilings: " + ", ".join(f"{k} {v}" for k, v in m["ceilings"].items()))
    for note in m.get("notes", []):
        out.append(f"- {note}")
    out += ["", "## Targets (full mode: forward + backward)", "", targets_table(m.get("targets", []))]
    if m.get("skipped"):
        out += ["## Skipped", ""]
        for s in m["skipped"]:
            out.append(f"- {s['provider']} ({s['dtype']}, {s['cases']} case(s)): {s['reason']}")
        out.append("")
    for mode in sorted({r["mode"] for r in rows}, key=lambda x: _MODE_ORDER.get(x, 9)):
        out += [f"## {mode}", "", table(rows, providers, mode)]
    out.append("Bold: the backend the registry picks by default. × floor / × hf_peft: p50 over that "
               "provider's p50 on the same shape and mode (lower is better). saved: tensors kept "
               "for backward by one forward, weights excluded.")
    return "\n".join(out) + "\n"


def plot(meta: dict, rows: list[dict], path: Path, providers: tuple[str, ...] = (), mode: str = "full") -> bool:
    """p50 per provider per shape (log scale, floor marked) above the ratio to the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    sel = [r for r in rows if r["mode"] == mode and r["provider"] != "floor"]
    if not sel:
        return False
    shapes: list[tuple] = []
    for r in sorted(sel, key=_sort_key(providers)):
        key = (r["dtype"], tuple(r["shape"].items()))
        if key not in shapes:
            shapes.append(key)
    provs = [p for p in providers if any(r["provider"] == p for r in sel)] or sorted({r["provider"] for r in sel})
    index = {(r["provider"], r["dtype"], tuple(r["shape"].items())): r for r in sel}
    width = 0.8 / max(len(provs), 1)
    fig_w = max(6.0, 0.9 * len(shapes) * max(1, len(provs)) * 0.35 + 2)
    fig, (ax_t, ax_r) = plt.subplots(2, 1, figsize=(min(fig_w, 40), 8), sharex=True)
    for j, p in enumerate(provs):
        xs, ts, rs = [], [], []
        for i, (dt, items) in enumerate(shapes):
            r = index.get((p, dt, items))
            if r is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ts.append(r["p50_ms"])
            rs.append(r["ratio_to_floor"] if r["ratio_to_floor"] is not None else float("nan"))
        ax_t.bar(xs, ts, width, label=p)
        ax_r.bar(xs, rs, width, label=p)
    floor_label = "floor (frozen base linear)"
    for i, (dt, items) in enumerate(shapes):
        for p in provs:
            r = index.get((p, dt, items))
            if r is not None and r["ratio_to_floor"]:
                ax_t.hlines(r["p50_ms"] / r["ratio_to_floor"], i - 0.45, i + 0.45, colors="k",
                            linewidths=2, label=floor_label)
                floor_label = None
                break
    ax_r.axhline(1.0, color="k", linewidth=1.5)
    for t in meta.get("targets", []):
        if t.get("max_ratio_to_floor"):
            key = (t["dtype"], tuple(t["shape"].items()))
            if key in shapes:
                i = shapes.index(key)
                ax_r.hlines(t["max_ratio_to_floor"], i - 0.45, i + 0.45, colors="r", linestyles="--")
    ax_t.set_yscale("log")
    ax_t.set_ylabel(f"{mode} p50 (ms, log)")
    ax_r.set_ylabel("× floor (red: target)")
    labels = []
    for dt, items in shapes:
        s = dict(items)
        lab = f"{s.get('tokens')}\n{s.get('in')}→{s.get('out')}\nr{s.get('r')} p{s.get('dropout')}"
        if len({d for d, _ in shapes}) > 1:
            lab += f"\n{dt}"
        labels.append(lab)
    ax_r.set_xticks(range(len(shapes)))
    ax_r.set_xticklabels(labels, fontsize=7)
    ax_t.legend(fontsize=8, ncol=min(4, len(provs) + 1))
    ax_t.set_title(f"{meta['op']} {mode}: {meta['device']} · torch {meta['torch']} · {meta['commit'][:10]}",
                   fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
