"""The benchmark harness: the smoke preset end to end, the row format, the saved-bytes metric,
interleaved timing (order, per-round ratios, the instability flag), ceilings, compare and render."""

import json
from pathlib import Path

import pytest
import torch

from peftcore.bench import ceilings, harness, list_benches, main, timing

from pc_testing import run_bench_smoke

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "op", "provider", "mode", "dtype", "shape", "p50_ms", "p20_ms", "p80_ms", "peak_mem_bytes",
    "saved_bytes", "ratio_to_floor", "ratio_to_baseline", "tflops", "device", "torch", "triton",
    "commit", "timestamp",
    # interleaved rounds
    "rounds", "calls_per_round", "ratio_to_floor_p20", "ratio_to_floor_p80", "ratio_to_floor_spread",
    "ratio_to_baseline_p20", "ratio_to_baseline_p80", "ratio_to_baseline_spread", "ratio_method",
    "ratio_spread", "unstable", "pct_of_gemm_ceiling",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, _, data, elapsed = run_bench_smoke("lora", tmp_path_factory.mktemp("bench"))
    return out, data, elapsed


def test_smoke_is_fast_and_writes_files(smoke):
    out, data, elapsed = smoke
    assert elapsed < 20, f"smoke preset took {elapsed:.1f} s"
    assert (out / "lora_cpu_smoke.md").read_text().startswith("# lora benchmark")
    assert "## Targets" in (out / "lora_cpu_smoke.md").read_text()
    assert (out / "lora_cpu_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(data) == {"meta", "rows"}


def test_rows_have_required_keys_and_sane_values(smoke):
    _, data, _ = smoke
    rows = data["rows"]
    providers = {r["provider"] for r in rows}
    assert {"floor", "reference"} <= providers
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "full"}
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert set(r["shape"]) >= {"tokens", "in", "out", "r", "dropout"}
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["peak_mem_bytes"] is None  # CPU
        assert isinstance(r["saved_bytes"], int) and r["saved_bytes"] >= 0
        assert r["tflops"] > 0
        assert r["dtype"] == "float32"
        assert r["device"] and r["torch"] == torch.__version__ and r["commit"]
        if r["provider"] == "floor":
            assert r["ratio_to_floor"] == 1.0 and r["shape"]["r"] is None
            assert r["rounds"] == 2 * 25  # timed with each of the two (r, dropout) shapes, pooled
        else:
            assert r["ratio_to_floor"] > 0 and r["rounds"] == 25
        if r["provider"] == "hf_peft":
            assert r["ratio_to_baseline"] == 1.0
        # every ratio is a median of per-round ratios, with its spread
        assert r["ratio_method"] == "interleaved"
        assert r["ratio_to_floor_p20"] <= r["ratio_to_floor"] <= r["ratio_to_floor_p80"]
        assert r["ratio_to_floor_spread"] >= 0 and r["calls_per_round"] >= 1
        if r["provider"] != "floor":
            assert r["ratio_to_baseline_p20"] <= r["ratio_to_baseline"] <= r["ratio_to_baseline_p80"]
        assert r["unstable"] == (r["ratio_spread"] > timing.UNSTABLE_SPREAD)


def test_saved_bytes_reference_keeps_only_x_and_xa(smoke):
    _, data, _ = smoke
    rows = [r for r in data["rows"] if r["mode"] == "full"]
    for r in rows:
        s = r["shape"]
        if r["provider"] == "floor":
            continue
        x_bytes, xa_bytes = s["tokens"] * s["in"] * 4, s["tokens"] * s["r"] * 4
        if r["provider"] in ("reference", "cpp"):  # our backends
            assert r["saved_bytes"] <= x_bytes + xa_bytes + 256, r
        if r["provider"] == "hf_peft" and s["dropout"] > 0:
            # PEFT keeps the dropout output (and/or its mask) besides x and xa
            assert r["saved_bytes"] > x_bytes + xa_bytes + 256, r


def test_skipped_providers_recorded_with_reasons(smoke):
    _, data, _ = smoke
    meta, rows = data["meta"], data["rows"]
    skipped = {s["provider"]: s["reason"] for s in meta["skipped"]}
    assert "interpreter" in skipped["triton"]
    assert "cuda" in skipped and skipped["cuda"]
    if not any(r["provider"] == "cpp" for r in rows):
        assert skipped["cpp"]
    for s in meta["skipped"]:
        assert s["reason"] and s["cases"] >= 1
        assert not any(r["provider"] == s["provider"] for r in rows) or s["reason"].startswith("error")


def test_meta_and_targets(smoke):
    _, data, _ = smoke
    meta = data["meta"]
    for key in ("op", "preset", "command", "device", "torch", "triton", "commit", "timestamp",
                "skipped", "targets", "default_backend", "notes", "timing", "unstable", "unstable_rows"):
        assert key in meta
    assert meta["format"] == 2 and meta["timing"]["method"] == "interleaved"
    assert meta["timing"]["unstable_spread"] == timing.UNSTABLE_SPREAD
    assert meta["unstable"] == bool(meta["unstable_rows"])
    assert len(meta["unstable_rows"]) == sum(r["unstable"] for r in data["rows"])
    assert meta["default_backend"]["float32"] in ("reference", "cpp")
    assert len(meta["targets"]) == 2  # one per (r, dropout) shape of the smoke preset
    for t in meta["targets"]:
        assert t["ratio_to_floor"] > 0 and t["status"] is None  # no target at smoke size


def test_filters(tmp_path):
    rc = main(["lora", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--name", "f",
               "--providers", "floor,reference", "--modes", "full", "--dropout", "0.1", "--r", "2",
               "--no-plot", "--no-progress", "--no-print"])
    assert rc == 0
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert sorted(r["provider"] for r in rows) == ["floor", "reference"]
    assert all(r["mode"] == "full" for r in rows)
    ref = next(r for r in rows if r["provider"] == "reference")
    assert ref["shape"]["r"] == 2 and ref["shape"]["dropout"] == 0.1
    assert not (tmp_path / "f.png").exists()


def test_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "--preset cpu" in out and "hf_peft" in out
    assert "lora" in list_benches()


def test_saved_bytes_dedupes_storages_and_excludes_params():
    w = torch.randn(8, 6, requires_grad=True)
    x = torch.randn(5, 6, requires_grad=True)

    def fwd():
        h = x @ w.t()  # saves x and w (w excluded)
        return (h * x[:, :1]).sum() + (x.t() @ x).sum()  # x again (a view / the same storage)

    n = harness.saved_bytes(fwd, [w])
    h_bytes = 5 * 8 * 4
    assert n == x.numel() * 4 + h_bytes
    assert harness.saved_bytes(lambda: x.sum() * 2.0, []) == 0


def test_percentiles_are_ordered():
    vals = sorted([3.0, 1.0, 2.0, 10.0, 4.0])
    p20, p50, p80 = (timing.percentile(vals, q) for q in (0.2, 0.5, 0.8))
    assert p20 <= p50 <= p80 and p50 == 3.0


def test_merge_combines_runs(tmp_path):
    common = ["lora", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--name", "m",
              "--modes", "full", "--dropout", "0", "--no-plot", "--no-progress", "--no-print", "--merge"]
    assert main(common + ["--providers", "floor"]) == 0
    assert main(common + ["--providers", "reference"]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert sorted(r["provider"] for r in data["rows"]) == ["floor", "reference"]
    ref = next(r for r in data["rows"] if r["provider"] == "reference")
    assert ref["ratio_to_floor"] > 0  # floor from the first run: p50 over p50, no spread
    assert ref["ratio_method"] == "p50" and ref["ratio_to_floor_spread"] is None and not ref["unstable"]
    assert len(data["meta"]["runs"]) == 2


# ----------------------------------------------------------------------------- interleaved timing

CPU = torch.device("cpu")
ENV = {"device": "test CPU", "device_kind": "cpu", "torch": torch.__version__, "triton": None, "commit": "test"}


class FakeClock:
    """A clock that only the fake providers advance: provider p's call costs ``cost[p] * drift(k)``
    seconds, k = calls so far // 3 (the round, for three providers timed one call each).  The
    drift changes the machine's speed from round to round by up to 4x, as a busy host does."""

    def __init__(self, cost, drift=lambda k, p: 1 + k % 4, fail=None):
        self.t, self.n, self.log = 0.0, 0, []
        self.cost, self.drift, self.fail = cost, drift, fail

    def __call__(self):
        return self.t

    def tick(self, name):
        if self.fail and self.fail(name, self.n):
            raise RuntimeError(f"{name} broke")
        self.t += self.cost[name] * self.drift(self.n // 3, name)
        self.n += 1
        self.log.append(name)


class FakeBench(harness.Bench):
    """Three providers that only advance a FakeClock: A the floor, B the baseline, C ours."""

    op, floor, baseline, providers = "fake", "A", "B", ("A", "B", "C")

    def __init__(self, clock):
        self.clock = clock

    def setup(self, case, device):
        x = torch.zeros(1)

        def forward():
            self.clock.tick(case.provider)
            return x

        return harness.Setup(forward=forward, inputs=[], params=[])


def _fake_run(clock, rounds=8):
    bench = FakeBench(clock)
    cases = [harness.Case({"n": 1}, "float32", p) for p in bench.providers]
    cfg = timing.TimerConfig(min_run_time=0.0, rounds=rounds, clock=clock)
    rows, skipped = harness.run_cases(bench, cases, ["fwd"], CPU, cfg, ENV, progress=False)
    harness.add_ratios(bench, rows)
    return {r["provider"]: r for r in rows}, skipped


def test_providers_are_timed_round_robin_with_rotating_start():
    clock = FakeClock({"A": 1.0, "B": 2.0, "C": 3.0})
    _fake_run(clock, rounds=8)
    timed = clock.log[-3 * 8:]  # before them: setups, warm-ups, estimates
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    starts = ["A", "B", "C"]
    for i, order in enumerate(rounds):
        first = starts.index(order[0])
        assert order == (starts[first:] + starts[:first]), rounds  # A B C, B C A, C A B, ...
        assert order[0] == starts[i % 3], rounds
    assert timing.round_orders(["A", "B", "C"], 4) == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"],
                                                       ["A", "B", "C"]]


def test_ratios_are_medians_of_per_round_ratios_despite_drift():
    """The machine's speed changes 4x between rounds: each provider's own times spread, but the
    ratios of providers timed in the same round do not move."""
    rows, skipped = _fake_run(FakeClock({"A": 1.0, "B": 2.0, "C": 3.0}))
    assert not skipped
    a, b, c = rows["A"], rows["B"], rows["C"]
    assert a["p80_ms"] / a["p20_ms"] > 1.5  # drift is in the times
    assert b["ratio_to_floor"] == pytest.approx(2.0) and c["ratio_to_floor"] == pytest.approx(3.0)
    assert c["ratio_to_baseline"] == pytest.approx(1.5)
    assert c["ratio_to_floor_p20"] == pytest.approx(3.0) and c["ratio_to_floor_p80"] == pytest.approx(3.0)
    for r in rows.values():
        assert r["ratio_method"] == "interleaved" and r["ratio_spread"] == pytest.approx(0.0)
        assert r["unstable"] is False and r["rounds"] == 8 and r["calls_per_round"] == 1
    assert a["ratio_to_floor"] == 1.0 and a["ratio_to_baseline"] is None and b["ratio_to_baseline"] == 1.0


def test_wide_ratio_spread_is_flagged_unstable():
    """C alone is slowed down in every other round (a neighbour process): its ratio spreads."""
    clock = FakeClock({"A": 1.0, "B": 2.0, "C": 3.0}, drift=lambda k, p: 1.5 if (p == "C" and k % 2) else 1.0)
    rows, _ = _fake_run(clock, rounds=10)
    assert rows["C"]["ratio_spread"] > timing.UNSTABLE_SPREAD and rows["C"]["unstable"] is True
    assert rows["B"]["unstable"] is False
    bad = harness.unstable_rows(list(rows.values()))
    assert [u["provider"] for u in bad] == ["C"]


def test_provider_failing_while_timed_becomes_a_skip():
    clock = FakeClock({"A": 1.0, "B": 2.0, "C": 3.0}, drift=lambda k, p: 1.0,
                      fail=lambda name, n: name == "C" and n > 20)
    rows, skipped = _fake_run(clock)
    assert set(rows) == {"A", "B"}
    (s,) = skipped
    assert s["provider"] == "C" and s["reason"].startswith("error in fwd: RuntimeError: C broke")
    assert rows["B"]["ratio_to_floor"] == pytest.approx(2.0)


def test_shared_floor_is_timed_with_every_shape():
    bench = harness.Bench()
    bench.floor, bench.baseline = "floor", "peft"
    bench.floor_shape = lambda s: {**s, "r": None}
    cases = bench.grid_cases([("float32", {"m": 8, "r": 4}), ("float32", {"m": 8, "r": 8}),
                              ("float32", {"m": 16, "r": 4})], ["floor", "peft", "ours"])
    groups = [[(cases[i].provider, cases[i].shape["m"], cases[i].shape["r"]) for i in g]
              for g in harness.plan_groups(bench, cases)]
    assert groups == [[("floor", 8, None), ("peft", 8, 4), ("ours", 8, 4)],
                      [("floor", 8, None), ("peft", 8, 8), ("ours", 8, 8)],
                      [("floor", 16, None), ("peft", 16, 4), ("ours", 16, 4)]]


# ----------------------------------------------------------------------------- ceilings


def _rate_row(prov, tflops, gbps=None, dtype="float32"):
    return {"provider": prov, "mode": "full", "dtype": dtype, "shape": {"m": 1}, "tflops": tflops, "gbps": gbps}


def test_ceiling_below_a_provider_is_raised_and_recorded():
    c = {"gemm_tflops_float32": 0.20, "copy_gbps": 50.0}
    rows = [_rate_row("floor", 0.25, 10.0), _rate_row("ours", 0.22), _rate_row("other", 0.1, 60.0)]
    ceilings.apply_ceilings(rows, c)
    assert c["gemm_tflops_float32"] == 0.25 and c["copy_gbps"] == 60.0
    raised = {e["key"]: e for e in c["raised"]}
    assert raised["gemm_tflops_float32"]["measured"] == 0.20 and raised["gemm_tflops_float32"]["provider"] == "floor"
    assert raised["copy_gbps"]["measured"] == 50.0 and raised["copy_gbps"]["provider"] == "other"
    assert rows[0]["pct_of_gemm_ceiling"] == pytest.approx(100.0)
    assert all(r["pct_of_gemm_ceiling"] <= 100.0 for r in rows)
    assert all(r["pct_of_copy_ceiling"] is None or r["pct_of_copy_ceiling"] <= 100.0 for r in rows)
    ceilings.apply_ceilings(rows, c)  # again (a --merge): nothing above, the record stays
    assert len(c["raised"]) == 2
    none = [_rate_row("floor", 0.25)]
    ceilings.apply_ceilings(none, {})  # no ceilings (smoke): no percentages
    assert none[0]["pct_of_gemm_ceiling"] is None


def test_gemm_candidates_include_the_cases_shapes():
    cands = ceilings.gemm_candidates(CPU, [(64, 40, 48), (64, 48, 40), (64, 40, 48)])
    for lay in ceilings.LAYOUTS:
        assert (64, 40, 48, lay) in cands and (64, 48, 40, lay) in cands
    assert len(cands) == len(set(cands))
    assert {c[0] for c in cands} >= set(ceilings.SQUARES["cpu"])


def test_no_provider_exceeds_the_ceilings(tmp_path, monkeypatch):
    # small squares and a short budget keep this at seconds; the case's own GEMMs are candidates
    monkeypatch.setitem(ceilings.SQUARES, "cpu", (64,))
    monkeypatch.setitem(ceilings.COPY_BYTES, "cpu", (1 << 20,))
    monkeypatch.setattr(ceilings, "BUDGET_S", 0.3)
    rc = main(["lora", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--name", "c",
               "--ceilings", "--providers", "floor,reference", "--modes", "fwd,full", "--dropout", "0",
               "--no-plot", "--no-progress", "--no-print"])
    assert rc == 0
    data = json.loads((tmp_path / "c.json").read_text())
    c = data["meta"]["ceilings"]
    assert c["gemm_tflops_float32"] > 0 and c["copy_gbps"] > 0 and c["gemm_shape_float32"]
    assert isinstance(c["raised"], list)
    for r in data["rows"]:
        assert 0 < r["pct_of_gemm_ceiling"] <= 100.0 + 1e-9, r
    for e in c["raised"]:
        assert e["raised_to"] > e["measured"] and e["provider"] in ("floor", "reference")
    if c["raised"]:
        assert "raised" in (tmp_path / "c.md").read_text()


# ----------------------------------------------------------------------------- compare, render


def _file(path, rows, **meta):
    meta = {"op": "lora", "device": "test CPU", "commit": "abc", "timestamp": "t", **meta}
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def _crow(prov, p50, mode="full", r=16, ratio=None, **extra):
    shape = {"tokens": 2048, "in": 1024, "out": 1024, "r": r, "dropout": 0.0, "bias": True}
    return {"op": "lora", "provider": prov, "mode": mode, "dtype": "float32", "shape": shape, "p50_ms": p50,
            "ratio_to_floor": ratio, **extra}


@pytest.fixture()
def two_files(tmp_path):
    # OLD in the format-1 layout (no interleaving keys), NEW in the current one
    old = _file(tmp_path / "old.json", [_crow("floor", 10.0, r=None, ratio=1.0), _crow("cpp", 12.0, ratio=1.2),
                                        _crow("hf_peft", 15.0, ratio=1.5), _crow("cpp", 5.0, mode="fwd")],
                format=1)
    new = _file(tmp_path / "new.json", [_crow("floor", 10.0, r=None, ratio=1.0), _crow("cpp", 14.4, ratio=1.44),
                                        _crow("hf_peft", 15.0, ratio=1.5, unstable=True),
                                        _crow("reference", 30.0, ratio=3.0)], format=2)
    return old, new


def test_compare_prints_ratios_and_unmatched(two_files, capsys):
    old, new = two_files
    assert main(["compare", str(old), str(new)]) == 0  # no threshold: a report only
    out = capsys.readouterr().out
    lines = {ln.split("|")[5].strip(): ln for ln in out.splitlines() if ln.startswith("| lora")}
    assert set(lines) == {"floor", "cpp", "hf_peft"}
    assert "| 1.200 |" in lines["cpp"] and "| 1.000 |" in lines["floor"] and "unstable" in lines["hf_peft"]
    gm = (1.0 * 1.2 * 1.0) ** (1 / 3)
    assert f"geometric mean of new/old over 3 matched case(s): {gm:.3f}" in out
    assert "only in OLD (1):" in out and "only in NEW (1):" in out
    assert "fwd cpp" in out.split("only in OLD")[1] and "full reference" in out.split("only in NEW")[1]


def test_compare_threshold_exits_nonzero_on_regression(two_files, capsys):
    old, new = two_files
    assert main(["compare", str(old), str(new), "--threshold", "1.10"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED" in out and "1 case(s) regressed beyond 1.1x" in out
    assert main(["compare", str(old), str(new), "--threshold", "1.25"]) == 0
    # the same through the peftcore console entry, which forwards `bench ...`
    from peftcore.cli import main as cli_main

    assert cli_main(["bench", "compare", str(old), str(new), "--threshold", "1.10"]) == 1
    # on the ratio to the floor: cpp went 1.2 -> 1.44 as well
    assert main(["compare", str(old), str(new), "--metric", "ratio_to_floor", "--threshold", "1.10"]) == 1
    assert main(["compare", str(old), str(new), "--providers", "floor,hf_peft", "--threshold", "1.01"]) == 0
    assert main(["compare", str(old), str(old) + ".missing"]) == 2


def test_old_result_files_still_load_in_compare_and_render(tmp_path, capsys):
    old = ROOT / "benchmarks" / "results" / "lora_cpu.json"
    if not old.exists():
        pytest.skip("no committed lora_cpu.json")
    assert main(["compare", str(old), str(old), "--threshold", "1.0"]) == 0
    assert "geometric mean of new/old" in capsys.readouterr().out
    assert main(["render", str(old), "--out", str(tmp_path), "--no-plot"]) == 0
    md = (tmp_path / "lora_cpu.md").read_text()
    assert md.startswith("# lora benchmark") and "## full" in md
