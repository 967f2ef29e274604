"""Cross-lingual transfer end to end (MAD-X): language adapters and a task adapter stacked, trained,
swapped for zero-shot transfer, fine-tuned few-shot, saved and reloaded by name."""

from __future__ import annotations

import pytest
import torch

import peftcore as pc
from pc_testing import tiny_model


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _snapshot(model, name):
    return {k: p.detach().clone() for k, p in pc.io.adapter_parameters(model, name).items()}


def _changed(before, model, name):
    now = pc.io.adapter_parameters(model, name)
    return any(not torch.equal(before[k], now[k]) for k in before)


def _train(model, names, ids, steps, lr=5e-2):
    pc.train_adapter(model, names)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = _lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_madx_zero_shot_and_few_shot_then_reload(tmp_path):
    model, _ = tiny_model("llama")
    model.train()
    g = torch.Generator().manual_seed(0)
    en = torch.randint(0, 48, (4, 12), generator=g)  # two "languages": disjoint halves of the vocabulary
    de = torch.randint(48, 97, (4, 12), generator=g)
    lang = pc.BottleneckConfig(placement="pfeiffer", reduction_factor=4, non_linearity="gelu")
    pc.apply(model, lang, name="lang_en")
    pc.apply(model, lang, name="lang_de")
    pc.apply(model, pc.CompacterConfig(reduction_factor=4, phm_dim=2), name="task")

    # 1. language adapters learn their language, each alone
    for name, ids in (("lang_en", en), ("lang_de", de)):
        pc.set_active(model, name)
        losses = _train(model, name, ids, steps=8)
        assert losses[-1] < losses[0]

    # 2. the task adapter trains on English on top of the frozen English adapter
    pc.set_active(model, pc.Stack("lang_en", "task"))
    frozen = {n: _snapshot(model, n) for n in ("lang_en", "lang_de")}
    task0 = _snapshot(model, "task")
    losses = _train(model, "task", en, steps=8)
    assert losses[-1] < losses[0]
    assert _changed(task0, model, "task")
    assert not _changed(frozen["lang_en"], model, "lang_en") and not _changed(frozen["lang_de"], model, "lang_de")

    # 3. zero-shot: swap the language under the task adapter; nothing else changes
    model.eval()
    with torch.no_grad():
        en_stack = model(input_ids=de).logits
        pc.set_active(model, pc.Stack("lang_de", "task"))
        zero_shot = model(input_ids=de).logits
    assert pc.active_adapters(model) == pc.Stack("lang_de", "task")
    assert (zero_shot - en_stack).abs().max() > 1e-4

    # 4. few-shot: fine-tune the task adapter on two German examples, German adapter frozen
    model.train()
    task1 = _snapshot(model, "task")
    losses = _train(model, "task", de[:2], steps=6)
    assert losses[-1] < losses[0]
    assert _changed(task1, model, "task") and not _changed(frozen["lang_de"], model, "lang_de")

    # 5. every adapter saved by name reloads into a fresh base model with identical outputs
    model.eval()
    with torch.no_grad():
        want = model(input_ids=de).logits
    for name in ("lang_en", "lang_de", "task"):
        pc.save_adapter(model, tmp_path / name, name=name)
    fresh, _ = tiny_model("llama")
    for name in ("lang_de", "task"):
        pc.load_adapter(fresh, tmp_path / name, name=name)
    pc.set_active(fresh, pc.Stack("lang_de", "task"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=de).logits, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_every_method_on_one_model_saves_and_loads_by_name(tmp_path, kind):
    """LoRA, bottleneck, Compacter, prompt and prefix adapters side by side: each one round-trips
    through save_adapter/load_adapter under a new name and reproduces its outputs exactly."""
    model, targets = tiny_model(kind)
    configs = {
        "lora": pc.LoRAConfig(r=4, alpha=8, target_modules=targets[:2]),
        "bn": pc.BottleneckConfig(reduction_factor=4),
        "cpt": pc.CompacterPlusPlusConfig(reduction_factor=4, phm_dim=2),
        "prompt": pc.PromptTuningConfig(num_virtual_tokens=3),
        "prefix": pc.PrefixTuningConfig(num_virtual_tokens=2),
    }
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    for name, cfg in configs.items():
        pc.apply(model, cfg, name=name)
        with torch.no_grad():  # move every adapter off its identity init
            for p in pc.io.adapter_parameters(model, name).values():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    fresh, _ = tiny_model(kind)
    out = lambda m: m(input_ids=ids)[0]  # noqa: E731
    for name in configs:
        pc.set_active(model, name)
        with torch.no_grad():
            want = out(model)
        with pc.disable_adapters(model), torch.no_grad():
            assert (out(model)[..., -ids.shape[1]:, :] - want[..., -ids.shape[1]:, :]).abs().max() > 1e-4, name
        pc.save_adapter(model, tmp_path / name, name=name)
        pc.load_adapter(fresh, tmp_path / name, name=f"{name}_copy")
        pc.set_active(fresh, f"{name}_copy")
        with torch.no_grad():
            torch.testing.assert_close(out(fresh), want, rtol=1e-5, atol=1e-6)
