"""Feature-distillation losses: hidden states, attention maps, layer maps, layer-subset students."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftcore.distill import HiddenStateLoss, attention_transfer_loss, shrink_encoder, uniform_layer_map


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _attn(b, h, t, seed):
    return torch.randn(b, h, t, t, generator=_g(seed)).softmax(-1)


# ------------------------------------------------------------------------------ hidden states


def test_hidden_mse_matches_hand_formula():
    s, t = torch.randn(2, 5, 8, generator=_g(0)), torch.randn(2, 5, 8, generator=_g(1))
    loss = HiddenStateLoss(8, 8, "mse")
    assert loss.proj is None
    expected = sum(((s[b, i] - t[b, i]) ** 2).sum() for b in range(2) for i in range(5)) / (2 * 5 * 8)
    torch.testing.assert_close(loss(s, t), expected)
    torch.testing.assert_close(loss(s, t), F.mse_loss(s, t))


def test_hidden_cosine_matches_hand_formula():
    s, t = torch.randn(3, 4, 6, generator=_g(2)), torch.randn(3, 4, 6, generator=_g(3))
    loss = HiddenStateLoss(6, 6, "cosine")
    cos = [(s[b, i] @ t[b, i]) / (s[b, i].norm() * t[b, i].norm()) for b in range(3) for i in range(4)]
    expected = sum(1 - c for c in cos) / len(cos)
    torch.testing.assert_close(loss(s, t), expected)
    # parallel vectors of any length are at distance 0, opposite ones at 2
    torch.testing.assert_close(loss(s, 3 * s), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(loss(s, -s), torch.tensor(2.0))


def test_hidden_projection_only_when_widths_differ():
    assert HiddenStateLoss(16, 16).proj is None
    p = HiddenStateLoss(8, 16).proj
    assert isinstance(p, torch.nn.Linear) and (p.in_features, p.out_features) == (8, 16)
    assert HiddenStateLoss(16, 16, project=True).proj is not None
    with pytest.raises(ValueError, match="needs a projection"):
        HiddenStateLoss(8, 16, project=False)
    assert [n for n, _ in HiddenStateLoss(8, 16).named_parameters()] == ["proj.weight", "proj.bias"]
    assert list(HiddenStateLoss(8, 8).parameters()) == []


def test_hidden_projection_is_applied_and_trains():
    s, t = torch.randn(2, 3, 4, generator=_g(4)), torch.randn(2, 3, 6, generator=_g(5))
    for kind in ("mse", "cosine"):
        loss = HiddenStateLoss(4, 6, kind)
        ref = HiddenStateLoss(6, 6, kind)(loss.proj(s).detach(), t)
        value = loss(s, t)
        torch.testing.assert_close(value, ref)
        value.backward()
        assert loss.proj.weight.grad is not None and loss.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_mask_leaves_out_padding(kind):
    s, t = torch.randn(2, 6, 8, generator=_g(6)), torch.randn(2, 6, 8, generator=_g(7))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    loss = HiddenStateLoss(8, 8, kind)
    value = loss(s, t, mask)
    # changing masked tokens changes nothing
    s2 = s.clone()
    s2[0, 4:] = 100.0
    torch.testing.assert_close(loss(s2, t, mask), value)
    # equals the loss over the kept tokens alone
    keep = mask.bool()
    torch.testing.assert_close(value, loss(s[keep], t[keep]))
    torch.testing.assert_close(loss(s, t, mask.bool()), value)  # bool and 0/1 masks agree
    assert loss(s, t, torch.zeros(2, 6, dtype=torch.bool)) == 0


def test_hidden_half_precision_reduces_in_float32():
    s, t = torch.randn(2, 3, 8, generator=_g(8)), torch.randn(2, 3, 8, generator=_g(9))
    out = HiddenStateLoss(8, 8)(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.mse_loss(s.bfloat16().float(), t.bfloat16().float()))


def test_hidden_bad_inputs():
    loss = HiddenStateLoss(8, 8)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"student hidden state must be \[\.\.\., 8\]"):
        loss(torch.randn(2, 5, 7), t)
    with pytest.raises(ValueError, match=r"teacher hidden state must be \[\.\.\., 8\]"):
        loss(s, torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match="agree on all but the last dim"):
        loss(s, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\)"):
        loss(s, t, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or integer"):
        loss(s, t, torch.ones(2, 5))
    with pytest.raises(ValueError, match="requires grad"):
        loss(s, t.requires_grad_())
    with pytest.raises(TypeError, match="floating point"):
        loss(s, torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="loss must be one of"):
        HiddenStateLoss(8, 8, "l1")
    with pytest.raises(ValueError, match="student_dim must be a positive int"):
        HiddenStateLoss(0, 8)


# ------------------------------------------------------------------------------ attention maps


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_attention_zero_for_identical_positive_otherwise(loss):
    a, b = _attn(2, 4, 7, 10), _attn(2, 4, 7, 11)
    assert attention_transfer_loss(a, a.clone(), loss=loss) == 0
    assert attention_transfer_loss(a, b, loss=loss) > 0
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    assert attention_transfer_loss(a, a.clone(), mask, loss=loss) == 0
    assert attention_transfer_loss(a, b, mask, loss=loss) > 0


def test_attention_mse_and_kl_hand_formulas():
    s, t = _attn(2, 3, 5, 12), _attn(2, 3, 5, 13)
    torch.testing.assert_close(attention_transfer_loss(s, t), ((s - t) ** 2).mean())
    kl = (t * (t.log() - s.log())).sum(-1).mean()
    torch.testing.assert_close(attention_transfer_loss(s, t, loss="kl"), kl)
    torch.testing.assert_close(attention_transfer_loss(s, t, loss="kl"),
                               F.kl_div(s.log().flatten(0, 2), t.flatten(0, 2), reduction="batchmean"))


def test_attention_heads_matched_or_averaged():
    s, t = _attn(2, 4, 5, 14), _attn(2, 4, 5, 15)
    matched = attention_transfer_loss(s, t, heads="match")
    assert torch.equal(attention_transfer_loss(s, t), matched)  # auto matches equal counts
    mean = attention_transfer_loss(s, t, heads="mean")
    torch.testing.assert_close(mean, ((s.mean(1) - t.mean(1)) ** 2).mean())
    # different head counts: auto averages
    t6 = _attn(2, 6, 5, 16)
    torch.testing.assert_close(attention_transfer_loss(s, t6), ((s.mean(1) - t6.mean(1)) ** 2).mean())
    torch.testing.assert_close(attention_transfer_loss(s, t6, loss="kl"),
                               attention_transfer_loss(s.mean(1, keepdim=True), t6.mean(1, keepdim=True), loss="kl"))
    with pytest.raises(ValueError, match="heads='match' needs equal head counts"):
        attention_transfer_loss(s, t6, heads="match")


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_attention_mask_leaves_out_padded_queries_and_keys(loss):
    m = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    scores_s = torch.randn(2, 2, 6, 6, generator=_g(17))
    scores_t = torch.randn(2, 2, 6, 6, generator=_g(18))
    keymask = torch.where(m.bool()[:, None, None, :], 0.0, float("-inf"))
    s, t = (scores_s + keymask).softmax(-1), (scores_t + keymask).softmax(-1)  # as a model masks keys
    value = attention_transfer_loss(s, t, m, loss=loss)
    s2, t2 = s.clone(), t.clone()
    s2[1, :, 3:, :] = torch.rand(2, 3, 6)  # padded query rows are garbage: ignored
    t2[1, :, 3:, :] = torch.rand(2, 3, 6)
    torch.testing.assert_close(attention_transfer_loss(s2, t2, m, loss=loss), value)
    # row 1 alone equals the unmasked loss on its 3x3 real block
    real = attention_transfer_loss(s[1:, :, :3, :3], t[1:, :, :3, :3], loss=loss)
    only1 = attention_transfer_loss(s[1:], t[1:], m[1:], loss=loss)
    torch.testing.assert_close(only1, real)
    assert torch.isfinite(value)


def test_attention_gradient_flows_to_student_only():
    s = _attn(1, 2, 4, 19).requires_grad_()
    t = _attn(1, 2, 4, 20)
    for loss in ("mse", "kl"):
        s.grad = None
        attention_transfer_loss(s, t, loss=loss).backward()
        assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_attention_bad_inputs():
    a = _attn(2, 2, 5, 21)
    with pytest.raises(ValueError, match=r"must be \[B, H, T, T\]"):
        attention_transfer_loss(a[..., :4], a[..., :4])
    with pytest.raises(ValueError, match="at least 4 dims"):
        attention_transfer_loss(a[0], a[0])
    with pytest.raises(ValueError, match="must agree on batch and sequence length"):
        attention_transfer_loss(a, _attn(2, 2, 6, 22))
    with pytest.raises(ValueError, match="must agree on batch and sequence length"):
        attention_transfer_loss(a, _attn(3, 2, 5, 22))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\)"):
        attention_transfer_loss(a, a.clone(), torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss must be one of"):
        attention_transfer_loss(a, a.clone(), loss="l2")
    with pytest.raises(ValueError, match="heads must be one of"):
        attention_transfer_loss(a, a.clone(), heads="first")
    with pytest.raises(ValueError, match="requires grad"):
        attention_transfer_loss(a, a.clone().requires_grad_())


# ------------------------------------------------------------------------------ layer maps


def test_uniform_layer_map():
    assert uniform_layer_map(2, 6) == [(0, 2), (1, 5)]
    assert uniform_layer_map(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert uniform_layer_map(3, 4) == [(0, 0), (1, 2), (2, 3)]  # 4/3, 8/3, 4 round to 1, 3, 4
    assert uniform_layer_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]  # 1.5 and 4.5 round up
    assert uniform_layer_map(6, 6) == [(i, i) for i in range(6)]
    assert uniform_layer_map(1, 6) == [(0, 5)]
    assert uniform_layer_map(2, 6, "first") == [(0, 0), (1, 1)]
    assert uniform_layer_map(2, 6, "last") == [(0, 4), (1, 5)]
    for ls in range(1, 13):
        teacher = [t for _, t in uniform_layer_map(ls, 12)]
        assert teacher == sorted(set(teacher)) and teacher[-1] == 11
    with pytest.raises(ValueError, match="must not exceed"):
        uniform_layer_map(7, 6)
    with pytest.raises(ValueError, match="positive int"):
        uniform_layer_map(0, 6)
    with pytest.raises(ValueError, match="strategy must be one of"):
        uniform_layer_map(2, 6, "random")


# ------------------------------------------------------------------------------ shrink_encoder


def test_shrink_encoder_copies_chosen_layers():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    teacher = tf.BertModel(cfg).eval()
    student = shrink_encoder(teacher, [1, 3]).eval()
    assert teacher.config.num_hidden_layers == 4 and len(teacher.encoder.layer) == 4  # untouched
    assert student.config.num_hidden_layers == 2 and len(student.encoder.layer) == 2
    assert student.encoder.layer[1].attention.self.layer_idx == 1
    sd_t, sd_s = teacher.state_dict(), student.state_dict()
    for k, v in sd_s.items():
        src = k.replace("encoder.layer.0.", "encoder.layer.1.", 1) if "encoder.layer.0." in k else \
            k.replace("encoder.layer.1.", "encoder.layer.3.", 1) if "encoder.layer.1." in k else k
        assert torch.equal(v, sd_t[src]), k
    assert student.embeddings.word_embeddings.weight.data_ptr() != teacher.embeddings.word_embeddings.weight.data_ptr()
    # the student runs the chosen layers: its output is the teacher's layer 3 applied to its layer 1
    # applied to the embeddings
    ids = torch.randint(0, 50, (2, 7), generator=_g(23))

    def out(o):
        return o[0] if isinstance(o, tuple) else o

    with torch.no_grad():
        hs = student(input_ids=ids, output_hidden_states=True).hidden_states
        ht = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        expected = out(teacher.encoder.layer[3](out(teacher.encoder.layer[1](ht[0]))))
    torch.testing.assert_close(hs[0], ht[0])
    torch.testing.assert_close(hs[2], expected)
    with pytest.raises(ValueError, match="out of range"):
        shrink_encoder(teacher, [0, 4])
    with pytest.raises(ValueError, match="must not repeat"):
        shrink_encoder(teacher, [1, 1])
    with pytest.raises(ValueError, match="num_hidden_layers"):
        shrink_encoder(torch.nn.Linear(2, 2), [0])
