"""The benchmark harness: the smoke preset end to end, the row format and the saved-bytes metric."""

import json

import pytest
import torch

from peftcore.bench import harness, list_benches, main

from pc_testing import run_bench_smoke

REQUIRED = {
    "op", "provider", "mode", "dtype", "shape", "p50_ms", "p20_ms", "p80_ms", "peak_mem_bytes",
    "saved_bytes", "ratio_to_floor", "ratio_to_baseline", "tflops", "device", "torch", "triton",
    "commit", "timestamp",
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
        else:
            assert r["ratio_to_floor"] > 0
        if r["provider"] == "hf_peft":
            assert r["ratio_to_baseline"] == 1.0


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
                "skipped", "targets", "default_backend", "notes"):
        assert key in meta
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
    p20, p50, p80 = (harness._percentile(vals, q) for q in (0.2, 0.5, 0.8))
    assert p20 <= p50 <= p80 and p50 == 3.0


def test_merge_combines_runs(tmp_path):
    common = ["lora", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path), "--name", "m",
              "--modes", "full", "--dropout", "0", "--no-plot", "--no-progress", "--no-print", "--merge"]
    assert main(common + ["--providers", "floor"]) == 0
    assert main(common + ["--providers", "reference"]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert sorted(r["provider"] for r in data["rows"]) == ["floor", "reference"]
    ref = next(r for r in data["rows"] if r["provider"] == "reference")
    assert ref["ratio_to_floor"] > 0  # floor from the first run
    assert len(data["meta"]["runs"]) == 2
