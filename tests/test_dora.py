"""DoRA: the formula (norm detached) without the full-size update, PEFT's files both ways with
equal outputs, merge/unmerge, several adapters, and DoRA on an NF4 base."""

import pytest
import torch

import peftcore as pc
from peftcore.layers import dora

transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96)
    return transformers.LlamaForCausalLM(cfg)


def _randomize(model, seed=1):
    """Non-zero B and magnitudes away from their init, so every term of the formula is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def test_norm_formula_equals_the_materialized_norm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 33).double()
    layer = pc.LoRALinear(lin)
    layer.add_adapter("d", pc.LoRAConfig(r=5, alpha=7, use_dora=True))
    with torch.no_grad():
        layer.lora_B["d"].weight.normal_()
    a, b, s = layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.scaling["d"]
    want = torch.linalg.norm(lin.weight + s * (b @ a), dim=1)
    torch.testing.assert_close(dora.weight_norm(layer, "d"), want, rtol=1e-12, atol=1e-12)
    # at init (B = 0) the magnitude is ||W|| per row: the first output is the plain layer's
    fresh = pc.LoRALinear(torch.nn.Linear(70, 33).double())
    fresh.add_adapter("d", pc.LoRAConfig(r=5, use_dora=True))
    fresh.set_active(["d"])
    x = torch.randn(4, 70, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), fresh.base_layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_output_and_gradients_follow_the_paper_with_the_norm_detached(p):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24).double()
    layer = pc.LoRALinear(lin)
    layer.add_adapter("d", pc.LoRAConfig(r=4, alpha=8, dropout=p, use_dora=True))
    layer.set_active(["d"])
    layer.train()
    with torch.no_grad():
        layer.lora_B["d"].weight.normal_()
        layer.lora_magnitude_vector["d"].mul_(1.3)
    x = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    a, b, m, s = (layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.lora_magnitude_vector["d"],
                  layer.scaling["d"])
    a2, b2, m2 = (t.detach().clone().requires_grad_(True) for t in (a, b, m))
    x2 = x.detach().clone().requires_grad_(True)
    from peftcore.reference.lora import dropout as ref_dropout

    norm = torch.linalg.norm(lin.weight + s * (b2 @ a2), dim=1).detach()
    seed = None
    if p > 0:  # the op drew its seed from torch's generator: draw the same one
        from peftcore.reference.rng import new_seed

        torch.manual_seed(7)
        seed = new_seed()
    xd = ref_dropout(x2.reshape(-1, 40), p, seed) if p > 0 else x2.reshape(-1, 40)
    want = ((m2 / norm) * (x2.reshape(-1, 40) @ lin.weight.T + s * (xd @ a2.T) @ b2.T) + lin.bias).reshape(2, 5, 24)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    for got, ref in ((x, x2), (a, a2), (b, b2), (m, m2)):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-9, atol=1e-9)


def _peft_dora(model, r=4):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    return peft.get_peft_model(model, cfg)


def test_peft_dora_file_loads_with_equal_outputs(tmp_path):
    ids = torch.randint(0, 100, (2, 9))
    pm = _peft_dora(_llama())
    _randomize(pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    ours = _llama()
    pc.load_adapter(ours, tmp_path / "peft")
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_peftcore_dora_file_loads_in_peft_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 100, (2, 9))
    ours = _llama()
    pc.apply(ours, pc.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    _randomize(ours)
    ours.eval()
    pc.save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    pm = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours")
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_training_step_matches_peft_gradients():
    ids = torch.randint(0, 100, (2, 9))
    pm = _peft_dora(_llama())
    _randomize(pm)
    ours = _llama()
    pc.apply(ours, pc.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    with torch.no_grad():  # the same adapter tensors in both
        theirs = {n.replace("base_model.model.", ""): p for n, p in pm.named_parameters()}
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(theirs[n.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")])
    pm.eval(), ours.eval()  # no dropout: compare the math
    pm(input_ids=ids, labels=ids).loss.backward()
    ours(input_ids=ids, labels=ids).loss.backward()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            q = theirs[n.replace("lora_magnitude_vector.default", "lora_magnitude_vector.default.weight")]
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_merge_unmerge_and_merge_and_unload():
    ids = torch.randint(0, 100, (2, 9))
    model = _llama()
    pc.apply(model, pc.LoRAConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    _randomize(model)
    model.eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = model(input_ids=ids).logits
        pc.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        pc.unmerge(model)
        for n, p in model.named_parameters():
            if n in base:
                torch.testing.assert_close(p, base[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
        plain = pc.merge_and_unload(model)
        assert not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)


def test_two_active_adapters_one_of_them_dora():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 12).double()
    layer = pc.LoRALinear(lin)
    layer.add_adapter("plain", pc.LoRAConfig(r=2, alpha=2))
    layer.add_adapter("d", pc.LoRAConfig(r=3, alpha=6, use_dora=True))
    with torch.no_grad():
        for n in ("plain", "d"):
            layer.lora_B[n].weight.normal_()
        layer.lora_magnitude_vector["d"].mul_(0.9)
    layer.set_active(["plain", "d"])
    layer.eval()
    x = torch.randn(3, 20, dtype=torch.float64)
    xw = x @ lin.weight.T
    lo = {n: layer.scaling[n] * (x @ layer.lora_A[n].weight.T) @ layer.lora_B[n].weight.T for n in ("plain", "d")}
    sc = layer.lora_magnitude_vector["d"] / torch.linalg.norm(lin.weight + layer.lora_B["d"].weight @
                                                              layer.lora_A["d"].weight * layer.scaling["d"], dim=1)
    want = xw + lin.bias + lo["plain"] + (sc - 1) * xw + sc * lo["d"]  # PEFT: each DoRA adapter on the base result
    torch.testing.assert_close(layer(x), want.detach(), rtol=1e-10, atol=1e-10)


def test_dora_on_an_nf4_base_equals_dora_on_the_dequantized_weight():
    model = _llama()
    pc.quantize(model, pc.NF4Config())
    ref = _llama()
    with torch.no_grad():  # the reference holds the dequantized weights in full precision
        for (n, m) in model.named_modules():
            if isinstance(m, pc.quant.NF4Linear):
                ref.get_submodule(n).weight.copy_(m.dequantize())
    for mdl in (model, ref):
        pc.apply(mdl, pc.LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True))
        mdl.eval()
    torch.testing.assert_close(  # m starts at the row norms: the same from the NF4 panels as from W
        dict(model.named_parameters())["model.layers.0.self_attn.q_proj.lora_magnitude_vector.default"],
        dict(ref.named_parameters())["model.layers.0.self_attn.q_proj.lora_magnitude_vector.default"])
    _randomize(model)
    with torch.no_grad():
        theirs = dict(model.named_parameters())
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(theirs[n])
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="use_dora with lora_bias"):
        pc.LoRAConfig(use_dora=True, lora_bias=True)
    with pytest.raises((TypeError, ValueError), match="use_dora"):
        pc.LoRAConfig(use_dora="yes")
