"""Residual bottleneck adapters: placement, identity at init, counts, Stack semantics, MAD-X
training, gradient checkpointing, LoRA on the same blocks, delete, save/load and bad configs."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import peftcore as pc
from peftcore.layers.base import Stack
from peftcore.layers.bottleneck import BottleneckSlot
from peftcore.tuners.bottleneck import BottleneckConfig, resolve_points
from peftcore.tuners.lora import LoRAConfig

from pc_testing import HIDDEN, LAYERS, adapter_params, hook_counts, model_out, n_slots, perturb, tiny_inputs, tiny_model

KINDS = ("bert", "llama", "gpt2")
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
def quiet_model(kind: str, seed: int = 0):
    """A tiny model without dropout, for training-mode comparisons."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertModel(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg)
    return tiny_model(kind, seed)[0]


# --- identity at init, placement, counts --------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_identity_at_init_then_changes(kind, placement):
    model, _ = tiny_model(kind)
    ids = tiny_inputs()
    base = model_out(model, ids)
    base_keys = list(model.state_dict())
    pc.apply(model, BottleneckConfig(placement=placement), name="a")
    # Base keys untouched (nothing replaced); adapter keys only added.
    keys = list(model.state_dict())
    assert [k for k in keys if BottleneckSlot.ATTR not in k.split(".")] == base_keys
    assert torch.equal(model_out(model, ids), base)
    perturb(model, "a")
    assert not torch.allclose(model_out(model, ids), base, atol=1e-3)
    with pc.disable_adapters(model):
        assert torch.equal(model_out(model, ids), base)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_trainable_count_equals_formula(kind, placement):
    model, _ = tiny_model(kind)
    total_before = sum(p.numel() for p in model.parameters())
    cfg = BottleneckConfig(placement=placement, reduction_factor=8)
    pc.apply(model, cfg, name="a")
    h, b = HIDDEN, HIDDEN // 8
    per_slot = 2 * h * b + b + h
    trainable, total = pc.count_parameters(model)
    assert trainable == n_slots(placement) * per_slot
    assert total == total_before + trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_params(model, "a"))


def test_placement_points_per_model_type():
    import transformers as tf

    bert, _ = tiny_model("bert")
    pts = [p[0] for p in resolve_points(bert, BottleneckConfig(placement="houlsby"))]
    # attention.output.* also ends in output.*: each layer gets exactly one of each.
    assert pts == ["encoder.layer.0.attention.output.dropout", "encoder.layer.0.output.dropout",
                   "encoder.layer.1.attention.output.dropout", "encoder.layer.1.output.dropout"]
    par = resolve_points(bert, BottleneckConfig(placement="parallel"))
    assert par == [("encoder.layer.0.output.dropout", "encoder.layer.0.intermediate", 0),
                   ("encoder.layer.1.output.dropout", "encoder.layer.1.intermediate", 1)]
    llama, _ = tiny_model("llama")
    assert [p[0] for p in resolve_points(llama, BottleneckConfig(placement="pfeiffer"))] == [
        "model.layers.0.mlp", "model.layers.1.mlp"]
    gpt2, _ = tiny_model("gpt2")
    assert [p[0] for p in resolve_points(gpt2, BottleneckConfig(leave_out=[0]))] == [
        "transformer.h.1.attn", "transformer.h.1.mlp"]
    distil = tf.DistilBertModel(tf.DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=48))
    assert [p[0] for p in resolve_points(distil, BottleneckConfig())] == [
        "transformer.layer.0.attention", "transformer.layer.0.ffn",
        "transformer.layer.1.attention", "transformer.layer.1.ffn"]
    ids = tiny_inputs()
    base = distil.eval()(input_ids=ids).last_hidden_state
    pc.apply(distil, BottleneckConfig(placement="parallel"), name="a")
    assert torch.equal(distil(input_ids=ids).last_hidden_state, base)
    perturb(distil, "a")
    assert not torch.allclose(distil(input_ids=ids).last_hidden_state, base, atol=1e-3)


def test_leave_out_and_init():
    model, _ = tiny_model("llama")
    pc.apply(model, BottleneckConfig(leave_out=[1], init_range=0.05), name="a")
    names = {n.split(".bottleneck.")[0] for n in adapter_params(model)}
    assert names == {"model.layers.0.self_attn", "model.layers.0.mlp"}
    slot = model.get_submodule("model.layers.0.mlp.bottleneck")
    a = slot.adapters["a"]
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.up.bias) == 0
    assert torch.count_nonzero(a.down.bias) == 0 and 0.02 < a.down.weight.std().item() < 0.09
    assert set(slot.adapter_tensors("a")) == {"down.weight", "down.bias", "up.weight", "up.bias"}


# --- composition --------------------------------------------------------------------------------
def _slot_with(names, placement="pfeiffer", non_linearity="relu", scaling=1.0):
    model, _ = tiny_model("llama")
    for i, n in enumerate(names):
        pc.apply(model, BottleneckConfig(placement=placement, reduction_factor=4, non_linearity=non_linearity,
                                         scaling=scaling), name=n)
        perturb(model, n, seed=10 + i)
    return model, model.get_submodule("model.layers.0.mlp.bottleneck")


def _f(adapter, h, act, scaling):
    return scaling * (act(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias)


def test_stack_runs_sequentially_at_a_slot():
    _, slot = _slot_with(["a", "b"], non_linearity="tanh", scaling=0.7)
    h = torch.randn(3, 5, HIDDEN, dtype=torch.float32)
    A, B = slot.adapters["a"], slot.adapters["b"]
    slot.set_active(Stack("a", "b"))
    ha = h + _f(A, h, torch.tanh, 0.7)
    hand = ha + _f(B, ha, torch.tanh, 0.7)
    out = slot(h)
    torch.testing.assert_close(out, hand, rtol=1e-5, atol=1e-6)
    slot.set_active(["a", "b"])  # a list means the same
    assert torch.equal(slot(h), out)
    slot.set_active(Stack("b", "a"))
    assert not torch.allclose(slot(h), out, atol=1e-4)


def test_parallel_stack_chains_on_the_branch():
    _, slot = _slot_with(["a", "b"], placement="parallel", non_linearity="gelu", scaling=2.0)
    x, h = torch.randn(2, 4, HIDDEN), torch.randn(2, 4, HIDDEN)
    A, B = slot.adapters["a"], slot.adapters["b"]
    gelu = torch.nn.functional.gelu
    slot.set_active(["a"])
    assert torch.equal(slot(h, x), h + A(x))
    torch.testing.assert_close(A(x), _f(A, x, gelu, 2.0), rtol=1e-5, atol=1e-6)
    slot.set_active(Stack("a", "b"))
    fa = _f(A, x, gelu, 2.0)
    torch.testing.assert_close(slot(h, x), h + fa + _f(B, x + fa, gelu, 2.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="block input"):
        slot(h)


def test_stack_order_and_madx_training():
    model = quiet_model("llama").train()
    ids = tiny_inputs()
    for n in ("lang_en", "lang_de", "task"):
        # gelu, not relu: a 2-unit relu bottleneck can be dead on every token (zero gradient).
        pc.apply(model, BottleneckConfig(placement="pfeiffer", reduction_factor=4, non_linearity="gelu"), name=n)
        perturb(model, n, seed=len(n) + ord(n[-1]))
    pc.set_active(model, Stack("lang_de", "task"))
    out_de = model_out(model, ids)
    pc.set_active(model, Stack("task", "lang_de"))
    assert not torch.allclose(model_out(model, ids), out_de, atol=1e-4)
    pc.set_active(model, Stack("lang_en", "task"))
    out_en = model_out(model, ids)
    assert not torch.allclose(out_en, out_de, atol=1e-4)
    # MAD-X: train the task adapter on top of a frozen language adapter.
    pc.train_adapter(model, "task")
    out_en.detach_()
    model_out(model, ids).square().mean().backward()
    for n, p in model.named_parameters():
        if ".adapters.task." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def _enable_checkpointing(model, reentrant: bool):
    kw = {"use_reentrant": reentrant}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


@pytest.mark.parametrize("kind,placement,reentrant", [
    ("llama", "houlsby", False), ("gpt2", "parallel", False), ("bert", "parallel", True), ("bert", "houlsby", False),
])
def test_gradient_checkpointing_same_grads(kind, placement, reentrant):
    ids = tiny_inputs()
    grads, calls = [], []
    for ckpt in (False, True):
        model = quiet_model(kind).train()
        pc.apply(model, BottleneckConfig(placement=placement), name="a")
        perturb(model, "a")
        if ckpt:
            _enable_checkpointing(model, reentrant)
        count = [0]

        def tick(*_, count=count):
            count[0] += 1

        # Every module call, recomputation included: checkpointing must have re-run part of the model.
        handle = torch.nn.modules.module.register_module_forward_hook(tick)
        try:
            model_out(model, ids).square().mean().backward()
        finally:
            handle.remove()
        grads.append({n: p.grad.clone() for n, p in adapter_params(model).items()})
        calls.append(count[0])
    assert calls[1] > calls[0] > 0
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


# --- LoRA beside, delete, save/load ---------------------------------------------------------------
@pytest.mark.parametrize("kind,targets", [("llama", ["o_proj", "down_proj"]), ("bert", ["dense"]),
                                          ("gpt2", ["c_proj"])])
def test_lora_on_the_same_blocks_in_either_order(kind, targets):
    ids = tiny_inputs()
    lora = LoRAConfig(r=4, alpha=8, target_modules=targets)
    models = []
    for order in (("lora", "bn"), ("bn", "lora")):
        model, _ = tiny_model(kind)
        for what in order:
            cfg = lora if what == "lora" else BottleneckConfig(placement="houlsby")
            pc.apply(model, cfg, name=what)
        pc.set_active(model, ["lora", "bn"])
        models.append(model)
    first, second = models
    assert list(first.state_dict()) == list(second.state_dict())  # keys do not depend on the order
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in first.named_parameters():
            if "lora_B" in n or ".adapters.bn." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    second.load_state_dict(first.state_dict())
    out = model_out(first, ids)
    torch.testing.assert_close(model_out(second, ids), out, rtol=1e-5, atol=1e-5)
    pc.set_active(first, ["lora"])
    without_bn = model_out(first, ids)
    pc.set_active(first, ["bn"])
    without_lora = model_out(first, ids)
    assert not torch.allclose(without_bn, out, atol=1e-4) and not torch.allclose(without_lora, out, atol=1e-4)


@pytest.mark.parametrize("kind,placement", [("bert", "parallel"), ("llama", "houlsby"), ("gpt2", "parallel")])
def test_delete_restores_the_base_model(kind, placement):
    model, _ = tiny_model(kind)
    ids = tiny_inputs()
    base, keys, hooks = model_out(model, ids), list(model.state_dict()), hook_counts(model)
    pc.apply(model, BottleneckConfig(placement=placement), name="a")
    pc.apply(model, BottleneckConfig(placement="pfeiffer"), name="b")
    perturb(model, "a")
    perturb(model, "b")
    pc.set_active(model, Stack("a", "b"))
    assert hook_counts(model) != hooks
    pc.delete_adapter(model, "a")
    assert not adapter_params(model, "a") and adapter_params(model, "b")
    pc.delete_adapter(model, "b")
    assert list(model.state_dict()) == keys
    assert hook_counts(model) == hooks
    assert not any(isinstance(m, BottleneckSlot) for m in model.modules())
    assert torch.equal(model_out(model, ids), base)


def test_save_and_load_under_another_name(tmp_path):
    ids = tiny_inputs()
    model, _ = tiny_model("gpt2")
    pc.apply(model, BottleneckConfig(placement="parallel", reduction_factor=4, non_linearity="swish",
                                     scaling=0.5, leave_out=[0]), name="task")
    perturb(model, "task")
    out = model_out(model, ids)
    pc.save_adapter(model, tmp_path, name="task")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(saved) == ["base_model.model.transformer.h.1.mlp.bottleneck." + k
                             for k in ("down.bias", "down.weight", "up.bias", "up.weight")]
    fresh, _ = tiny_model("gpt2")
    pc.load_adapter(fresh, tmp_path, name="other")
    cfg = pc.adapter_configs(fresh)["other"]
    assert isinstance(cfg, BottleneckConfig) and cfg.non_linearity == "silu" and cfg.leave_out == [0]
    torch.testing.assert_close(model_out(fresh, ids), out, rtol=0, atol=0)


# --- other model types, bad configs -------------------------------------------------------------
class _FF(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ff = _FF(d)
        self.seq = nn.Sequential(nn.Identity())

    def forward(self, x):
        return self.seq(x + self.ff(x))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery", hidden_size=16)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_unknown_model_type_needs_overrides_which_then_work():
    torch.manual_seed(0)
    toy = _Toy()
    with pytest.raises(ValueError, match=r"model_type 'mystery'.*bert.*llama.*ffn_output_modules"):
        pc.apply(toy, BottleneckConfig(placement="pfeiffer"), name="a")
    with pytest.raises(ValueError, match="attn_output_modules"):
        pc.apply(toy, BottleneckConfig(placement="houlsby", ffn_output_modules=r"blocks\.\d+\.ff"), name="a")
    assert not pc.adapter_configs(toy) and not any(isinstance(m, BottleneckSlot) for m in toy.modules())
    x = torch.randn(2, 5, 16)
    base = toy(x)
    pc.apply(toy, BottleneckConfig(placement="parallel", reduction_factor=4, ffn_output_modules=r"blocks\.\d+\.ff",
                                   ffn_input_modules=r"blocks\.\d+\.ff", leave_out=[1]), name="a")
    assert sorted(n for n, m in toy.named_modules() if isinstance(m, BottleneckSlot)) == [
        "blocks.0.ff.bottleneck", "blocks.2.ff.bottleneck"]
    assert pc.count_parameters(toy)[0] == 2 * (2 * 16 * 4 + 4 + 16)
    assert torch.equal(toy(x), base)
    perturb(toy, "a")
    slot = toy.blocks[0].ff.bottleneck
    ff = toy.blocks[0].ff
    h0 = x + ff.fc2(torch.relu(ff.fc1(x))) + slot.adapters["a"](x)
    torch.testing.assert_close(toy.blocks[0](x), h0)
    with pytest.raises(TypeError, match=r"blocks.0.seq is a container \(Sequential\)"):
        pc.apply(toy, BottleneckConfig(placement="pfeiffer", ffn_output_modules=r"blocks\.\d+\.seq"), name="b")


@pytest.mark.parametrize("kwargs,match", [
    ({"placement": "sequential"}, r"placement must be one of \('houlsby', 'pfeiffer', 'parallel'\)"),
    ({"non_linearity": "softmax"}, r"non_linearity must be one of .*gelu.*relu"),
    ({"reduction_factor": 0}, "reduction_factor must be a positive number"),
    ({"reduction_factor": "16"}, "reduction_factor must be a positive number"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"leave_out": [0, -1]}, "leave_out must be a list of layer indices"),
    ({"ffn_output_modules": [1]}, "ffn_output_modules must be None, a regex string"),
    ({"init_range": -1}, "init_range must be a number >= 0"),
])
def test_bad_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BottleneckConfig(**kwargs)


def test_bad_configs_at_apply_change_nothing():
    model, _ = tiny_model("bert")
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"reduction_factor=64 is too large for hidden size 32.*32 // 64 = 0"):
        pc.apply(model, BottleneckConfig(reduction_factor=64), name="a")
    with pytest.raises(ValueError, match="leaves no layer"):
        pc.apply(model, BottleneckConfig(leave_out=[0, 1]), name="a")
    with pytest.raises(ValueError, match=r"leave_out=\[2\] names layers \[2\] this model does not have.*\[0, 1\]"):
        pc.apply(model, BottleneckConfig(leave_out=[2]), name="a")
    with pytest.raises(ValueError, match="matched no module"):
        pc.apply(model, BottleneckConfig(placement="pfeiffer", ffn_output_modules=["nope"]), name="a")
    assert list(model.state_dict()) == keys and not pc.adapter_configs(model)
    pc.apply(model, BottleneckConfig(), name="a")
    with pytest.raises(ValueError, match="already"):
        pc.apply(model, BottleneckConfig(), name="a")
    with pytest.raises(KeyError, match="'zzz'"):
        pc.set_active(model, Stack("a", "zzz"))


def test_json_round_trip():
    from peftcore.tuners import method_for_config, method_for_type

    cfg = BottleneckConfig(placement="parallel", reduction_factor=2.5, non_linearity="gelu_new", scaling=4.0,
                           leave_out=[1], ffn_output_modules=["mlp"], ffn_input_modules="x")
    m = method_for_config(cfg)
    d = m.to_json(cfg, None, "a")
    assert d["peft_type"] == "BOTTLENECK"
    assert method_for_type("BOTTLENECK", "t").from_json(d, "t") == cfg
    with pytest.raises(ValueError, match="unknown BottleneckConfig keys"):
        m.from_json({**d, "mystery": 1}, "t")
