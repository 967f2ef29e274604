"""peftcore.transfer.prompts: templates, verbalizers, the encoder and causal-LM scorers, template
selection; the real MiniLM does zero-shot classification of the shipped set well above chance."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pc_testing import bpe_tokenizer  # noqa: E402
from peftcore.transfer.prompts import (CONTENT_FREE, CausalLMScorer, EncoderScorer, PromptClassifier,  # noqa: E402
                                       PromptError, Template, Verbalizer, select_template)

LABELS = ["complaint", "praise", "question"]
TEXTS = ["The parcel never arrived and nobody answers.", "Thanks, the new app is lovely!",
         "What time does the gym open on Sunday?", "Ugh, my order was cold again.",
         "Great support, five stars.", "How do I change my address?", "x"]


def _bpe_tokenizer():
    return bpe_tokenizer(LABELS + TEXTS)


def _tiny_lm(vocab):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def lm():
    tok = _bpe_tokenizer()
    return _tiny_lm(len(tok)), tok


# --------------------------------------------------------------------------------------------
# templates and verbalizers


@pytest.mark.parametrize("bad, what", [("no field", "no {label}"), ("{label} {lable}", "unknown field"),
                                       ("{label} {label}", "occurs twice"), ("{label:>5}", "format spec"),
                                       ("{label!r}", "conversion"), ("{label", "not a valid format")])
def test_template_errors_name_the_problem(bad, what):
    with pytest.raises(PromptError, match="template") as e:
        Template(bad)
    assert what in str(e.value)


def test_template_render_split_and_literal_braces():
    t = Template("{{json}} {text}\nIntent: {label}.")
    assert t.fields == ("text", "label")
    assert t.render(text="hi", label="praise") == "{json} hi\nIntent: praise."
    assert t.split("hi") == ("{json} hi\nIntent: ", ".")


def test_verbalizer_validation_and_labels():
    v = Verbalizer({"a": "x", "b": ["y", "z"]})
    assert v.labels == ["a", "b"] and v.words["b"] == ("y", "z")
    assert Verbalizer.from_labels(["not_sure", "yes-no"]).words == {"not_sure": ("not sure",), "yes-no": ("yes no",)}
    for bad in ({"a": "x"}, {"a": "x", "b": ""}, {"a": "x", "b": [3]}, ["a", "b"]):
        with pytest.raises(PromptError, match="verbalizer"):
            Verbalizer(bad)


# --------------------------------------------------------------------------------------------
# the causal-LM scorer


def _manual_loglik(model, tok, context, word):
    """One unbatched forward on the whole string; the label's tokens are what follows the context."""
    ctx = context.rstrip(" ")
    whole = tok(ctx + context[len(ctx):] + word, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return [logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))]


@pytest.mark.parametrize("share", [True, False], ids=["kv-cache", "full-sequences"])
def test_causal_scores_match_an_unbatched_forward_and_ignore_padding(lm, share):
    model, tok = lm
    verb = Verbalizer({"complaint": ("complaint", "a problem"), "praise": "praise", "question": "question"})
    tmpl = Template("Message: {text}\nThis message is a {label}")
    sc = CausalLMScorer(model, tok, normalize="sum", batch_size=1, share_prefix=share)
    s_sum = sc.scores(TEXTS, tmpl, verb)
    assert sc.last_path == ("kv-cache" if share else "full")  # the cached path ran where asked
    s_batched = CausalLMScorer(model, tok, normalize="sum", batch_size=5, share_prefix=share).scores(TEXTS, tmpl, verb)
    s_mean = CausalLMScorer(model, tok, normalize="mean", batch_size=3, share_prefix=share).scores(TEXTS, tmpl, verb)
    assert s_sum.shape == (len(TEXTS), 3)
    torch.testing.assert_close(s_batched, s_sum, rtol=1e-4, atol=1e-4)  # right padding changes nothing
    for n, text in enumerate(TEXTS):
        context, _ = tmpl.split(text)
        for j, label in enumerate(verb.labels):
            per_word = [_manual_loglik(model, tok, context, w) for w in verb.words[label]]
            assert s_sum[n, j].item() == pytest.approx(max(sum(lp) for lp in per_word), abs=1e-3)
            assert s_mean[n, j].item() == pytest.approx(max(sum(lp) / len(lp) for lp in per_word), abs=1e-3)


def test_kv_cache_path_on_gpt2_equals_full_sequences():
    tok = _bpe_tokenizer()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                                                n_positions=256)).eval()
    verb = Verbalizer({"complaint": ("complaint", "a problem"), "praise": "praise", "question": "a question"})
    sc = CausalLMScorer(gpt2, tok, batch_size=4)
    a = sc.scores(TEXTS, "{text} Intent: {label}", verb)
    assert sc.last_path == "kv-cache"  # the cached path ran (no fallback)
    b = CausalLMScorer(gpt2, tok, batch_size=4, share_prefix=False).scores(TEXTS, "{text} Intent: {label}", verb)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_causal_leading_space_belongs_to_the_label(lm):
    _, tok = lm
    sc = CausalLMScorer(lm[0], tok)
    ctx, cont = sc._encode("Intent: ", "praise")
    assert tok.decode(cont) == " praise"  # the space moved from the context into the continuation
    assert tok.decode(ctx) == "Intent:"


def test_contextual_calibration_formula(lm):
    model, tok = lm
    verb, tmpl = Verbalizer.from_labels(LABELS), "{text} => {label}"
    raw = CausalLMScorer(model, tok).scores(TEXTS, tmpl, verb).double()
    free = CausalLMScorer(model, tok).scores(list(CONTENT_FREE), tmpl, verb).double()
    p_cf = torch.softmax(free, -1).mean(0)  # Zhao et al.: the label distribution on content-free inputs
    want = torch.log_softmax(raw, -1) - p_cf.log()
    got = CausalLMScorer(model, tok, calibrate=True).scores(TEXTS, tmpl, verb).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(p_cf, torch.full_like(p_cf, 1 / 3), atol=1e-3)  # so calibration changes something


def test_demonstrations_are_prepended(lm):
    model, tok = lm
    verb, tmpl = Verbalizer.from_labels(LABELS), Template("{text} => {label}")
    demos = [("Where is my refund?", "question"), ("Love it", 1)]
    sc = CausalLMScorer(model, tok, normalize="sum")
    with_demos = sc.scores(TEXTS[:2], tmpl, verb, demos=demos)
    prefix = "Where is my refund? => question\n\nLove it => praise\n\n"
    manual = sum(_manual_loglik(model, tok, prefix + tmpl.split(TEXTS[0])[0], "praise"))
    assert with_demos[0, 1].item() == pytest.approx(manual, abs=1e-3)
    assert not torch.allclose(with_demos, sc.scores(TEXTS[:2], tmpl, verb))


def test_causal_template_and_argument_errors(lm):
    model, tok = lm
    verb = Verbalizer.from_labels(LABELS)
    sc = CausalLMScorer(model, tok)
    with pytest.raises(PromptError, match=r"needs \{text\} followed by \{label\}"):
        sc.scores(TEXTS, "{label}: {text}", verb)
    with pytest.raises(PromptError, match="texts: expected a list"):
        sc.scores("one string", "{text} {label}", verb)
    with pytest.raises(PromptError, match=r"demos\[0\]: unknown label 'refund'"):
        sc.scores(TEXTS, "{text} {label}", verb, demos=[("a", "refund")])
    with pytest.raises(PromptError, match="normalize"):
        CausalLMScorer(model, tok, normalize="max")
    with pytest.raises(PromptError, match=r"labels\[1\]: class id 7"):
        PromptClassifier(sc, "{text} {label}", verb).accuracy(TEXTS[:2], [0, 7])


# --------------------------------------------------------------------------------------------
# the encoder scorer and template selection


class _Fixed:
    """A scorer whose scores say the truth for templates starting with 'good', the opposite else."""

    def __init__(self, truth):
        self.truth = truth

    def scores(self, texts, template, verbalizer, demos=None):
        y = torch.tensor([self.truth[t] for t in texts])
        s = torch.nn.functional.one_hot(y, len(verbalizer.labels)).float()
        return s if str(template).startswith("good") else 1 - s


def test_select_template_picks_the_best_and_reports_every_candidate():
    truth = {t: i % 3 for i, t in enumerate(TEXTS)}
    v1, v2 = Verbalizer.from_labels(LABELS), Verbalizer({k: k.upper() for k in LABELS})
    sel = select_template(_Fixed(truth), ["bad {label}", "good {label}", "good too {label}"], [v1, v2],
                          list(truth), list(truth.values()))
    assert sel.classifier.template.text == "good {label}" and sel.classifier.verbalizer is v1  # earliest of ties
    assert sel.accuracy == 1.0
    assert [(r["template"], r["verbalizer"]) for r in sel.table] == [
        ("bad {label}", 0), ("bad {label}", 1), ("good {label}", 0), ("good {label}", 1),
        ("good too {label}", 0), ("good too {label}", 1)]
    assert sel.table[0]["accuracy"] < 0.5
    with pytest.raises(PromptError, match="verbalizers: every verbalizer needs the labels"):
        select_template(_Fixed(truth), ["good {label}"], [v1, Verbalizer({"a": "a", "b": "b"})], TEXTS, [0] * 7)
    with pytest.raises(PromptError, match="non-empty dev split"):
        select_template(_Fixed(truth), ["good {label}"], v1, TEXTS, [0, 1])


def _minilm():
    from peftcore.assets import default_model_dir, load_encoder, load_tokenizer

    d = default_model_dir()
    return load_encoder(d).eval(), load_tokenizer(d)


def test_encoder_scores_are_cosines_of_mean_pooled_embeddings():
    enc, tok = _minilm()
    sc = EncoderScorer(enc, tok, batch_size=2)
    verb = Verbalizer({"complaint": ("a complaint", "a problem"), "praise": "praise", "question": "a question"})
    s = sc.scores(TEXTS, "This is {label}.", verb)

    def emb(texts):
        b = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = enc(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    x = torch.cat([emb([t]) for t in TEXTS])
    lab = torch.stack([torch.nn.functional.normalize(emb([f"This is {w}." for w in verb.words[k]]).mean(0), dim=-1)
                       for k in verb.labels])
    torch.testing.assert_close(s, x @ lab.T, rtol=1e-4, atol=1e-4)
    assert s.abs().max() <= 1 + 1e-5
    with pytest.raises(PromptError, match="an encoder template describes the label"):
        sc.scores(TEXTS, "{text} is {label}", verb)
    with pytest.raises(PromptError, match="demos"):
        sc.scores(TEXTS, "{label}", verb, demos=[("a", 0)])


def test_minilm_zero_shot_and_few_shot_selection_beat_chance_on_the_shipped_set():
    from peftcore.data import load_textcls
    from peftcore.transfer.textdata import per_class_sample

    enc, tok = _minilm()
    (tr, ytr, names), (te, yte, _) = load_textcls("train"), load_textcls("test")
    sc = EncoderScorer(enc, tok)
    desc = Verbalizer({"complaint": "reporting that something went wrong", "praise": "thanking someone",
                       "question": "asking for information", "cancellation": "cancelling or getting money back",
                       "suggestion": "proposing an improvement"})
    names_v = Verbalizer.from_labels(names)
    zero = PromptClassifier(sc, "{label}", desc).accuracy(te, yte)
    assert zero > 0.4  # five classes: chance is 0.2 (measured 0.6)
    dev = per_class_sample(ytr, 4, seed=0)
    sel = select_template(sc, ["{label}", "This request is about {label}."], [names_v, desc],
                          [tr[i] for i in dev], [ytr[i] for i in dev])
    assert len(sel.table) == 4 and sel.accuracy == max(r["accuracy"] for r in sel.table)
    assert sel.classifier.accuracy(te, yte) > 0.4
    assert math.isclose(sel.classifier.accuracy([tr[i] for i in dev], [ytr[i] for i in dev]), sel.accuracy)


def test_legacy_tuple_caches_repeat_and_an_unrepeatable_cache_falls_back_with_a_warning(lm):
    from types import SimpleNamespace

    from peftcore.transfer.prompts import _NoRepeatableCache, _repeat_cache

    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    rep = _repeat_cache(((k, v),), 3)
    assert rep[0][0].shape[0] == 6 and torch.equal(rep[0][0][:3], k[:1].expand(3, -1, -1, -1))
    with pytest.raises(_NoRepeatableCache):
        _repeat_cache(object(), 2)

    model, tok = lm

    class NoCache(torch.nn.Module):  # a model whose forward returns no usable cache
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kw):
            kw.pop("cache", None), kw.pop("past_key_values", None)
            return SimpleNamespace(logits=self.inner(**kw).logits, cache="opaque")

    verb = Verbalizer({"complaint": ("complaint", "a problem"), "praise": "praise", "question": "question"})
    sc = CausalLMScorer(NoCache(), tok)
    with pytest.warns(UserWarning, match="no repeatable KV cache"):
        got = sc.scores(TEXTS, "{text} => {label}", verb)
    assert sc.last_path == "full" and sc.share_prefix  # the user's setting is left alone
    want = CausalLMScorer(model, tok, share_prefix=False).scores(TEXTS, "{text} => {label}", verb)
    torch.testing.assert_close(got, want)


def test_a_tokenizer_that_adds_bos_keeps_it_also_when_truncating():
    from peftcore.assets import default_model_dir, load_tokenizer

    tok = load_tokenizer(default_model_dir())  # BERT wordpiece: [CLS] in front, [SEP] behind
    model = _tiny_lm(len(tok))
    sc = CausalLMScorer(model, tok, normalize="sum")
    assert sc._lead() == [tok.cls_token_id]
    verb = Verbalizer.from_labels(LABELS)
    s = sc.scores(TEXTS[:3], "{text} intent : {label}", verb)
    for n, text in enumerate(TEXTS[:3]):
        ctx = tok(text + " intent :", add_special_tokens=False)["input_ids"]
        for j, w in enumerate(LABELS):
            cont = tok(" " + w, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tok.cls_token_id] + ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            want = sum(logp[i - 1, ids[0, i]].item() for i in range(1 + len(ctx), ids.shape[1]))
            assert s[n, j].item() == pytest.approx(want, abs=1e-3)
    short = CausalLMScorer(model, tok, max_length=6)
    ctx, cont = short._encode("one two three four five six seven eight intent : ", "praise")
    assert ctx[0] == tok.cls_token_id and len(ctx) + len(cont) == 6 and tok.decode(ctx[-2:]) == "intent :"
    with pytest.raises(PromptError, match="max_length"):
        CausalLMScorer(model, tok, max_length=0)
