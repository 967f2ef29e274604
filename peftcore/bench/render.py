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


def _any(rows: list[dict], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def _spread(r: dict) -> str:
    """The row's ratio spread (relative IQR of its per-round ratios), ⚠ when flagged unstable."""
    v = r.get("ratio_spread")
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" + (" ⚠" if r.get("unstable") else "")


def _ceilings(c: dict) -> str:
    """The meta's ceilings as one line: values, the best GEMM shapes, raised ceilings."""
    parts = [f"{k} {v}" for k, v in c.items() if k != "raised" and not k.startswith("gemm_candidates_")]
    for e in c.get("raised") or []:
        shape = " ".join(f"{k}={v}" for k, v in e["shape"].items() if v is not None)
        parts.append(f"**{e['key']} raised** from the measured {e['measured']:.4g} to {e['raised_to']:.4g}, "
                     f"what {e['provider']} {e['mode']} ({shape}) achieved")
    return ", ".join(parts)


def table(rows: list[dict], providers: tuple[str, ...] = (), mode: str | None = None,
          floor: str = "floor", baseline: str = "hf_peft", extra_cols: tuple = ()) -> str:
    """One markdown table of the rows of ``mode`` (all modes when None).

    Columns without a value in any row (× floor for an op without a floor, TFLOP/s for a
    memory-bound op, GB/s for a GEMM) are left out; ``extra_cols`` are ``(row key, header,
    format)`` triples appended after the standard columns.
    """
    rows = [r for r in rows if mode is None or r["mode"] == mode]
    if not rows:
        return "_no rows_\n"
    cols = _shape_cols(rows)
    metrics = [  # (header, cell of a row, the row key that must have a value somewhere)
        ("× floor" if floor == "floor" else f"× {floor}", lambda r: _f(r["ratio_to_floor"], "{:.2f}"),
         "ratio_to_floor"),
        (f"× {baseline}", lambda r: _f(r["ratio_to_baseline"], "{:.2f}"), "ratio_to_baseline"),
        ("TFLOP/s", lambda r: _f(r["tflops"], "{:.3g}"), "tflops"),
        ("% GEMM peak", lambda r: _f(r.get("pct_of_gemm_ceiling"), "{:.0f}%"), "tflops"),
        ("GB/s", lambda r: _f(r.get("gbps"), "{:.3g}"), "gbps"),
        ("% copy peak", lambda r: _f(r.get("pct_of_copy_ceiling"), "{:.0f}%"), "gbps"),
    ]
    keep = [(h, cell) for h, cell, key in metrics if _any(rows, key)]
    if _any(rows, "ratio_spread"):  # after the ratios it qualifies
        keep.insert(sum(1 for h, _ in keep if h.startswith("×")), ("ratio IQR", _spread))
    head = ["dtype", *cols, "mode", "provider", "p50 ms", "p20–p80 ms", *[h for h, _ in keep],
            "peak mem", "saved", *[h for _, h, _ in extra_cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in sorted(rows, key=lambda r: (_MODE_ORDER.get(r["mode"], 9), _sort_key(providers)(r))):
        s = r["shape"]
        name = f"**{r['provider']}**" if r.get("is_default") else r["provider"]
        cells = [
            r["dtype"], *[_f(s.get(c), "{}") for c in cols], r["mode"], name,
            _f(r["p50_ms"]), f"{_f(r['p20_ms'])}–{_f(r['p80_ms'])}",
            *[cell(r) for _, cell in keep], _bytes(r["peak_mem_bytes"]), _bytes(r["saved_bytes"]),
            *[_f(r.get(k), fmt) for k, _, fmt in extra_cols],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets_table(targets: list[dict], floor: str = "floor", baseline: str = "hf_peft", mode: str = "full") -> str:
    """Per shape: the default backend against the floor and the baseline, the target and its status.

    A target may also bound memory: ``peak_mem`` (measured, in ``peak_mem_unit``) against
    ``max_peak_mem``; the column appears when any target has it.
    """
    if not targets:
        return "_no targets evaluated_\n"
    cols = _shape_cols(targets)
    with_floor = any(t.get("ratio_to_floor") is not None or t.get("max_ratio_to_floor") is not None
                     for t in targets)
    with_mem = any("peak_mem" in t for t in targets)
    head = ["dtype", *cols, "default backend"]
    head += [f"{mode} × {floor}"] if with_floor else []
    head += [f"speedup vs {baseline}"] + (["peak mem"] if with_mem else []) + ["target", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for t in targets:
        want = []
        if t.get("max_ratio_to_floor") is not None:
            want.append(f"≤ {t['max_ratio_to_floor']:.2f}× {floor}")
        if t.get("min_speedup_vs_baseline") is not None:
            want.append(f"≥ {t['min_speedup_vs_baseline']:.2f}× vs {baseline}")
        unit = t.get("peak_mem_unit") or ""
        if t.get("max_peak_mem") is not None:
            want.append(f"peak ≤ {t['max_peak_mem']:.2f} {unit}".rstrip())
        cells = [t["dtype"], *[_f(t["shape"].get(c), "{}") for c in cols], _f(t["default_backend"], "{}")]
        if with_floor:
            cells.append(_f(t.get("ratio_to_floor"), "{:.3f}"))
        cells.append(_f(t["speedup_vs_baseline"], "{:.2f}×"))
        if with_mem:
            cells.append(_f(t.get("peak_mem"), "{:.3g} " + unit).rstrip())
        status = (t["status"] or "–") + (" ⚠ unstable" if t.get("unstable") else "")
        cells += [", ".join(want) or "–", status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(meta: dict, rows: list[dict], providers: tuple[str, ...] = (), extra_cols: tuple = ()) -> str:
    """The result file as markdown: how it was made, the targets, skipped providers, one table per mode."""
    m = meta
    floor, baseline = m.get("floor", "floor"), m.get("baseline", "hf_peft")
    out = [f"# {m['op']} benchmark: {m['device']}", ""]
    out.append(f"- command: `{m['command']}`")
    libs = "".join(f", {k} {v}" for k, v in (m.get("libraries") or {}).items())
    out.append(f"- preset `{m['preset']}`, modes {', '.join(m['modes'])}; torch {m['torch']}, "
               f"triton {m['triton']}, peft {m['peft']}{libs}, python {m['python']}")
    dirty = " (uncommitted changes)" if m.get("commit_dirty") else ""
    out.append(f"- peftcore commit `{m['commit']}`{dirty}; {m['timestamp']}")
    out.append(f"- timer: {m['timer']}")
    timing = m.get("timing") or {}
    if timing.get("method") == "interleaved":
        bad = m.get("unstable_rows") or []
        out.append(f"- ratios: medians of per-round ratios over {timing.get('rounds')} interleaved rounds; "
                   f"{len(bad)} row(s) unstable (ratio IQR / median > {timing.get('unstable_spread', 0.1):.0%}, "
                   "marked ⚠)" + (": **do not trust their ratios; rerun on a quieter machine**" if bad else ""))
    if m.get("default_backend"):
        out.append("- default backend: " + ", ".join(f"{k}: {v}" for k, v in m["default_backend"].items()))
    if m.get("ceilings"):
        out.append("- measured ceilings: " + _ceilings(m["ceilings"]))
    for note in m.get("notes", []):
        out.append(f"- {note}")
    mode = m.get("plot_mode", "full")
    heading = "full mode: forward + backward" if mode == "full" else f"{mode} mode"
    out += ["", f"## Targets ({heading})", "", targets_table(m.get("targets", []), floor, baseline, mode)]
    if m.get("skipped"):
        out += ["## Skipped", ""]
        for s in m["skipped"]:
            out.append(f"- {s['provider']} ({s['dtype']}, {s['cases']} case(s)): {s['reason']}")
        out.append("")
    for mode in sorted({r["mode"] for r in rows}, key=lambda x: _MODE_ORDER.get(x, 9)):
        out += [f"## {mode}", "", table(rows, providers, mode, floor, baseline, extra_cols)]
    ratios = " / ".join(f"× {n}" for n in (floor, baseline) if n and any(
        r.get("ratio_to_floor" if n == floor else "ratio_to_baseline") is not None for r in rows))
    ratios = ratios or "× floor / × hf_peft"
    if _any(rows, "ratio_spread"):
        how = ("the median over the interleaved rounds of the per-round ratio of the two providers' times "
               "(p50 over p50 where the two were not timed together); ratio IQR: (p75 - p25) / median of "
               "those per-round ratios, ⚠ above the unstable threshold")
    else:
        how = "p50 over that provider's p50"
    out.append(f"Bold: the backend the registry picks by default. {ratios}: {how}, on the same shape and mode "
               "(lower is better). saved: tensors kept for backward by one forward, weights excluded.")
    return "\n".join(out) + "\n"


def plot(meta: dict, rows: list[dict], path: Path, providers: tuple[str, ...] = (), mode: str = "full") -> bool:
    """p50 per provider per shape (log scale, floor marked) above the ratio to the floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    floor = meta.get("floor", "floor")
    sel = [r for r in rows if r["mode"] == mode and r["provider"] != floor]
    if not sel:
        return False
    shapes: list[tuple] = []
    for r in sorted(sel, key=_sort_key(providers)):
        key = (r["dtype"], tuple(r["shape"].items()))
        if key not in shapes:
            shapes.append(key)
    provs = [p for p in providers if any(r["provider"] == p for r in sel)] or sorted({r["provider"] for r in sel})
    index = {(r["provider"], r["dtype"], tuple(r["shape"].items())): r for r in sel}
    # Lower panel: the ratio to the floor, or to the baseline for an op without a floor.
    ratio_key = "ratio_to_floor" if _any(sel, "ratio_to_floor") else "ratio_to_baseline"
    with_mem = bool(meta.get("plot_memory")) and _any(sel, "peak_mem_bytes")
    width = 0.8 / max(len(provs), 1)
    fig_w = max(6.0, 0.9 * len(shapes) * max(1, len(provs)) * 0.35 + 2)
    fig, axes = plt.subplots(3 if with_mem else 2, 1, figsize=(min(fig_w, 40), 11 if with_mem else 8), sharex=True)
    ax_t, ax_r = axes[0], axes[1]
    for j, p in enumerate(provs):
        xs, ts, rs, ms = [], [], [], []
        for i, (dt, items) in enumerate(shapes):
            r = index.get((p, dt, items))
            if r is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ts.append(r["p50_ms"])
            rs.append(r[ratio_key] if r[ratio_key] is not None else float("nan"))
            ms.append(r["peak_mem_bytes"] / 2**30 if r["peak_mem_bytes"] is not None else float("nan"))
        ax_t.bar(xs, ts, width, label=p)
        ax_r.bar(xs, rs, width, label=p)
        if with_mem:
            axes[2].bar(xs, ms, width, label=p)
    floor_label = meta.get("floor_label") or "floor (frozen base linear)"
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
        if ratio_key == "ratio_to_floor":
            line = t.get("max_ratio_to_floor")
        else:
            line = 1.0 / t["min_speedup_vs_baseline"] if t.get("min_speedup_vs_baseline") else None
        key = (t["dtype"], tuple(t["shape"].items()))
        if line and key in shapes:
            i = shapes.index(key)
            ax_r.hlines(line, i - 0.45, i + 0.45, colors="r", linestyles="--")
    ax_t.set_yscale("log")
    ax_t.set_ylabel(f"{mode} p50 (ms, log)")
    ax_r.set_ylabel("× floor (red: target)" if ratio_key == "ratio_to_floor"
                    else f"× {meta.get('baseline')} (red: target)")
    if with_mem:
        axes[2].set_ylabel("peak mem above inputs (GiB)")
    labels = []
    for dt, items in shapes:
        s = dict(items)
        if {"tokens", "in", "out", "r", "dropout"} <= set(s):
            lab = f"{s.get('tokens')}\n{s.get('in')}→{s.get('out')}\nr{s.get('r')} p{s.get('dropout')}"
        else:
            lab = "\n".join(f"{k} {v}" for k, v in s.items() if v is not None)
        if len({d for d, _ in shapes}) > 1:
            lab += f"\n{dt}"
        labels.append(lab)
    axes[-1].set_xticks(range(len(shapes)))
    axes[-1].set_xticklabels(labels, fontsize=7)
    ax_t.legend(fontsize=8, ncol=min(4, len(provs) + 1))
    ax_t.set_title(f"{meta['op']} {mode}: {meta['device']} · torch {meta['torch']} · {meta['commit'][:10]}",
                   fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
