"""Numerics of the distillation losses at the edges (issue 10, section 5), on every backend.

* Temperatures from 1e-2 to 1e4: every row loss within 1e-4 (relative) of the float64 answer and
  never negative, and the gradient within 1e-4, for forward KL, reverse KL and JSD.  At T = 1e4
  the divergence is ~1e-8 of log V, so a loss formed as a difference of log-normalizers in fp32
  cancels to noise (the reference returned -4.59 here before: 36 of 64 rows negative).
* T -> infinity: T² · D tends to c · Var(t - s) over the vocabulary (c = 1/2 for the KLs,
  β(1 - β)/2 for JSD); at T = 1e6 and 1e8 the kernels must land on that limit (the float64
  formula of the oracle cancels there, the limit does not).
* Non-finite inputs: a row with a NaN or +inf logit or only -inf logits (either side) gives a NaN
  loss and NaN gradient row on every backend, other rows are unaffected, masked rows are never read;
  -inf entries are probabilities of 0; an infinite divergence is +inf.
* Argument checks: temperature <= 0, NaN, ±inf or not a number; memory_budget not a finite
  positive number: ValueError naming the argument.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import peftcore as pc
from peftcore import backends
from peftcore.reference.distill import row_losses

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = ("forward", "reverse", "jsd")
BETA = 0.3


def _available():
    out = []
    for name in ("reference", "cpp", "triton", "cuda"):
        try:
            if backends.select("distill_kl", torch.device(DEV), torch.float32, name) == name:
                out.append(name)
        except Exception:
            pass
    return out


BACKENDS = _available()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: tiny ops on a shared two-core machine otherwise spin in the thread pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(n=24, v=61, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).float()
    t = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).float()
    return s.to(DEV), t.to(DEV)


def _run(s, t, T, kind, backend, upstream=None):
    """Per-row losses [N] and the gradient of Σ upstream · loss w.r.t. s."""
    s = s.detach().clone().requires_grad_()
    loss = pc.losses.distill_kl(s, t, temperature=T, reduction="none", kind=kind, beta=BETA, backend=backend)
    (g,) = torch.autograd.grad(loss, s, grad_outputs=upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), g


def _oracle(s, t, T, kind, upstream):
    """The float64 formula (log-softmax differences, fine in float64 up to T ~ 1e4) and its autograd gradient."""
    s64 = s.detach().double().requires_grad_()
    loss = row_losses(s64, t.double(), T, kind, BETA)
    (g,) = torch.autograd.grad(loss, s64, grad_outputs=upstream.double())
    return loss.detach(), g


TEMPERATURES = (1e-2, 0.3, 1.0, 2.0, 10.0, 1e2, 1e3, 1e4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_rows_match_float64_across_temperatures(backend, kind, T):
    s, t = _logits()
    up = torch.rand(s.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    got, g = _run(s, t, T, kind, backend, up.float().to(DEV))
    want, wg = _oracle(s, t, T, kind, up.to(DEV))
    assert got.dtype == torch.float32
    assert (got >= 0).all(), f"negative row losses: {got[got < 0].tolist()}"
    rel = ((got.double() - want).abs() / want.abs()).max().item()
    assert rel <= 1e-4, f"worst row: relative error {rel:.3g}"
    # The gradient: relative to its norm, with an absolute floor for T = 1e-2, where q and p are
    # one-hot and the gradient is 0 up to rounding: T q (h - Σ q h) at the entry q keeps is a
    # difference of two O(|s - t| / T) numbers, i.e. eps · |s - t| ~ 1e-6 after the factor T.
    err = (g.double() - wg).norm().item()
    bound = 1e-4 * wg.norm().item() + 2e-6
    assert err <= bound, f"gradient: error {err:.3g} > {bound:.3g} (norm {wg.norm().item():.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", (1e6, 1e8))
def test_huge_temperature_reaches_the_logit_matching_limit(backend, kind, T):
    """T² · D -> c · Var(t - s) (population variance over V); the next term is O(|t - s|³ / T)."""
    s, t = _logits(n=8, v=47, scale=2.0)
    got, g = _run(s, t, T, kind, backend)
    diff = (t.double() - s.double())
    var = diff.var(-1, unbiased=False)
    c = 0.5 if kind != "jsd" else BETA * (1 - BETA) / 2
    want = c * var
    assert (got >= 0).all()
    rel = ((got.double() - want).abs() / want).max().item()
    assert rel <= 2e-4, f"worst row vs the T -> inf limit: relative error {rel:.3g}"
    # ∂(T² D)/∂s -> -2c (d - mean d) / V · ... : for the KLs T (q - p) -> -(d - mean d) / V.
    centered = diff - diff.mean(-1, keepdim=True)
    want_g = -2 * c * centered / s.shape[1]
    gerr = ((g.double() - want_g).norm() / want_g.norm()).item()
    assert gerr <= 2e-4, f"gradient vs the T -> inf limit: relative error {gerr:.3g}"


def _edge_batch():
    """Rows: 0 normal, 1 teacher all -inf, 2 teacher NaN, 3 student +inf, 4 student NaN,
    5 student all -inf, 6 teacher with -inf entries (a masked vocabulary), 7 teacher +inf,
    8 teacher = student (D = 0), 9 teacher = student + 1000 (D = 0 up to the inputs' rounding)."""
    s, t = _logits(n=10, v=13, scale=2.0, seed=5)
    s, t = s.clone(), t.clone()
    inf, nan = math.inf, math.nan
    t[1] = -inf
    t[2, 4] = nan
    s[3, 2] = inf
    s[4, 7] = nan
    s[5] = -inf
    t[6, ::3] = -inf
    t[7, 0] = inf
    t[8] = s[8]
    t[9] = s[9] + 1000.0
    return s, t


BAD_ROWS = (1, 2, 3, 4, 5, 7)


def _good_rows(kind):
    # Row 6's teacher has -inf where the student has mass: reverse KL is +inf there (tested below).
    return (0, 8, 9) if kind == "reverse" else (0, 6, 8, 9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_rows_give_nan_and_leave_the_others_alone(backend, kind):
    s, t = _edge_batch()
    T = 2.0
    loss, g = _run(s, t, T, kind, backend)
    for i in BAD_ROWS:
        assert torch.isnan(loss[i]), f"row {i}: loss {loss[i].item()} (a row without a softmax is NaN)"
        assert torch.isnan(g[i]).all(), f"row {i}: gradient not NaN: {g[i].tolist()}"
    good = list(_good_rows(kind))
    if kind == "reverse":
        assert loss[6] == math.inf
    want, wg = _oracle(s[good], t[good], T, kind, torch.ones(len(good), dtype=torch.float64, device=DEV))
    assert torch.isfinite(loss[good]).all() and torch.isfinite(g[good]).all()
    assert (loss[good] >= 0).all()
    # Rows 8 and 9 have D = 0 (up to the fp32 rounding of s + 1000): absolute tolerance there.
    err = (loss[good].double() - want).abs()
    assert (err <= 1e-5 * want.abs() + 1e-5).all(), f"good rows: {loss[good].tolist()} vs {want.tolist()}"
    gerr = (g[good].double() - wg).norm().item()
    assert gerr <= 1e-5 * wg.norm().item() + 1e-6, f"good rows' gradient: error {gerr:.3g}"
    # A reduced loss over a batch holding a bad row is NaN, as torch's would be.
    total = pc.losses.distill_kl(s, t, temperature=T, kind=kind, beta=BETA, backend=backend)
    assert torch.isnan(total)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_masked_rows_are_never_read(backend, kind):
    s, t = _edge_batch()
    mask = torch.zeros(s.shape[0], dtype=torch.bool, device=DEV)
    mask[list(_good_rows(kind))] = True
    sg = s.detach().clone().requires_grad_()
    loss = pc.losses.distill_kl(sg, t, temperature=2.0, kind=kind, beta=BETA, mask=mask, backend=backend)
    loss.backward()
    assert torch.isfinite(loss), f"masked NaN rows leaked into the loss: {loss.item()}"
    assert torch.isfinite(sg.grad).all() and (sg.grad[~mask] == 0).all()
    want = row_losses(s[mask].double(), t[mask].double(), 2.0, kind, BETA).mean()
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_divergence_is_inf(backend):
    """Forward KL with student -inf where the teacher has mass, reverse KL with teacher -inf
    where the student has mass: +inf (the other kinds stay finite on the same rows)."""
    s, t = _logits(n=2, v=9, scale=1.0, seed=7)
    s, t = s.clone(), t.clone()
    s[0, 3] = -math.inf
    t[1, 5] = -math.inf
    fwd = pc.losses.distill_kl(s, t, 2.0, reduction="none", kind="forward", backend=backend)
    rev = pc.losses.distill_kl(s, t, 2.0, reduction="none", kind="reverse", backend=backend)
    jsd = pc.losses.distill_kl(s, t, 2.0, reduction="none", kind="jsd", backend=backend)
    assert fwd[0] == math.inf and math.isfinite(fwd[1])
    assert rev[1] == math.inf and math.isfinite(rev[0])
    assert torch.isfinite(jsd).all()
    for i, kind in ((1, "forward"), (0, "reverse")):
        got = pc.losses.distill_kl(s[i:i + 1], t[i:i + 1], 2.0, reduction="none", kind=kind, backend=backend)
        want = row_losses(s[i:i + 1].double(), t[i:i + 1].double(), 2.0, kind)
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", (1e2, 1e4))
def test_fused_linear_distill_at_large_temperatures(backend, T):
    g = torch.Generator().manual_seed(11)
    hs, ws = torch.randn(9, 8, generator=g), torch.randn(29, 8, generator=g)
    ht, wt = torch.randn(9, 6, generator=g), torch.randn(29, 6, generator=g)
    hs, ws, ht, wt = (x.to(DEV) for x in (hs, ws, ht, wt))
    for kind in KINDS:
        h = hs.clone().requires_grad_()
        loss = pc.losses.fused_linear_distill(h, ws, ht, wt, temperature=T, kind=kind, beta=BETA, chunk_size=4,
                                              backend=backend)
        (gh,) = torch.autograd.grad(loss, h)
        h64 = hs.double().requires_grad_()
        want = row_losses(h64 @ ws.double().t(), (ht.double() @ wt.double().t()), T, kind, BETA).mean()
        (wg,) = torch.autograd.grad(want, h64)
        assert loss.item() >= 0
        assert abs(loss.item() - want.item()) <= 1e-4 * want.item(), f"{kind}: {loss.item()} vs {want.item()}"
        assert (gh.double() - wg).norm() <= 1e-4 * wg.norm()


BAD_T = (0, 0.0, -1.0, math.nan, math.inf, -math.inf, "2", True, None)


@pytest.mark.parametrize("T", BAD_T, ids=repr)
def test_bad_temperature_raises(T):
    s, t = _logits(n=2, v=5)
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got .* \(T must be finite and > 0\)"):
        pc.losses.distill_kl(s, t, temperature=T)
    hs, w = torch.randn(3, 4, device=DEV), torch.randn(7, 4, device=DEV)
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got .* \(T must be finite and > 0\)"):
        pc.losses.fused_linear_distill(hs, w, hs, w, temperature=T)


@pytest.mark.parametrize("budget", (math.inf, math.nan, 0, -5.0, "1e6", True), ids=repr)
def test_bad_memory_budget_raises(budget):
    hs, w = torch.randn(3, 4, device=DEV), torch.randn(7, 4, device=DEV)
    with pytest.raises(ValueError, match=r"memory_budget must be a finite positive number of bytes or None"):
        pc.losses.fused_linear_distill(hs, w, hs, w, memory_budget=budget)


def test_good_memory_budgets_still_work():
    hs, w = torch.randn(5, 4, device=DEV), torch.randn(7, 4, device=DEV)
    a = pc.losses.fused_linear_distill(hs, w, hs + 0.1, w, memory_budget=1.5e9)
    b = pc.losses.fused_linear_distill(hs, w, hs + 0.1, w, memory_budget=64)  # one row per chunk
    assert torch.isfinite(a) and abs(a.item() - b.item()) <= 1e-6 * abs(a.item()) + 1e-9


def test_every_backend_here_is_covered():
    assert "reference" in BACKENDS
    if DEV == "cpu":
        from peftcore import native

        if native.unavailable_reason() is None:
            assert "cpp" in BACKENDS
