"""NF4 storage (bit-equal to bitsandbytes), the panel-wise QLoRA op and QLoRA on a model."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import peftcore as pc
from peftcore.quant import NF4Linear, QuantError, dequantize_nf4, quantize_nf4
from peftcore.quant.nf4 import NF4_CODE, dequantize_range, dynamic_map
from peftcore.reference.lora import lora_linear_formula


def test_the_issue_example_bytes_and_values():
    packed, state = quantize_nf4(torch.tensor([1.0, 0.5, -0.5, 0.0]), blocksize=64)
    assert packed.flatten().tolist() == [0xFC, 0x27]
    torch.testing.assert_close(dequantize_nf4(packed, state), torch.tensor([1.0, 0.440710, -0.525073, 0.0]),
                               rtol=0, atol=1e-6)


def test_dynamic_map_shape_and_order():
    code = dynamic_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] >= code[:-1]) and code[-1] == 1.0 and -1.0 < code[0] < -0.99
    assert (code == 0).any() and (code > 0).sum() == 128


CASES = [((64,), 64, False, torch.float32), ((4, 1000), 64, False, torch.float32),
         ((1023, 77), 128, True, torch.float32), ((512, 2048), 64, True, torch.float32),
         ((300, 301), 32, True, torch.bfloat16), ((255, 257), 4096, True, torch.float16),
         ((777, 129), 256, False, torch.float16), ((3, 5), 32, True, torch.float32)]


@pytest.mark.parametrize("shape, blocksize, dq, dtype", CASES)
def test_bit_for_bit_equal_to_bitsandbytes(shape, blocksize, dq, dtype):
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency (peer format)")
    torch.manual_seed(sum(shape) + blocksize)
    w = (torch.randn(shape) * torch.rand(shape[-1:]) * 3).to(dtype)
    w.view(-1)[: min(8, w.numel())] = 0  # a block with zeros, and exact code values below
    if w.numel() > 40:
        w.view(-1)[8:40] = torch.tensor([1.0, -1.0, 0.5, -0.5] * 8).to(dtype)
    packed, state = quantize_nf4(w, blocksize, dq)
    pb, sb = bnb.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
    assert torch.equal(packed, pb)
    if dq:
        assert torch.equal(state.absmax, sb.absmax) and torch.equal(state.absmax2, sb.state2.absmax)
        assert torch.equal(state.offset, sb.offset)
    else:
        assert torch.equal(state.absmax, sb.absmax)
    ours, theirs = dequantize_nf4(packed, state), bnb.dequantize_4bit(pb, sb)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1))  # bitsandbytes returns 1-D input as [1, n]


def test_dequantize_range_is_any_slice_of_the_whole():
    torch.manual_seed(0)
    w = torch.randn(37, 51)
    packed, state = quantize_nf4(w, 32, True)
    whole = dequantize_nf4(packed, state).reshape(-1)
    a = state.block_absmax()
    for lo, hi in [(0, 1), (1, 2), (3, 100), (31, 33), (64, 1887), (1, 1887), (1800, 1887)]:
        assert torch.equal(dequantize_range(packed, a, 32, lo, hi), whole[lo:hi])
    err = (whole - w.reshape(-1)).abs()
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    scale = a.repeat_interleave(32)[: err.numel()]  # double quantization moves each absmax a little
    assert (err <= half_gap * scale * 1.05 + 1e-6).all()


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.tensor([1.0, float("nan")])), "inf or NaN"),
    (dict(weight=torch.ones(4, dtype=torch.int64)), "float32, bfloat16 or float16"),
    (dict(weight=torch.ones(64), blocksize=48), "blocksize"),
    (dict(weight=torch.ones(64), blocksize=True), "blocksize"),
    (dict(weight=torch.empty(0)), "empty"),
])
def test_quantize_errors_name_the_argument(bad, match):
    with pytest.raises(QuantError, match=match):
        quantize_nf4(**bad)


def test_inconsistent_state_is_refused_before_reading():
    packed, state = quantize_nf4(torch.randn(8, 64), 64, True)
    with pytest.raises(QuantError, match="bytes for a weight"):
        dequantize_nf4(packed[:-1], state)
    state.absmax = state.absmax[:-1]
    with pytest.raises(QuantError, match="state.absmax"):
        dequantize_nf4(packed, state)


# --------------------------------------------------------------------------------------------
# the op


def _setup(m, k, n, r, blocksize, dq, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    packed, state = quantize_nf4(w, blocksize, dq)
    wq = dequantize_nf4(packed, state).to(dtype)
    x = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) if bias else None
    a = (torch.randn(r, k, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    bb = (torch.randn(n, r, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    return (packed, state), wq, x, b, a, bb


@settings(deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 70), n=st.integers(1, 70), r=st.integers(1, 5),
       blocksize=st.sampled_from([32, 64, 128]), dq=st.booleans(), p=st.sampled_from([0.0, 0.3]),
       three_d=st.booleans(), bias=st.booleans())
def test_op_equals_dequantize_then_lora_in_float64(m, k, n, r, blocksize, dq, p, three_d, bias):
    qw, wq, x, b, a, bb = _setup(m * 2, k, n, r, blocksize, dq, bias=bias)
    if three_d:
        x = x.view(2, m, k)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bb)] + ([b.clone().requires_grad_(True)] if bias else [])
    x1, a1, b1 = leaves[:3]
    bias1 = leaves[3] if bias else None
    y = pc.ops.nf4_lora_linear(x1, qw, bias1, a1, b1, 0.7, dropout_p=p, seed=5)
    leaves2 = [t.detach().clone().requires_grad_(True) for t in leaves]
    x2, a2, b2 = leaves2[:3]
    want = lora_linear_formula(x2, wq, leaves2[3] if bias else None, a2, b2, 0.7, p, 5)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    for got, ref in zip(leaves, leaves2):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_torch_error(dtype):
    qw, wq, x, b, a, bb = _setup(33, 130, 67, 4, 64, True)
    ref = lora_linear_formula(x, wq, b, a, bb, 0.5)
    y = pc.ops.nf4_lora_linear(x.to(dtype), qw, b.to(dtype), a.to(dtype), bb.to(dtype), 0.5)
    torch_half = lora_linear_formula(x.to(dtype), wq.to(dtype), b.to(dtype), a.to(dtype), bb.to(dtype), 0.5)
    rel = lambda t: ((t.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert y.dtype == dtype and rel(y) < 1e-2 and rel(y) <= 2 * rel(torch_half) + 1e-4


def test_under_cpu_autocast_output_is_bf16_and_absmax_stays_fp32():
    qw, wq, x, b, a, bb = _setup(16, 96, 40, 4, 64, True, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pc.ops.nf4_lora_linear(x, qw, b, a, bb, 0.5)
    ref = lora_linear_formula(x.double(), wq.double(), b.double(), a.double(), bb.double(), 0.5)
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_no_full_precision_copy_of_the_weight(monkeypatch, backend):
    import peftcore.native.nf4_lora as N
    import peftcore.reference.nf4_lora as R
    from peftcore import backends

    if backends.why_not("nf4_lora_linear", backend, "cpu", torch.float32):
        pytest.skip(f"{backend}: {backends.why_not('nf4_lora_linear', backend, 'cpu', torch.float32)}")
    seen = []
    if backend == "reference":
        real = R.dequantize_range

        def spy(packed, absmax, blocksize, lo, hi, out=None, dtype=torch.float32):
            seen.append(hi - lo)
            return real(packed, absmax, blocksize, lo, hi, out, dtype)

        monkeypatch.setattr(R, "dequantize_range", spy)
    else:
        ext = N.require(cuda=False)

        class Spy:
            def nf4_dequant_rows(self, packed, absmax, out, n, start, blocksize, nthreads):
                ext.nf4_dequant_rows(packed, absmax, out, n, start, blocksize, nthreads)
                seen.append(torch.utils.dlpack.from_dlpack(out).numel())

            def __getattr__(self, name):
                return getattr(ext, name)

        monkeypatch.setattr(N, "require", lambda cuda: Spy())
    qw, _, x, b, a, bb = _setup(4, 1024, 2048, 4, 64, True, dtype=torch.float32)
    x.requires_grad_(True)
    pc.ops.nf4_lora_linear(x, qw, b, a, bb, 1.0, backend=backend).sum().backward()
    assert len(seen) >= 32 and max(seen) <= 1024 * 2048 // 16  # forward and dx: panels of at most 1/16 of W


def test_cpp_dequant_kernel_equals_the_reference_on_any_rows():
    from peftcore import native
    from peftcore.native import dl

    if native.unavailable_reason():
        pytest.skip(f"peftcore._C unavailable: {native.unavailable_reason()}")
    for n, k, bs, dq in [(37, 51, 32, True), (64, 64, 64, False), (3, 1001, 128, True), (129, 7, 4096, True)]:
        packed, state = quantize_nf4(torch.randn(n, k), bs, dq)
        whole = dequantize_nf4(packed, state)
        a = state.block_absmax()
        for start, stop in [(0, n), (1, 2), (n // 3, n), (n - 1, n)]:
            for dtype in (torch.float32, torch.float64):
                out = torch.empty(stop - start, k, dtype=dtype)
                native.load().nf4_dequant_rows(dl(packed.view(-1)), dl(a), dl(out), n, start, bs)
                assert torch.equal(out, whole[start:stop].to(dtype)), (n, k, bs, start, stop, dtype)


def test_op_argument_errors():
    qw, _, x, b, a, bb = _setup(4, 64, 32, 2, 64, False, dtype=torch.float32)
    with pytest.raises(ValueError, match="last dim 64"):
        pc.ops.nf4_lora_linear(x[:, :63], qw, b, a, bb)
    with pytest.raises(ValueError, match="pass both"):
        pc.ops.nf4_lora_linear(x, qw, b, a, None)
    with pytest.raises(ValueError, match=r"lora_b must be \[out=32, r=2\]"):
        pc.ops.nf4_lora_linear(x, qw, b, a, bb[:, :1])
    with pytest.raises(QuantError, match="weight: expected an NF4Linear"):
        pc.ops.nf4_lora_linear(x, torch.randn(32, 64), b, a, bb)
    with pytest.raises(ValueError, match="scaling"):
        pc.ops.nf4_lora_linear(x, qw, b, a, bb, float("nan"))


def test_compiles_without_graph_breaks():
    qw, _, x, b, a, bb = _setup(4, 64, 32, 2, 64, True, dtype=torch.float32)
    layer = NF4Linear(*qw, b)
    f = torch.compile(lambda t: pc.ops.nf4_lora_linear(t, layer, layer.bias, a, bb, 0.5), fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(x), pc.ops.nf4_lora_linear(x, layer, layer.bias, a, bb, 0.5))


# --------------------------------------------------------------------------------------------
# models


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128)
    return transformers.LlamaForCausalLM(cfg)


def test_quantize_model_bytes_outputs_and_all_or_nothing():
    model = _llama()
    ids = torch.randint(0, 120, (2, 12))
    ref = model(input_ids=ids).logits
    bad = _llama()
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantError, match=r"model.layers.1.mlp.down_proj: weight: holds inf or NaN"):
        pc.quantize(bad, pc.NF4Config())
    assert not any(isinstance(m, NF4Linear) for m in bad.modules())  # nothing was swapped
    pc.quantize(model, pc.NF4Config(blocksize=64, double_quant=True))
    q, f = pc.quant.quantized_bytes(model)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14 and q <= 0.135 * f
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output head stays
    out = model(input_ids=ids).logits
    assert ((out - ref).norm() / ref.norm()) < 0.3  # 4-bit weights of a random model
    with pytest.raises(QuantError, match="matches no linear layer"):
        pc.quantize(_llama(), pc.NF4Config(), target_modules=["nope"])
    with pytest.raises(QuantError, match="NF4Config.blocksize"):
        pc.NF4Config(blocksize=100)


def test_qlora_trains_only_the_adapter_and_round_trips_its_file(tmp_path):
    model = _llama()
    pc.quantize(model, pc.NF4Config())
    pc.apply(model, pc.LoRAConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    frozen = {n: b.clone() for n, b in model.named_buffers() if "weight_packed" in n or "absmax" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(0, 120, (4, 16))
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    pc.save_adapter(model, tmp_path / "qlora")
    fresh = _llama()
    pc.quantize(fresh, pc.NF4Config())
    pc.load_adapter(fresh, tmp_path / "qlora")
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="NF4"):
        pc.merge(model)
    with pytest.raises(pc.quant.QuantError, match="already holds peftcore adapters"):
        pc.quantize(model, pc.NF4Config())


def test_pissa_on_an_nf4_base_is_refused_clearly():
    model = _llama()
    pc.quantize(model, pc.NF4Config())
    with pytest.raises(ValueError, match="PiSSA needs the full-precision base"):
        pc.apply(model, pc.LoRAConfig(r=4, target_modules=["q_proj"], init="pissa"))
    assert not any(type(m).__name__ == "LoRALinear" for m in model.modules())
    assert math.isfinite(model(input_ids=torch.randint(0, 120, (1, 4))).logits.sum().item())
