"""LoRA on real transformers models: equivalence with HF PEFT, save/load interop, model management."""

import copy
import json

import pytest
import torch

import peftcore as pc
from peftcore.layers import LoRALinear

from pc_testing import rel_err
from pc_testing import model_out, tiny_inputs, tiny_model

peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e '.[test]'")
pytestmark = pytest.mark.hf

KINDS = ["llama", "gpt2", "bert"]


def _randomize_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pc.model.lora_layers(model):
            for name in layer.lora_A:
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def _ours_and_peft(kind, **cfg):
    base, targets = tiny_model(kind)
    ours = pc.apply(copy.deepcopy(base), pc.LoRAConfig(target_modules=targets, **cfg))
    _randomize_lora(ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=cfg.get("r", 8), lora_alpha=cfg.get("alpha", 8), target_modules=targets,
                        use_rslora=cfg.get("use_rslora", False), lora_dropout=0.0),
    )
    sd = pc.io.adapter_state_dict(ours, "default")
    peft.set_peft_model_state_dict(theirs, sd)
    return base, ours, theirs


@pytest.mark.parametrize("kind", KINDS)
def test_apply_trains_only_adapter_and_is_identity_at_init(kind):
    base, targets = tiny_model(kind)
    ids = tiny_inputs()
    ref = model_out(base, ids)
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=targets))
    trainable, total = pc.count_parameters(model)
    expect = sum(4 * (m.in_features + m.out_features) for _, m in pc.model.lora_layers(model))
    assert trainable == expect > 0
    assert total == sum(p.numel() for p in base.parameters()) + expect
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert torch.equal(model_out(model, ids), ref)  # B = 0: an untrained adapter changes nothing


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_hf_peft_outputs_and_grads(kind, rslora):
    _, ours, theirs = _ours_and_peft(kind, r=4, alpha=16, use_rslora=rslora)
    ids = tiny_inputs()
    y1, y2 = model_out(ours, ids), model_out(theirs, ids)
    assert rel_err(y1, y2) < 1e-5
    (y1 * torch.linspace(-1, 1, y1.shape[-1])).sum().backward()
    (y2 * torch.linspace(-1, 1, y2.shape[-1])).sum().backward()
    g1 = {k: v.grad for k, v in ours.named_parameters() if v.requires_grad}
    g2 = {k.replace("base_model.model.", "").replace(".default.", ".default."): v.grad
          for k, v in theirs.named_parameters() if v.requires_grad}
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        assert (g1[k] is None) == (g2[k] is None), k  # BERT's pooler is targeted but unused
        if g1[k] is not None:
            assert rel_err(g1[k], g2[k]) < 1e-4, k


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_what_we_save(kind, tmp_path):
    base, ours, _ = _ours_and_peft(kind, r=4, alpha=8)
    pc.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["fan_in_fan_out"] == (kind == "gpt2")  # Conv1D stores [in, out]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    ids = tiny_inputs()
    assert rel_err(model_out(loaded, ids), model_out(ours, ids)) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_we_load_what_peft_saves(kind, tmp_path):
    base, _, theirs = _ours_and_peft(kind, r=4, alpha=8)
    theirs.save_pretrained(str(tmp_path / "p"))
    model = pc.load_adapter(copy.deepcopy(base), tmp_path / "p")  # injects from the config
    ids = tiny_inputs()
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    assert rel_err(model_out(model, ids), model_out(theirs, ids)) < 1e-6


def test_conv1d_fan_in_fan_out_and_merge_roundtrip():
    base, _ = tiny_model("gpt2")
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    _randomize_lora(model)
    ids = tiny_inputs()
    y = model_out(model, ids)
    w0 = layer.base_layer.weight.clone()
    pc.merge(model)
    assert not torch.equal(layer.base_layer.weight, w0)
    assert rel_err(model_out(model, ids), y) < 1e-5
    pc.unmerge(model)
    assert rel_err(layer.base_layer.weight, w0) < 1e-6
    assert rel_err(model_out(model, ids), y) < 1e-6


def test_disable_context_and_multiple_adapters():
    base, targets = tiny_model("llama")
    ids = tiny_inputs()
    y_base = model_out(base, ids)
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, target_modules=targets), name="a")
    model = pc.apply(model, pc.LoRAConfig(r=2, target_modules=["q_proj"]), name="b")
    _randomize_lora(model)
    assert pc.active_adapters(model) == ["b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)
    y_b = model_out(model, ids)
    pc.set_active(model, "a")
    y_a = model_out(model, ids)
    assert rel_err(y_a, y_b) > 1e-3 and rel_err(y_a, y_base) > 1e-3
    pc.set_active(model, ["a", "b"])
    y_ab = model_out(model, ids)
    assert rel_err(y_ab, y_a) > 1e-4
    pc.merge(model)
    assert rel_err(model_out(model, ids), y_ab) < 1e-5
    with pc.disable_adapters(model):
        assert rel_err(model_out(model, ids), y_base) < 1e-6
    assert rel_err(model_out(model, ids), y_ab) < 1e-5
    pc.unmerge(model)
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        pc.set_active(model, "zzz")


def test_inits_gaussian_and_pissa():
    base, targets = tiny_model("llama")
    ids = tiny_inputs()
    y = model_out(base, ids)
    g = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, target_modules=targets, init="gaussian"))
    a = g.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert 0.1 < a.std().item() < 0.4  # N(0, 1/r) with r = 4
    for init in ("pissa", "pissa_niter_4"):
        m = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=targets, init=init))
        layer = m.model.layers[0].self_attn.q_proj
        assert layer.lora_B["default"].weight.abs().sum() > 0  # principal part moved into the adapter
        tol = 1e-5 if init == "pissa" else 1e-4
        assert rel_err(model_out(m, ids), y) < tol  # residual + s·BA reproduces W


def test_target_rules(tmp_path):
    base, _ = tiny_model("llama")
    m = pc.apply(copy.deepcopy(base), pc.LoRAConfig(target_modules="all-linear"))
    wrapped = [n for n, _ in pc.model.lora_layers(m)]
    assert "lm_head" not in wrapped and len(wrapped) == 2 * 7
    m = pc.apply(copy.deepcopy(base), pc.LoRAConfig(target_modules=r"model\.layers\.0\.self_attn\.(q|k)_proj"))
    assert [n for n, _ in pc.model.lora_layers(m)] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    m = pc.apply(copy.deepcopy(base), pc.LoRAConfig())  # llama default: q_proj, v_proj
    assert len(list(pc.model.lora_layers(m))) == 4
    pc.save_adapter(m, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="matched no module"):
        pc.apply(copy.deepcopy(base), pc.LoRAConfig(target_modules=["nope"]))


def test_bad_configs():
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        pc.LoRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        pc.LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        pc.LoRAConfig(init="olora")
    base, targets = tiny_model("bert")
    m = pc.apply(base, pc.LoRAConfig(target_modules=targets))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        pc.apply(m, pc.LoRAConfig(target_modules=targets))


def test_load_rejects_adapter_of_another_model_and_leaves_model_unchanged(tmp_path):
    big, targets = tiny_model("llama")
    src = pc.apply(copy.deepcopy(big), pc.LoRAConfig(r=4, target_modules=targets))
    pc.save_adapter(src, tmp_path / "llama")
    other, _ = tiny_model("bert")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="matched no module"):
        pc.load_adapter(other, tmp_path / "llama")
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    # same module names, other widths: shape error names the key, nothing half-loaded
    import transformers as tf

    wide = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"saved for another model: .*lora_[AB]\.weight has shape \(\d+, \d+\), this model expects"):
        pc.load_adapter(wide, tmp_path / "llama")
    assert not any(isinstance(m, LoRALinear) for m in wide.modules()) and not pc.adapter_configs(wide)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_load_rejects_corrupt_and_missing_files(tmp_path):
    base, targets = tiny_model("gpt2")
    src = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, target_modules=targets))
    d = pc.save_adapter(src, tmp_path / "a")
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        pc.load_adapter(copy.deepcopy(base), d)
    w.unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        pc.load_adapter(copy.deepcopy(base), d)
    (d / "adapter_config.json").write_text("{not json")
    pc.save_adapter(src, tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pc.load_adapter(copy.deepcopy(base), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        pc.load_adapter(copy.deepcopy(base), tmp_path / "missing")


def test_save_is_atomic(tmp_path, monkeypatch):
    base, targets = tiny_model("bert")
    m = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, target_modules=targets))
    d = pc.save_adapter(m, tmp_path / "a")
    old = {p.name: p.read_bytes() for p in d.iterdir()}
    _randomize_lora(m)
    import os

    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        pc.save_adapter(m, d)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == old  # old files intact, no temp files left
    pc.save_adapter(m, d)
    fresh = pc.load_adapter(copy.deepcopy(base), d)
    ids = tiny_inputs()
    assert rel_err(model_out(fresh, ids), model_out(m, ids)) < 1e-6


def test_training_with_dropout_lowers_loss_and_leaves_base_untouched():
    base, targets = tiny_model("gpt2")
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=16, dropout=0.1, target_modules=targets))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = tiny_inputs(batch=4, seq=16)
    model.train()
    torch.manual_seed(0)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2  # random-init tiny GPT-2: LoRA alone moves it slowly
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
