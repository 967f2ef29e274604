"""The distillation benchmarks (peftcore bench distill / fused-distill): smoke presets end to end,
the row format, skipped providers and the target logic."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftcore.bench import harness, list_benches, main
from peftcore.bench.distill import TARGETS as KL_TARGETS
from peftcore.bench.distill import evaluate_targets
from peftcore.bench.fused_distill import TARGETS as FUSED_TARGETS

from pc_testing import run_bench_smoke

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "op", "provider", "mode", "dtype", "shape", "p50_ms", "p20_ms", "p80_ms", "peak_mem_bytes",
    "saved_bytes", "ratio_to_floor", "ratio_to_baseline", "tflops", "gbps", "device", "torch",
    "triton", "commit", "timestamp", "peak_mem_logits", "saved_logits", "logits_bytes", "check_rel_err",
}


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    return run_bench_smoke("distill", tmp_path_factory.mktemp("bench_distill"))


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return run_bench_smoke("fused-distill", tmp_path_factory.mktemp("bench_fused"))


def _files_ok(out, stem, data, elapsed, op):
    assert elapsed < 20, f"smoke preset took {elapsed:.1f} s"
    md = (out / f"{stem}.md").read_text()
    assert md.startswith(f"# {op} benchmark") and "## Targets" in md and "## Skipped" in md
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(data) == {"meta", "rows"}
    meta = data["meta"]
    for key in ("op", "preset", "command", "device", "torch", "triton", "commit", "timestamp",
                "skipped", "targets", "default_backend", "notes", "baseline", "libraries"):
        assert key in meta, key
    assert meta["op"] == op and meta["preset"] == "smoke" and meta["floor"] is None
    assert "liger_kernel" in meta["libraries"]
    for s in meta["skipped"]:
        assert s["reason"] and s["cases"] >= 1
    assert len(meta["targets"]) == 1 and meta["targets"][0]["status"] is None  # no target at smoke size


def _rows_ok(rows, baseline, logits_of):
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "full"}
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["dtype"] == "float32" and r["torch"] == torch.__version__ and r["commit"]
        assert r["ratio_to_floor"] is None  # these ops have no floor provider
        assert r["ratio_to_baseline"] > 0
        if r["provider"] == baseline:
            assert r["ratio_to_baseline"] == 1.0
        assert r["logits_bytes"] == logits_of(r["shape"])
        # CPU peak via the profiler: an int, and the backward of a loss allocates at least the gradient
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] >= 0
        assert r["peak_mem_logits"] == pytest.approx(r["peak_mem_bytes"] / r["logits_bytes"])
        assert isinstance(r["saved_bytes"], int) and r["saved_bytes"] >= 0
        assert r["check_rel_err"] < 1e-3


def test_kl_smoke_files(kl):
    _files_ok(*kl, "distill")


def test_kl_rows(kl):
    _, _, data, _ = kl
    rows = data["rows"]
    assert {"torch_eager", "reference"} <= {r["provider"] for r in rows}
    _rows_ok(rows, "torch_eager", lambda s: s["tokens"] * s["vocab"] * 4)
    for r in rows:
        assert set(r["shape"]) == {"tokens", "vocab", "temperature"}
        assert r["tflops"] is None
        assert (r["gbps"] is None) == (r["mode"] == "bwd")
        if r["mode"] == "full":
            assert r["bytes"] == 3 * r["logits_bytes"] and r["gbps"] > 0
            assert r["peak_mem_logits"] >= 0.99  # the gradient
        if r["provider"] == "torch_eager" and r["mode"] == "full":
            assert r["peak_mem_logits"] >= 2  # log-softmax outputs and the gradient
            assert r["saved_logits"] >= 2
        if r["provider"] in ("reference", "cpp"):
            # the single-pass op keeps only the gradient for the backward
            assert r["saved_logits"] == pytest.approx(1.0, abs=0.01)


def test_kl_skipped_with_reasons(kl):
    _, _, data, _ = kl
    meta, rows = data["meta"], data["rows"]
    skipped = {s["provider"]: s["reason"] for s in meta["skipped"]}
    assert "smoke" in skipped["torch_compile"]
    assert "liger" in skipped["liger"].lower() and "CPU" in skipped["liger"]
    assert "interpreter" in skipped["triton"]
    assert "cuda" in skipped["cuda"]
    measured = {r["provider"] for r in rows}
    assert "cpp" in measured or skipped["cpp"]
    for s in meta["skipped"]:
        assert s["provider"] not in measured or s["reason"].startswith("error")
    assert meta["default_backend"]["float32"] in ("cpp", "reference")


def test_fused_smoke_files(fused):
    _files_ok(*fused, "fused_distill")


def test_fused_rows(fused):
    _, _, data, _ = fused
    meta, rows = data["meta"], data["rows"]
    assert "unfused_torch" in {r["provider"] for r in rows}
    _rows_ok(rows, "unfused_torch", lambda s: s["tokens"] * s["vocab"] * 4)
    for r in rows:
        assert set(r["shape"]) == {"tokens", "hs", "ht", "vocab", "temperature", "head_grad"}
        assert r["tflops"] > 0 and r["flops"] > 0
        if r["provider"] == "unfused_torch" and r["mode"] == "full":
            assert r["peak_mem_logits"] >= 2  # both logits, at least
        if r["provider"] == "ours":
            assert r["chunks"] >= 1 and r["kl_backend"]
    skipped = {s["provider"]: s["reason"] for s in meta["skipped"]}
    assert "liger" in skipped
    assert "ours" in {r["provider"] for r in rows} or skipped["ours"]
    assert meta["default_backend"]["float32"] == "ours"


def _row(prov, p50, peak, shape, dtype="float32", mode="full"):
    return {"provider": prov, "mode": mode, "dtype": dtype, "shape": shape, "p50_ms": p50,
            "peak_mem_bytes": peak, "peak_mem_logits": None if peak is None else peak / 100}


def test_kl_targets_pass_and_fail():
    cpu = {"tokens": 4096, "vocab": 32000, "temperature": 2.0}
    meta = {"device_type": "cpu", "default_backend": {"float32": "cpp"}}
    rows = [_row("torch_eager", 400.0, 500, cpu), _row("cpp", 90.0, 100, cpu)]
    (t,) = evaluate_targets(rows, meta, "torch_eager", KL_TARGETS, logits_peak=True)
    assert t["status"] == "PASS" and t["speedup_vs_baseline"] == pytest.approx(400 / 90)
    rows[1]["p50_ms"] = 110.0
    (t,) = evaluate_targets(rows, meta, "torch_eager", KL_TARGETS, logits_peak=True)
    assert t["status"] == "FAIL"
    (t,) = evaluate_targets(rows[:1], meta, "torch_eager", KL_TARGETS, logits_peak=True)
    assert t["status"].startswith("n/a")
    gpu = {"tokens": 8192, "vocab": 128256, "temperature": 2.0}
    meta = {"device_type": "cuda", "default_backend": {"bfloat16": "triton"}}
    fast = [_row("torch_eager", 30.0, 900, gpu, "bfloat16"), _row("triton", 5.0, 100, gpu, "bfloat16")]
    (t,) = evaluate_targets(fast, meta, "torch_eager", KL_TARGETS, logits_peak=True)
    assert t["status"] == "PASS" and t["peak_mem"] == 1.0 and t["peak_mem_unit"] == "logits"
    fast[1]["peak_mem_logits"] = 2.0  # an extra logits-sized tensor besides the gradient
    (t,) = evaluate_targets(fast, meta, "torch_eager", KL_TARGETS, logits_peak=True)
    assert t["status"] == "FAIL"


def test_fused_targets_at_every_n():
    meta = {"device_type": "cuda", "default_backend": {"bfloat16": "ours"}}
    rows = []
    for n in (1024, 16384):
        shape = {"tokens": n, "hs": 2048, "ht": 4096, "vocab": 128256, "temperature": 2.0, "head_grad": False}
        rows += [_row("unfused_torch", 10.0, 1000, shape, "bfloat16"), _row("ours", 9.0, 150, shape, "bfloat16")]
    rows[-1]["peak_mem_bytes"] = 300  # 30% of unfused at N = 16384
    out = evaluate_targets(rows, meta, "unfused_torch", FUSED_TARGETS, logits_peak=False)
    assert [t["status"] for t in out] == ["PASS", "FAIL"]
    assert out[0]["peak_mem"] == pytest.approx(0.15)


def test_cpu_peak_memory_sees_transients():
    def fn():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        a.fill_(1)
        del a
        return torch.empty(10, dtype=torch.uint8)

    assert harness.cpu_peak_memory(fn) >= 1 << 20


def test_list_and_script():
    text = list_benches()
    assert "distill: providers torch_eager" in text and "fused-distill: providers unfused_torch" in text
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_distill.py"), "--fused", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--hs" in out.stdout


@pytest.mark.gpu
def test_gpu_smoke_all_providers(tmp_path):
    """On the GPU machine: every provider either measured or skipped with a reason, bf16, CUDA peaks."""
    for op, provs in (("distill", "torch_eager,torch_compile,liger,reference,triton,cpp,cuda"),
                      ("fused-distill", "unfused_torch,liger,ours")):
        rc = main([op, "--preset", "smoke", "--device", "cuda", "--dtype", "bf16", "--providers", provs,
                   "--out", str(tmp_path), "--no-progress", "--no-print", "--no-ceilings"])
        assert rc == 0
        data = json.loads(next(tmp_path.glob(f"{op.replace('-', '_')}_*_smoke.json")).read_text())
        rows, skipped = data["rows"], {s["provider"]: s["reason"] for s in data["meta"]["skipped"]}
        measured = {r["provider"] for r in rows}
        for p in provs.split(","):
            assert p in measured or skipped.get(p), p
        for r in rows:
            assert r["dtype"] == "bfloat16" and isinstance(r["peak_mem_bytes"], int)
            assert r["check_rel_err"] < 5e-2
        assert "cpp" not in measured  # CPU only
        if "liger" not in measured:
            assert "not importable" in skipped["liger"]
        if op == "distill" and "torch_compile" in measured:
            comp = [r for r in rows if r["provider"] == "torch_compile"]
            assert all(r["compile_warmup_s"] > 0 for r in comp)
