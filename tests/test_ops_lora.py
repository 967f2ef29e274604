"""peftcore.ops.lora_linear: every available backend against the float64 formula, plus input checks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore import backends
from peftcore.ops import lora_linear
from peftcore.reference.lora import lora_linear_formula
from peftcore.reference.rng import keep_mask

from pc_testing import rel_err

BACKENDS = ["reference", "cpp", "triton"]


def _skip_unavailable(backend, dtype=torch.float32):
    reason = backends.why_not("lora_linear", backend, "cpu", dtype)
    if reason:
        pytest.skip(f"{backend} unavailable here: {reason}")


def _inputs(lead, k, n, r, dtype, bias=True, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = mk(*lead, 2 * k)[..., ::2] if noncontig else mk(*lead, k)
    return dict(
        x=x, weight=mk(n, k) / k**0.5, bias=mk(n) if bias else None,
        lora_a=mk(r, k) / k**0.5, lora_b=mk(n, r) / r**0.5,
    ), g


def _run(fn, t, dtype, dy, scaling, p, seed, **kw):
    """Output and gradients (x, lora_a, lora_b, bias) of fn on dtype copies of t."""
    leaves = {k: (v.detach().to(dtype, copy=True).requires_grad_(k != "weight") if v is not None else None) for k, v in t.items()}
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], scaling, p, seed, **kw)
    y.backward(dy.to(dtype))
    grads = {k: v.grad for k, v in leaves.items() if v is not None and k != "weight"}
    return y, grads


def _op(x, w, b, a, bb, s, p, seed, backend):
    return lora_linear(x, w, b, a, bb, s, dropout_p=p, seed=seed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    m=st.integers(1, 37), k=st.integers(1, 70), n=st.integers(1, 45), r=st.integers(1, 20),
    p=st.sampled_from([0.0, 0.1, 0.5]), bias=st.booleans(), three_d=st.booleans(),
    noncontig=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_fp32_matches_float64_formula(backend, m, k, n, r, p, bias, three_d, noncontig, seed):
    _skip_unavailable(backend)
    lead = (2, (m + 1) // 2) if three_d else (m,)
    t, g = _inputs(lead, k, n, r, torch.float64, bias=bias, seed=seed % 1000, noncontig=noncontig)
    dy = torch.randn(*lead, n, generator=g, dtype=torch.float64)  # not all ones
    y, grads = _run(_op, t, torch.float32, dy, 0.75, p, seed, backend=backend)
    y64, g64 = _run(lambda *a: lora_linear_formula(*a), t, torch.float64, dy, 0.75, p, seed)
    assert y.dtype == torch.float32 and y.shape == (*lead, n)
    assert rel_err(y, y64) < 1e-5
    for name, ref in g64.items():
        if ref.norm() > 0:  # dA is exactly 0 where dropout drops a whole tiny input
            assert rel_err(grads[name], ref) < 1e-5, name
        else:
            assert grads[name].abs().max() == 0, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_error_within_twice_pytorch(backend, dtype):
    _skip_unavailable(backend, dtype)
    t, g = _inputs((3, 21), 40, 33, 8, torch.float64, seed=5)
    dy = torch.randn(3, 21, 33, generator=g, dtype=torch.float64)
    y, grads = _run(_op, t, dtype, dy, 2.0, 0.1, 7, backend=backend)
    y64, g64 = _run(lambda *a: lora_linear_formula(*a), t, torch.float64, dy, 2.0, 0.1, 7)
    yp, gp = _run(lambda *a: lora_linear_formula(*a), t, dtype, dy, 2.0, 0.1, 7)  # plain PyTorch, same dtype
    assert y.dtype == dtype
    assert rel_err(y, y64) < max(1e-2, 2 * rel_err(yp, y64))
    for name in g64:
        assert rel_err(grads[name], g64[name]) < max(1e-2, 2 * rel_err(gp[name], g64[name])), name


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_gradcheck_float64(p):
    t, _ = _inputs((2, 3), 6, 5, 3, torch.float64, seed=1)
    x, a, b, bias = (t[k].clone().requires_grad_() for k in ("x", "lora_a", "lora_b", "bias"))
    w = t["weight"].clone().requires_grad_()  # dW too, when the base weight is trainable
    fn = lambda x, w, bias, a, b: lora_linear(x, w, bias, a, b, 0.5, dropout_p=p, seed=3, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, bias, a, b))


def test_dropout_mask_is_deterministic_and_has_rate_p():
    k1 = keep_mask(256, 300, seed=1, p=0.25)
    assert torch.equal(k1, keep_mask(256, 300, seed=1, p=0.25))
    assert not torch.equal(k1, keep_mask(256, 300, seed=2, p=0.25))
    assert abs(k1.float().mean().item() - 0.75) < 0.01
    assert abs(k1[:, :7].float().mean().item() - 0.75) < 0.03  # no column or row pattern
    assert keep_mask(8, 8, seed=1, p=0.0).all()
    t, _ = _inputs((64,), 32, 16, 4, torch.float32, seed=2)
    args = (t["x"].float(), t["weight"].float(), None, t["lora_a"].float(), t["lora_b"].float(), 1.0)
    torch.manual_seed(0)
    y1 = lora_linear(*args, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(y1, lora_linear(*args, dropout_p=0.5))  # seed=None follows torch.manual_seed
    assert not torch.equal(y1, lora_linear(*args, dropout_p=0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_x_and_rank_r_intermediate(backend):
    _skip_unavailable(backend)
    m, k, n, r = 64, 48, 40, 4
    x = torch.randn(m, k)
    w, a, b = torch.randn(n, k), torch.randn(r, k, requires_grad=True), torch.randn(n, r, requires_grad=True)
    saved = []

    def pack(t):
        if not any(t is p for p in (w, a, b)):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_linear(x, w, None, a, b, 1.0, dropout_p=0.1, seed=1, backend=backend)
    # x and xa, plus the seed as one int64 (the op draws it, so it travels as a tensor); no mask,
    # no dropped-out copy
    assert sum(saved) == (m * k + m * r) * 4 + 8


def _good():
    return dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6),
                lora_a=torch.randn(2, 8), lora_b=torch.randn(6, 2), scaling=1.0)


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(x=torch.randn(4, 7)), ValueError, r"x must have last dim 8"),
        (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), ValueError, r"rank must be >= 1, got lora_a with r = 0"),
        (dict(lora_a=torch.randn(2, 9)), ValueError, r"lora_a must be \[r, in=8\]"),
        (dict(lora_b=torch.randn(6, 3)), ValueError, r"lora_b must be \[out=6, r=2\]"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must be \[out=6\]"),
        (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, r"weight has dtype torch.float64 but x has torch.float32"),
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, r"x must be a floating-point tensor"),
        (dict(lora_b=torch.randn(6, 2, device="meta")), ValueError, r"lora_b is on meta but x is on cpu"),
        (dict(weight=torch.randn(6, 8, 1)), ValueError, r"weight must be 2-D"),
        (dict(scaling=torch.tensor(1.0)), TypeError, r"scaling must be a real Python float"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, err, match):
    args = {**_good(), **change}
    with pytest.raises(err, match=match):
        lora_linear(**args)


def test_bad_dropout_seed_and_backend():
    g = _good()
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.0"):
        lora_linear(**g, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*31\)"):
        lora_linear(**g, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_linear(**g, backend="numpy")
    with pytest.raises(backends.BackendUnavailable, match="cuda runs on CUDA devices"):
        lora_linear(**g, backend="cuda")
