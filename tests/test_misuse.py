"""API misuse gets an error naming the argument, on every backend alike; valid input a backend cannot
take falls back to one that can (issue 10, sections 2 and 6)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftcore as pc
from peftcore import backends
from peftcore.backends import BackendUnavailable
from peftcore.ops import lora_linear, lora_mixed_linear

CPU_BACKENDS = ["reference", "cpp", "triton"]


def _needs(op, backend):
    reason = backends.why_not(op, backend, "cpu", torch.float32)
    if reason:
        pytest.skip(f"{backend} unavailable here: {reason}")


def _lora_args(r=2, k=8, n=8, m=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), None,
            torch.randn(r, k, generator=g), torch.randn(n, r, generator=g))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), -float("inf"), 1e308, 10**400])
def test_lora_linear_non_finite_scaling_is_an_error_on_every_backend(backend, scaling):
    _needs("lora_linear", backend)
    with pytest.raises(ValueError, match="scaling must be finite"):
        lora_linear(*_lora_args(), scaling, backend=backend)


@pytest.mark.parametrize("scaling", [1 + 1j, True, torch.tensor(1.0), "1.0"])
def test_lora_linear_scaling_type(scaling):
    with pytest.raises(TypeError, match="scaling must be a real Python float"):
        lora_linear(*_lora_args(), scaling)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_seed_is_checked_even_without_dropout(p):
    with pytest.raises(TypeError, match="seed must be an int"):
        lora_linear(*_lora_args(), 1.0, p, seed="garbage")
    with pytest.raises(ValueError, match="seed must be in"):
        lora_linear(*_lora_args(), 1.0, p, seed=-5)


def _mixed_args(j=2, r=2, k=8, n=8, b=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g),
            torch.randn(j, r, k, generator=g), torch.randn(j, n, r, generator=g))


def test_lora_mixed_complex_scaling_is_refused():
    x, w, bias, a, b = _mixed_args()
    with pytest.raises(TypeError, match="scaling must be a real floating-point tensor"):
        lora_mixed_linear(x, w, bias, a, b, torch.tensor([1 + 1j, 2 + 0j]), torch.tensor([0, 1, 0, 1]))


def test_ops_on_meta_tensors_give_shapes():
    """Shape inference (accelerate's init_empty_weights) runs the ops on meta tensors, as F.linear."""
    x, w, bias, a, b = (t.to("meta") for t in _mixed_args())
    y = lora_mixed_linear(x, w, bias, a, b, torch.ones(2, device="meta"), torch.zeros(4, dtype=torch.int64, device="meta"))
    assert y.shape == (4, 8) and y.device.type == "meta"
    x, w, _, a, b = (None if t is None else t.to("meta") for t in _lora_args())
    x.requires_grad_(True)
    y = lora_linear(x, w, None, a, b, 1.0, 0.1)
    y.sum().backward()
    assert y.shape == (4, 8) and x.grad.shape == x.shape


def test_lora_mixed_without_adapters_falls_back_and_runs_the_base():
    x, w, bias, a, b = _mixed_args()
    none_a, none_b = a[:0], b[:0]
    y = lora_mixed_linear(x, w, bias, none_a, none_b, torch.ones(0), torch.full((4,), -1))
    torch.testing.assert_close(y, F.linear(x, w, bias))
    for backend in ("cpp", "triton"):
        _needs("lora_mixed", backend)
        with pytest.raises(BackendUnavailable, match="at least one adapter"):
            lora_mixed_linear(x, w, bias, none_a, none_b, torch.ones(0), torch.full((4,), -1), backend=backend)


def test_rank_above_the_kernels_limit_falls_back():
    r = (1 << 20) + 1
    x, w, _, a, b = _lora_args(r=r, k=2, n=1, m=1)
    y = lora_linear(x, w, None, a, b, 0.5)  # the registry's choice: a backend that takes r
    torch.testing.assert_close(y, x @ w.t() + 0.5 * (x @ a.t()) @ b.t(), rtol=1e-4, atol=1e-3)
    for backend in ("cpp", "triton"):
        _needs("lora_linear", backend)
        with pytest.raises(BackendUnavailable, match=f"rank r={r}"):
            lora_linear(x, w, None, a, b, 0.5, backend=backend)


def _model():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["0", "2"], init="gaussian"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model


@pytest.mark.parametrize("names", [None, 3, [None], {"default": 1}])
def test_set_active_names_its_argument(names):
    with pytest.raises(TypeError, match="names must be an adapter name"):
        pc.set_active(_model(), names)


def test_lora_linear_layer_refuses_integer_input():
    model = _model()
    with pytest.raises(TypeError, match="floating-point"):
        model[0](torch.ones(2, 8, dtype=torch.int64))


def test_set_active_after_merge_runs_exactly_the_active_adapters():
    model = _model()
    x = torch.randn(3, 8)
    pc.set_active(model, [])
    base = model(x)
    pc.set_active(model, "default")
    adapted = model(x)
    pc.merge(model)
    pc.set_active(model, [])  # the merged adapter is unmerged: it is no longer active
    assert pc.active_adapters(model) == []
    torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)
    pc.set_active(model, "default")
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
