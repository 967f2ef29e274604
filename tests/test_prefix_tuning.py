"""Prefix tuning through transformers' AttentionInterface: equivalence with a KV cache pre-filled
with the prefix (what prefix tuning means), GQA, padding, eager/sdpa, projection, generation,
gradient checkpointing, parameter counts, save/load and deletion."""

import copy
import inspect
import json

import pytest
import torch

import peftcore as pc
from peftcore.layers.prompt import SLOT, PrefixEncoder
from peftcore.tuners.prompt import PrefixTuningConfig
from peftcore.tuners.prompt.prefix import attention_modules
from pc_testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
P = 3
SHAPES = {"llama": (2, 2, 8, 32), "gpt2": (2, 4, 8, 32), "bert": (2, 4, 8, 32)}  # layers, kv heads, head_dim, hidden


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _cache_kw(model):
    return "cache" if "cache" in inspect.signature(type(model.base_model).forward).parameters else "past_key_values"


def _set_impl(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


def _prefixed(kind, impl="sdpa", projection=False, p=P, seed=0):
    model, _ = tiny_model(kind, seed=seed)
    _set_impl(model, impl)
    pc.apply(model, PrefixTuningConfig(num_virtual_tokens=p, projection=projection), name="pre")
    return model


def _layer_prefixes(model):
    host = model.peftcore_prefix
    return [host.layer_kv(i).detach() for i in range(host.num_layers)]  # each [2, n_kv, p, d]


def _reference(model, ids, mask, **kw):
    """The base model with a DynamicCache holding the prefix and a mask with ones in front."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    b = ids.shape[0]
    for layer, kv in enumerate(_layer_prefixes(model)):
        cache.update(kv[0].expand(b, -1, -1, -1).clone(), kv[1].expand(b, -1, -1, -1).clone(), layer)
    mask = torch.ones_like(ids) if mask is None else mask
    mask = torch.cat((torch.ones(b, P, dtype=mask.dtype), mask), dim=1)
    with pc.disable_adapters(model):
        return _out(model(input_ids=ids, attention_mask=mask, **{_cache_kw(model): cache}, **kw))


def _padded(batch=2, seq=7):
    ids = tiny_inputs(batch=batch, seq=seq)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


# --- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2, "projection": 1}, "projection"),
    ({"num_virtual_tokens": 2, "encoder_hidden_size": 8}, "encoder_hidden_size"),
    ({"num_virtual_tokens": 2, "projection": True, "encoder_hidden_size": -1}, "encoder_hidden_size"),
    ({"num_virtual_tokens": 2, "position_offset": "yes"}, "position_offset"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        PrefixTuningConfig(**kwargs)


# --- equivalence with a pre-filled cache -------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_equals_prefilled_cache_with_padding(kind, impl):
    model, _ = tiny_model(kind)
    _set_impl(model, impl)
    if kind == "bert" and not attention_modules(model):  # transformers < 5 BERT: no AttentionInterface
        with pytest.raises(ValueError, match="AttentionInterface"):
            pc.apply(model, PrefixTuningConfig(num_virtual_tokens=P))
        return
    pc.apply(model, PrefixTuningConfig(num_virtual_tokens=P), name="pre")
    assert model.config._attn_implementation == f"peftcore_prefix_{impl}"
    ids, mask = _padded()
    out = _out(model(input_ids=ids, attention_mask=mask))
    ref = _reference(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
    with pc.disable_adapters(model):
        base = _out(model(input_ids=ids, attention_mask=mask))
    assert (base[real] - out[real]).abs().max() > 1e-2  # the prefix matters


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_no_mask_with_sdpa_gets_an_explicit_causal_mask(kind):
    # sdpa gets attention_mask=None here and would use is_causal, which is top-left aligned: wrong
    # once the prefix makes keys outnumber queries.
    model = _prefixed(kind, "sdpa", projection=True)
    ids = tiny_inputs(batch=2, seq=6)
    torch.testing.assert_close(_out(model(input_ids=ids)), _reference(model, ids, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_position_offset(kind):
    ids, mask = _padded()
    pos = torch.arange(7).unsqueeze(0).expand(2, -1)
    model = _prefixed(kind)  # real tokens at p, p + 1, ...: given positions shift as well
    torch.testing.assert_close(_out(model(input_ids=ids, attention_mask=mask, position_ids=pos)),
                               _out(model(input_ids=ids, attention_mask=mask)))
    model, _ = tiny_model(kind)
    pc.apply(model, PrefixTuningConfig(num_virtual_tokens=P, position_offset=False), name="pre")
    out = _out(model(input_ids=ids, attention_mask=mask))  # real tokens keep positions 0, 1, ...
    ref = _reference(model, ids, mask, position_ids=pos)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    assert (out - _reference(model, ids, mask))[mask.bool()].abs().max() > 1e-3


def test_gqa_shapes_and_parameter_counts():
    layers, n_kv, d, h = SHAPES["llama"]
    model = _prefixed("llama")
    assert model.peftcore_prefix.prefixes["pre"].shape == (layers, 2, n_kv, P, d)  # n_kv = 2 < 4 heads
    assert pc.count_parameters(model)[0] == layers * 2 * n_kv * P * d
    for kind, (layers, n_kv, d, h) in SHAPES.items():
        model, _ = tiny_model(kind)
        pc.apply(model, PrefixTuningConfig(num_virtual_tokens=P, projection=True, encoder_hidden_size=24))
        out = layers * 2 * n_kv * d
        assert pc.count_parameters(model)[0] == P * h + (h * 24 + 24) + (24 * out + out)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("peftcore_prefix.projections.default.") for n in trainable)


# --- generation ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, impl", [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_generate_with_and_without_cache_equals_manual_loop(kind, impl):
    model = _prefixed(kind, impl, seed=3)
    model.generation_config.eos_token_id = None  # run all steps, like the loop below
    model.generation_config.pad_token_id = 0
    ids = tiny_inputs(seed=4, batch=2, seq=5)
    kw = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kw)
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
        cur, steps = ids, []
        for _ in range(5):
            logits = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits[:, -1]
            steps.append(logits)
            cur = torch.cat((cur, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached.sequences, cur) and torch.equal(full.sequences, cur)
    for got, nocache, want in zip(cached.logits, full.logits, steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(nocache, want, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), pc.disable_adapters(model):
        base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert (base.logits[0] - cached.logits[0]).abs().max() > 1e-3


# --- training -------------------------------------------------------------------------------
def _loss_and_grads(kind, projection, checkpointing, reentrant=False):
    model = _prefixed(kind, projection=projection)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = tiny_inputs(batch=2, seq=6)
    torch.manual_seed(5)  # GPT-2 has dropout: the same masks with and without checkpointing
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, model.peftcore_prefix.calls


@pytest.mark.parametrize("kind, projection, reentrant", [
    ("llama", False, False), ("llama", True, True), ("llama", True, False), ("gpt2", False, True),
])
def test_gradient_checkpointing_gives_same_loss_and_prefix_grads(kind, projection, reentrant):
    loss0, g0, calls0 = _loss_and_grads(kind, projection, False)
    loss1, g1, calls1 = _loss_and_grads(kind, projection, True, reentrant)
    layers = SHAPES[kind][0]
    assert calls0 == layers and calls1 == 2 * layers  # the backward recomputed every layer
    torch.testing.assert_close(loss1, loss0)
    assert g0.keys() == g1.keys() and all(n.startswith("peftcore_prefix.") for n in g0)
    for n in g0:
        assert g0[n].abs().sum() > 0
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


# --- management -------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_delete_restores_the_base_model(impl):
    model, _ = tiny_model("llama")
    _set_impl(model, impl)
    ids, mask = _padded()
    base = model(input_ids=ids, attention_mask=mask).logits
    pc.apply(model, PrefixTuningConfig(num_virtual_tokens=P), name="a")
    pc.apply(model, PrefixTuningConfig(num_virtual_tokens=2, projection=True), name="b")
    assert model.peftcore_prefix.num_virtual_tokens() == 2
    with pytest.raises(ValueError, match="at most one prefix tuning adapter"):
        pc.set_active(model, ["a", "b"])
    pc.delete_adapter(model, "b")
    assert model.config._attn_implementation == f"peftcore_prefix_{impl}"
    pc.set_active(model, "a")
    assert (model(input_ids=ids, attention_mask=mask).logits - base).abs().max() > 1e-2
    pc.delete_adapter(model, "a")
    assert model.config._attn_implementation == impl
    assert not hasattr(model, "peftcore_prefix")
    assert not any(SLOT in m.__dict__ for m in model.modules())
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


def test_save_load_round_trip(tmp_path):
    for projection in (False, True):
        model = _prefixed("gpt2", projection=projection)
        ids = tiny_inputs(batch=2, seq=5)
        want = model(input_ids=ids).logits
        out = pc.save_adapter(model, tmp_path / str(projection), name="pre")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["projection"] is projection
        fresh, _ = tiny_model("gpt2", seed=0)
        pc.load_adapter(fresh, out, name="x")
        torch.testing.assert_close(fresh(input_ids=ids).logits, want)
        other, _ = tiny_model("llama")  # other shapes: refused, model left as it was
        impl = other.config._attn_implementation
        with pytest.raises(ValueError, match="another model"):
            pc.load_adapter(other, out)
        assert not hasattr(other, "peftcore_prefix") and other.config._attn_implementation == impl


def test_attention_implementation_changes_after_apply():
    model = _prefixed("llama", "sdpa")
    ids, mask = _padded()
    want = model(input_ids=ids, attention_mask=mask).logits
    _set_impl(model, "eager")  # the backbone's hook wraps the new implementation again
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "peftcore_prefix_eager"
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="eager and sdpa"):
        model(input_ids=ids)


def test_clear_errors():
    model, _ = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="set_attn_implementation"):
        pc.apply(model, PrefixTuningConfig(num_virtual_tokens=P))
    assert not hasattr(model, "peftcore_prefix") and model.config._attn_implementation == "flash_attention_2"
    model = _prefixed("llama")
    ids = tiny_inputs(batch=2, seq=5)
    with pytest.raises(ValueError, match="real tokens only"):  # a PEFT-style mask that includes the prefix
        model(input_ids=ids, attention_mask=torch.tensor([[1] * (P + 5), [0] + [1] * (P + 4)]))
    for m in model.modules():  # as if the attention bypassed the interface: no silent no-op
        m.__dict__.pop(SLOT, None)
    with pytest.raises(RuntimeError, match="no attention layer"):
        model(input_ids=ids)
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                                   num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        pc.apply(t5, PrefixTuningConfig(num_virtual_tokens=P))


def test_deepcopy_is_independent():
    model = _prefixed("llama")
    twin = copy.deepcopy(model)
    ids = tiny_inputs(batch=2, seq=5)
    torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    assert isinstance(twin.peftcore_prefix, PrefixEncoder) and twin.peftcore_prefix is not model.peftcore_prefix
    pc.delete_adapter(twin, "pre")
    assert twin.config._attn_implementation == "sdpa"  # _prefixed sets sdpa
    assert model.config._attn_implementation == "peftcore_prefix_sdpa"
    assert model.model._forward_pre_hooks  # the original keeps its hooks
    torch.testing.assert_close(model(input_ids=ids).logits, _reference(model, ids, None), rtol=1e-5, atol=1e-5)
