"""``peftcore bench compile``: a LoRA training step compiled (fullgraph, inductor) against eager."""

import pytest

from pc_testing import run_bench_smoke

pytest.importorskip("transformers", reason="transformers is in the test extra")


def test_compile_smoke_rows_and_target(tmp_path):
    out, stem, data, _ = run_bench_smoke("compile", tmp_path)
    rows = [r for r in data["rows"] if r["mode"] == "full" and not r.get("skipped")]
    by = {r["provider"]: r for r in rows}
    assert {"eager", "compiled", "hf_peft"} <= set(by)
    for r in by.values():
        assert r["p50_ms"] > 0 and r["trainable"] > 0
        assert r["ratio_method"] == "interleaved"
    assert by["eager"]["ratio_to_floor"] == pytest.approx(1.0)
    assert by["compiled"]["trainable"] == by["eager"]["trainable"] == by["hf_peft"]["trainable"]
    (target,) = data["meta"]["targets"]
    assert target["default_backend"] == "compiled" and target["ratio_to_floor"] == by["compiled"]["ratio_to_floor"]
    assert target["status"] in ("PASS", "FAIL")
    assert (out / f"{stem}.md").read_text().count("compiled") >= 3
