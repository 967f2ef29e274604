"""Distiller: the weighted hard / soft / hidden / attention loss and its training loop on tiny BERTs."""

from __future__ import annotations

import pytest
import torch

import peftcore as pc
from peftcore.distill import DistillOutput, Distiller, MeanPoolHead, hf_forward
from peftcore.distill.recipes import distill_classifier

tf = pytest.importorskip("transformers")

VOCAB, CLASSES = 61, 3


def _bert(layers, hidden, heads=2, kind="cls", seed=0, eager=True, dropout=0.1):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=CLASSES,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if eager:
        cfg._attn_implementation = "eager"
    if kind == "enc":
        return tf.BertModel(cfg, add_pooling_layer=False)
    return {"cls": tf.BertForSequenceClassification, "tok": tf.BertForTokenClassification}[kind](cfg)


def _batches(n=4, b=6, t=9, seed=1, token_labels=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[: b // 2, t - 3 :] = 0
        ids[mask == 0] = 0
        if token_labels:
            labels = torch.randint(0, CLASSES, (b, t), generator=g).masked_fill(mask == 0, -100)
        else:
            labels = torch.randint(0, CLASSES, (b,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


ALL = {"hard": 0.5, "soft": 0.5, "hidden": 1.0, "attention": 1.0}


@pytest.fixture
def pair():
    """A 4-layer hidden-32 teacher and a 2-layer hidden-16 student, no dropout."""
    return _bert(4, 32, seed=0, dropout=0.0), _bert(2, 16, seed=1, dropout=0.0)


def test_fit_decreases_the_loss_and_leaves_teacher_unchanged(pair):
    teacher, student = pair
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = _batches(n=4)
    d = Distiller(student, teacher, weights=ALL, lr=3e-3, progress=False, seed=0)
    # widths differ (16 -> 32): one projection per mapped layer pair (uniform 4 -> 2: layers 1, 3)
    assert d.layer_map == [(0, 1), (1, 3)]
    assert len(d.hidden_losses) == 2 and all(h.proj is not None for h in d.hidden_losses)
    proj_ids = {id(p) for p in d.hidden_losses.parameters()}
    assert proj_ids <= {id(p) for p in d.params}

    def mean_total():
        with torch.no_grad():
            return sum(d.losses(b)["total"].item() for b in data) / len(data)

    start = mean_total()
    history = d.fit(data, epochs=8)
    end = mean_total()
    assert end < 0.7 * start, (start, end)
    assert len(history) == 8 * len(data) == len(d.history)
    # the teacher: unchanged, in eval mode, no gradients
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k]), k
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())


def test_history_has_each_term_and_the_weighted_total(pair):
    teacher, student = pair
    d = Distiller(student, teacher, weights=ALL, lr=1e-3, progress=False)
    history = d.fit(_batches(n=3), epochs=2)
    assert [r["step"] for r in history] == list(range(1, 7))
    assert [r["epoch"] for r in history] == [0, 0, 0, 1, 1, 1]
    for r in history:
        assert set(r) == {"step", "epoch", "lr", "total", "hard", "soft", "hidden", "attention"}
        weighted = sum(ALL[k] * r[k] for k in ("hard", "soft", "hidden", "attention"))
        assert r["total"] == pytest.approx(weighted, rel=1e-5)
        assert all(r[k] >= 0 for k in ("hard", "soft", "hidden", "attention"))
    # linear schedule: warm-up to the peak over 10% of the steps, then decay towards 0
    lrs = [r["lr"] for r in history]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-3


def test_progress_bar_shows_each_term(pair, capsys):
    teacher, student = pair
    Distiller(student, teacher, weights=ALL, progress=True, desc="kd").fit(_batches(n=2), epochs=1)
    err = capsys.readouterr().err
    assert "kd" in err
    for term in ("total=", "hard=", "soft=", "hidden=", "attention="):
        assert term in err


class _Spy:
    """A forward callable that records the flags it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, inputs, *, output_hidden_states, output_attentions):
        self.calls.append((output_hidden_states, output_attentions))
        return hf_forward(model, inputs, output_hidden_states=output_hidden_states, output_attentions=output_attentions)


@pytest.mark.parametrize(
    "weights, teacher_runs, flags, terms",
    [
        ({"hard": 1.0}, False, (False, False), {"hard"}),
        ({"hard": 0.5, "soft": 0.5}, True, (False, False), {"hard", "soft"}),
        ({"soft": 1.0, "hidden": 1.0}, True, (True, False), {"soft", "hidden"}),
        ({"attention": 1.0}, True, (False, True), {"attention"}),
    ],
)
def test_zero_weight_terms_are_not_computed(pair, weights, teacher_runs, flags, terms):
    teacher, student = pair
    s_spy, t_spy = _Spy(), _Spy()
    d = Distiller(student, teacher, weights=weights, student_forward=s_spy, teacher_forward=t_spy, progress=False)
    if "hidden" not in terms:
        assert len(d.hidden_losses) == 0  # no projection made, none optimized
    history = d.fit(_batches(n=2), epochs=1)
    assert set(history[0]) - {"step", "epoch", "lr", "total"} == terms
    assert s_spy.calls == [flags, flags]
    assert t_spy.calls == ([flags, flags] if teacher_runs else [])


def test_default_weights_are_half_hard_half_soft(pair):
    teacher, student = pair
    d = Distiller(student, teacher, progress=False)
    assert d.weights == {"hard": 0.5, "soft": 0.5, "hidden": 0.0, "attention": 0.0}


def test_deterministic_with_a_seed():
    runs = []
    for _ in range(2):
        teacher, student = _bert(4, 32, seed=0), _bert(2, 16, seed=1)  # dropout on
        d = Distiller(student, teacher, weights=ALL, lr=1e-3, seed=7, progress=False)
        runs.append(d.fit(_batches(n=3), epochs=2))
    assert runs[0] == runs[1]


def test_lora_student_trains_only_adapters(pair):
    teacher, _ = pair
    student = _bert(2, 32, seed=1)
    pc.apply(student, pc.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"]))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    # the adapters, and the sequence-classification head (new for the task), whole, as PEFT's SEQ_CLS
    assert trainable and all("lora_" in n or n.startswith("classifier.modules_to_save.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    d = Distiller(student, teacher, weights={"hard": 0.5, "soft": 0.5, "hidden": 1.0}, lr=5e-3, progress=False)
    assert {id(p) for p in d.params} == {id(p) for n, p in student.named_parameters() if n in trainable}
    d.fit(_batches(n=2), epochs=2)
    for n, p in student.named_parameters():
        if n in trainable and "lora_B" in n:
            assert not torch.equal(p, before[n]), n  # B starts at 0 and moves
        elif n not in trainable:
            assert torch.equal(p, before[n]), n


def test_encoder_with_separate_heads():
    teacher_enc, student_enc = _bert(4, 32, kind="enc", seed=0), _bert(2, 32, kind="enc", seed=1)
    torch.manual_seed(2)
    t_lin, s_lin = torch.nn.Linear(32, CLASSES), torch.nn.Linear(32, CLASSES)
    t_before = t_lin.weight.detach().clone()
    s_before = s_lin.weight.detach().clone()
    d = Distiller(student_enc, teacher_enc, weights=ALL, head=MeanPoolHead(s_lin, 0.1),
                  teacher_head=MeanPoolHead(t_lin), lr=1e-3, progress=False)
    assert id(s_lin.weight) in {id(p) for p in d.params}
    assert all(h.proj is None for h in d.hidden_losses)  # equal widths: no projection
    history = d.fit(_batches(n=2), epochs=2)
    assert {"hard", "soft", "hidden", "attention"} <= set(history[-1])
    assert not torch.equal(s_lin.weight, s_before)
    assert torch.equal(t_lin.weight, t_before)


def test_distill_classifier_recipe_with_tuple_batches():
    class Clf(torch.nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.encoder, self.dropout, self.head = enc, torch.nn.Dropout(0.1), torch.nn.Linear(32, CLASSES)

    teacher, student = Clf(_bert(4, 32, kind="enc", seed=0)), Clf(_bert(2, 32, kind="enc", seed=1))
    data = [(b["input_ids"], b["attention_mask"], b["labels"]) for b in _batches(n=2)]
    d = distill_classifier(teacher, student, lambda epoch: data, epochs=2, steps_per_epoch=2, progress=False)
    assert len(d.history) == 4 and {"hard", "soft"} <= set(d.history[0])


def test_custom_forward_returning_distill_output(pair):
    teacher, student = pair

    def fwd(model, inputs, *, output_hidden_states, output_attentions):
        out = model(**inputs, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        return DistillOutput(logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions)

    def logits_only(model, inputs, **_):
        return model(**inputs).logits

    d = Distiller(student, teacher, weights=ALL, student_forward=fwd, teacher_forward=fwd, progress=False)
    assert set(d.fit(_batches(n=1), epochs=1)[0]) >= {"hidden", "attention"}
    d = Distiller(student, teacher, student_forward=logits_only, teacher_forward=logits_only, progress=False)
    assert {"hard", "soft"} <= set(d.fit(_batches(n=1), epochs=1)[0])


def test_token_level_logits_with_padding():
    teacher, student = _bert(2, 32, kind="tok", seed=0), _bert(1, 32, kind="tok", seed=1)
    d = Distiller(student, teacher, weights={"hard": 0.5, "soft": 0.5}, lr=1e-3, progress=False)
    data = _batches(n=2, token_labels=True)
    history = d.fit(data, epochs=1)
    assert all(r["total"] == r["total"] for r in history)  # finite, not NaN
    # the soft term is distill_kl over real tokens only (padded positions left out)
    b = data[0]
    student.eval()
    with torch.no_grad():
        got = d.losses(b)["soft"]
        inputs = {k: b[k] for k in ("input_ids", "attention_mask")}
        s, t = student(**inputs).logits, teacher(**inputs).logits
        want = pc.losses.distill_kl(s, t, 2.0, mask=b["attention_mask"].bool())
        unmasked = pc.losses.distill_kl(s, t, 2.0)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, unmasked)


def test_max_steps_and_callable_data(pair):
    teacher, student = pair
    data = _batches(n=3)
    seen = []

    def epochs(e):
        seen.append(e)
        return data

    history = Distiller(student, teacher, progress=False).fit(epochs, epochs=3, max_steps=4)
    assert len(history) == 4 and seen[:2] == [0, 1]
    with pytest.raises(ValueError, match="needs the step count"):
        Distiller(student, teacher, progress=False).fit(epochs, epochs=1)
    assert len(Distiller(student, teacher, schedule="constant", progress=False).fit(epochs, epochs=1)) == 3


def test_errors(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="unknown loss term 'kd'"):
        Distiller(student, teacher, weights={"kd": 1.0})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        Distiller(student, teacher, weights={"hard": 0.0})
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        Distiller(student, teacher, weights={"soft": -1.0})
    for bad in (0, float("inf"), float("nan")):  # inf used to pass here and fail at the first step
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            Distiller(student, teacher, temperature=bad)
    with pytest.raises(ValueError, match="names student layer 5"):
        Distiller(student, teacher, weights={"hidden": 1.0}, layer_map=[(5, 0)])
    with pytest.raises(ValueError, match="shares a trainable parameter with the teacher"):
        Distiller(teacher, teacher)
    with pytest.raises(ValueError, match="nothing to train"):
        Distiller(student.requires_grad_(False), teacher)
    student.requires_grad_(True)
    with pytest.raises(ValueError, match="needs labels"):
        Distiller(student, teacher, progress=False).fit([{"input_ids": _batches(n=1)[0]["input_ids"]}])
    with pytest.raises(TypeError, match="a batch must be a mapping"):
        Distiller(student, teacher, progress=False).fit([(1, 2)])


def test_attention_term_needs_eager_attention():
    teacher, student = _bert(2, 32, seed=0, eager=False), _bert(1, 32, seed=1, eager=False)
    if teacher.config._attn_implementation == "eager":
        pytest.skip("this transformers build uses eager attention by default")
    d = Distiller(student, teacher, weights={"attention": 1.0}, progress=False)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        d.fit(_batches(n=1))
