"""apply, load_adapter, delete_adapter, merge and merge_and_unload are all or nothing: every failing
call leaves the model as it was (state dict keys and values, requires_grad, hooks, module tree),
and deleting the last adapter gives the base parameters back the requires_grad they had."""

import pytest
import torch
from torch import nn

import peftcore as pc
import peftcore.model as pcm
from peftcore.layers.bottleneck import BottleneckSlot
from peftcore.layers.lora import LoRALinear
from peftcore.layers.saved import ModulesToSave
from pc_testing import tiny_inputs, tiny_model


def snapshot(model):
    return {
        "keys": list(model.state_dict().keys()),
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "tree": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._load_state_dict_pre_hooks))
                  for n, m in model.named_modules()},
        "attrs": sorted(k for k in model.__dict__ if k.startswith("_peftcore") or k == "save_pretrained"),
        "config": dict(vars(model.config)) if hasattr(model, "config") else None,  # prefix tuning edits it
    }


def assert_same(before, after):
    for field in ("keys", "grad", "tree", "hooks", "attrs", "config"):
        assert before[field] == after[field], field
    for k, v in before["values"].items():
        assert torch.equal(v, after["values"][k]), k


def configs():
    return {
        "lora": pc.LoRAConfig(r=2, target_modules=["query", "value"], backend="reference"),
        "lora_pissa": pc.LoRAConfig(r=2, target_modules=["query", "value"], init="pissa", backend="reference"),
        "lora_saved": pc.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["pooler"], backend="reference"),
        "lora_bias_all": pc.LoRAConfig(r=2, target_modules=["query"], bias="all", backend="reference"),
        "bottleneck": pc.BottleneckConfig(placement="houlsby"),
        "parallel": pc.BottleneckConfig(placement="parallel"),
        "compacter": pc.CompacterConfig(reduction_factor=4, backend="reference"),
        "prompt": pc.PromptTuningConfig(num_virtual_tokens=3),
        "prefix": pc.PrefixTuningConfig(num_virtual_tokens=3),
    }


def _raise(*a, **k):
    raise RuntimeError("injected fault")


def _on_call(orig, n):
    """``orig`` that raises on its n-th call."""
    calls = [0]

    def f(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("injected fault")
        return orig(*a, **k)

    return f


@pytest.mark.parametrize("kind", list(configs()))
@pytest.mark.parametrize("where", ["after_inject", "in_train_adapter", "in_set_active"])
@pytest.mark.parametrize("existing", [False, True])
def test_apply_fault_after_every_mutation_leaves_model_unchanged(monkeypatch, kind, where, existing):
    """A fault once the method has injected everything: the worst case for an undo."""
    model, _ = tiny_model("bert")
    model.pooler.dense.weight.requires_grad_(False)  # a user's own freezing must survive too
    handle = model.encoder.layer[0].register_forward_hook(lambda m, i, o: None)
    if existing:
        pc.apply(model, pc.LoRAConfig(r=2, target_modules=["key"], backend="reference"), name="old")
    ids = tiny_inputs()
    ref = model(input_ids=ids).last_hidden_state
    before = snapshot(model)
    target = {"after_inject": "take_host_mode", "in_train_adapter": "train_adapter", "in_set_active": "set_active"}[where]
    monkeypatch.setattr(pcm, target, _raise)
    with pytest.raises(RuntimeError, match="injected fault"):
        pc.apply(model, configs()[kind], name="new")
    monkeypatch.undo()
    assert_same(before, snapshot(model))
    assert torch.equal(model(input_ids=ids).last_hidden_state, ref)
    handle.remove()  # a handle taken before the failed call still removes its hook
    assert len(model.encoder.layer[0]._forward_hooks) == 0
    pc.apply(model, configs()[kind], name="new")  # and the model takes the adapter afterwards
    assert "new" in pc.adapter_configs(model)


@pytest.mark.parametrize("host, method, kind", [
    (LoRALinear, "add_adapter", "lora"),
    (LoRALinear, "add_adapter", "lora_pissa"),
    (ModulesToSave, "add_adapter", "lora_saved"),
    (BottleneckSlot, "add_adapter", "bottleneck"),
    (BottleneckSlot, "add_adapter", "compacter"),
])
def test_apply_fault_midway_leaves_model_unchanged(monkeypatch, host, method, kind):
    """A fault on the third host: two are already in, and PiSSA has rewritten their base weights."""
    model, _ = tiny_model("bert")
    before = snapshot(model)
    n = 1 if host is ModulesToSave else 3
    monkeypatch.setattr(host, method, _on_call(getattr(host, method), n))
    with pytest.raises(RuntimeError, match="injected fault"):
        pc.apply(model, configs()[kind])
    assert_same(before, snapshot(model))


def test_apply_out_of_memory_leaves_model_unchanged():
    """An adapter too large to allocate (a config that got past validation) fails inside inject."""
    model, _ = tiny_model("bert")
    before = snapshot(model)
    cfg = pc.LoRAConfig(r=2, target_modules=["query"])
    cfg.r = 2**40  # bypasses construction-time validation: the allocation itself fails
    with pytest.raises((RuntimeError, MemoryError, ValueError)):
        pc.apply(model, cfg)
    assert_same(before, snapshot(model))


def _saved_adapter(tmp_path, **kw):
    model, _ = tiny_model("bert")
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["query", "value"], backend="reference", **kw))
    return pc.save_adapter(model, tmp_path / "a")


def test_load_adapter_failing_on_shape_leaves_model_unchanged(tmp_path):
    path = _saved_adapter(tmp_path)
    model, _ = tiny_model("bert")
    model.encoder.layer[1].attention.self.value = nn.Linear(32, 16)  # another shape
    before = snapshot(model)
    with pytest.raises(ValueError, match="shape"):
        pc.load_adapter(model, path)
    assert_same(before, snapshot(model))
    assert all(p.requires_grad for p in model.parameters())


def test_load_adapter_failing_on_keys_leaves_model_unchanged(tmp_path):
    path = _saved_adapter(tmp_path)
    model, _ = tiny_model("bert")
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["query"], backend="reference"), name="default")
    before = snapshot(model)
    with pytest.raises((ValueError, KeyError)):
        pc.load_adapter(model, path, name="default")  # the existing adapter lacks the value layers
    assert_same(before, snapshot(model))


def test_delete_last_adapter_restores_requires_grad():
    model, _ = tiny_model("bert")
    model.embeddings.word_embeddings.weight.requires_grad_(False)  # frozen by the user beforehand
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["query"]), name="a")
    pc.apply(model, pc.BottleneckConfig(), name="b")
    pc.delete_adapter(model, "a")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "adapter" not in n)  # b still trains alone
    pc.delete_adapter(model, "b")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys


def test_merge_and_unload_restores_requires_grad():
    model, _ = tiny_model("bert")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["query"]))
    pc.merge_and_unload(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_failed_delete_leaves_model_unchanged():
    model, _ = tiny_model("bert")
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["query"]), name="a")
    pc.merge(model, "a")
    before = snapshot(model)
    with pytest.raises(ValueError, match="merged"):
        pc.delete_adapter(model, "a")
    assert_same(before, snapshot(model))


def test_merge_checks_every_layer_before_changing_any():
    """A lora_bias adapter on layers where one base layer has no bias: merge refuses before any
    weight changes (it used to fold the first layers in and raise on a later one)."""
    model, _ = tiny_model("bert")
    model.encoder.layer[1].attention.self.query = nn.Linear(32, 32, bias=False)
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["query"], lora_bias=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    before = snapshot(model)
    with pytest.raises(ValueError, match="no bias"):
        pc.merge(model)
    assert_same(before, snapshot(model))
    with pytest.raises(ValueError, match="no bias"):
        pc.merge_and_unload(model)
    assert_same(before, snapshot(model))


def test_reference_model_leaves_the_policy_base_frozen():
    """reference_model deletes the adapters of a copy that shares model's parameters: the base
    requires_grad that the last delete restores must not reach model's frozen base."""
    model, _ = tiny_model("bert")
    pc.apply(model, pc.LoRAConfig(r=2, target_modules=["query"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ref = pc.reference_model(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not any(p.requires_grad for p in ref.parameters())
