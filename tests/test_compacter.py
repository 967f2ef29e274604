"""Compacter / Compacter++: AdapterHub's defaults, PHM layers, the shared rule (one parameter),
identity at init, parameter counts, stacking with plain bottleneck adapters and bad configs."""

import dataclasses
import math

import pytest
import torch

import peftcore as pc
from peftcore.layers.base import Stack
from peftcore.layers.bottleneck import BottleneckSlot
from peftcore.layers.phm import PHMLinear, PHMRuleBank
from peftcore.reference.phm import phm_linear_formula
from peftcore.tuners.bottleneck import (
    BottleneckConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
)

from pc_testing import model_out, tiny_inputs, tiny_model
from pc_testing import (
    HIDDEN,
    LAYERS,
    adapter_params,
    hook_counts,
    n_slots,
    perturb,
)

# The layers are under test here, not the op's backends (tested with the op): pin the reference.
REF = "reference"


def compacter(**kw):
    kw.setdefault("reduction_factor", 4)  # hidden 32 -> width 8, which phm_dim 4 divides
    kw.setdefault("backend", REF)
    return CompacterConfig(**kw)


def rule_params(model):
    return {n: p for n, p in model.named_parameters() if PHMRuleBank.ATTR in n.split(".")}


def test_defaults_match_adapterhub():
    # adapters/configuration/adapter_config.py: CompacterConfig(DoubleSeqBnConfig) and
    # CompacterPlusPlusConfig(SeqBnConfig) with phm_layer=True, reduction_factor=32, non_linearity="gelu".
    expected = {"placement": "houlsby", "reduction_factor": 32, "non_linearity": "gelu", "scaling": 1.0,
                "dropout": 0.0, "leave_out": [], "phm_dim": 4, "shared_phm_rule": True, "factorized_phm_W": True,
                "phm_rank": 1, "phm_init_range": 1e-4, "phm_c_init": "normal",
                "hypercomplex_nonlinearity": "glorot-uniform", "phm_bias": True, "learn_phm": True}
    c = CompacterConfig()
    assert {k: getattr(c, k) for k in expected} == expected
    pp = CompacterPlusPlusConfig()
    assert isinstance(pp, CompacterConfig)
    assert {k: getattr(pp, k) for k in expected} == {**expected, "placement": "pfeiffer"}
    assert c.phm and not BottleneckConfig().phm


@pytest.mark.parametrize("kind", ("bert", "llama", "gpt2"))
@pytest.mark.parametrize("cls", (CompacterConfig, CompacterPlusPlusConfig))
def test_identity_at_init_then_changes(kind, cls):
    model, _ = tiny_model(kind)
    ids = tiny_inputs()
    base = model_out(model, ids)
    pc.apply(model, cls(reduction_factor=4, backend=REF), name="c")
    assert torch.equal(model_out(model, ids), base)  # exactly: up's W_right starts at zero
    for n, p in adapter_params(model, "c").items():
        if n.endswith("up.w_right"):
            assert torch.count_nonzero(p) == 0
    with torch.no_grad():  # the rule is ~1e-4: scale it up so the change is visible
        next(iter(rule_params(model).values())).normal_()
        for n, p in adapter_params(model, "c").items():
            if n.endswith("up.w_right"):
                p.normal_()
    assert not torch.allclose(model_out(model, ids), base, atol=1e-3)


@pytest.mark.parametrize("kw,rank", [({}, 1), ({"phm_rank": 3}, 3), ({"placement": "parallel", "phm_dim": 2}, 1)])
def test_trainable_count_equals_formula(kw, rank):
    model, _ = tiny_model("llama")
    cfg = compacter(**kw)
    pc.apply(model, cfg, name="c")
    n, h, b, k = cfg.phm_dim, HIDDEN, HIDDEN // 4, rank

    def phm(i, o):
        return n * (i // n) * k + n * k * (o // n) + o

    expected = n ** 3 + n_slots(cfg.placement) * (phm(h, b) + phm(b, h))
    assert pc.count_parameters(model)[0] == expected
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model, "c")) | set(rule_params(model))
    assert len(rule_params(model)) == 1 and rule_params(model)["phm_rules.rule_c"].shape == (n, n, n)


@pytest.mark.parametrize("kw,extra", [
    ({"shared_phm_rule": False}, "own"),  # every PHM layer has its own rule: 2 per slot, no bank
    ({"factorized_phm_W": False}, "full"),  # W [n, in/n, out/n]
    ({"learn_phm": False}, "fixed"),  # the rule is a buffer: saved, not trained, not counted
])
def test_variant_counts(kw, extra, tmp_path):
    model, _ = tiny_model("gpt2")
    cfg = compacter(placement="pfeiffer", **kw)
    pc.apply(model, cfg, name="c")
    n, h, b = 4, HIDDEN, HIDDEN // 4
    if extra == "own":
        per_slot = 2 * n ** 3 + (h + b + b) + (b + h + h)
        expected = LAYERS * per_slot
        assert not rule_params(model) and PHMRuleBank.of(model) is None
    elif extra == "full":
        expected = n ** 3 + LAYERS * ((h * b // n + b) + (b * h // n + h))
    else:
        expected = LAYERS * ((h + b + b) + (b + h + h))
        bank = PHMRuleBank.of(model)
        assert bank.adapter_tensors("c")["rule"].requires_grad is False and not bank.trainable_tensors("c")
    assert pc.count_parameters(model)[0] == expected
    ids = tiny_inputs()
    base = model_out(model, ids)
    with pc.disable_adapters(model):
        assert torch.equal(model_out(model, ids), base)  # identity at init for every variant
    perturb(model, "c")
    out = model_out(model, ids)
    assert not torch.allclose(out, base, atol=1e-3)
    pc.save_adapter(model, tmp_path, name="c")  # the rules (own, fixed) travel with the adapter
    fresh, _ = tiny_model("gpt2", seed=5)
    pc.load_adapter(fresh, tmp_path, name="c")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "bottleneck" not in k and "phm" not in k},
                          strict=False)
    torch.testing.assert_close(model_out(fresh, ids), out, rtol=0, atol=0)


def test_one_shared_rule_for_all_layers_and_both_projections():
    model, _ = tiny_model("bert")
    pc.apply(model, compacter(), name="c")
    bank = PHMRuleBank.of(model)
    rule = bank.rule("c")
    layers = [m for m in model.modules() if isinstance(m, PHMLinear)]
    assert len(layers) == 2 * n_slots("houlsby")
    assert all(layer.current_rule() is rule for layer in layers)
    keys = [k for k in model.state_dict() if "rule" in k]
    assert keys == ["phm_rules.rule_c"]  # saved once, no duplicate per layer
    assert 2e-5 < rule.std().item() < 5e-4  # normal(0, 1e-4)
    # Gradients of every layer meet in the one rule.
    with torch.no_grad():
        for name, p in adapter_params(model, "c").items():
            if name.endswith("up.w_right"):
                p.normal_()
    model_out(model, tiny_inputs()).square().mean().backward()
    assert rule.grad is not None and rule.grad.abs().sum() > 0


def test_phm_init_follows_adapterhub():
    torch.manual_seed(0)
    layer = PHMLinear(32, 8, 4, rank=2)
    layer.reset_parameters("glorot-uniform", 1e-4, "normal")
    for w in (layer.w_left, layer.w_right):  # xavier-uniform per [in/n, rank] / [rank, out/n] slice
        fan_in, fan_out = w.shape[2], w.shape[1]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= bound and w.abs().max() > bound / 2
    assert torch.count_nonzero(layer.bias) == 0 and 2e-5 < layer.rule.std() < 5e-4
    layer.reset_parameters("normal", 1e-3, "uniform", zero_out=True)
    assert torch.count_nonzero(layer.w_right) == 0 and 2e-4 < layer.w_left.std() < 5e-3
    assert layer.rule.abs().max() <= 1 and layer.rule.std() > 0.3
    with pytest.raises(ValueError, match="hypercomplex_nonlinearity must be one of"):
        layer.reset_parameters("xavier")


@pytest.mark.parametrize("factorized", (True, False))
def test_phm_layer_equals_kronecker_formula(factorized):
    torch.manual_seed(1)
    layer = PHMLinear(12, 8, 4, rank=2, factorized=factorized, backend=REF).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    if factorized:
        wl, wr = layer.w_left, layer.w_right
    else:  # the full W as a factorization with an identity right factor
        wl, wr = layer.weight, torch.eye(2, dtype=torch.float64).expand(4, 2, 2)
    torch.testing.assert_close(layer(x), phm_linear_formula(x, layer.rule, wl, wr, layer.bias))
    g = torch.randn(3, 5, 8, dtype=torch.float64)
    (dx,) = torch.autograd.grad(layer(x), x, g)
    (dx_ref,) = torch.autograd.grad(phm_linear_formula(x, layer.rule, wl, wr, layer.bias), x, g)
    torch.testing.assert_close(dx, dx_ref)


def test_stack_bottleneck_and_compacter_at_one_slot():
    model, _ = tiny_model("llama")
    pc.apply(model, BottleneckConfig(placement="pfeiffer", reduction_factor=4, non_linearity="tanh"), name="bn")
    pc.apply(model, compacter(placement="pfeiffer"), name="c")
    perturb(model, "bn", seed=1)
    perturb(model, "c", seed=2)
    with torch.no_grad():
        PHMRuleBank.of(model).rule("c").normal_()
    slot = model.get_submodule("model.layers.1.mlp.bottleneck")
    assert isinstance(slot, BottleneckSlot) and slot.adapter_names() == ["bn", "c"]
    bn, c = slot.adapters["bn"], slot.adapters["c"]
    h = torch.randn(2, 3, HIDDEN)
    rule = PHMRuleBank.of(model).rule("c")

    def f_c(z):
        d = phm_linear_formula(z, rule, c.down.w_left, c.down.w_right, c.down.bias)
        return phm_linear_formula(torch.nn.functional.gelu(d), rule, c.up.w_left, c.up.w_right, c.up.bias)

    def f_bn(z):
        return torch.tanh(z @ bn.down.weight.T + bn.down.bias) @ bn.up.weight.T + bn.up.bias

    slot.set_active(Stack("bn", "c"))
    z = h + f_bn(h)
    torch.testing.assert_close(slot(h), z + f_c(z), rtol=1e-5, atol=1e-5)
    slot.set_active(Stack("c", "bn"))
    z = h + f_c(h)
    torch.testing.assert_close(slot(h), z + f_bn(z), rtol=1e-5, atol=1e-5)
    ids = tiny_inputs()
    pc.set_active(model, Stack("bn", "c"))
    out = model_out(model, ids)
    pc.set_active(model, Stack("c", "bn"))
    assert not torch.allclose(model_out(model, ids), out, atol=1e-4)
    # Train the Compacter on top of the frozen bottleneck adapter: only its tensors (and its rule) learn.
    pc.train_adapter(model, "c")
    model_out(model, ids).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(adapter_params(model, "c")) | {"phm_rules.rule_c"}


def test_delete_removes_rule_bank_and_hooks():
    model, _ = tiny_model("gpt2")
    ids = tiny_inputs()
    base, keys, hooks = model_out(model, ids), list(model.state_dict()), hook_counts(model)
    pc.apply(model, compacter(), name="c1")
    pc.apply(model, compacter(placement="parallel"), name="c2")
    assert PHMRuleBank.of(model).adapter_names() == ["c1", "c2"]
    pc.delete_adapter(model, "c1")
    assert PHMRuleBank.of(model).adapter_names() == ["c2"] and list(rule_params(model)) == ["phm_rules.rule_c2"]
    pc.delete_adapter(model, "c2")
    assert PHMRuleBank.of(model) is None and not hasattr(model, PHMRuleBank.ATTR)
    assert list(model.state_dict()) == keys and hook_counts(model) == hooks
    assert torch.equal(model_out(model, ids), base)


def test_save_and_load_under_another_name(tmp_path):
    from safetensors.torch import load_file

    ids = tiny_inputs()
    model, _ = tiny_model("bert")
    cfg = CompacterPlusPlusConfig(reduction_factor=4, phm_rank=2, backend=REF)
    pc.apply(model, cfg, name="task")
    perturb(model, "task")
    with torch.no_grad():
        PHMRuleBank.of(model).rule("task").normal_()
    out = model_out(model, ids)
    pc.save_adapter(model, tmp_path, name="task")
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert [k for k in saved if "rule" in k] == ["base_model.model.phm_rules.rule"]
    assert all("task" not in k for k in saved) and len(saved) == 1 + LAYERS * 6
    fresh, _ = tiny_model("bert")
    pc.load_adapter(fresh, tmp_path, name="other")
    loaded = pc.adapter_configs(fresh)["other"]
    assert type(loaded) is CompacterPlusPlusConfig and loaded == cfg
    torch.testing.assert_close(model_out(fresh, ids), out, rtol=0, atol=0)


def test_json_round_trip_keeps_the_class():
    from peftcore.tuners import method_for_config

    for cfg in (compacter(phm_c_init="uniform"), CompacterPlusPlusConfig(phm_dim=2)):
        m = method_for_config(cfg)
        d = m.to_json(cfg, None, "a")
        assert d["peft_type"] == "COMPACTER"
        back = m.from_json(d, "t")
        assert type(back) is type(cfg) and dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_phm_dim_must_divide_the_widths():
    model, _ = tiny_model("llama")
    keys = list(model.state_dict())
    # AdapterHub's defaults on hidden 32: bottleneck width 32 // 32 = 1, which 4 does not divide.
    with pytest.raises(ValueError, match=r"CompacterConfig.phm_dim=4 must divide out_features=1.*"
                                         r"bottleneck width 32 // reduction_factor 32 = 1"):
        pc.apply(model, CompacterConfig(backend=REF), name="c")
    with pytest.raises(ValueError, match=r"phm_dim=5 must divide in_features=32.*hidden size 32"):
        pc.apply(model, compacter(phm_dim=5, reduction_factor=2), name="c")
    with pytest.raises(ValueError, match=r"phm_dim=3 must divide"):
        PHMLinear(32, 8, 3)
    assert list(model.state_dict()) == keys and not pc.adapter_configs(model)
    assert PHMRuleBank.of(model) is None


@pytest.mark.parametrize("kwargs,match", [
    ({"phm_dim": 0}, "phm_dim must be an int >= 1"),
    ({"phm_rank": 1.5}, "phm_rank must be an int >= 1"),
    ({"phm_c_init": "xavier"}, r"phm_c_init must be one of \('normal', 'uniform'\)"),
    ({"hypercomplex_nonlinearity": "phm"}, "hypercomplex_nonlinearity must be one of"),
    ({"phm_init_range": -1.0}, "phm_init_range must be a number >= 0"),
    ({"learn_phm": 1}, "learn_phm must be a bool"),
    ({"backend": "gpu"}, "backend must be one of"),
    ({"placement": "serial"}, "CompacterConfig.placement must be one of"),
    ({"non_linearity": "elu"}, "CompacterConfig.non_linearity must be one of"),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CompacterConfig(**kwargs)


def test_default_backend_matches_reference():
    ids = tiny_inputs()
    outs = []
    for backend in (None, REF):  # None: the registry's choice for CPU fp32 (C++ when built)
        model, _ = tiny_model("llama")
        pc.apply(model, compacter(backend=backend), name="c")
        perturb(model, "c")
        with torch.no_grad():
            PHMRuleBank.of(model).rule("c").normal_(generator=torch.Generator().manual_seed(4))
        outs.append(model_out(model, ids))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
