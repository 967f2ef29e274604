"""Train/eval mode: new modules take the mode of the module they go into, for every method, and
LoRA dropout is an ``nn.Dropout`` per adapter that ``model.eval()`` and TRL's
``disable_dropout_in_model`` reach.

Before: ``pc.apply`` / ``pc.load_adapter`` created modules in training mode inside an eval model,
so a PEFT adapter saved with ``lora_dropout=0.1`` gave two different outputs for one input at
inference (max difference 0.45 on Llama, 0.30 on GPT-2, 0.20 on BERT).
"""

import copy

import pytest
import torch
from torch import nn

import peftcore as pc
from peftcore.layers import LoRALinear

from pc_testing import model_out, tiny_inputs, tiny_model

peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e '.[test]'")
KINDS = ["llama", "gpt2", "bert"]


def _configs(kind, targets):
    out = {
        "lora": pc.LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=targets),
        "bottleneck": pc.BottleneckConfig(placement="houlsby", reduction_factor=4, dropout=0.3),
        "compacter": pc.CompacterConfig(reduction_factor=4),
        "prompt": pc.PromptTuningConfig(num_virtual_tokens=3),
        "prefix": pc.PrefixTuningConfig(num_virtual_tokens=3, projection=True),
    }
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "bottleneck", "compacter", "prompt", "prefix"])
@pytest.mark.parametrize("train", [False, True])
def test_new_modules_take_the_host_mode(kind, method, train):
    model, targets = tiny_model(kind)
    model.train(train)
    before = {id(m) for m in model.modules()}
    pc.apply(model, _configs(kind, targets)[method], name="a")
    new = [(n, m) for n, m in model.named_modules() if id(m) not in before]
    assert new, "the method added no module"
    assert all(m.training == train for _, m in new), [n for n, m in new if m.training != train]
    assert all(m.training == train for m in model.modules())  # and nothing that was there changed


def test_a_submodule_mode_the_user_set_is_kept():
    model, targets = tiny_model("llama")
    model.train()
    model.model.layers[0].eval()
    pc.apply(model, pc.LoRAConfig(r=2, dropout=0.2, target_modules=targets))
    for n, m in model.named_modules():
        assert m.training == (not n.startswith("model.layers.0")), n


def _randomize_b(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_with_dropout_loaded_into_an_eval_model_is_deterministic(kind, tmp_path):
    base, targets = tiny_model(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                      target_modules=targets))
    _randomize_b(theirs)
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    ids = tiny_inputs()
    with torch.no_grad():
        want = model_out(theirs, ids)
        model = pc.load_adapter(copy.deepcopy(base), tmp_path)  # base is in eval mode, as from_pretrained's
        first, second = model_out(model, ids), model_out(model, ids)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)


def test_eval_then_train_switches_lora_dropout():
    model, targets = tiny_model("llama")
    pc.apply(model, pc.LoRAConfig(r=4, alpha=8, dropout=0.5, target_modules=targets))
    _randomize_b(model)
    ids = tiny_inputs()
    with torch.no_grad():
        ev = model_out(model, ids)
        assert torch.equal(ev, model_out(model, ids))
        model.train()
        assert not torch.allclose(model_out(model, ids), model_out(model, ids))
        model.eval()
        assert torch.equal(model_out(model, ids), ev)


def test_lora_dropout_is_an_nn_dropout_per_adapter_as_in_peft():
    model, targets = tiny_model("llama")
    pc.apply(model, pc.LoRAConfig(r=4, dropout=0.1, target_modules=targets), name="a")
    pc.apply(model, pc.LoRAConfig(r=4, dropout=0.0, target_modules=targets), name="b")
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert layers
    for layer in layers:
        assert isinstance(layer.lora_dropout["a"], nn.Dropout) and layer.lora_dropout["a"].p == 0.1
        assert isinstance(layer.lora_dropout["b"], nn.Identity)  # PEFT's choice at p = 0
    keys = set(model.state_dict())
    assert not any("lora_dropout" in k for k in keys)  # no state: PEFT's files are unchanged


def test_trl_disable_dropout_in_model_reaches_lora_dropout():
    trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is in the test extra")
    model, targets = tiny_model("llama")
    pc.apply(model, pc.LoRAConfig(r=4, alpha=8, dropout=0.5, target_modules=targets))
    _randomize_b(model)
    ids = tiny_inputs()
    with torch.no_grad():
        ev = model_out(model, ids)
        model.train()
        assert not torch.allclose(model_out(model, ids), ev)
        trl_utils.disable_dropout_in_model(model)  # sets p = 0 on every nn.Dropout
        assert torch.equal(model_out(model, ids), model_out(model, ids))
        torch.testing.assert_close(model_out(model, ids), ev, rtol=1e-6, atol=1e-6)
