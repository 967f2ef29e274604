"""``peftcore bench phm`` and ``peftcore bench lora-mixed``: smoke presets end to end, every
provider's setup against an independent computation, the output check, the case grid and targets."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from peftcore.bench import _parser, list_benches, main
from peftcore.bench.harness import Case, Skip
from peftcore.bench.lora_mixed import BENCH as MIXED
from peftcore.bench.lora_mixed import TARGETS as MIXED_TARGETS
from peftcore.bench.phm import BENCH as PHM
from peftcore.bench.phm import TARGETS as PHM_TARGETS
from peftcore.bench.phm import shape_targets

from pc_testing import run_bench_smoke

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
REQUIRED = {
    "op", "provider", "mode", "dtype", "shape", "p50_ms", "p20_ms", "p80_ms", "samples", "timer",
    "peak_mem_bytes", "saved_bytes", "ratio_to_floor", "ratio_to_baseline", "flops", "tflops", "bytes",
    "gbps", "is_default", "device", "device_kind", "torch", "triton", "commit", "timestamp", "check_rel_err",
}


@pytest.fixture(scope="module")
def phm(tmp_path_factory):
    return run_bench_smoke("phm", tmp_path_factory.mktemp("bench_phm"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return run_bench_smoke("lora-mixed", tmp_path_factory.mktemp("bench_mixed"))


def _files_ok(out, stem, data, elapsed, op, floor, baseline):
    assert elapsed < 20, f"smoke preset took {elapsed:.1f} s"
    md = (out / f"{stem}.md").read_text()
    assert md.startswith(f"# {op} benchmark") and "## Targets" in md and "## Skipped" in md
    assert f"× {floor}" in md and f"× {baseline}" in md
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = data["meta"]
    for key in ("op", "preset", "command", "device", "torch", "triton", "commit", "timestamp", "skipped",
                "targets", "default_backend", "notes", "floor", "baseline", "runs"):
        assert key in meta, key
    assert meta["op"] == op and meta["floor"] == floor and meta["baseline"] == baseline
    assert meta["targets"] and all(t["status"] is None for t in meta["targets"])  # no target at smoke size


def _rows_ok(rows, floor, baseline, modes):
    assert {r["mode"] for r in rows} == set(modes)
    assert {floor, baseline} <= {r["provider"] for r in rows}
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["dtype"] == "float32" and r["torch"] == torch.__version__ and r["commit"]
        assert r["tflops"] > 0 and r["gbps"] > 0
        assert isinstance(r["peak_mem_bytes"], int) and isinstance(r["saved_bytes"], int)
        assert r["check_rel_err"] < 1e-5
        if r["provider"] == floor:
            assert r["ratio_to_floor"] == 1.0 and r["ratio_to_baseline"] is None
        else:
            assert r["ratio_to_floor"] > 0
        if r["provider"] == baseline:
            assert r["ratio_to_baseline"] == 1.0


def _skips_ok(meta, rows):
    skipped = {s["provider"]: s["reason"] for s in meta["skipped"]}
    assert "interpreter" in skipped["triton"]
    assert "cuda" in skipped["cuda"].lower()
    measured = {r["provider"] for r in rows}
    assert "cpp" in measured or skipped["cpp"]  # the cpp kernels may not be built yet: then a reason
    for s in meta["skipped"]:
        assert s["reason"] and s["cases"] >= 1
        assert s["provider"] not in measured or s["reason"].startswith("error")


# ----------------------------------------------------------------------------- phm


def test_phm_smoke_files_rows_skips(phm):
    out, stem, data, elapsed = phm
    _files_ok(out, stem, data, elapsed, "phm", "linear", "materialize")
    rows = data["rows"]
    _rows_ok(rows, "linear", "materialize", ("fwd", "bwd", "full"))
    _skips_ok(data["meta"], rows)
    assert {"reference"} <= {r["provider"] for r in rows}
    for r in rows:
        assert set(r["shape"]) == {"tokens", "in", "mid", "out", "n", "k"}
        if r["provider"] == "linear":
            assert r["shape"]["n"] is None and r["shape"]["k"] is None
    # the smoke preset holds one block and one single layer
    assert {r["shape"]["mid"] is None for r in rows} == {True, False}


def test_phm_materialize_keeps_h_alive(phm):
    """Autograd keeps the materialized H [in, out] for dx; the factored op keeps x and t only."""
    for r in phm[2]["rows"]:
        s = r["shape"]
        if r["mode"] != "full" or s["mid"] is not None:
            continue
        x_bytes, h_bytes = s["tokens"] * s["in"] * 4, s["in"] * s["out"] * 4
        t_bytes = s["tokens"] * s["n"] ** 2 * s["k"] * 4 if s["n"] else 0
        if r["provider"] == "materialize":
            assert r["saved_bytes"] >= x_bytes + h_bytes
        if r["provider"] in ("reference", "cpp"):
            assert r["saved_bytes"] <= x_bytes + t_bytes + 1024


def _phm_einsum(x, rule, layers):
    """y[m,b,q] = Σ x[m,a,p] rule[i,a,b] W_left[i,p,r] W_right[i,r,q] + bias, GELU between layers
    (written out, no Kronecker product: independent of both phm_weight and the op)."""
    h = x
    n = rule.shape[0]
    for j, (wl, wr, b) in enumerate(layers):
        h = F.gelu(h) if j else h
        hv = h.reshape(h.shape[0], n, -1)
        h = torch.einsum("map,iab,ipr,irq->mbq", hv, rule, wl, wr).reshape(h.shape[0], -1) + b
    return h


@pytest.mark.parametrize("mid", [10, None])
def test_phm_every_provider_computes_the_formula(mid):
    shape = {"tokens": 9, "in": 12, "mid": mid, "out": 20, "n": 2, "k": 3}
    t = PHM.tensors(shape, torch.float64, CPU)
    x = t["x"].clone().requires_grad_(True)
    ref = _phm_einsum(x, t["rule"], t["layers"])
    dy = torch.randn_like(ref)
    (dx_ref,) = torch.autograd.grad(ref, x, dy)
    measured = 0
    for prov in PHM.providers:
        # The floor's own rows carry n, k None (Compacter's 4, 1 build its H); given, they are used.
        case = Case(shape=dict(shape), dtype="float32", provider=prov)
        try:
            setup = PHM.setup(case, CPU)
        except Skip as e:
            assert prov in ("cpp", "triton", "cuda") and str(e), (prov, e)
            continue
        measured += 1
        y = setup.forward()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5, prov
        grads = torch.autograd.grad(y, setup.inputs, dy.float())
        assert all(g is not None and g.shape == i.shape for g, i in zip(grads, setup.inputs)), prov
        # every provider computes the same function of x, so dx agrees too
        assert ((grads[0].double() - dx_ref).norm() / dx_ref.norm()).item() < 1e-5, prov
        n_layers = 2 if mid else 1
        assert len(setup.inputs) == 1 + (2 * n_layers if prov == "linear" else 1 + 3 * n_layers)
    assert measured >= 3  # linear, materialize, reference


def test_phm_wrong_output_is_skipped(monkeypatch):
    """A provider whose output is wrong is not timed: setup raises Skip('wrong result ...')."""
    from peftcore.reference.phm import phm_linear_formula

    def transposed_rule(x, rule, wl, wr, b):
        return phm_linear_formula(x, rule.transpose(1, 2).contiguous(), wl, wr, b)

    monkeypatch.setattr(type(PHM), "_phm_fn", staticmethod(lambda prov: transposed_rule))
    case = Case(shape={"tokens": 9, "in": 12, "mid": None, "out": 20, "n": 2, "k": 1}, dtype="float32",
                provider="materialize")
    with pytest.raises(Skip, match="wrong result"):
        PHM.setup(case, CPU)


def _phm_args(*argv):
    return _parser().parse_args(["phm", *argv])


def test_phm_case_grid():
    args = _phm_args("--preset", "gpu")
    cases = PHM.cases(args)
    shapes = {tuple(c.shape.items()) for c in cases if c.provider == "materialize"}
    assert len(shapes) == 8  # 2 token counts x (2 blocks + 4096 single at k 1 and k 8)
    floor = [c for c in cases if c.provider == "linear"]
    assert len(floor) == 6  # k 1 and k 8 of the 4096 single layer share one dense floor
    assert {c.dtype for c in cases} == {"bfloat16"}
    assert PHM.cases(_phm_args("--preset", "cpu", "--block", "1"))[0].shape["mid"] == 32
    singles = PHM.cases(_phm_args("--preset", "cpu", "--block", "0", "--providers", "reference"))
    assert [(c.shape["in"], c.shape["out"]) for c in singles] == [(1024, 32), (32, 1024)]
    custom = PHM.cases(_phm_args("--preset", "cpu", "--layers", "768x24x768,768x768", "--k", "1,4",
                                 "--providers", "reference"))
    assert {(c.shape["mid"], c.shape["k"]) for c in custom} == {(24, 1), (24, 4), (None, 1), (None, 4)}
    with pytest.raises(SystemExit):
        PHM.cases(_phm_args("--preset", "cpu", "--layers", "30x30", "--n", "4"))  # 4 does not divide 30


def test_phm_flops_rank_providers():
    full = {"tokens": 2048, "in": 1024, "mid": 32, "out": 1024, "n": 4, "k": 1}
    f = {p: PHM.flops(Case(full, "float32", p), "full") for p in ("linear", "materialize", "reference")}
    assert f["reference"] < f["linear"] < f["materialize"]
    assert PHM.bytes_moved(Case(full, "float32", "linear"), "fwd") == 2048 * 2048 * 4


# ----------------------------------------------------------------------------- lora-mixed


def test_mixed_smoke_files_rows_skips(mixed):
    out, stem, data, elapsed = mixed
    _files_ok(out, stem, data, elapsed, "lora_mixed", "base", "loop")
    rows = data["rows"]
    _rows_ok(rows, "base", "loop", ("fwd",))
    _skips_ok(data["meta"], rows)
    assert data["meta"]["modes"] == ["fwd"]
    provs = {r["provider"] for r in rows}
    skipped = {s["provider"]: s["reason"] for s in data["meta"]["skipped"]}
    assert "peft" in provs or "peft" in skipped["peft"]
    for r in rows:
        assert set(r["shape"]) == {"batch", "seq", "in", "out", "adapters", "r", "assign", "bias"}
        assert r["saved_bytes"] == 0  # inference mode saves nothing
        if r["provider"] == "base":
            assert r["shape"]["adapters"] is None
        else:
            assert 1 <= r["adapters_present"] <= r["shape"]["adapters"]
    assert {r["shape"]["assign"] for r in rows if r["provider"] == "loop"} == {"round_robin", "random"}


def test_mixed_every_provider_computes_per_example_lora():
    shape = {"batch": 6, "seq": 3, "in": 10, "out": 14, "adapters": 4, "r": 2, "assign": "random", "bias": True}
    t = MIXED.tensors(shape, torch.float64, CPU)
    idx = t["idx"].tolist()
    assert len(set(idx)) > 1  # a mixed batch
    x, w, b = t["x"], t["w"], t["bias"]
    base = F.linear(x, w, b)
    lora = torch.stack([base[e] + t["scaling"][j] * (x[e] @ t["a"][j].t()) @ t["b"][j].t()
                        for e, j in enumerate(idx)])
    measured = 0
    for prov in MIXED.providers:
        case = Case(shape=MIXED.floor_shape(shape) if prov == "base" else dict(shape), dtype="float32",
                    provider=prov)
        try:
            setup = MIXED.setup(case, CPU)
        except Skip as e:
            assert prov in ("cpp", "triton", "cuda") or "peft" in str(e), (prov, e)
            assert str(e)
            continue
        measured += 1
        y = setup.forward()
        assert y.shape == (6, 3, 14) and y.is_inference()
        ref = base if prov == "base" else lora
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5, prov
    assert measured >= 2  # base, loop


def test_mixed_wrong_scaling_is_skipped(monkeypatch):
    """A kernel that applied adapter 0's scaling to every example would be skipped, not timed."""
    import peftcore.ops

    real = peftcore.ops.lora_mixed_linear

    def one_scaling(x, w, b, a, bb, sc, idx, backend=None):
        return real(x, w, b, a, bb, sc[:1].expand_as(sc).contiguous(), idx, backend=backend)

    monkeypatch.setattr(peftcore.ops, "lora_mixed_linear", one_scaling)
    shape = {"batch": 4, "seq": 2, "in": 8, "out": 6, "adapters": 3, "r": 2, "assign": "round_robin",
             "bias": False}
    with pytest.raises(Skip, match="wrong result"):
        MIXED.setup(Case(shape, "float32", "loop"), CPU)


def test_mixed_case_grid_and_forward_only():
    def cases(*argv):
        return MIXED.cases(_parser().parse_args(["lora-mixed", *argv]))

    gpu = cases("--preset", "gpu")
    assert len({tuple(c.shape.items()) for c in gpu if c.provider == "loop"}) == 16
    assert len([c for c in gpu if c.provider == "base"]) == 4  # one per (B, S)
    cpu = cases("--preset", "cpu", "--providers", "loop")
    assert {(c.shape["batch"], c.shape["seq"]) for c in cpu} == {(8, 128), (32, 32)}
    assert {c.shape["adapters"] for c in cpu} == {4, 16}
    new = cases("--preset", "cpu", "--providers", "loop", "--batch", "3", "--seq", "5", "--assign", "random")
    assert {(c.shape["batch"], c.shape["seq"], c.shape["assign"]) for c in new} == {(3, 5, "random")}
    with pytest.raises(SystemExit):
        cases("--preset", "smoke", "--modes", "fwd,full")


# ----------------------------------------------------------------------------- targets, CLI


def _row(prov, p50, shape, mode="full", dtype="float32", ratio=None):
    return {"provider": prov, "mode": mode, "dtype": dtype, "shape": shape, "p50_ms": p50, "ratio_to_floor": ratio}


def test_phm_targets_cpu_and_gpu():
    cpu = {"tokens": 2048, "in": 1024, "mid": 32, "out": 1024, "n": 4, "k": 1}
    meta = {"device_type": "cpu", "default_backend": {"float32": "cpp"}}
    rows = [_row("materialize", 3.0, cpu, ratio=1.4), _row("cpp", 2.1, cpu, ratio=1.05)]
    (t,) = shape_targets(rows, meta, "linear", "materialize", PHM_TARGETS, "full")
    assert t["status"] == "PASS" and t["speedup_vs_baseline"] == pytest.approx(3.0 / 2.1)
    rows[1]["ratio_to_floor"] = 1.2
    (t,) = shape_targets(rows, meta, "linear", "materialize", PHM_TARGETS, "full")
    assert t["status"] == "FAIL"
    (t,) = shape_targets(rows[:1], meta, "linear", "materialize", PHM_TARGETS, "full")
    assert t["status"].startswith("n/a")
    gpu = {"tokens": 16384, "in": 4096, "mid": None, "out": 4096, "n": 4, "k": 8}
    meta = {"device_type": "cuda", "default_backend": {"bfloat16": "triton"}}
    rows = [_row("materialize", 3.0, gpu, dtype="bfloat16"), _row("triton", 1.9, gpu, dtype="bfloat16")]
    (t,) = shape_targets(rows, meta, "linear", "materialize", PHM_TARGETS, "full")
    assert t["status"] == "PASS"
    rows[1]["p50_ms"] = 2.1  # 1.43x
    (t,) = shape_targets(rows, meta, "linear", "materialize", PHM_TARGETS, "full")
    assert t["status"] == "FAIL"


def test_mixed_targets_need_the_kernel_to_beat_the_loop():
    shape = {"batch": 8, "seq": 128, "in": 1024, "out": 1024, "adapters": 16, "r": 16, "assign": "random",
             "bias": True}
    meta = {"device_type": "cpu", "default_backend": {"float32": "cpp"}}
    rows = [_row("loop", 2.0, shape, "fwd"), _row("cpp", 1.5, shape, "fwd")]
    (t,) = shape_targets(rows, meta, "base", "loop", MIXED_TARGETS, "fwd")
    assert t["status"] == "PASS" and t["mode"] == "fwd"
    rows[1]["p50_ms"] = 2.0  # a tie does not beat the loop
    (t,) = shape_targets(rows, meta, "base", "loop", MIXED_TARGETS, "fwd")
    assert t["status"] == "FAIL"
    meta["default_backend"]["float32"] = "loop"  # no kernel: nothing to compare
    (t,) = shape_targets(rows, meta, "base", "loop", MIXED_TARGETS, "fwd")
    assert t["status"].startswith("n/a")


def test_list_and_scripts(capsys):
    assert main(["--list"]) == 0
    text = capsys.readouterr().out
    assert text == list_benches() + "\n"
    assert "phm: providers linear, materialize, reference, cpp, triton, cuda" in text
    assert "lora-mixed: providers base, loop, peft, cpp, triton, cuda" in text
    for script, flag in (("bench_phm.py", "--block"), ("bench_lora_mixed.py", "--assign")):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0 and flag in out.stdout, out.stderr[-500:]


@pytest.mark.gpu
def test_gpu_smoke_all_providers(tmp_path):
    """On the GPU machine: every provider measured or skipped with a reason, bf16, CUDA peaks."""
    for op in ("phm", "lora-mixed"):
        rc = main([op, "--preset", "smoke", "--device", "cuda", "--dtype", "bf16", "--out", str(tmp_path),
                   "--no-progress", "--no-print", "--no-ceilings"])
        assert rc == 0
        data = json.loads(next(tmp_path.glob(f"{op.replace('-', '_')}_*_smoke.json")).read_text())
        rows, skipped = data["rows"], {s["provider"]: s["reason"] for s in data["meta"]["skipped"]}
        measured = {r["provider"] for r in rows}
        bench = PHM if op == "phm" else MIXED
        for p in bench.providers:
            assert p in measured or skipped.get(p), p
        assert "cpp" not in measured  # CPU only
        for r in rows:
            assert r["dtype"] == "bfloat16" and isinstance(r["peak_mem_bytes"], int)
            assert r["check_rel_err"] < 5e-2
