"""Soft prompt tuning: input extension, loss, generation, encoders, text init, save/load, delete."""

import json

import pytest
import torch
import torch.nn.functional as F

import peftcore as pc
from peftcore.layers.prompt import PromptEmbeddings
from peftcore.tuners.prompt import (
    PromptTuningConfig,
    extend_prompt_mask,
    prompt_length,
    strip_prompt,
)
from pc_testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
P = 4


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _prompted(kind, p=P, name="pt", seed=0):
    model, _ = tiny_model(kind, seed=seed)
    pc.apply(model, PromptTuningConfig(num_virtual_tokens=p), name=name)
    return model


def _manual(model, ids, mask=None, **kw):
    """The base model run on [prompt; embeddings] by hand (adapters disabled)."""
    prompt = model.peftcore_prompt.prompts["pt"]
    emb = model.get_input_embeddings()(ids)
    embeds = torch.cat((prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), emb), dim=1)
    if mask is not None:
        mask = torch.cat((torch.ones(ids.shape[0], prompt.shape[0], dtype=mask.dtype), mask), dim=1)
    with pc.disable_adapters(model):
        return model(inputs_embeds=embeds, attention_mask=mask, **kw)


def _padded(batch=2, seq=7):
    ids = tiny_inputs(batch=batch, seq=seq)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


# --- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": True}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 4, "init": "vocab"}, "init"),
    ({"num_virtual_tokens": 4, "init": "text", "tokenizer_name_or_path": "t"}, "init_text"),
    ({"num_virtual_tokens": 4, "init": "text", "init_text": "hi"}, "tokenizer_name_or_path"),
    ({"num_virtual_tokens": 4, "init_text": "hi"}, "init_text"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PromptTuningConfig(**kwargs)


# --- decoder: inputs, loss, masks -----------------------------------------------------------
def test_llama_loss_and_logits_match_manual_computation():
    model = _prompted("llama")
    ids, mask = _padded()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, P + 7, 97)  # p virtual positions in front
    ref = _manual(model, ids, mask)
    real = torch.cat((torch.zeros(2, P, dtype=torch.bool), mask.bool()), dim=1)
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    # labels were extended with -100: next-token CE over the real tokens, the first one predicted
    # from the last virtual position (as in PEFT)
    manual = F.cross_entropy(out.logits[:, P - 1:-1].reshape(-1, 97), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    with pc.disable_adapters(model):
        base = model(input_ids=ids, attention_mask=mask)
    assert base.logits.shape == (2, 7, 97)
    assert (base.logits[mask.bool()] - out.logits[:, P:][mask.bool()]).abs().max() > 1e-3  # the prompt matters


def test_positional_inputs_embeds_and_position_ids_are_equivalent():
    model = _prompted("llama")
    ids = tiny_inputs(batch=2, seq=6)
    ref = model(input_ids=ids).logits
    torch.testing.assert_close(model(ids).logits, ref)  # positional input_ids go through the hook too
    emb = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=emb).logits, ref)
    pos = torch.arange(6).unsqueeze(0).expand(2, -1)
    torch.testing.assert_close(model(input_ids=ids, position_ids=pos).logits, ref, rtol=1e-5, atol=1e-6)


def test_only_the_prompt_trains_and_counts():
    model = _prompted("gpt2")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["peftcore_prompt.prompts.pt"]
    assert pc.count_parameters(model)[0] == P * 32
    ids = tiny_inputs(batch=2, seq=5)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.peftcore_prompt.prompts["pt"].grad.abs().sum() > 0


def test_one_prompt_active_at_a_time():
    model = _prompted("llama")
    pc.apply(model, PromptTuningConfig(num_virtual_tokens=2), name="other")
    ids = tiny_inputs(batch=1, seq=5)
    assert model(input_ids=ids).logits.shape[1] == 2 + 5  # the last applied one is active
    with pytest.raises(ValueError, match="at most one prompt tuning adapter"):
        pc.set_active(model, ["pt", "other"])
    pc.set_active(model, "pt")
    assert prompt_length(model) == P and model(input_ids=ids).logits.shape[1] == P + 5
    pc.set_active(model, [])
    assert prompt_length(model) == 0 and model(input_ids=ids).logits.shape[1] == 5


def test_bad_inputs_give_clear_errors():
    model = _prompted("llama")
    ids = tiny_inputs(batch=2, seq=5)
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))
    out = model(input_ids=ids, use_cache=True)
    with pytest.raises(ValueError, match="attention_mask has 3 columns"):
        model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 3, dtype=torch.long), past_key_values=out.past_key_values)
    with pytest.raises(TypeError, match="not a transformers model"):
        pc.apply(torch.nn.Linear(2, 2), PromptTuningConfig(num_virtual_tokens=2))


# --- generation ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generate_equals_manual_loop(kind):
    model = _prompted(kind, seed=3)
    model.generation_config.eos_token_id = None  # run all steps: the loop below does not stop early
    model.generation_config.pad_token_id = 0
    ids = tiny_inputs(seed=4, batch=2, seq=5)
    new = 5
    with torch.no_grad():
        kw = {"max_new_tokens": new, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
        cur, steps = ids, []
        for _ in range(new):  # full forwards, prompt prepended each time by the hook
            logits = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits[:, -1]
            steps.append(logits)
            cur = torch.cat((cur, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached.sequences, cur) and torch.equal(full.sequences, cur)
    for got, want in zip(cached.logits, steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the cached prompt stays in effect: generating without it gives other logits
    with torch.no_grad(), pc.disable_adapters(model):
        base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert (base.logits[0] - cached.logits[0]).abs().max() > 1e-3


def test_manual_cached_decoding_with_real_token_mask():
    model = _prompted("llama")
    ids, mask = _padded(seq=6)
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        cache = first.past_key_values
        assert cache.get_seq_length() == P + 5  # the prompt went into the cache once
        step = model(input_ids=ids[:, 5:], attention_mask=mask, past_key_values=cache, use_cache=True)
        full = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)


# --- encoder -------------------------------------------------------------------------------
def test_bert_sequence_output_helpers_and_token_types():
    model = _prompted("bert")
    ids, mask = _padded()
    tt = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    assert out.shape == (2, P + 7, 32)
    ref = _manual(model, ids, mask, token_type_ids=torch.cat((torch.zeros(2, P, dtype=tt.dtype), tt), 1))
    torch.testing.assert_close(out, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    ext = extend_prompt_mask(model, mask)
    assert ext.shape == (2, P + 7) and ext[:, :P].eq(1).all() and torch.equal(ext[:, P:], mask)
    stripped = strip_prompt(model, out)
    assert stripped.shape == (2, 7, 32) and torch.equal(stripped, out[:, P:])
    pooled = (out * ext[..., None]).sum(1) / ext.sum(1, keepdim=True)  # mean pooling with the extended mask
    assert pooled.shape == (2, 32) and torch.isfinite(pooled).all()


def test_bert_sequence_classification_labels_are_left_alone():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, num_labels=3)
    model = tf.BertForSequenceClassification(cfg).eval()
    pc.apply(model, PromptTuningConfig(num_virtual_tokens=3), name="pt")
    ids = tiny_inputs(batch=2, seq=5)
    labels = torch.tensor([0, 2])
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


# --- init, save/load, delete -------------------------------------------------------------
def _tokenizer_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 11, "the": 12, "review": 13, "huge": 500}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


def test_text_init_uses_token_embeddings_and_survives_save_load(tmp_path):
    tok = _tokenizer_dir(tmp_path / "tok")
    model, _ = tiny_model("llama")
    cfg = PromptTuningConfig(num_virtual_tokens=7, init="text", init_text="classify the review",
                             tokenizer_name_or_path=tok)
    pc.apply(model, cfg, name="pt")
    want = model.get_input_embeddings().weight[[11, 12, 13, 11, 12, 13, 11]]
    assert torch.equal(model.peftcore_prompt.prompts["pt"].detach(), want)
    with torch.no_grad():
        model.peftcore_prompt.prompts["pt"].add_(0.5)  # "trained"
    ids = tiny_inputs(batch=2, seq=5)
    expected = model(input_ids=ids).logits
    out = pc.save_adapter(model, tmp_path / "adapter", name="pt")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING" and saved["init_text"] == "classify the review"
    (tmp_path / "tok" / "tokenizer.json").unlink()  # loading must not need the tokenizer
    fresh, _ = tiny_model("llama")
    pc.load_adapter(fresh, out, name="loaded")
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected)
    assert pc.adapter_configs(fresh)["loaded"] == cfg


def test_text_init_errors(tmp_path):
    tok = _tokenizer_dir(tmp_path / "tok")
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="does not belong to this model"):  # id 500 >= vocab 97
        pc.apply(model, PromptTuningConfig(num_virtual_tokens=2, init="text", init_text="huge",
                                           tokenizer_name_or_path=tok))
    with pytest.raises(ValueError, match="could not be loaded"):
        pc.apply(model, PromptTuningConfig(num_virtual_tokens=2, init="text", init_text="the",
                                           tokenizer_name_or_path=str(tmp_path / "missing")))
    assert not hasattr(model, "peftcore_prompt") and not pc.adapter_configs(model)  # unchanged on error


def test_delete_restores_the_base_model():
    model, _ = tiny_model("gpt2")
    ids = tiny_inputs(batch=2, seq=5)
    base = model(input_ids=ids).logits
    hooks = dict(model._forward_pre_hooks)
    pc.apply(model, PromptTuningConfig(num_virtual_tokens=3), name="a")
    pc.apply(model, PromptTuningConfig(num_virtual_tokens=2), name="b")
    assert isinstance(model.peftcore_prompt, PromptEmbeddings)
    pc.delete_adapter(model, "b")
    assert model(input_ids=ids).logits.shape[1] == 5  # "a" was not active: no prompt now
    pc.set_active(model, "a")
    assert model(input_ids=ids).logits.shape[1] == 3 + 5
    pc.delete_adapter(model, "a")
    assert not hasattr(model, "peftcore_prompt") and dict(model._forward_pre_hooks) == hooks
    assert torch.equal(model(input_ids=ids).logits, base)
    assert all(not k.startswith("peftcore") for k in model.state_dict())
