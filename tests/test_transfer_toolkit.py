"""peftcore.transfer: layer groups and freezing, gradual unfreezing, layer-wise rates, the slanted
triangular schedule, R-Drop / L2-SP / Mixout, augmentation, TaskConfig, FeatureCache."""

import math
import random

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from peftcore import transfer as T  # noqa: E402


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                          num_attention_heads=2, intermediate_size=32,
                                                          max_position_embeddings=32))


def _llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                                  num_attention_heads=2, num_key_value_heads=1,
                                                                  intermediate_size=32))


def _gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2,
                                                                n_positions=32))


FAMILIES = {"bert": (_bert, "encoder.layer."), "llama": (_llama, "model.layers."), "gpt2": (_gpt2, "transformer.h.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_groups_cover_every_parameter_once_in_order(family):
    make, prefix = FAMILIES[family]
    m = make()
    groups = T.layer_groups(m)
    assert len(groups) == 5 and groups[0].name == "embeddings" and groups[-1].name == "head"
    names = [n for g in groups for n, _ in g.params]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters()) and len(names) == len(set(names))
    for i, g in enumerate(groups[1:-1]):
        assert all(n.startswith(f"{prefix}{i}.") for n, _ in g.params)
    assert all("embed" in n or "wte" in n or "wpe" in n for n, _ in groups[0].params)


@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_to_fastai_semantics(family):
    m = FAMILIES[family][0]()
    groups = T.freeze_to(m, -1)
    assert all(p.requires_grad == (i == len(groups) - 1) for i, g in enumerate(groups) for p in g.parameters())
    T.freeze_to(m, 2)
    assert all(p.requires_grad == (i >= 2) for i, g in enumerate(groups) for p in g.parameters())
    T.freeze_to(m, 0)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="n=9"):
        T.freeze_to(m, 9)


def test_freeze_to_norms_and_adapters():
    import peftcore as pc

    m = _bert()
    groups = T.freeze_to(m, -1, train_norm=True)
    for n, p in groups[1].params:
        assert p.requires_grad == ("LayerNorm" in n)
    pc.apply(m, pc.LoRAConfig(r=2, target_modules=["query", "value"]))
    T.freeze_to(m, -2, params="adapters")  # top block's adapters train, base untouched (frozen by apply)
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert p.requires_grad == n.startswith("encoder.layer.2.")
        else:
            assert not p.requires_grad
    lora = [n for g in T.layer_groups(m)[1:-1] for n, _ in g.params if "lora_" in n]
    assert lora  # adapters sit in their block's group


def test_layer_groups_pattern_and_error():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pattern"):
        T.layer_groups(nn.Linear(2, 2))
    g = T.layer_groups(m, pattern=r"^(\d+)\.")
    assert [x.name for x in g] == ["embeddings", "block.0", "block.1", "head"]


def test_slanted_triangular_formula():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = T.slanted_triangular(opt, 100)
    lrs = []
    for t in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()

    def stlr(t, T_=100, cut_frac=0.1, ratio=32, base=0.01):  # AllenNLP's formula, written out
        cut = math.floor(T_ * cut_frac)
        p = t / cut if t < cut else 1 - (t - cut) / (T_ - cut)
        return base * (1 + p * (ratio - 1)) / ratio

    for t, want in ((0, 3.125e-4), (5, 5.156e-3), (10, 1e-2), (55, 5.156e-3), (100, 3.125e-4)):
        assert lrs[t] == pytest.approx(stlr(t), rel=1e-12) and lrs[t] == pytest.approx(want, rel=1e-3)
    for bad in (dict(total_steps=0), dict(total_steps=10, cut_frac=1.0), dict(total_steps=10, ratio=0.5)):
        with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else list(bad)[1]):
            T.slanted_triangular(opt, **bad)


def test_param_groups_layer_decay_and_any_scheduler():
    m = _bert()
    pg = T.param_groups(m, 1e-3, layer_decay=0.5, weight_decay=0.01)
    ids = [id(p) for g in pg for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(ids) == len(set(ids))
    by = {g["name"]: g for g in pg}
    assert by["head"]["lr"] == pytest.approx(1e-3) and by["embeddings"]["lr"] == pytest.approx(1e-3 * 0.5**4)
    assert by["encoder.layer.1"]["lr"] == pytest.approx(1e-3 * 0.5**2)
    assert all(g["weight_decay"] == 0.0 for g in pg if g["name"].endswith("no_decay"))
    opt = torch.optim.AdamW(pg)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 2, 10)
    sched.step()
    sched.step()  # end of warm-up: every group at its own base rate
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([g["lr"] for g in pg])


def _classifier():
    from peftcore.transfer.classifier import TextClassifier

    return TextClassifier(_bert(), 3)


def test_gradual_unfreezing_steps_and_state_dict():
    clf = _classifier()
    u = T.GradualUnfreezing(clf)
    groups = T.layer_groups(clf)
    trained = lambda: [any(p.requires_grad for p in g.parameters()) for g in groups]  # noqa: E731
    assert trained() == [False, False, False, False, True]
    u.step()
    assert trained() == [False, False, False, True, True]
    state = u.state_dict()
    fresh = T.GradualUnfreezing(_classifier())
    fresh.load_state_dict(state)  # a resumed run trains exactly the same groups
    assert [p.requires_grad for p in fresh.model.parameters()] == [p.requires_grad for p in clf.parameters()]
    for _ in range(5):
        u.step()
    assert all(p.requires_grad for p in clf.parameters())


def test_frozen_parameters_never_move_and_optimizer_state_reloads():
    """One optimizer over every parameter (frozen ones included): AdamW with weight decay leaves a
    frozen parameter alone, and its state dict loads into a fresh optimizer after unfreezing
    (no param-group mismatch, lightning#8502)."""
    clf = _classifier()
    u = T.GradualUnfreezing(clf)
    opt = torch.optim.AdamW(T.param_groups(clf, 1e-2, weight_decay=0.1))
    emb = clf.encoder.embeddings.word_embeddings.weight.detach().clone()
    x = torch.randint(0, 50, (2, 5))
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        clf(x, torch.ones_like(x)).sum().backward()
        opt.step()
        u.step()
    assert torch.equal(clf.encoder.embeddings.word_embeddings.weight, emb)
    opt2 = torch.optim.AdamW(T.param_groups(_classifier(), 1e-2, weight_decay=0.1))
    opt2.load_state_dict(opt.state_dict())
    assert len(opt2.state) == len(opt.state) > 0


def test_gradual_unfreezing_callback_restores_on_resume():
    clf = _classifier()
    u = T.GradualUnfreezing(clf)
    cb = T.GradualUnfreezingCallback(u)

    class S:
        epoch = 2.0

    cb.on_train_begin(None, S(), None)  # a Trainer resumed in epoch 2
    assert u.epoch == 2 and u.state_dict()["frozen"] == 2


def test_r_drop_loss_formula():
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    p, q = a.softmax(-1), b.softmax(-1)
    want = 0.5 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    assert T.r_drop_loss(a, b).double().item() == pytest.approx(want.item(), rel=1e-6)
    assert T.r_drop_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)


def test_l2sp_formula():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    w0 = [p.detach().clone() for p in m[0].parameters()]
    reg = T.L2SP(m, alpha=0.3, beta=0.7, new_params=list(m[1].parameters()))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    want = 0.5 * 0.3 * sum(((p - q) ** 2).sum() for p, q in zip(m[0].parameters(), w0)) \
        + 0.5 * 0.7 * sum((p ** 2).sum() for p in m[1].parameters())
    assert reg.penalty().item() == pytest.approx(want.item(), rel=1e-6)


def test_mixout_expectation_eval_and_removal():
    from peftcore.transfer.regularizers import remove_mixout

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8))
    u = m[0].weight.detach().clone()
    T.apply_mixout(m, 0.5)
    with torch.no_grad():
        m[0].weight.add_(1.0)  # trained weight w = u + 1
    x = torch.randn(4, 8)
    m.eval()
    assert torch.allclose(m(x), x @ (u + 1).T + m[0].bias)  # eval: the plain linear
    m.train()
    mean = torch.stack([m(x) for _ in range(4000)]).mean(0)
    err = (mean - (x @ (u + 1).T + m[0].bias)).abs().mean()
    assert err < 0.08  # E[mixout(w)] = w (one draw's error is about 1 per element here)
    remove_mixout(m)
    assert type(m[0]) is nn.Linear and set(m.state_dict()) == {"0.weight", "0.bias"}


def test_augmentation_deterministic_and_word_preserving():
    text = "please cancel my gym membership before the next billing date"
    aug = T.TextAugmenter(swap=0.2, delete=0.0, insert=0.0, seed=1)
    assert aug(text, 3, 0) == aug(text, 3, 0) and aug(text, 3, 0) != aug(text, 3, 1)
    assert sorted(aug(text, 3, 0).split()) == sorted(text.split())
    ins = T.random_insertion(text, 3, rng=random.Random(0)).split()
    assert len(ins) == len(text.split()) + 3 and set(ins) <= set(text.split())
    kept = [len(T.random_deletion(text, 0.3, rng=random.Random(i)).split()) for i in range(400)]
    assert 0.6 < sum(kept) / (400 * len(text.split())) < 0.8
    assert T.random_deletion("one", 0.99, rng=random.Random(0)) == "one"


@pytest.mark.parametrize("cut", ["token_cutoff", "span_cutoff"])
def test_cutoff_touches_only_real_inner_tokens(cut):
    e = torch.randn(2, 8, 4) + 5
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    out = getattr(T, cut)(e, mask, 0.5, generator=torch.Generator().manual_seed(0))
    zero = (out == 0).all(-1)
    assert zero[0].sum() == 3 and zero[1].sum() == 2  # round(0.5 * inner real tokens)
    assert not zero[:, 0].any() and not zero[0, 7] and not zero[1, 5] and not zero[1, 6:].any()
    if cut == "span_cutoff":
        idx = zero[0].nonzero().flatten()
        assert (idx[1:] - idx[:-1] == 1).all()


def test_task_config_defaults_validation_and_json(tmp_path):
    cfg = T.TaskConfig.for_method("unfreeze", epochs=3)
    assert cfg.schedule == "slanted_triangular" and cfg.layer_decay == 0.8 and cfg.epochs == 3
    cfg.to_json(tmp_path / "t.json")
    assert T.TaskConfig.from_json(tmp_path / "t.json") == cfg
    for bad, field in ((dict(lr=-1.0), "lr"), (dict(epochs=2.5), "epochs"), (dict(schedule="step"), "schedule"),
                       (dict(regularizer="dropconnect"), "regularizer"), (dict(epochs=True), "epochs")):
        with pytest.raises(ValueError, match=f"TaskConfig.{field}"):
            T.TaskConfig.for_method("lora", **bad)
    with pytest.raises(ValueError, match=r"t2.json: unknown TaskConfig field\(s\) \['lrate'\]"):
        (tmp_path / "t2.json").write_text('{"lrate": 1}')
        T.TaskConfig.from_json(tmp_path / "t2.json")


def test_feature_cache_hit_miss_invalidation_and_random_refused(tmp_path):
    from peftcore.demo import default_model_dir

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    enc = transformers.BertModel(transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32))
    calls = []
    enc.register_forward_hook(lambda *a: calls.append(1))
    texts = ["the router overheats", "thanks for the quick refund", "is there parking?"]
    a = T.FeatureCache(tmp_path).features(enc, texts, tokenizer=tok)
    assert len(calls) == 1 and a.shape == (3, 16)
    b = T.FeatureCache(tmp_path).features(enc, texts, tokenizer=tok)  # a new object: read from the file
    assert len(calls) == 1 and torch.equal(a, b)
    assert enc.training  # the cache ran it in eval mode and gave its mode back
    with torch.no_grad():
        enc.eval()
        ids = tok(texts, padding=True, return_tensors="pt")
        h = enc(**ids).last_hidden_state
        m = ids["attention_mask"].unsqueeze(-1).float()
        assert torch.allclose(a, (h * m).sum(1) / m.sum(1), atol=1e-6)
        enc.train()
    T.FeatureCache(tmp_path).features(enc, texts[:2], tokenizer=tok)  # other data: a miss
    T.FeatureCache(tmp_path).features(enc, texts, tokenizer=tok, pooling="cls")  # other pooling: a miss
    with torch.no_grad():
        enc.embeddings.word_embeddings.weight[0, 0] += 1  # other weights: a miss
    T.FeatureCache(tmp_path).features(enc, texts, tokenizer=tok)
    assert len(calls) == 5  # three misses + the first call + the reference forward above
    with pytest.raises(ValueError, match="random"):
        T.FeatureCache(tmp_path).features(enc, texts, tokenizer=tok, transform=T.TextAugmenter())
