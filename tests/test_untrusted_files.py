"""Adapter files from elsewhere are untrusted input: loading one finishes in bounded time, never
silently ignores or misreads a value, and every error names the file and the field.

Run as a script it prints each reproducer's outcome on the installed peftcore
(``PYTHONPATH=<old tree>`` for an older one): the before/after table of issue 10, section 4.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import peftcore as pc

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"


class Net(nn.Module):
    def __init__(self, long_name: str = "a" * 40):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 12)
        self.blocks = nn.ModuleDict({long_name: nn.Linear(16, 16)})

    def forward(self, x):
        return self.q(x) + self.blocks[next(iter(self.blocks))](x) + self.v(x).sum(-1, keepdim=True)


def _saved(tmp: Path, **cfg) -> Path:
    m = pc.apply(Net(), pc.LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": ["q", "v"], **cfg}))
    with torch.no_grad():
        for p in pc.io.adapter_parameters(m, "default").values():
            p.normal_()
    d = pc.save_adapter(m, tmp)
    return d


def _edit(d: Path, **changes) -> None:
    raw = json.loads((d / CFG).read_text())
    raw.update(changes)
    (d / CFG).write_text(json.dumps(raw))


def _outcome(fn, file_field: tuple[str, ...] = ()) -> str:
    """"clear: ..." (an error naming each of ``file_field``), "unclear <type>: ...", or what loaded."""
    try:
        r = fn()
    except (ValueError, TypeError, FileNotFoundError) as e:
        missing = [s for s in file_field if s not in str(e)]
        return f"clear {type(e).__name__}" if not missing else f"error not naming {missing}: {type(e).__name__}: {str(e)[:90]}"
    except Exception as e:  # noqa: BLE001
        return f"unclear {type(e).__name__}: {str(e)[:90]}"
    return f"loaded{'' if r is None else ': ' + str(r)}"


# --- reproducers: each returns the outcome string -------------------------------------------------
def repro_hostile_regex(tmp: Path, seconds: float = 10.0) -> str:
    """target_modules "(.|.|.)*(.|.|.)*Z" and "(a|aa)+Z" on a 40-character module name, in a
    subprocess bounded at ``seconds``."""
    d = _saved(tmp)
    out = []
    for pattern in ("(.|.|.)*(.|.|.)*Z", r"blocks\.(a|aa)+Z"):
        _edit(d, target_modules=pattern)
        code = textwrap.dedent(f"""
            import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_untrusted_files import Net
            import peftcore as pc
            t = time.monotonic()
            try:
                pc.load_adapter(Net(), {str(d)!r})
            except Exception as e:
                print(type(e).__name__, str(e)[:100])
            print(f"{{time.monotonic() - t:.1f}} s")
        """)
        t0 = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds)
            lines = r.stdout.strip().splitlines()
            out.append(f"{pattern}: {lines[-2][:60] if len(lines) > 1 else r.stderr[-120:]} in {lines[-1] if lines else '?'}")
        except subprocess.TimeoutExpired:
            out.append(f"{pattern}: still running after {time.monotonic() - t0:.0f} s (killed)")
    return " | ".join(out)


def repro_existing_name(tmp: Path) -> str:
    """The file has lora_alpha 16 and use_rslora; the model's adapter 'default' alpha 8 without."""
    src = pc.apply(Net(), pc.LoRAConfig(r=4, alpha=16, use_rslora=True, target_modules=["q", "v"]))
    with torch.no_grad():
        for p in pc.io.adapter_parameters(src, "default").values():
            p.normal_()
    d = pc.save_adapter(src, tmp)
    x = torch.randn(3, 16)
    dst = pc.apply(Net(), pc.LoRAConfig(r=4, alpha=8, target_modules=["q", "v"]))

    def load():
        pc.load_adapter(dst, d)
        return f"max |out - saved model's out| = {(dst(x) - src(x)).abs().max().item():.3g}"

    return _outcome(load, (CFG, "lora_alpha", "use_rslora"))


def repro_fan_in_fan_out(tmp: Path) -> str:
    d = _saved(tmp)
    _edit(d, fan_in_fan_out=True)
    return _outcome(lambda: pc.load_adapter(Net(), d) and "ran with the weights transposed", (CFG, "fan_in_fan_out", "q"))


def repro_dtypes(tmp: Path) -> dict:
    from safetensors.torch import load_file, save_file

    d = _saved(tmp)
    good = load_file(str(d / WTS))
    key = next(k for k in good if k.endswith("q.lora_A.weight"))
    out = {}
    for dtype in (torch.int64, torch.bool, torch.complex64):
        bad = dict(good)
        bad[key] = (good[key] * 3).to(dtype) if dtype is not torch.complex64 else torch.complex(good[key], good[key])
        save_file(bad, str(d / WTS))
        out[str(dtype)] = _outcome(lambda: pc.load_adapter(Net(), d) and "cast silently", (WTS, key))
    return out


def repro_duplicate_keys(tmp: Path) -> str:
    from safetensors.torch import load_file, save_file

    d = _saved(tmp)
    t = load_file(str(d / WTS))
    key = next(k for k in t if k.endswith("q.lora_A.weight"))
    t[key.replace("lora_A.weight", "lora_A.default.weight")] = torch.zeros_like(t[key])
    save_file(t, str(d / WTS))
    return _outcome(lambda: pc.load_adapter(Net(), d) and "last key won silently", (WTS, key, "lora_A.default.weight"))


BAD_VALUES = [[], {}, "x", 1.5, -1, True, "(["]
LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "modules_to_save", "bias", "init_lora_weights", "task_type", "peft_type",
               "fan_in_fan_out", "exclude_modules", "layers_pattern", "lora_bias"]
DATACLASS_FIELDS = {
    "BOTTLENECK": (pc.BottleneckConfig(), ["placement", "reduction_factor", "non_linearity", "scaling", "dropout",
                                           "leave_out", "ffn_output_modules", "init_range"]),
    "COMPACTER": (pc.CompacterConfig(), ["phm_dim", "phm_rank", "shared_phm_rule", "phm_init_range", "phm_c_init",
                                         "learn_phm", "backend"]),
}


def repro_wrong_types(tmp: Path) -> dict:
    """Every field of a LoRA / bottleneck / Compacter file set to each of BAD_VALUES: how many loads
    give a clear error naming the file and the field, an unclear one, or load."""
    from peftcore.tuners.base import dataclass_to_json

    d = _saved(tmp)
    base_cfg = json.loads((d / CFG).read_text())
    tally = {"clear": 0, "unclear": 0, "loaded": 0}
    examples = []
    cases = [(base_cfg, f, v) for f in LORA_FIELDS for v in BAD_VALUES]
    for peft_type, (cfg, fields) in DATACLASS_FIELDS.items():
        raw = dataclass_to_json(cfg, peft_type)
        cases += [(raw, f, v) for f in fields for v in BAD_VALUES]
    for raw, field, value in cases:
        if raw.get(field) == value and type(raw.get(field)) is type(value):
            continue
        (d / CFG).write_text(json.dumps({**raw, field: value}))
        try:
            pc.io.read_adapter(d)
        except (ValueError, TypeError, FileNotFoundError) as e:
            ok = str(d / CFG) in str(e) and (field in str(e) or field == "peft_type")
            tally["clear" if ok else "unclear"] += 1
            if not ok and len(examples) < 3:
                examples.append(f"{field}={value!r}: {type(e).__name__}: {str(e)[:70]}")
        except Exception as e:  # noqa: BLE001
            tally["unclear"] += 1
            if len(examples) < 3:
                examples.append(f"{field}={value!r}: {type(e).__name__}: {str(e)[:70]}")
        else:
            tally["loaded"] += 1
    return {**tally, "examples": examples}


def repro_truncation(tmp: Path) -> dict:
    """r=4.9 / r=true / lora_alpha=Infinity / lora_alpha=1e308 in a file."""
    out = {}
    for label, change in [("r=4.9", {"r": 4.9}), ("r=true", {"r": True}), ("lora_alpha=Infinity", {"lora_alpha": float("inf")}),
                          ("lora_alpha=1e308", {"lora_alpha": 1e308}), ("r=10**12", {"r": 10**12})]:
        d = _saved(tmp / label.replace("*", "_"))
        _edit(d, **change)
        out[label] = _outcome(lambda: pc.io.read_adapter(d) and "read", (CFG, next(iter(change))))
    return out


def repro_deep_and_big(tmp: Path) -> dict:
    d = _saved(tmp)
    raw = json.loads((d / CFG).read_text())
    out = {}
    text = json.dumps(raw)[:-1] + ', "nested": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (d / CFG).write_text(text)
    out["nesting 100000"] = _outcome(lambda: pc.io.read_adapter(d) and "read", (CFG,))
    (d / CFG).write_text(json.dumps({**raw, "blob": "x" * (64 << 20)}))
    t0 = time.monotonic()
    out["64 MiB config"] = _outcome(lambda: pc.io.read_adapter(d) and "read", (CFG,)) + f" ({time.monotonic() - t0:.1f} s)"
    return out


# --- tests ---------------------------------------------------------------------------------------
def test_hostile_regex_is_bounded(tmp_path):
    t0 = time.monotonic()
    d = _saved(tmp_path)
    _edit(d, target_modules=r"blocks\.(a|aa)+Z")
    with pytest.raises(ValueError, match=r"target_modules.*budget"):
        pc.load_adapter(Net(), d)
    _edit(d, target_modules="(.|.|.)*(.|.|.)*Z")
    with pytest.raises(ValueError, match="matched no module"):
        pc.load_adapter(Net(), d)
    assert time.monotonic() - t0 < 15
    _edit(d, target_modules=r"(q|v)")  # an ordinary pattern keeps PEFT's full-match semantics
    m = pc.load_adapter(Net(), d)
    assert sorted(n for n, _ in pc.model.lora_layers(m)) == ["q", "v"]


def test_loading_over_an_existing_adapter(tmp_path):
    src = pc.apply(Net(), pc.LoRAConfig(r=4, alpha=16, use_rslora=True, target_modules=["q", "v"]))
    with torch.no_grad():
        for p in pc.io.adapter_parameters(src, "default").values():
            p.normal_()
    d = pc.save_adapter(src, tmp_path / "a")
    x = torch.randn(3, 16)
    dst = pc.apply(Net(), pc.LoRAConfig(r=4, alpha=8, target_modules=["q", "v"]))
    before = dst(x)
    with pytest.raises(ValueError, match=r"adapter_config.json.*lora_alpha: 8 \(model\) vs 16 \(file\).*use_rslora.*replace=True"):
        pc.load_adapter(dst, d)
    assert torch.equal(dst(x), before)
    pc.load_adapter(dst, d, replace=True)
    assert torch.allclose(dst(x), src(x), atol=1e-5)
    assert dst.q.scaling["default"] == pytest.approx(16 / 2)
    # Same config: the weights load into the adapter in place (what FSDP-sharded models rely on).
    same = pc.apply(Net(), pc.LoRAConfig(r=4, alpha=16, use_rslora=True, target_modules=["q", "v"]))
    param = same.q.lora_A["default"].weight
    pc.load_adapter(same, d)
    assert same.q.lora_A["default"].weight is param and torch.allclose(same(x), src(x), atol=1e-5)
    # A replace that fails (the file is for another model) leaves the old adapter as it was.
    other = pc.apply(nn.Sequential(nn.Linear(16, 16)), pc.LoRAConfig(r=4, target_modules=["0"]))
    bad = pc.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError):
        pc.load_adapter(dst, bad, replace=True)
    assert torch.allclose(dst(x), src(x), atol=1e-5) and list(pc.model.adapter_configs(dst)) == ["default"]
    assert dst.q.lora_A["default"].weight.requires_grad and not dst.q.base_layer.weight.requires_grad


def test_fan_in_fan_out_on_linear_is_an_error(tmp_path):
    d = _saved(tmp_path)
    _edit(d, fan_in_fan_out=True)
    with pytest.raises(ValueError, match=r"adapter_config.json.*fan_in_fan_out=True.*'q'.*Linear"):
        pc.load_adapter(Net(), d)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        pc.apply(Net(), pc.LoRAConfig(target_modules=["q"], fan_in_fan_out=True))


def test_non_floating_and_ambiguous_tensors_are_refused(tmp_path):
    res = repro_dtypes(tmp_path / "d")
    assert all(v == "clear ValueError" for v in res.values()), res
    assert repro_duplicate_keys(tmp_path / "k") == "clear ValueError"


def test_wrong_types_name_the_file_and_field(tmp_path):
    res = repro_wrong_types(tmp_path)
    assert res["unclear"] == 0, res
    assert res["clear"] > 150, res


def test_truncation_and_absurd_values_in_files(tmp_path):
    res = repro_truncation(tmp_path)
    assert all(v.startswith("clear") for v in res.values()), res


def test_deep_and_oversized_configs(tmp_path):
    res = repro_deep_and_big(tmp_path)
    assert all(v.startswith("clear") for v in res.values()), res


if __name__ == "__main__":
    import tempfile

    print("peftcore from", pc.__file__)
    for fn in (repro_existing_name, repro_fan_in_fan_out, repro_dtypes, repro_duplicate_keys, repro_truncation,
               repro_wrong_types, repro_deep_and_big, repro_hostile_regex):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            try:
                r = fn(Path(tmp) / "a")
            except Exception as e:  # noqa: BLE001
                r = f"reproducer failed: {type(e).__name__}: {e}"
            print(f"{fn.__name__} ({time.monotonic() - t0:.1f} s): {r}", flush=True)
