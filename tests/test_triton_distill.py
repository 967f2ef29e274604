"""Triton distillation kernel (peftcore.kernels.distill) against the float64 reference.

Without CUDA the kernel runs under the Triton interpreter (BLOCK_V 64, or smaller where a test
pins it), so rows here are short but longer than a block: the vocabulary loop runs several chunks.
Tests marked ``gpu`` use real vocabularies (Llama 3's 128256, Gemma's 256000) and skip on CPU.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from pc_testing import DEV, SETTINGS, gpu, needs_cuda

if not torch.cuda.is_available():
    # Must precede the first import of triton-decorated kernels (triton.jit reads it then).
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

kd = importlib.import_module("peftcore.kernels.distill")  # kernels/ is installed as peftcore.kernels
from peftcore.losses import distill_kl  # noqa: E402
from peftcore.reference import distill as ref  # noqa: E402

KINDS = ("forward", "reverse", "jsd")
EPS32 = 2.0**-24

# Under the interpreter, lanes past the row end compute -inf - (-inf) before tl.where drops them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def rel(out, want):
    """||out - want|| / ||want|| in float64 (||out|| when want is exactly zero)."""
    out, want = out.double().cpu(), want.double().cpu()
    assert out.shape == want.shape
    den = want.norm().item()
    return (out - want).norm().item() / den if den > 0 else out.norm().item()


def logits(N, V, seed, scale=3.0, dtype=torch.float32, pad=0):
    """Student and teacher logits [N, V] (row stride V + pad), correlated like a real pair."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V + pad, generator=g) * scale
    t = 0.6 * s + 0.8 * torch.randn(N, V + pad, generator=g) * scale
    return s[:, :V].to(DEV, dtype), t[:, :V].to(DEV, dtype)


def weights(N, seed, masked=()):
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(N, generator=g) + 0.25
    w[list(masked)] = 0.0
    return w.to(DEV)


def both(s, t, T, kind, beta=0.5, w=None, need_grad=True, **kw):
    """(kernel loss, kernel grad), (float64 reference loss, grad)."""
    w = torch.ones(s.shape[0], device=s.device) if w is None else w
    out = kd.distill_fwd(s, t, T, kind, beta, w, need_grad, **kw)
    want = ref.distill_fwd(s.double(), t.double(), T, kind, beta, w.double(), need_grad)
    return out, want


def check(s, t, T, kind, beta=0.5, w=None, need_grad=True, tol=1e-5, what="", **kw):
    """Run kernel and float64 reference; relative errors under ``tol`` up to an fp32 noise floor.

    The floor is the rounding of the logits' own scale, eps32 · (max|s/T| + max|t/T| + log V + 1)
    per row (times T² for the loss, T·w for the gradient): where an exact value is a tiny difference
    of such numbers (nearly one-hot rows in reverse KL, jsd of identical rows) no fp32 code,
    plain PyTorch included, gets closer.  For ordinary rows it is far below ``tol``.
    """
    w = torch.ones(s.shape[0], device=s.device) if w is None else w
    (loss, grad), (loss_r, grad_r) = out, want = both(s, t, T, kind, beta, w, need_grad, **kw)
    finite = lambda x: x[torch.isfinite(x)].double().abs().max().item()  # noqa: E731  (-inf teacher entries)
    scale = EPS32 * ((finite(s) + finite(t)) / T + math.log(s.shape[1]) + 1) * s.shape[0] ** 0.5
    assert loss.dtype == torch.float32 and loss.shape == loss_r.shape
    err = (loss.double().cpu() - loss_r.double().cpu()).norm().item()
    assert err <= tol * loss_r.double().norm().item() + 4 * T * T * scale, f"{what} loss: {rel(loss, loss_r):.2e}"
    if grad_r is None:
        assert grad is None
    else:
        assert grad.dtype == torch.float32 and grad.shape == grad_r.shape
        err = (grad.double().cpu() - grad_r.double().cpu()).norm().item()
        floor = 4 * T * w.abs().max().item() * scale
        assert err <= tol * grad_r.double().norm().item() + floor, f"{what} grad: {rel(grad, grad_r):.2e}"
    return out, want


# --------------------------------------------------------------------------- fp32 equivalence


def test_vector():
    s = torch.tensor([[1.0, 2.0, 3.0]], device=DEV)
    t = torch.tensor([[3.0, 2.0, 1.0]], device=DEV)
    loss, grad = kd.distill_fwd(s, t, 2.0, "forward", 0.5, torch.ones(1, device=DEV), True)
    assert loss.item() == pytest.approx(1.280627, abs=1e-6)
    _, grad_r = ref.distill_fwd(s.double(), t.double(), 2.0, "forward", 0.5, torch.ones(1, dtype=torch.float64), True)
    assert rel(grad, grad_r) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("V", [1, 7, 37, 257, 333])
def test_fp32_odd_vocab(kind, V):
    # 257 and 333 at BLOCK_V 64: five and six chunks, the last one partial.
    s, t = logits(5, V, seed=V, pad=3)
    check(s, t, 2.0, kind, beta=0.3, w=weights(5, V), what=f"{kind} V={V}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [0.5, 1.0, 3.0, 8.0])
def test_fp32_temperatures(kind, T):
    s, t = logits(4, 150, seed=int(T * 10))
    check(s, t, T, kind, beta=0.7, block_v=32, what=f"{kind} T={T}")


@settings(max_examples=12, **SETTINGS)
@given(
    N=st.integers(1, 6),
    V=st.integers(1, 200),
    T=st.sampled_from([0.5, 1.0, 2.0, 4.0, 8.0]),
    kind=st.sampled_from(KINDS),
    beta=st.sampled_from([0.1, 0.5, 0.9]),
    scale=st.sampled_from([0.1, 1.0, 3.0, 10.0]),  # in units of T
    block_v=st.sampled_from([16, 64]),
    n_masked=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_fp32_matches_reference(N, V, T, kind, beta, scale, block_v, n_masked, seed):
    s, t = logits(N, V, seed, scale=scale * T)
    w = weights(N, seed, masked=range(0, N, 2)[:n_masked])
    check(s, t, T, kind, beta, w, block_v=block_v)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T,V", [(4.0, 3), (8.0, 40)])
def test_fp32_near_uniform(kind, T, V):
    # Logits far smaller than T: p and q are nearly uniform and nearly equal, the loss is a tiny
    # difference (q - p, log q - log m, ...) and fp32 itself loses digits: the bar is plain PyTorch
    # in fp32 (the reference backend on the fp32 inputs), over enough rows to average out luck.
    s, t = logits(64, V, seed=V, scale=0.1)
    (loss, grad), (loss_r, grad_r) = both(s, t, T, kind, 0.1)
    loss_t, grad_t = ref.distill_fwd(s, t, T, kind, 0.1, torch.ones(64, device=DEV), True)
    for name, o, r, pt in (("loss", loss, loss_r, loss_t), ("grad", grad, grad_r, grad_t)):
        err, err_torch = rel(o, r), rel(pt, r)
        assert err <= max(1e-5, 2 * err_torch), f"{name}: {err:.2e} vs torch fp32 {err_torch:.2e}"


@pytest.mark.parametrize("kind", KINDS)
def test_loss_only(kind):
    s, t = logits(3, 90, seed=4)
    (loss, grad), _ = check(s, t, 1.5, kind, need_grad=False)
    assert grad is None
    (loss_g, _), _ = both(s, t, 1.5, kind, need_grad=True)
    assert torch.equal(loss, loss_g)  # the same sums whether or not the gradient sweep runs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("need_grad", [True, False])
def test_masked_rows_do_no_work(kind, need_grad):
    # Masked rows hold NaN: any read of them would show in the outputs.
    s, t = logits(6, 77, seed=8)
    w = weights(6, 8, masked=(0, 3, 5))
    for x in (s, t):
        x[[0, 3, 5]] = float("nan")
    (loss, grad), (loss_r, grad_r) = both(s, t, 2.0, kind, 0.4, w, need_grad)
    live = w != 0
    assert torch.equal(loss[~live], torch.zeros(3, device=DEV))
    assert rel(loss[live], loss_r[live]) < 1e-5
    if need_grad:
        assert torch.equal(grad[~live], torch.zeros(3, 77, device=DEV))
        assert rel(grad[live], grad_r[live]) < 1e-5


@pytest.mark.parametrize("kind", ["forward", "jsd"])
@pytest.mark.parametrize("pattern", ["scattered", "leading_chunks", "all_but_one"])
def test_teacher_neg_inf(kind, pattern):
    # A masked teacher vocabulary: p = 0 there, no NaN.  "leading_chunks" leaves the teacher's
    # running max at its sentinel for the first two chunks.
    N, V = 4, 100
    s, t = logits(N, V, seed=21)
    if pattern == "scattered":
        t[:, ::3] = float("-inf")
    elif pattern == "leading_chunks":
        t[:, :40] = float("-inf")
    else:
        t[:, :] = float("-inf")
        t[:, 57] = 1.0
    (loss, grad), _ = check(s, t, 2.0, kind, 0.5, block_v=16)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [0.5, 1.0, 8.0])
@pytest.mark.parametrize("mode", ["independent", "close", "shifted"])
def test_huge_logits(kind, T, mode):
    # Logits of ±1e4 never overflow.  The distributions are nearly one-hot, so the exact values are
    # often tiny differences of large numbers: errors are bounded in units of eps32 · max|x|, the
    # error of just representing x / T in fp32 (plain PyTorch in fp32 reaches about 2 of them).
    g = torch.Generator().manual_seed(5)
    N, V = 4, 150
    s = (torch.rand(N, V, generator=g) * 2 - 1) * 1e4
    if mode == "independent":
        t = (torch.rand(N, V, generator=g) * 2 - 1) * 1e4
    elif mode == "close":
        t = s + 3 * torch.randn(N, V, generator=g)
    else:
        t = s + 5000.0  # the same distribution: every divergence is 0
    s, t = s.to(DEV), t.to(DEV)
    (loss, grad), (loss_r, grad_r) = both(s, t, T, kind, 0.4, block_v=32)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    unit = EPS32 * 1e4
    assert (loss.double() - loss_r).abs().max().item() <= 16 * T * unit
    assert (grad.double() - grad_r).abs().max().item() <= 16 * unit
    if mode == "shifted":
        assert loss.abs().max().item() <= 1e-5 * T * T
        assert grad.abs().max().item() <= 1e-5 * T


def test_row_stride_and_views():
    # Rows of a wider buffer (row stride > V) and a teacher with a different row stride.
    s, _ = logits(5, 61, seed=2, pad=9)
    _, t = logits(5, 61, seed=3, pad=0)
    assert s.stride(0) == 70 and t.stride(0) == 61
    check(s, t, 1.7, "reverse", block_v=16)


# --------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("V,T", [(37, 1.0), (203, 2.0), (130, 0.5)])
def test_half_matches_reference(dtype, kind, V, T):
    s, t = logits(6, V, seed=V, dtype=dtype)
    w = weights(6, V, masked=(2,))
    (loss, grad), (loss_r, grad_r) = both(s, t, T, kind, 0.3, w)
    # Plain PyTorch in the same dtype (the reference backend on the half inputs: fp32 math, the
    # gradient rounded to the dtype) sets the bar.
    loss_t, grad_t = ref.distill_fwd(s, t, T, kind, 0.3, w, True)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    for name, o, r, pt, floor in (
        ("loss", loss, loss_r, loss_t, 1e-6),
        ("grad", grad, grad_r, grad_t, 0.5 * unit / grad.numel() ** 0.5),
    ):
        err, err_torch = rel(o, r), rel(pt, r)
        assert err <= max(1e-2, 2 * err_torch), f"{name}: {err:.2e} vs torch {err_torch:.2e}"
        # In practice far tighter: fp32 math, one rounding of the gradient on store.
        assert err <= 2 * err_torch + floor, f"{name}: {err:.2e} vs torch {err_torch:.2e}"


# --------------------------------------------------------------------------- through the op


def _op(backend, s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    out = distill_kl(s, t.detach(), backend=backend, **kw)
    return s, out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_op_scalar_grad_output(kind, reduction):
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(2, 5, 67, generator=g) * 2).to(DEV)
    t = (torch.randn(2, 5, 67, generator=g) * 2).to(DEV)
    mask = torch.rand(2, 5, generator=g).to(DEV) > 0.3
    kw = dict(temperature=2.5, reduction=reduction, mask=mask, kind=kind, beta=0.35)
    s1, out = _op("triton", s, t, **kw)
    s2, want = _op("reference", s.double(), t.double(), **kw)
    assert out.dtype == torch.float32 and out.shape == ()
    assert rel(out, want) < 1e-5
    out.backward(torch.tensor(0.37, device=DEV))  # a grad_output that is not 1
    want.backward(torch.tensor(0.37, dtype=torch.float64, device=DEV))
    assert rel(s1.grad, s2.grad) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_op_reduction_none(kind):
    # Per-row losses with a random per-row grad_output; a transposed (non-contiguous) student.
    g = torch.Generator().manual_seed(12)
    s = (torch.randn(7, 3, 45, generator=g) * 2).transpose(0, 1).to(DEV)
    t = (torch.randn(3, 7, 45, generator=g) * 2).to(DEV)
    mask = torch.rand(3, 7, generator=g).to(DEV) > 0.25
    dy = torch.randn(3, 7, generator=g).to(DEV)
    kw = dict(temperature=1.5, reduction="none", mask=mask, kind=kind, beta=0.6)
    s1, out = _op("triton", s, t, **kw)
    s2, want = _op("reference", s.double(), t.double(), **kw)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    assert rel(out, want) < 1e-5
    out.backward(dy)
    want.backward(dy.double())
    assert rel(s1.grad, s2.grad) < 1e-5


def test_op_test_vector():
    s = torch.tensor([1.0, 2.0, 3.0], device=DEV, requires_grad=True)
    t = torch.tensor([3.0, 2.0, 1.0], device=DEV)
    loss = distill_kl(s, t, temperature=2.0, backend="triton")
    assert loss.item() == pytest.approx(1.280627, abs=1e-6)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_op_half_through_triton():
    s, t = logits(9, 50, seed=13, dtype=torch.bfloat16)
    s1, out = _op("triton", s, t, temperature=2.0, kind="jsd")
    s2, want = _op("reference", s.double(), t.double(), temperature=2.0, kind="jsd")
    (out * 3.0).backward()
    (want * 3.0).backward()
    assert out.dtype == torch.float32 and s1.grad.dtype == torch.bfloat16
    assert rel(out, want) < 1e-5 and rel(s1.grad, s2.grad) < 1e-2


# --------------------------------------------------------------------------- configs


def test_pinned_config(monkeypatch):
    assert kd._parse_pinned("BLOCK_V=8192, num_warps=16") == {"BLOCK_V": 8192, "num_warps": 16}
    with pytest.raises(ValueError, match="unknown key"):
        kd._parse_pinned("BLOCK_M=64")
    with pytest.raises(ValueError, match="integer"):
        kd._parse_pinned("num_warps=eight")
    with pytest.raises(ValueError, match="power of two"):
        kd._parse_pinned("BLOCK_V=1000")
    monkeypatch.setenv(kd.CONFIG_ENV, "BLOCK_V=16")
    assert kd._config(300, torch.float32)["BLOCK_V"] == 16
    s, t = logits(3, 100, seed=1)
    check(s, t, 2.0, "jsd")  # runs with the pinned 16-wide chunks
    monkeypatch.delenv(kd.CONFIG_ENV)
    cfg = kd._config(128256, torch.bfloat16)
    assert cfg["BLOCK_V"] & (cfg["BLOCK_V"] - 1) == 0 and cfg["BLOCK_V"] <= triton.next_power_of_2(128256)


def test_bad_inputs():
    s, t = logits(2, 10, seed=0)
    w = torch.ones(2, device=DEV)
    with pytest.raises(ValueError, match="kind"):
        kd.distill_fwd(s, t, 1.0, "kl", 0.5, w, True)
    with pytest.raises(ValueError, match="unit column stride"):
        kd.distill_fwd(s.t(), t.t(), 1.0, "forward", 0.5, torch.ones(10, device=DEV), True)
    with pytest.raises(TypeError):
        kd.distill_fwd(s.double(), t.double(), 1.0, "forward", 0.5, w, True)


def test_empty_batch():
    s = torch.empty(0, 11, device=DEV)
    loss, grad = kd.distill_fwd(s, s, 2.0, "forward", 0.5, torch.empty(0, device=DEV), True)
    assert loss.shape == (0,) and grad.shape == (0, 11)


# --------------------------------------------------------------------------- GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("V", [128256, 256000])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_large_vocab_bf16(V, kind):
    N = 48
    s, t = logits(N, V, seed=V % 1000, dtype=torch.bfloat16)
    if kind != "reverse":
        t[:, V - 256:] = float("-inf")  # a padded vocabulary tail (reverse KL would be inf)
    w = weights(N, 3, masked=(5, 17))
    (loss, grad), (loss_r, grad_r) = both(s, t, 2.0, kind, 0.5, w)
    loss_t, grad_t = ref.distill_fwd(s, t, 2.0, kind, 0.5, w, True)
    assert grad.dtype == torch.bfloat16
    for name, o, r, pt in (("loss", loss, loss_r, loss_t), ("grad", grad, grad_r, grad_t)):
        err, err_torch = rel(o, r), rel(pt, r)
        assert err <= max(1e-2, 2 * err_torch), f"{name}: {err:.2e} vs torch {err_torch:.2e}"
        assert err <= 2 * err_torch + 1e-5, f"{name}: {err:.2e} vs torch {err_torch:.2e}"


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_large_vocab_fp32(kind):
    s, t = logits(16, 128256, seed=7)
    check(s, t, 1.0, kind, 0.5, weights(16, 7, masked=(3,)))
