"""Mixed-adapter LoRA batches (``peftcore.adapter_batch``) and model-level composition of LoRA."""

from __future__ import annotations

import pytest
import torch

import peftcore as pc
from pc_testing import model_out, tiny_inputs, tiny_model


def _three_adapters(kind="llama"):
    model, targets = tiny_model(kind)
    for i, (name, r) in enumerate((("a", 4), ("b", 2), ("c", 8))):
        pc.apply(model, pc.LoRAConfig(r=r, alpha=2 * r, target_modules=targets[: 2 + (i == 2)]), name=name)
        torch.manual_seed(10 + i)
        with torch.no_grad():  # B starts at zero: give every adapter a visible effect
            for _, layer in pc.model.lora_layers(model):
                if name in layer.lora_B:
                    layer.lora_B[name].weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_mixed_batch_equals_each_adapter_alone(kind):
    model = _three_adapters(kind)
    ids = tiny_inputs(batch=5, seq=7)
    names = ["a", "c", "__base__", "b", "a"]
    with torch.no_grad():
        with pc.adapter_batch(model, names):
            mixed = model_out(model, ids)
        for e, n in enumerate(names):
            if n == "__base__":
                with pc.disable_adapters(model):
                    want = model_out(model, ids[e : e + 1])
            else:
                pc.set_active(model, n)
                want = model_out(model, ids[e : e + 1])
            torch.testing.assert_close(mixed[e : e + 1], want, rtol=1e-5, atol=1e-5)
    # the block leaves nothing behind: the active adapter runs for every example again
    assert all(layer.mixed is None for _, layer in pc.model.lora_layers(model))


def test_adapters_differ_so_the_test_can_fail():
    model = _three_adapters()
    ids = tiny_inputs(batch=2)
    with torch.no_grad():
        with pc.adapter_batch(model, ["a", "b"]):
            ab = model_out(model, ids)
        with pc.adapter_batch(model, ["b", "a"]):
            ba = model_out(model, ids)
    assert (ab - ba).abs().max() > 1e-3


def test_adapter_batch_ignores_the_active_adapter_on_layers_it_does_not_target():
    model = _three_adapters()  # "c" also targets down_proj, "a" does not
    ids = tiny_inputs(batch=1)
    with torch.no_grad():
        pc.set_active(model, "c")
        with pc.adapter_batch(model, ["a"]):
            mixed = model_out(model, ids)
        pc.set_active(model, "a")
        want = model_out(model, ids)
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-5)


def test_adapter_batch_errors():
    model = _three_adapters()
    ids = tiny_inputs(batch=2)
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        with pc.adapter_batch(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="one adapter name per example"):
        with pc.adapter_batch(model, []):
            pass
    with pytest.raises(ValueError, match="adapter_index has 3 entries but x has batch size 2"):
        with torch.no_grad(), pc.adapter_batch(model, ["a", "b", "a"]):
            model_out(model, ids)
    pc.merge(model, ["a"])
    with pytest.raises(RuntimeError, match="unmerged"):
        with pc.adapter_batch(model, ["a", "b"]):
            pass


def test_lora_stack_adds_terms_and_train_adapter_freezes_the_rest():
    model = _three_adapters()
    ids = tiny_inputs()
    with torch.no_grad():
        pc.set_active(model, pc.Stack("a", "b"))
        s_ab = model_out(model, ids)
        pc.set_active(model, ["b", "a"])
        l_ba = model_out(model, ids)
    torch.testing.assert_close(s_ab, l_ba, rtol=1e-5, atol=1e-6)  # LoRA terms commute
    assert pc.active_adapters(model) == ["b", "a"]
    pc.train_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n or n.endswith(".b.weight") for n in trainable)
    with pytest.raises(KeyError, match="no adapter named 'q'"):
        pc.train_adapter(model, "q")


def test_mixed_op_matches_reference_loop_with_grad():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)
    a = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, 2.0])
    idx = torch.tensor([1, -1, 0])
    y = pc.ops.lora_mixed_linear(x, w, None, a, b, s, idx)
    want = torch.stack([x[e] @ w.t() + (s[j].double() * (x[e] @ a[j].t()) @ b[j].t() if j >= 0 else 0)
                        for e, j in enumerate(idx.tolist())])
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), g)
    exp = torch.autograd.grad(want, (x, a, b), g)
    for u, v in zip(got, exp):
        torch.testing.assert_close(u, v)
