"""peftcore.losses.distill_kl: every available backend against the float64 formula, plus input checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from peftcore import backends
from peftcore.losses import distill_kl
from peftcore.reference.distill import row_losses

from pc_testing import rel_err

BACKENDS = ["reference", "cpp", "triton"]


def _skip_unavailable(backend, dtype=torch.float32):
    backends.ops()
    reason = backends.why_not("distill_kl", backend, "cpu", dtype)
    if reason:
        pytest.skip(f"{backend} unavailable here: {reason}")


def _oracle(s, t, T, kind, beta, mask, reduction, dy):
    """Loss and student gradient by autograd through the float64 closed form."""
    s = s.detach().double().requires_grad_()
    rows = row_losses(s, t.double(), T, kind, beta).reshape(s.shape[:-1])
    live = torch.ones(rows.shape, dtype=torch.bool) if mask is None else mask
    rows = torch.where(live, rows, torch.zeros_like(rows))
    n = max(int(live.sum()), 1)
    out = {"batchmean": rows.sum() / n, "sum": rows.sum(), "mean": rows.sum() / (n * s.shape[-1]), "none": rows}[reduction]
    out.backward(dy)
    return out.detach(), s.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_test_vector(backend):
    _skip_unavailable(backend)
    s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    assert distill_kl(s, t, temperature=2.0, backend=backend).item() == pytest.approx(1.280627, abs=1e-6)
    assert distill_kl(s, t, temperature=2.0, backend=backend).item() / 4 == pytest.approx(0.320157, abs=1e-6)


def test_matches_torch_kl_div_times_t_squared():
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    ref = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), reduction="batchmean", log_target=True) * 9
    assert distill_kl(s, t, 3.0, backend="reference").item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    n=st.integers(1, 9), v=st.integers(1, 300), temperature=st.sampled_from([0.5, 1.0, 2.0, 8.0]),
    kind=st.sampled_from(["forward", "reverse", "jsd"]), reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]),
    masked=st.booleans(), neg_inf=st.booleans(), big=st.booleans(), three_d=st.booleans(), seed=st.integers(0, 10_000),
)
def test_fp32_matches_float64(backend, n, v, temperature, kind, reduction, masked, neg_inf, big, three_d, seed):
    _skip_unavailable(backend)
    g = torch.Generator().manual_seed(seed)
    shape = (2, n, v) if three_d else (n, v)
    scale = 1e4 if big else 3.0
    s = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if neg_inf and kind != "reverse" and v > 1:  # reverse KL is +inf where only the teacher is -inf
        t[..., 0] = -math.inf
    mask = (torch.rand(shape[:-1], generator=g) > 0.3) if masked else None
    dy = torch.randn(shape[:-1], generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(2.5, dtype=torch.float64)
    ref, ref_grad = _oracle(s, t, temperature, kind, 0.3, mask, reduction, dy)
    s32 = s.float().requires_grad_()
    out = distill_kl(s32, t.float(), temperature, reduction=reduction, mask=mask, kind=kind, beta=0.3, backend=backend)
    out.backward(dy.float())
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # ±1e4 logits: log-probs differ by ~1e4/T and carry fp32's relative error; a saturated softmax
    # also leaves gradients that cancel to ~0, so the bound has an absolute part on the grad's scale.
    tol = 1e-5 if not big else 1e-4
    assert (out - ref).norm() <= tol * ref.norm() + 1e-6
    assert (s32.grad.double() - ref_grad).norm() <= tol * ref_grad.norm() + 1e-6 * temperature
    if mask is not None:
        assert (s32.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorch(backend, dtype):
    _skip_unavailable(backend, dtype)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(7, 301, generator=g, dtype=torch.float64) * 4, torch.randn(7, 301, generator=g, dtype=torch.float64) * 4
    ref, ref_grad = _oracle(s, t, 2.0, "forward", 0.5, None, "batchmean", torch.tensor(1.0, dtype=torch.float64))
    sh = s.to(dtype).requires_grad_()
    out = distill_kl(sh, t.to(dtype), 2.0, backend=backend)
    out.backward()
    sp = s.to(dtype).requires_grad_()  # plain PyTorch in the same dtype
    eager = F.kl_div(F.log_softmax(sp / 2, -1), F.log_softmax(t.to(dtype) / 2, -1), reduction="batchmean", log_target=True) * 4
    eager.backward()
    assert sh.grad.dtype == dtype
    assert rel_err(out, ref) < max(1e-2, 2 * rel_err(eager, ref))
    assert rel_err(sh.grad, ref_grad) < max(1e-2, 2 * rel_err(sp.grad, ref_grad))


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_reference_gradcheck(kind):
    s = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 9, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.4
    fn = lambda s: distill_kl(s, t, 1.7, mask=mask, kind=kind, beta=0.3, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s,))


def test_no_grad_forward_and_teacher_gets_none():
    s, t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    with torch.no_grad():
        v = distill_kl(s, t, 2.0)
    assert v.requires_grad is False and v.item() > 0
    distill_kl(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is None


def _st():
    return torch.randn(4, 10), torch.randn(4, 10)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(teacher_logits=torch.randn(4, 11)), ValueError, r"same shape, got \(4, 10\) and \(4, 11\)"),
        (dict(student_logits=torch.ones(4, 10, dtype=torch.int64)), TypeError, r"student_logits must be floating point"),
        (dict(temperature=0.0), ValueError, r"temperature must be a positive number, got 0.0"),
        (dict(temperature=-2), ValueError, r"temperature must be a positive number"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of"),
        (dict(kind="tvd"), ValueError, r"kind must be one of"),
        (dict(kind="jsd", beta=1.0), ValueError, r"beta must be in \(0, 1\)"),
        (dict(mask=torch.ones(4)), TypeError, r"mask must be a bool tensor"),
        (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, r"mask must have shape \(4,\)"),
        (dict(teacher_logits=torch.randn(4, 10, dtype=torch.float64)), TypeError, r"teacher_logits has dtype torch.float64"),
        (dict(teacher_logits=torch.randn(4, 10, requires_grad=True)), ValueError, r"teacher_logits.detach\(\)"),
        (dict(backend="cuda"), backends.BackendUnavailable, r"cuda runs on CUDA devices"),
    ],
)
def test_bad_inputs(kwargs, err, match):
    s, t = _st()
    args = {"student_logits": s, "teacher_logits": t, **kwargs}
    with pytest.raises(err, match=match):
        distill_kl(**args)
