"""``peftcore.ops.phm_linear``: the reference backend against the Kronecker formula, and the op's
input checks (the kernels' equivalence tests live in test_triton_phm.py and test_native_phm.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore.ops import phm_linear
from peftcore.reference.phm import phm_linear_formula, phm_weight


def _factors(g, n, p, q, k, dtype=torch.float64):
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(n, n, n), r(n, p, k), r(n, k, q), r(n * q)


@given(m=st.integers(1, 9), n=st.sampled_from([1, 2, 3, 4]), p=st.sampled_from([1, 3, 5]),
       q=st.sampled_from([1, 3, 7]), k=st.sampled_from([1, 2, 3]), bias=st.booleans(), seed=st.integers(0, 999))
def test_reference_gradcheck_and_formula(m, n, p, q, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    rule, wl, wr, b = _factors(g, n, p, q, k)
    x = torch.randn(m, 2, n * p, generator=g, dtype=torch.float64)[:, 1]  # non-contiguous rows
    args = [t.requires_grad_() for t in (x, rule, wl, wr)] + [b.requires_grad_() if bias else None]
    y = phm_linear(*args, backend="reference")
    torch.testing.assert_close(y, phm_linear_formula(*args), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda *a: phm_linear(*a, backend="reference"), tuple(args), eps=1e-6, atol=1e-6)


def test_phm_weight_is_the_kronecker_sum():
    g = torch.Generator().manual_seed(0)
    rule, wl, wr, _ = _factors(g, 2, 3, 2, 1)
    h = phm_weight(rule, wl, wr)
    w = wl @ wr
    # block (a, b) of H is Σᵢ rule[i, a, b] · (W_left[i] @ W_right[i])
    for a in range(2):
        for bb in range(2):
            want = sum(rule[i, a, bb] * w[i] for i in range(2))
            torch.testing.assert_close(h[a * 3 : (a + 1) * 3, bb * 2 : (bb + 1) * 2], want)


@pytest.mark.parametrize("change,match", [
    (dict(rule=torch.zeros(2, 3, 3)), r"rule must be \[n, n, n\]"),
    (dict(w_left=torch.zeros(3, 4, 1)), r"w_left must be \[n=2, in/n, rank\]"),
    (dict(w_right=torch.zeros(2, 2, 3)), r"w_right must be \[n=2, rank=1, out/n\]"),
    (dict(x=torch.zeros(5, 7)), "phm_dim=2 must divide x's last dim 7"),
    (dict(x=torch.zeros(5, 6)), r"x must have last dim in = n·P = 2·4 = 8"),
    (dict(bias=torch.zeros(5)), r"bias must be \[out=6\]"),
    (dict(w_left=torch.zeros(2, 4, 1, dtype=torch.float64)), "w_left has dtype torch.float64 but x has torch.float32"),
    (dict(x=torch.zeros(5, 8, dtype=torch.int64)), "x must be a floating-point tensor"),
])
def test_bad_inputs_name_the_argument(change, match):
    args = dict(x=torch.zeros(5, 8), rule=torch.zeros(2, 2, 2), w_left=torch.zeros(2, 4, 1),
                w_right=torch.zeros(2, 1, 3), bias=torch.zeros(6))
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        phm_linear(**args)
