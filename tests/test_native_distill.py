"""peftcore._C's distill kernels (the cpp and cuda backends of distill_kl): row losses and gradients
against the float64 formula for the three kinds, edge values (-inf teacher entries, ±1e4 logits,
odd V, masked rows), the whole op with a grad_output that is not 1, and the argument checks."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore import native
from peftcore.losses import distill_kl
from peftcore.native import distill as nd
from peftcore.native import dl
from peftcore.reference import distill as rd

from pc_testing import rel_err

REASON = native.unavailable_reason()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"peftcore._C unavailable: {REASON}")
KINDS = ("forward", "reverse", "jsd")
TOL = 1e-5


def _C():
    return native.load()


def _inputs(n, v, scale, g, neg_inf=False, pad=0):
    """Student and teacher [n, v] (row stride v + pad); with neg_inf, some teacher entries at -inf."""
    s = (torch.randn(n, v + pad, generator=g, dtype=torch.float64) * scale).float()[:, :v]
    t = (torch.randn(n, v + pad, generator=g, dtype=torch.float64) * scale).float()[:, :v]
    if neg_inf and v > 1:
        hole = torch.rand(n, v, generator=g) < 0.3
        hole[:, 0] = False  # keep one finite entry per row
        t = t.masked_fill(hole, -math.inf)
    return s, t


def _weights(n, g, masked=True):
    w = torch.rand(n, generator=g, dtype=torch.float64).float() + 0.1
    if masked and n > 1:
        w[torch.rand(n, generator=g) < 0.3] = 0.0
    return w


def _ref(s, t, T, kind, beta, w):
    """The float64 closed form, plus fp32 PyTorch (to bound what fp32 can do on cancelling rows)."""
    return rd.distill_fwd(s.double(), t.double(), T, kind, beta, w, True), rd.distill_fwd(s, t, T, kind, beta, w, True)


def _close(out, ref, plain, what, atol=0.0):
    """rel err < TOL, else (a row sum that cancels to ~0, as JSD at V=1) within atol per element, or no
    worse than twice plain fp32 PyTorch."""
    assert out.shape == ref.shape, what
    assert not torch.isnan(out).any(), f"{what}: NaN"
    e = rel_err(out, ref)
    if e < TOL:
        return
    if atol and (out.double() - ref.double()).abs().max().item() <= atol:
        return
    ep = rel_err(plain, ref)
    assert e <= 2 * ep, f"{what}: rel err {e:.3g} > {TOL:g} and > 2x plain fp32 torch's {ep:.3g}"


def _check_kernel(s, t, T, kind, beta, w):
    loss, grad = nd.distill_fwd(s, t, T, kind, beta, w, True)
    (lr, gr), (lp, gp) = _ref(s, t, T, kind, beta, w)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype and grad.shape == s.shape
    _close(loss, lr, lp, f"{kind} loss", atol=1e-6 * T * T)
    _close(grad, gr, gp, f"{kind} grad", atol=1e-6 * T)
    live = w != 0
    assert torch.all(loss[~live] == 0) and torch.all(grad[~live] == 0), "masked rows must be 0"
    loss2, none = nd.distill_fwd(s, t, T, kind, beta, w, False)
    assert none is None
    assert torch.equal(loss2, loss), "the loss must not depend on need_grad"
    return loss, grad


# ------------------------------------------------------------------------------------------ kernel


@needs_ext
def test_test_vector():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])
    loss, _ = nd.distill_fwd(s, t, 2.0, "forward", 0.5, torch.ones(1), False)
    assert loss.item() == pytest.approx(1.280627, abs=2e-6)
    assert distill_kl(s, t, temperature=2.0, backend="cpp").item() == pytest.approx(1.280627, abs=2e-6)


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
@given(n=st.integers(1, 9), v=st.sampled_from([1, 2, 7, 16, 17, 33, 1001, 1037]),
       scale=st.sampled_from([0.1, 1.0, 4.0]), T=st.floats(0.5, 8.0), beta=st.sampled_from([0.1, 0.5, 0.9]),
       pad=st.sampled_from([0, 3]), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_float64(kind, n, v, scale, T, beta, pad, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _inputs(n, v, scale, g, pad=pad)
    _check_kernel(s, t, T, kind, beta, _weights(n, g))


@needs_ext
@pytest.mark.parametrize("kind", ["forward", "jsd"])  # reverse KL is +inf where p = 0 < q
@given(n=st.integers(1, 6), v=st.sampled_from([2, 7, 31, 1001]), T=st.sampled_from([0.5, 1.0, 3.0]),
       seed=st.integers(0, 2**31 - 1))
def test_neg_inf_teacher_entries(kind, n, v, T, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = _inputs(n, v, 2.0, g, neg_inf=True)
    loss, grad = _check_kernel(s, t, T, kind, 0.3, _weights(n, g, masked=False))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_large_logits(kind, T):
    """Logits at ±1e4: no overflow, no NaN; near one-hot distributions."""
    g = torch.Generator().manual_seed(7)
    s, t = _inputs(6, 515, 1e4, g)
    s[0, :] = t[0, :]  # one row with identical distributions: loss 0
    loss, grad = _check_kernel(s, t, T, kind, 0.5, torch.ones(6))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert abs(loss[0].item()) <= 1e-6 * T * T


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_near_uniform_rows_keep_precision(kind):
    """High T and small logits: KL ~ 1e-4 is a small difference of log-partition sums ~ log V."""
    g = torch.Generator().manual_seed(3)
    s, t = _inputs(8, 4001, 0.2, g)
    loss, _ = nd.distill_fwd(s, t, 8.0, kind, 0.5, torch.ones(8), False)
    lr, _ = rd.distill_fwd(s.double(), t.double(), 8.0, kind, 0.5, torch.ones(8), False)
    assert rel_err(loss, lr) < TOL


@needs_ext
def test_threads_do_not_change_results():
    g = torch.Generator().manual_seed(5)
    s, t = _inputs(37, 1500, 2.0, g)
    w = _weights(37, g)
    native.set_num_threads(1)
    try:
        one = nd.distill_fwd(s, t, 2.0, "jsd", 0.5, w, True)
    finally:
        native.set_num_threads(None)
    two = _C().distill_fwd  # explicit thread count through the binding
    loss = torch.empty(37)
    grad = torch.empty(37, 1500)
    two(dl(s), dl(t), dl(w), dl(loss), dl(grad), 2.0, "jsd", 0.5, 2)
    assert torch.equal(loss, one[0]) and torch.equal(grad, one[1])


@needs_ext
def test_empty_rows_and_broadcast_teacher():
    loss, grad = nd.distill_fwd(torch.empty(0, 5), torch.empty(0, 5), 1.0, "forward", 0.5, torch.empty(0), True)
    assert loss.shape == (0,) and grad.shape == (0, 5)
    g = torch.Generator().manual_seed(2)
    s, _ = _inputs(4, 9, 1.0, g)
    t = torch.randn(1, 9, generator=g).expand(4, 9)  # row stride 0
    _check_kernel(s, t, 2.0, "reverse", 0.5, torch.ones(4))


# -------------------------------------------------------------------------------------- the op


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
@given(lead=st.sampled_from([(5,), (2, 3)]), v=st.sampled_from([7, 130, 1001]), T=st.sampled_from([0.5, 2.0, 8.0]),
       reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]), masked=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_distill_kl_cpp_matches_reference(kind, lead, v, T, reduction, masked, seed):
    """The whole op, forward and backward, with a grad_output that is not 1."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    s0, t0 = _inputs(n, v, 3.0, g)
    s0, t0 = s0.reshape(*lead, v), t0.reshape(*lead, v)
    mask = (torch.rand(lead, generator=g) < 0.7) if masked else None
    up = torch.randn(lead, generator=g) if reduction == "none" else torch.tensor(3.7)
    outs = {}
    for name, dtype in (("cpp", torch.float32), ("reference", torch.float64)):
        s = s0.to(dtype).clone().requires_grad_(True)
        out = distill_kl(s, t0.to(dtype), temperature=T, reduction=reduction, mask=mask, kind=kind, beta=0.3,
                         backend=name)
        (out * up.to(dtype)).sum().backward()
        outs[name] = (out.detach(), s.grad)
    (o, gs), (orf, grf) = outs["cpp"], outs["reference"]
    assert o.dtype == torch.float32 and o.shape == orf.shape
    assert rel_err(o, orf) < TOL or (o.double() - orf).abs().max() < 1e-6 * T * T
    assert rel_err(gs, grf) < TOL or (gs.double() - grf).abs().max() < 1e-6 * T


@needs_ext
def test_distill_kl_cpp_no_grad_and_noncontiguous():
    g = torch.Generator().manual_seed(11)
    base_s = torch.randn(6, 40, generator=g)
    base_t = torch.randn(6, 40, generator=g)
    s, t = base_s.t()[:20], base_t.t()[:20]  # column stride 40
    out = distill_kl(s, t, temperature=2.0, backend="cpp")
    ref = distill_kl(s.double(), t.double(), temperature=2.0, backend="reference")
    assert rel_err(out, ref) < TOL


# ------------------------------------------------------------------------------------ checks


@needs_ext
def test_python_wrapper_checks_tensors():
    s, t, w = torch.randn(3, 5), torch.randn(3, 5), torch.ones(3)
    with pytest.raises(TypeError, match="float32"):
        nd.distill_fwd(s.double(), t.double(), 1.0, "forward", 0.5, w, True)
    with pytest.raises(ValueError, match="same shape"):
        nd.distill_fwd(s, t[:, :4], 1.0, "forward", 0.5, w, True)
    with pytest.raises(ValueError, match="2-D"):
        nd.distill_fwd(s[0], t[0], 1.0, "forward", 0.5, w, True)
    with pytest.raises(TypeError, match="dtype"):
        nd.distill_fwd(s, t.half(), 1.0, "forward", 0.5, w, True)
    with pytest.raises(TypeError, match="row_weight"):
        nd.distill_fwd(s, t, 1.0, "forward", 0.5, w.double(), True)
    with pytest.raises(ValueError, match="row_weight"):
        nd.distill_fwd(s, t, 1.0, "forward", 0.5, torch.ones(4), True)
    with pytest.raises(ValueError, match="temperature"):
        nd.distill_fwd(s, t, 0.0, "forward", 0.5, w, True)
    with pytest.raises(ValueError, match="temperature"):
        nd.distill_fwd(s, t, float("inf"), "forward", 0.5, w, True)
    with pytest.raises(ValueError, match="kind"):
        nd.distill_fwd(s, t, 1.0, "kl", 0.5, w, True)
    with pytest.raises(ValueError, match="beta"):
        nd.distill_fwd(s, t, 1.0, "jsd", 1.0, w, True)
    with pytest.raises(TypeError, match="Tensor"):
        nd.distill_fwd(s.tolist(), t, 1.0, "forward", 0.5, w, True)


@needs_ext
def test_binding_rejects_bad_arguments():
    C = _C()
    s, t, w = torch.randn(3, 5), torch.randn(3, 5), torch.ones(3)
    loss, grad = torch.empty(3), torch.empty(3, 5)

    def call(**kw):
        a = dict(s=s, t=t, row_weight=w, loss=loss, grad=grad, temperature=1.0, kind="forward", beta=0.5)
        a.update(kw)
        C.distill_fwd(**{k: dl(v) if isinstance(v, torch.Tensor) else v for k, v in a.items()})

    call()  # the baseline is valid
    for kw, err, msg in [({"s": s.half(), "t": t.half()}, TypeError, "s must have dtype float32, got float16"),
                         ({"kind": "kl"}, ValueError, "kind"),
                         ({"s": torch.randn(3, 0), "t": torch.randn(3, 0)}, ValueError, "V .* must be >= 1"),
                         ({"t": torch.randn(3, 6)}, ValueError, r"t must have shape \[N, V\] = \[3, 5\]"),
                         ({"temperature": 0.0}, ValueError, "temperature"),
                         ({"temperature": float("nan")}, ValueError, "temperature"),
                         ({"kind": "jsd", "beta": 0.0}, ValueError, "beta"),
                         ({"s": s.data_ptr()}, TypeError, "DLPack capsule"),
                         ({"s": torch.randn(5, 3).t()}, ValueError, "unit column stride"),
                         ({"row_weight": torch.ones(4)}, ValueError, "row_weight must have shape"),
                         ({"loss": torch.empty(2)}, ValueError, "loss must have shape"),
                         ({"grad": s}, ValueError, "grad overlaps s")]:
        with pytest.raises(err, match=msg):
            call(**kw)
    call(grad=None)  # no gradient is fine
    if not C.CUDA:
        with pytest.raises(ValueError, match="s must be a CUDA tensor"):
            C.cuda_distill_fwd(dl(s), dl(t), dl(w), dl(loss), None, 1.0, "forward", 0.5, 0)


# --------------------------------------------------------------------------------------- GPU


def _cuda_or_skip():
    reason = native.unavailable_reason(cuda=True)
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7), (33, 1001), (8, 32000), (2, 262144), (3, 4099)])
def test_cuda_kernel_matches_float64(kind, dtype, shape):
    _cuda_or_skip()
    n, v = shape
    g = torch.Generator().manual_seed(n * 7919 + v)
    s, t = _inputs(n, v, 3.0, g, neg_inf=(kind != "reverse"))
    w = _weights(n, g)
    s, t = s.to(dtype), t.to(dtype)
    loss, grad = nd.distill_fwd(s.cuda(), t.cuda(), 2.0, kind, 0.3, w.cuda(), True)
    lr, gr = rd.distill_fwd(s.double(), t.double(), 2.0, kind, 0.3, w, True)  # float64, on the rounded inputs
    tol = TOL if dtype == torch.float32 else 1e-2
    assert rel_err(loss.cpu(), lr) < tol
    assert rel_err(grad.cpu(), gr) < tol
    assert torch.all(loss.cpu()[w == 0] == 0) and torch.all(grad.cpu()[w == 0] == 0)
    if dtype != torch.float32:  # the gradient is rounded to the input dtype: within 2x of torch doing the same
        plain = rd.distill_fwd(s.cuda(), t.cuda(), 2.0, kind, 0.3, w.cuda(), True)[1].cpu()
        assert rel_err(grad.cpu(), gr) <= 2 * rel_err(plain, gr) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_large_logits_and_unaligned_rows(kind):
    _cuda_or_skip()
    g = torch.Generator().manual_seed(1)
    s, t = _inputs(4, 1003, 1e4, g, pad=1)  # row stride 1004: no 16-byte vectors
    loss, grad = nd.distill_fwd(s.cuda(), t.cuda(), 0.5, kind, 0.5, torch.ones(4, device="cuda"), True)
    lr, gr = rd.distill_fwd(s.double(), t.double(), 0.5, kind, 0.5, torch.ones(4), True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss.cpu(), lr) < TOL and rel_err(grad.cpu(), gr) < TOL


@pytest.mark.gpu
def test_distill_kl_cuda_op_matches_reference():
    _cuda_or_skip()
    g = torch.Generator().manual_seed(4)
    s0, t0 = _inputs(12, 777, 2.0, g)
    mask = torch.rand(12, generator=g) < 0.7
    outs = {}
    for name, dev, dtype in (("cuda", "cuda", torch.float32), ("reference", "cpu", torch.float64)):
        s = s0.to(dev, dtype).clone().requires_grad_(True)
        out = distill_kl(s, t0.to(dev, dtype), temperature=2.0, mask=mask.to(dev), backend=name)
        (out * 3.7).backward()
        outs[name] = (out.detach().cpu(), s.grad.cpu())
    assert rel_err(outs["cuda"][0], outs["reference"][0]) < TOL
    assert rel_err(outs["cuda"][1], outs["reference"][1]) < TOL
