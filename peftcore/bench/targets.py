"""Targets of the benchmarks: which measured rows a target applies to, and the table rows that
say whether the default backend met it (PASS / FAIL)."""

from __future__ import annotations


def shape_matches(want: dict | None, shape: dict) -> bool:
    """``shape`` has every key of ``want`` at its value (a tuple value: at one of its values)."""
    if want is None:
        return True
    for key, v in want.items():
        allowed = v if isinstance(v, tuple) else (v,)
        if shape.get(key) not in allowed:
            return False
    return True


def find_target(targets: list[dict], device_type: str | None, dtype: str, shape: dict) -> dict | None:
    """The first target for this device type and dtype whose ``shape`` matches (see shape_matches)."""
    return next((t for t in targets if t["device_type"] == device_type and t["dtype"] == dtype
                 and shape_matches(t["shape"], shape)), None)


def default_vs_baseline(rows: list[dict], meta: dict, mode: str, floor: str | None, baseline: str):
    """Per (dtype, shape) measured in ``mode`` by a provider other than the floor, in the rows'
    order: ``(dtype, shape, default provider, its row, the baseline's row)``; None where the meta
    names no default or a row was not measured."""
    default = meta.get("default_backend") or {}
    sel = [r for r in rows if r["mode"] == mode]
    index = {(r["provider"], r["dtype"], tuple(r["shape"].items())): r for r in sel}
    shapes = []
    for r in sel:
        key = (r["dtype"], tuple(r["shape"].items()))
        if r["provider"] != floor and key not in shapes:
            shapes.append(key)
    for dt, items in shapes:
        prov = default.get(dt)
        ours = index.get((prov, dt, items)) if prov else None
        yield dt, dict(items), prov, ours, index.get((baseline, dt, items))


def speedup(ours: dict | None, base: dict | None) -> float | None:
    """How many times faster ``ours`` is than the baseline's row: 1 / ours' ``ratio_to_baseline``
    (the median of the per-round ratios when both were timed in the same rounds), else the
    baseline's p50 over ours (rows without the ratio: hand-made, or from other files)."""
    if not (ours and base):
        return None
    ratio = ours.get("ratio_to_baseline")
    if ratio:
        return 1.0 / ratio
    return base["p50_ms"] / ours["p50_ms"]


def target_row(dtype: str, shape: dict, default: str | None, ratio: float | None, speedup: float | None,
               target: dict | None, status: str | None, mode: str | None = None,
               unstable: bool | None = None) -> dict:
    """One row of the targets table: the default backend's ratio to the floor and speedup over
    the baseline at one (dtype, shape), the target that applies (or None), its status, and
    ``unstable`` when the default backend's row is flagged (its ratios spread too widely)."""
    row: dict = {"dtype": dtype, "shape": shape}
    if mode is not None:
        row["mode"] = mode
    row.update({
        "default_backend": default,
        "ratio_to_floor": ratio, "speedup_vs_baseline": speedup,
        "target": target["name"] if target else None,
        "max_ratio_to_floor": target["max_ratio_to_floor"] if target else None,
        "min_speedup_vs_baseline": target["min_speedup_vs_baseline"] if target else None,
        "status": status,
        "unstable": bool(unstable),
    })
    return row


def shape_targets(rows: list[dict], meta: dict, floor: str | None, baseline: str, targets: list[dict],
                  mode: str) -> list[dict]:
    """Per (dtype, shape) of ``mode``: the default backend's ratio to the floor and speedup over the
    baseline, with a status where a target applies.

    A target holds ``device_type``, ``dtype``, ``shape`` (keys to match; a tuple value is a set),
    ``max_ratio_to_floor`` and/or ``min_speedup_vs_baseline`` (None: not checked) and optionally
    ``strict`` (the speedup must exceed the bound, not just reach it).
    """
    out = []
    for dt, shape, prov, ours, base in default_vs_baseline(rows, meta, mode, floor, baseline):
        ratio = ours.get("ratio_to_floor") if ours else None
        fast = speedup(ours, base)
        target = find_target(targets, meta.get("device_type"), dt, shape)
        status = None
        if target and prov == baseline:
            status = f"n/a (the default backend is the baseline {baseline})"
        elif target and ours is None:
            status = "n/a (default backend not measured)"
        elif target:
            ok = True
            if target["max_ratio_to_floor"] is not None:
                ok = ratio is not None and ratio <= target["max_ratio_to_floor"]
            bound = target["min_speedup_vs_baseline"]
            if bound is not None:
                beat = fast is not None and (fast > bound if target.get("strict") else fast >= bound)
                ok = ok and beat
            status = "PASS" if ok else "FAIL"
        out.append(target_row(dt, shape, prov, ratio, fast, target, status, mode=mode,
                              unstable=(ours or {}).get("unstable")))
    return out
