"""Mixed precision: every op follows ``torch.autocast`` as ``F.linear`` does, on every CPU backend.

Under CPU autocast (bf16, and fp16) each op's forward and backward equal the float64 formula on the
inputs as autocast casts them, within half-precision tolerances and within about twice plain
PyTorch's own error in the same setting; linear-like ops return the autocast dtype, losses fp32;
gradients reach fp32 parameters in fp32.  Before this, the default ``cpp`` backend of lora_linear
wrote fp32 results into a bf16 buffer under autocast (garbage, then heap corruption) and the
reference backend failed in backward on mixed dtypes.  A model trained by transformers' Trainer
with ``bf16=True`` on the CPU is the end-to-end case.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import peftcore as pc
from peftcore import backends
from peftcore.losses import distill_kl, fused_linear_distill
from peftcore.reference.lora import dropout as ref_dropout
from peftcore.reference.lora_mixed import lora_mixed_fwd
from peftcore.reference.phm import phm_weight

from pc_testing import rel_err, tiny_inputs, tiny_model

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = [None, "reference", "cpp", "triton"]  # None: the registry's choice


def _usable(backend, dtype=torch.bfloat16, op="lora_linear"):
    if backend is None:
        return
    reason = backends.why_not(op, backend, "cpu", dtype)
    if reason:
        pytest.skip(f"{backend} unavailable here: {reason}")


def _leaves(*shapes, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_(grad) for s in shapes]


def _check(run_ours, formula, inputs, dtype, out_dtype, tol=1.5e-2):
    """ours under autocast vs the fp64 formula on autocast's casts; torch's own autocast error bounds ours."""
    g = torch.Generator().manual_seed(7)
    with torch.autocast("cpu", dtype=dtype):
        out = run_ours(*inputs)
    assert out.dtype == out_dtype, f"output dtype {out.dtype}, expected {out_dtype} (autocast's)"
    dy = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], dy.to(out.dtype))
    for t, gr in zip([t for t in inputs if t.requires_grad], grads):
        assert gr.dtype == t.dtype  # an fp32 master weight gets an fp32 gradient

    cast = [t.detach().to(dtype).double().requires_grad_(t.requires_grad) for t in inputs]
    ref = formula(*cast)
    ref_grads = torch.autograd.grad(ref, [t for t in cast if t.requires_grad], dy.double())

    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with torch.autocast("cpu", dtype=dtype):
        plain = formula(*leaves)  # plain PyTorch under the same autocast
    plain_grads = torch.autograd.grad(plain, [t for t in leaves if t.requires_grad], dy.to(plain.dtype))

    for what, o, r, p in [("out", out, ref, plain)] + [
        (f"grad {i}", o, r, p) for i, (o, r, p) in enumerate(zip(grads, ref_grads, plain_grads))
    ]:
        err, torch_err = rel_err(o, r), rel_err(p, r)
        assert err < tol, f"{what}: rel err {err:.2e} vs fp64"
        assert err <= 2 * torch_err + 2e-3, f"{what}: rel err {err:.2e}, plain PyTorch {torch_err:.2e}"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_under_autocast(precision, backend, p):
    dtype = HALF[precision]
    _usable(backend, dtype)
    x, w, bias, a, b = _leaves((3, 37, 48), (40, 48), (40,), (6, 48), (40, 6))
    w.requires_grad_(False)
    run = lambda x, w, bias, a, b: pc.ops.lora_linear(x, w, bias, a, b, 0.7, dropout_p=p, seed=11, backend=backend)  # noqa: E731

    def formula(x, w, bias, a, b):  # through F.linear, so plain PyTorch autocasts as a user's model would
        x2 = x.reshape(-1, 48)
        return (F.linear(x2, w, bias) + 0.7 * F.linear(F.linear(ref_dropout(x2, p, 11), a), b)).reshape(3, 37, 40)

    _check(run, formula, [x, w, bias, a, b], dtype, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_phm_linear_under_autocast(backend):
    _usable(backend, op="phm_linear")
    n, P, k, Q = 4, 9, 2, 5
    x, rule, wl, wr, bias = _leaves((2, 13, n * P), (n, n, n), (n, P, k), (n, k, Q), (n * Q,))
    run = lambda *t: pc.ops.phm_linear(*t, backend=backend)  # noqa: E731

    def formula(x, rule, wl, wr, bias):  # H built, then F.linear: what a plain PyTorch layer autocasts
        return F.linear(x, phm_weight(rule, wl, wr).t(), bias)

    _check(run, formula, [x, rule, wl, wr, bias], torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_mixed_linear_under_autocast(backend):
    _usable(backend, op="lora_mixed")
    x, w, bias, a, b = _leaves((4, 5, 24), (20, 24), (20,), (3, 4, 24), (3, 20, 4))
    scaling = torch.tensor([0.5, 1.0, 2.0])
    index = torch.tensor([2, -1, 0, 2])

    def run(x, w, bias, a, b):
        return pc.ops.lora_mixed_linear(x, w, bias, a, b, scaling, index, backend=backend)

    def formula(x, w, bias, a, b):
        rows = index.repeat_interleave(5).to(torch.int32)
        return lora_mixed_fwd(x.reshape(20, 24), w, bias, a, b, scaling.to(x.dtype), rows).reshape(4, 5, 20)

    _check(run, formula, [x, w, bias, a, b], torch.bfloat16, torch.bfloat16)


def _kl_formula(s, t, temperature=2.0):
    ls, lt = F.log_softmax(s.float() / temperature, -1), F.log_softmax(t.float() / temperature, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    return kl.mean() * temperature**2


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_kl_under_autocast(backend):
    """A loss: nothing lowered, fp32 out; a bf16 student against an fp32 teacher meets at fp32."""
    _usable(backend, torch.float32, op="distill_kl")
    (s,) = _leaves((2, 7, 97))
    (t,) = _leaves((2, 7, 97), seed=1, grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half_s = s.to(torch.bfloat16)
        loss = distill_kl(half_s, t, temperature=2.0, backend=backend)  # mixed dtypes: legal under autocast
    assert loss.dtype == torch.float32
    (gs,) = torch.autograd.grad(loss, s)
    sd = s.detach().to(torch.bfloat16).double().requires_grad_()
    ref = _kl_formula(sd.double(), t.double())
    (rg,) = torch.autograd.grad(ref, sd)
    assert rel_err(loss, ref) < 1e-5  # fp32 math on the bf16 student: no precision lost to autocast
    assert rel_err(gs, rg) < 1e-2  # the gradient comes back in the student's bf16


def test_fused_linear_distill_under_autocast():
    hs, ws = _leaves((3, 6, 32), (50, 32))
    ht, wt = _leaves((3, 6, 24), (50, 24), seed=1, grad=False)
    labels = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(2))

    def run(hs, ws):
        return fused_linear_distill(hs, ws, ht, wt, labels=labels, temperature=2.0, alpha=0.3)

    def formula(hs, ws):
        s = hs @ ws.t()
        t = ht.to(s.dtype) @ wt.to(s.dtype).t()
        ce = F.cross_entropy(s.reshape(-1, 50).float(), labels.reshape(-1))
        return 0.3 * ce + 0.7 * _kl_formula(s.reshape(-1, 50), t.reshape(-1, 50))

    # The formula's teacher is cast by the _check helper only through hs/ws; cast it here likewise.
    ht.data, wt.data = ht.data.bfloat16().float(), wt.data.bfloat16().float()
    _check(run, formula, [hs, ws], torch.bfloat16, torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cpp_half_path_equals_the_reference(p):
    """cpp takes bf16/fp16 on the CPU (torch's half GEMMs, the C++ dropout mask): the reference's
    math and roundings, so the two agree bit for bit, forward and backward."""
    _usable("cpp")
    x, w, bias, a, b = (t.detach().bfloat16().requires_grad_(t.requires_grad)
                        for t in _leaves((33, 40), (24, 40), (24,), (5, 40), (24, 5)))
    outs = []
    for be in ("cpp", "reference"):
        y = pc.ops.lora_linear(x, w, bias, a, b, 0.5, dropout_p=p, seed=9, backend=be)
        outs.append((y, *torch.autograd.grad(y, [x, w, bias, a, b], torch.ones_like(y))))
    for mine, ref in zip(*outs):
        assert torch.equal(mine, ref)


def test_backends_without_half_are_never_chosen_for_it():
    """phm_linear's cpp takes fp32/fp64: asked for bf16 it says so; the registry picks another."""
    if backends.why_not("phm_linear", "cpp", "cpu", torch.float32) is None:
        with pytest.raises(backends.BackendUnavailable, match="cpp takes float32, float64, got bfloat16"):
            backends.select("phm_linear", "cpu", torch.bfloat16, backend="cpp")
    assert backends.select("phm_linear", "cpu", torch.bfloat16) != "cpp"
    assert backends.select("lora_linear", "cpu", torch.bfloat16) in ("cpp", "reference")


def test_lora_model_under_autocast_repeatedly_finite_and_equal_to_reference():
    """The reported crash: a LoRA model's forward/backward under CPU autocast on the default backend
    returned values near 1e38 and then corrupted the heap; six runs of six died."""
    base, targets = tiny_model("llama")
    model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=targets))
    ref = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=targets,
                                                      backend="reference"))
    ref.load_state_dict(model.state_dict())
    model.train(), ref.train()
    ids = tiny_inputs(batch=4, seq=16)
    for i in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(i)
            out = model(input_ids=ids, labels=ids)
            torch.manual_seed(i)
            want = ref(input_ids=ids, labels=ids)
        assert torch.isfinite(out.logits).all() and out.logits.abs().max() < 1e3
        assert torch.equal(out.logits, want.logits)
        out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_trainer_bf16_trains_on_cpu(tmp_path):
    """transformers' Trainer with bf16=True (accelerate's CPU autocast) trains a LoRA model."""
    tf = pytest.importorskip("transformers")
    from datasets import Dataset

    base, targets = tiny_model("llama")
    model = pc.apply(base, pc.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=targets))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = tiny_inputs(seed=3, batch=16, seq=12)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = tf.TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=12,
                                per_device_train_batch_size=8, learning_rate=5e-2, logging_steps=1,
                                report_to=[], save_strategy="no", disable_tqdm=True, seed=0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
