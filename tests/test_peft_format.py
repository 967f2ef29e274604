"""PEFT's LoRA format, completely: every feature saved by PEFT loads into peftcore and the reverse,
with outputs equal to PEFT's, and the same parameters train.

Features: rank_pattern / alpha_pattern, layers_to_transform / layers_pattern, modules_to_save
(and the task types' heads), bias="lora_only" / "all", lora_bias; PiSSA adapters reload into the
original base and reproduce the trained model; files of methods PEFT or peftcore cannot read fail
with the method's name.
"""

import copy
import json

import pytest
import torch

import peftcore as pc

from pc_testing import model_out, tiny_inputs, tiny_model

peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e '.[test]'")
pytestmark = pytest.mark.hf


def _seq_cls(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             num_labels=3, pad_token_id=0)
        return tf.LlamaForSequenceClassification(cfg).eval(), ["q_proj", "v_proj"]
    cfg = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return tf.BertForSequenceClassification(cfg).eval(), ["query", "value"]


def _base(kind):
    if kind.endswith("-cls"):
        return _seq_cls(kind.split("-")[0])
    return tiny_model(kind)


# (name, model kind, PEFT LoraConfig kwargs, peftcore LoRAConfig kwargs) of each feature
FEATURES = [
    ("rank_alpha_pattern", "llama",
     dict(r=4, lora_alpha=8, rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={"q_proj": 3}),
     dict(r=4, alpha=8, rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={"q_proj": 3})),
    ("layers_to_transform", "llama",
     dict(r=4, lora_alpha=8, layers_to_transform=[1], layers_pattern="layers"),
     dict(r=4, alpha=8, layers_to_transform=[1], layers_pattern="layers")),
    ("layers_to_transform_gpt2", "gpt2",
     dict(r=4, lora_alpha=8, layers_to_transform=0, layers_pattern="h"),
     dict(r=4, alpha=8, layers_to_transform=0, layers_pattern="h")),
    ("modules_to_save", "llama-cls",
     dict(r=4, lora_alpha=8, modules_to_save=["score"]), dict(r=4, alpha=8, modules_to_save=["score"])),
    ("task_type_seq_cls", "bert-cls",
     dict(r=4, lora_alpha=8, task_type="SEQ_CLS"), dict(r=4, alpha=8, task_type="SEQ_CLS")),
    ("bias_lora_only", "bert", dict(r=4, lora_alpha=8, bias="lora_only"), dict(r=4, alpha=8, bias="lora_only")),
    ("bias_all", "bert", dict(r=4, lora_alpha=8, bias="all"), dict(r=4, alpha=8, bias="all")),
    ("lora_bias", "llama", dict(r=4, lora_alpha=8, lora_bias=True), dict(r=4, alpha=8, lora_bias=True)),
]
IDS = [f[0] for f in FEATURES]


def _randomize_trainable(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _canon(name):
    """A parameter's name with PEFT's prefixes and the adapter's name taken out."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".default", "")


@pytest.mark.parametrize("feature", FEATURES, ids=IDS)
def test_peft_saves_peftcore_loads_equal_outputs(feature, tmp_path):
    _, kind, peft_kw, _ = feature
    base, targets = _base(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, **peft_kw))
    _randomize_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    theirs.eval()
    ids = tiny_inputs()
    ours = pc.load_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_out(ours, ids), _out(theirs, ids), rtol=1e-5, atol=1e-5)
    # loading made exactly PEFT's parameters trainable
    want = {_canon(n) for n, p in theirs.named_parameters() if p.requires_grad}
    got = {_canon(n) for n, p in ours.named_parameters() if p.requires_grad}
    assert got == want


@pytest.mark.parametrize("feature", FEATURES, ids=IDS)
def test_peftcore_saves_peft_loads_equal_outputs(feature, tmp_path):
    _, kind, peft_kw, our_kw = feature
    base, targets = _base(kind)
    ours = pc.apply(copy.deepcopy(base), pc.LoRAConfig(target_modules=targets, **our_kw))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, **peft_kw))
    assert ({_canon(n) for n, p in ours.named_parameters() if p.requires_grad}
            == {_canon(n) for n, p in ref.named_parameters() if p.requires_grad})
    _randomize_trainable(ours)
    pc.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(_out(theirs, ids), _out(ours, ids), rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_pattern_set_each_layer():
    base, targets = tiny_model("llama")
    m = pc.apply(base, pc.LoRAConfig(r=4, alpha=8, target_modules=targets,
                                     rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6},
                                     alpha_pattern={"q_proj": 3}))
    layers = m.model.layers
    assert layers[0].self_attn.q_proj.r["default"] == 2 and layers[1].self_attn.q_proj.r["default"] == 4
    assert layers[0].self_attn.v_proj.r["default"] == 6
    assert layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(3 / 4)
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(8 / 6)


def test_modules_to_save_trains_a_copy_and_disable_runs_the_original():
    base, targets = _seq_cls("llama")
    m = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=targets))  # SEQ_CLS found by class
    assert isinstance(m.score, pc.layers.saved.ModulesToSave)
    assert all(p.requires_grad for p in m.score.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in m.score.original_module.parameters())
    ids = tiny_inputs()
    _randomize_trainable(m)
    with torch.no_grad():
        with pc.disable_adapters(m):
            torch.testing.assert_close(_out(m, ids), _out(base, ids))
        assert not torch.allclose(_out(m, ids), _out(base, ids))
    assert m.score.weight is m.score.modules_to_save["default"].weight  # attribute reads see the live copy
    pc.delete_adapter(m, "default")
    assert isinstance(m.score, torch.nn.Linear)


def test_pissa_adapter_reloads_into_the_original_base_and_reproduces_the_trained_model(tmp_path):
    """PEFT re-derives the PiSSA residual when it loads such an adapter (1.8e-7); peftcore did not
    (logits differed by 0.269).  Train a PiSSA adapter a little, save, reload into the untouched base."""
    base, targets = tiny_model("llama")
    m = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=targets, init="pissa"))
    ids = tiny_inputs()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    with torch.no_grad():
        trained = _out(m, ids)
        assert (trained - _out(base, ids)).abs().max() > 1e-2  # training moved it
    pc.save_adapter(m, tmp_path)
    config, _ = pc.read_adapter(tmp_path)
    assert config.init == "pissa"
    again = pc.load_adapter(copy.deepcopy(base), tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(again, ids), trained, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_out(theirs, ids), trained, rtol=1e-5, atol=1e-5)


def test_lora_bias_merges_into_the_base_bias():
    base, _ = tiny_model("bert")
    m = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, target_modules=["query"], lora_bias=True))
    _randomize_trainable(m)
    ids = tiny_inputs()
    with torch.no_grad():
        want = _out(m, ids)
        pc.merge(m)
        torch.testing.assert_close(_out(m, ids), want, rtol=1e-5, atol=1e-5)
        pc.unmerge(m)
        torch.testing.assert_close(_out(m, ids), want, rtol=1e-5, atol=1e-5)


def test_unknown_methods_are_named(tmp_path):
    """A PEFT method peftcore does not implement, and a config PEFT cannot read, both say which."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k"]}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="peft_type 'IA3' is not a method peftcore loads"):
        pc.read_adapter(tmp_path)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_qalora": True}  # DoRA loads now (tests/test_dora.py)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_qalora=True is not supported"):
        pc.read_adapter(tmp_path)


@pytest.mark.parametrize("bad, match", [
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": -1}), "alpha_pattern"),
    (dict(layers_to_transform="1"), "layers_to_transform"),
    (dict(modules_to_save="score"), "modules_to_save"),
    (dict(bias="some"), "bias"),
    (dict(lora_bias=1), "lora_bias"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        pc.LoRAConfig(**bad)


def test_modules_to_save_that_matches_nothing_is_an_error_and_changes_nothing():
    base, targets = tiny_model("llama")
    before = [n for n, _ in base.named_modules()]
    with pytest.raises(ValueError, match="modules_to_save=\\['nope'\\] matched no module"):
        pc.apply(base, pc.LoRAConfig(target_modules=targets, modules_to_save=["nope"]))
    assert [n for n, _ in base.named_modules()] == before


def test_peft_prompt_tuning_file_is_refused_by_name(tmp_path):
    """PEFT's PROMPT_TUNING shares the peft_type of peftcore's own (different) prompt-tuning format."""
    base, _ = tiny_model("llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="PROMPT_TUNING adapter in Hugging Face PEFT's format"):
        pc.read_adapter(tmp_path / "peft")
    ours = pc.apply(copy.deepcopy(base), pc.PromptTuningConfig(num_virtual_tokens=4))
    pc.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["library"] == "peftcore"
    config, _ = pc.read_adapter(tmp_path / "ours")
    assert config.num_virtual_tokens == 4
