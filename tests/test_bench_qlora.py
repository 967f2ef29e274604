"""``peftcore bench qlora``: the smoke preset end to end (PEFT + bitsandbytes beside ours), and our
providers computing what the whole-weight dequantization computes."""

import pytest
import torch

from peftcore.bench.harness import Case
from peftcore.bench.qlora import BENCH, TARGETS

from pc_testing import rel_err, run_bench_smoke

CPU = torch.device("cpu")


def test_smoke_writes_every_provider_and_the_targets(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the benchmark's baseline (a test dependency)")
    out, stem, data, elapsed = run_bench_smoke("qlora", tmp_path)
    assert elapsed < 60, f"smoke preset took {elapsed:.1f} s"
    text = (out / f"{stem}.md").read_text()
    assert text.startswith("# qlora benchmark") and "## Targets" in text
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    provs = {r["provider"] for r in data["rows"] if r.get("p50_ms")}
    assert {"floor", "torch_dequant", "peft_bnb", "reference", "cpp"} <= provs, provs
    assert all(r["peak_mem_bytes"] is not None for r in data["rows"] if r.get("p50_ms"))
    assert [t["name"] for t in TARGETS][:2] and len(data["meta"]["targets"]) == 2


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("prov", ["reference", "cpp"])
def test_ours_equal_the_whole_weight_dequantization(prov, p):
    shape = {"tokens": 33, "in": 96, "out": 80, "r": 4, "dropout": p, "bias": True}
    ref = BENCH.setup(Case(shape, "float32", "torch_dequant"), CPU)
    ours = BENCH.setup(Case(shape, "float32", prov), CPU)
    y0, y1 = ref.forward(), ours.forward()
    assert rel_err(y1, y0) < 1e-6
    g = torch.randn_like(y0)
    g0 = torch.autograd.grad(y0, ref.inputs, g)
    g1 = torch.autograd.grad(y1, ours.inputs, g)
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-5
