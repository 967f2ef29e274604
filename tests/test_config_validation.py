"""Configs are validated at construction (and so on load): absurd values are clear errors naming
the field, before anything is allocated.

Run as a script it prints, per case, what the installed peftcore does (``PYTHONPATH=<old tree>``
for an older one): the before/after table of issue 10, section 2.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

import peftcore as pc
from peftcore import BottleneckConfig, CompacterConfig, LoRAConfig
from peftcore.tuners.prompt import PrefixTuningConfig, PromptTuningConfig

NAN, INF = float("nan"), float("inf")

# (label, config class, kwargs, field the error must name)
CONSTRUCTION = [
    ("alpha=nan", LoRAConfig, {"alpha": NAN}, "alpha"),
    ("alpha=inf", LoRAConfig, {"alpha": INF}, "alpha"),
    ("alpha=1e308", LoRAConfig, {"alpha": 1e308}, "alpha"),
    ("r=4.9", LoRAConfig, {"r": 4.9}, "r"),
    ("r=True", LoRAConfig, {"r": True}, "r"),
    ("r=10**12", LoRAConfig, {"r": 10**12}, "r"),
    ("dropout=nan", LoRAConfig, {"dropout": NAN}, "dropout"),
    ("rank_pattern value 2.5", LoRAConfig, {"rank_pattern": {"q": 2.5}}, "rank_pattern"),
    ("alpha_pattern value inf", LoRAConfig, {"alpha_pattern": {"q": INF}}, "alpha_pattern"),
    ("use_rslora=1", LoRAConfig, {"use_rslora": 1}, "use_rslora"),
    ("fan_in_fan_out='yes'", LoRAConfig, {"fan_in_fan_out": "yes"}, "fan_in_fan_out"),
    ("target_modules invalid regex", LoRAConfig, {"target_modules": "(["}, "target_modules"),
    ("layers_to_transform=[True]", LoRAConfig, {"layers_to_transform": [True]}, "layers_to_transform"),
    ("bottleneck scaling=nan", BottleneckConfig, {"scaling": NAN}, "scaling"),
    ("bottleneck scaling=inf", BottleneckConfig, {"scaling": INF}, "scaling"),
    ("bottleneck scaling=1e308", BottleneckConfig, {"scaling": 1e308}, "scaling"),
    ("bottleneck init_range=nan", BottleneckConfig, {"init_range": NAN}, "init_range"),
    ("bottleneck reduction_factor=inf", BottleneckConfig, {"reduction_factor": INF}, "reduction_factor"),
    ("bottleneck reduction_factor=1e-300", BottleneckConfig, {"reduction_factor": 1e-300}, "reduction_factor"),
    ("bottleneck dropout=nan", BottleneckConfig, {"dropout": NAN}, "dropout"),
    ("compacter phm_rank=10**12", CompacterConfig, {"phm_rank": 10**12}, "phm_rank"),
    ("compacter phm_dim=True", CompacterConfig, {"phm_dim": True}, "phm_dim"),
    ("compacter phm_init_range=inf", CompacterConfig, {"phm_init_range": INF}, "phm_init_range"),
    ("prompt num_virtual_tokens=10**12", PromptTuningConfig, {"num_virtual_tokens": 10**12}, "num_virtual_tokens"),
    ("prefix num_virtual_tokens=10**12", PrefixTuningConfig, {"num_virtual_tokens": 10**12}, "num_virtual_tokens"),
    ("prefix num_virtual_tokens=2.0", PrefixTuningConfig, {"num_virtual_tokens": 2.0}, "num_virtual_tokens"),
]


def construction_outcome(cls, kwargs, field) -> str:
    try:
        cls(**kwargs)
    except (TypeError, ValueError) as e:
        return "clear error" if field in str(e) else f"error without the field: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001
        return f"unclear {type(e).__name__}: {str(e)[:80]}"
    return "accepted"


@pytest.mark.parametrize("label, cls, kwargs, field", CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION])
def test_absurd_values_are_errors_naming_the_field(label, cls, kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        cls(**kwargs)


def test_bool_is_not_an_int_and_floats_are_not_ranks():
    with pytest.raises(TypeError, match=r"LoRAConfig\.r must be an int.*True \(bool\)"):
        LoRAConfig(r=True)
    with pytest.raises(TypeError, match=r"LoRAConfig\.r must be an int.*4\.9 \(float\)"):
        LoRAConfig(r=4.9)
    with pytest.raises(ValueError, match=r"2147483647.*cannot be allocated"):
        LoRAConfig(r=2**31)
    assert LoRAConfig(r=2**31 - 1).r == 2**31 - 1  # the bound itself is a legal config
    assert LoRAConfig(alpha=16).alpha == 16 and LoRAConfig(dropout=0).dropout == 0


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.v = nn.Linear(32, 32)


def test_sizes_that_cannot_fit_are_refused_before_allocating():
    """phm_rank=10**9 is a legal int, but the model's widths make the adapter ~10**11 parameters:
    refused by apply, naming the fields, in far less time than an allocation would take."""
    from pc_testing import tiny_model

    model, _ = tiny_model("bert")
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"CompacterConfig\.\{reduction_factor, phm_dim, phm_rank\}.*cannot be allocated"):
        pc.apply(model, CompacterConfig(phm_rank=10**9, reduction_factor=2))
    assert time.monotonic() - t0 < 5
    assert not pc.model.adapter_configs(model)  # nothing was added
    with pytest.raises(ValueError, match=r"LoRAConfig\.r.*cannot be allocated"):
        pc.apply(Tiny(), LoRAConfig(r=2**31 - 1, target_modules=["q", "v"]))
    llama, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"PrefixTuningConfig\.num_virtual_tokens.*cannot be allocated"):
        pc.apply(llama, PrefixTuningConfig(num_virtual_tokens=10**9))
    with pytest.raises(ValueError, match=r"PromptTuningConfig\.num_virtual_tokens.*cannot be allocated"):
        pc.apply(llama, PromptTuningConfig(num_virtual_tokens=2**31 - 1))
    assert not pc.model.adapter_configs(llama)


def test_regex_fields_are_compiled_at_construction():
    for kwargs, field in [({"target_modules": "(["}, "target_modules"), ({"exclude_modules": "*x"}, "exclude_modules"),
                          ({"rank_pattern": {"(": 2}}, "rank_pattern"), ({"layers_pattern": "a{"}, None)]:
        try:
            LoRAConfig(**kwargs)
        except ValueError as e:
            assert field is None or field in str(e)
        else:
            assert field is None  # "a{" is a literal in Python's re


if __name__ == "__main__":
    print("peftcore from", pc.__file__)
    for label, cls, kwargs, field in CONSTRUCTION:
        print(f"| {label} | {construction_outcome(cls, kwargs, field)} |")
