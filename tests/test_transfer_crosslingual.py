"""Cross-lingual transfer: the shipped German and Spanish data, BERT masking, the tied MLM head and
language-adapter training, and the MAD-X swap on top of a trained task adapter."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import peftcore as pc  # noqa: E402
from peftcore.data import DATA_DIR, load_textcls, load_unlabelled  # noqa: E402
from peftcore.transfer.crosslingual import TiedMLMHead, mask_tokens, special_ids, train_language_adapter  # noqa: E402


@pytest.mark.parametrize("lang", ["de", "es"])
def test_translations_align_with_the_english_test_set(lang):
    en_x, en_y, names = load_textcls("test")
    x, y, names2 = load_textcls("test", language=lang)
    assert len(x) == len(en_x) == 161 and y == en_y and names2 == names
    assert all(a != b and b.strip() for a, b in zip(en_x, x))
    assert sum(a.endswith("?") for a in en_x) == sum(b.endswith("?") for b in x)  # questions stay questions
    raw = (DATA_DIR / f"textcls_test_{lang}.jsonl").read_text(encoding="utf-8").splitlines()
    assert all(set(json.loads(line)) == {"text", "label"} for line in raw)
    unl = load_unlabelled(lang)
    assert len(unl) == len(load_textcls("train")[0]) == 464 and not set(unl) & set(x)
    with pytest.raises(ValueError, match="language"):
        load_textcls("train", language=lang)
    with pytest.raises(ValueError, match="language"):
        load_unlabelled("fr")


def _tok():
    from peftcore.assets import default_model_dir, load_tokenizer

    return load_tokenizer(default_model_dir())


def test_mask_tokens_bert_rule_specials_and_seed():
    tok = _tok()
    b = tok(load_unlabelled("de")[:64] + ["Ja."], padding=True, return_tensors="pt")
    ids, mask = b["input_ids"], b["attention_mask"]
    special = special_ids(tok)
    inp, lab = mask_tokens(ids, mask, mask_id=tok.mask_token_id, vocab_size=len(tok), special=special,
                           generator=torch.Generator().manual_seed(0))
    chosen = lab != -100
    eligible = mask.bool() & ~torch.isin(ids, torch.tensor(special))
    assert not (chosen & ~eligible).any()            # never CLS, SEP or padding
    assert chosen.any(1).all()                       # every row predicts at least one token ("Ja." too)
    assert torch.equal(lab[chosen], ids[chosen]) and torch.equal(inp[~chosen], ids[~chosen])
    rate = chosen.sum() / eligible.sum()
    assert 0.11 < rate < 0.20
    to_mask = (inp[chosen] == tok.mask_token_id).float().mean()
    assert 0.7 < to_mask < 0.9                       # 80% [MASK], the rest random or kept
    again = mask_tokens(ids, mask, mask_id=tok.mask_token_id, vocab_size=len(tok), special=special,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], inp) and torch.equal(again[1], lab)
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(ids, mask, mask_id=1, vocab_size=10, prob=0.0)


def _tiny_bert(vocab):
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=64,
                                                          max_position_embeddings=128), add_pooling_layer=False)


def test_tied_head_reads_the_frozen_embeddings():
    enc = _tiny_bert(100)
    head = TiedMLMHead(enc)
    assert "embeddings" not in dict(head.named_parameters()) and len(head.state_dict()) == 5
    h = torch.randn(3, 32)
    logits = head(h)
    assert logits.shape == (3, 100)
    logits.sum().backward()
    assert enc.get_input_embeddings().weight.grad is None
    want = head.norm(torch.nn.functional.gelu(head.dense(h))) @ enc.get_input_embeddings().weight.T + head.bias
    torch.testing.assert_close(logits, want)


def test_language_adapter_learns_and_touches_nothing_else():
    tok = _tok()
    enc = _tiny_bert(len(tok))
    pc.apply(enc, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=2), name="lang_de")
    pc.apply(enc, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=4), name="task")
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    grads = {n: p.requires_grad for n, p in enc.named_parameters()}
    enc.eval()
    h = train_language_adapter(enc, tok, load_unlabelled("de")[:48], "lang_de", epochs=4, batch_size=8, lr=2e-2,
                               progress=False)
    assert len(h["loss"]) == 4 and h["loss"][-1] < h["loss"][0] - 0.1  # from ln(V) = 10.3: it learns
    moved = {n for n, p in enc.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lang_de" in n for n in moved)  # base weights and the other adapter unchanged
    assert {n: p.requires_grad for n, p in enc.named_parameters()} == grads
    assert not enc.training
    with pytest.raises(ValueError, match="no adapter 'lang_fr'"):
        train_language_adapter(enc, tok, ["Hallo"], "lang_fr")
    with pytest.raises(ValueError, match="texts"):
        train_language_adapter(enc, tok, [], "lang_de")


def test_madx_swap_keeps_the_task_adapter_and_changes_the_language():
    from peftcore.training import encode, train_loop
    from peftcore.transfer.classifier import TextClassifier

    tok = _tok()
    enc = _tiny_bert(len(tok))
    for lang in ("en", "de"):
        pc.apply(enc, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=2), name=f"lang_{lang}")
    pc.apply(enc, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=4), name="task")
    x, y, _ = load_textcls("train")
    train_language_adapter(enc, tok, x[:32], "lang_en", epochs=1, batch_size=16, progress=False)
    train_language_adapter(enc, tok, load_unlabelled("de")[:32], "lang_de", epochs=1, batch_size=16, progress=False)
    clf = TextClassifier(enc, 5)
    pc.set_active(enc, pc.Stack("lang_en", "task"))
    pc.train_adapter(enc, "task")
    lang_en = {n: p.detach().clone() for n, p in enc.named_parameters() if "lang_" in n}
    params = [p for p in clf.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for n, p in enc.named_parameters() if "lang_" in n)
    train_loop(clf, params, encode(tok, x[:32], y[:32], 32), {"lr": 1e-3, "batch_size": 16, "epochs": 1},
               tok.pad_token_id, "cpu", 0, "task", False)
    assert all(torch.equal(p, lang_en[n]) for n, p in enc.named_parameters() if "lang_" in n)
    b = tok(x[:4], padding=True, return_tensors="pt")
    clf.eval()
    with torch.no_grad():
        en = clf(b["input_ids"], b["attention_mask"])
        pc.set_active(enc, pc.Stack("lang_de", "task"))
        de = clf(b["input_ids"], b["attention_mask"])
        pc.set_active(enc, pc.Stack("lang_en", "task"))
        en2 = clf(b["input_ids"], b["attention_mask"])
    assert not torch.allclose(en, de) and torch.equal(en, en2)


def test_content_groups_group_split_and_per_class_sample():
    from peftcore.transfer.textdata import content_groups, group_split, per_class_sample

    texts = ["Wow, the new tracking map made waiting painless!", "Five stars, the new tracking map made waiting painless.",
             "Is the pool open on Sunday mornings?", "Quick question: is the pool open on Sunday mornings?",
             "Cancel my plan now.", "The new tracking map made waiting painless, so I will recommend you.",
             "My plan should be cancelled now."]
    g = content_groups(texts)
    assert g[0] == g[1] == g[5] and g[2] == g[3] and len({g[0], g[2], g[4], g[6]}) == 4
    x, y, _ = load_textcls("test")
    groups = content_groups(x)
    pool, rest = group_split(y, groups, 10, seed=1234)
    assert sorted(pool + rest) == list(range(len(x)))
    assert not {groups[i] for i in pool} & {groups[i] for i in rest}  # no body on both sides
    assert all(sum(y[i] == c for i in pool) >= 10 for c in set(y))
    assert group_split(y, groups, 10, seed=1234) == (pool, rest)
    with pytest.raises(ValueError, match="per_class=100"):
        group_split(y, groups, 100)
    pick = per_class_sample([y[i] for i in pool], 5, seed=3)
    assert len(pick) == 25 and pick == per_class_sample([y[i] for i in pool], 5, seed=3)
    assert pick != per_class_sample([y[i] for i in pool], 5, seed=4)
    with pytest.raises(ValueError, match="class .* has only"):
        per_class_sample([0, 0, 1], 2)


def test_review_edge_cases_masks_classes_short_texts_and_state_on_error(monkeypatch):
    import peftcore.transfer.crosslingual as X
    from peftcore.transfer.textdata import content_groups, per_class_sample

    ids = torch.tensor([[101, 7, 8, 102]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    mask_tokens(ids, mask, mask_id=103, vocab_size=200, special=[101, 102])
    assert mask.all()  # the caller's mask is not written
    with pytest.raises(ValueError, match="class 1 has only 0"):
        per_class_sample([0, 0, 1], 1, exclude=[2])
    assert content_groups(["Cancel my plan.", "cancel my plan!", "Hi"]) == [0, 0, 1]

    tok = _tok()
    enc = _tiny_bert(len(tok))
    pc.apply(enc, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=2), name="lang_de")
    for p in enc.parameters():
        p.requires_grad_(True)
    grads = {n: p.requires_grad for n, p in enc.named_parameters()}

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(X, "TiedMLMHead", boom)
    with pytest.raises(RuntimeError, match="boom"):
        X.train_language_adapter(enc, tok, ["Hallo Welt"], "lang_de", progress=False)
    assert {n: p.requires_grad for n, p in enc.named_parameters()} == grads  # restored on failure
    with pytest.raises(ValueError, match="lr"):
        X.train_language_adapter(enc, tok, ["Hallo Welt"], "lang_de", lr=-1.0)


def test_a_prompt_tuning_language_adapter_trains():
    tok = _tok()
    enc = _tiny_bert(len(tok))
    pc.apply(enc, pc.PromptTuningConfig(num_virtual_tokens=4), name="lang_de")
    h = train_language_adapter(enc, tok, load_unlabelled("de")[:16], "lang_de", epochs=2, batch_size=8,
                               progress=False)
    assert len(h["loss"]) == 2 and all(v == v for v in h["loss"])
