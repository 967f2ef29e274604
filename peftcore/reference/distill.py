"""Pure-PyTorch soft-label distillation losses: the CPU fallback and the oracle of the tests.

Per row ``i`` of 2-D logits ``[N, V]``, with ``p = softmax(t / T)`` (teacher) and
``q = softmax(s / T)`` (student):

* ``forward``  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)     (Hinton's soft-label loss)
* ``reverse``  KL(q ‖ p)
* ``jsd``      β · KL(p ‖ m) + (1 − β) · KL(q ‖ m),  m = β p + (1 − β) q,  0 < β < 1
  (the generalized JSD of GKD, with TRL's convention: β weighs the teacher)

The row loss is multiplied by ``T²`` so that gradient magnitudes do not shrink with the
temperature (Hinton et al. 2015).  Teacher entries at −inf (a masked vocabulary) have p = 0 and
contribute nothing.

Every distill backend exposes ``distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad)
-> (loss_rows, grad)`` on 2-D views:

* ``s``, ``t``: ``[N, V]``, same dtype (fp32/fp16/bf16; fp64 on the reference), unit column stride.
* ``row_weight``: fp32 ``[N]``; the weight of each row in the reduction (0 for masked rows).
* ``loss_rows``: fp32 (fp64 for fp64 inputs) ``[N]``, ``T² · KL_i`` (0 where ``row_weight`` is 0).
* ``grad``: ``row_weight[i] · ∂loss_rows[i]/∂s[i]`` in s's dtype, or None unless ``need_grad``.

Math is fp32 (fp64 for fp64 inputs) whatever the input dtype, row sums fp64.

Numerics (every backend computes the same formulas, see :func:`distill_terms`): the loss is a sum
of non-negative per-element terms formed from r = log p − log q, itself formed without subtracting
two O(log V) log-normalizers, so it is never negative and keeps its relative accuracy at any
temperature (at T = 1e4 the divergence is ~1e-8 of log V).  A row holding a NaN or +inf logit, or
only -inf logits, in either input has no softmax: its loss and its gradient row are NaN (as
torch's log_softmax would make them), on every backend.  -inf entries elsewhere are probabilities
of 0; a divergence that is infinite (forward KL where the student has -inf and the teacher mass,
reverse KL the other way round) is +inf.
"""

from __future__ import annotations

import math

import torch

KINDS = ("forward", "reverse", "jsd")


def _log_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    x = x.double() if x.dtype == torch.float64 else x.float()
    return torch.log_softmax(x / temperature, dim=-1)


def _xlogy_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p · (log p − log q) elementwise, with 0 where p == 0 (including log p == −inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def row_losses(s: torch.Tensor, t: torch.Tensor, temperature: float, kind: str = "forward", beta: float = 0.5):
    """Differentiable ``T² · divergence`` per row (fp32 or fp64), via autograd-friendly ops."""
    ls, lt = _log_softmax(s, temperature), _log_softmax(t, temperature)
    if kind == "forward":
        d = _xlogy_ratio(lt, ls).sum(-1)
    elif kind == "reverse":
        d = _xlogy_ratio(ls, lt).sum(-1)
    elif kind == "jsd":
        b = torch.tensor(beta, dtype=ls.dtype)
        lm = torch.logsumexp(torch.stack([lt + b.log(), ls + (1 - b).log()]), dim=0)
        d = beta * _xlogy_ratio(lt, lm).sum(-1) + (1 - beta) * _xlogy_ratio(ls, lm).sum(-1)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return d * temperature**2


# |r| at or below which the per-element terms use series (no cancellation), above it closed forms:
# the series (to x⁸) is exact to fp32 rounding up to 0.5; in fp64 math it is used up to 1e-2, where
# its truncation is < 1e-19 and the closed forms lose at most ~1e-12 to cancellation.
SERIES_MAX = 0.5
SERIES_MAX_F64 = 1e-2


def _series_max(dtype: torch.dtype) -> float:
    return SERIES_MAX_F64 if dtype == torch.float64 else SERIES_MAX


def _p_series(x: torch.Tensor):
    """(P(x), P(-x)) with P(x) = eˣ − 1 − x = x²/2 + x³/6 + … (to x⁸: < 1 ulp of fp32 for |x| <= 0.5),
    from one even and one odd part."""
    y = x * x
    even = y * (0.5 + y * (1 / 24 + y * (1 / 720 + y * (1 / 40320))))
    odd = x * y * (1 / 6 + y * (1 / 120 + y * (1 / 5040)))
    return even + odd, even - odd


def _row_stats(s, t, T):
    """Per row: log q, log p, r = log p − log q (formed without the difference of two log-normalizers)
    and which rows are valid.  Math in fp32 (fp64 for fp64 inputs); row sums in fp64.

    With xs = (s − max s)/T, xt likewise, Zs = Σ e^xs, Zt = Σ e^xt and u = xt − xs:
    r = u − log(Zt/Zs), and Zt/Zs = 1 + Y/Zs with Y = Σ (e^xt − e^xs) summed as e^xs · expm1(u) where
    |u| is small.  At a large T every u is O(1/T) and log(Zt/Zs) is then known to a relative
    precision of r itself, which the gradients need (their size is O(1/T)).
    """
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    s, t = s.to(acc), t.to(acc)
    xs = (s - s.amax(-1, keepdim=True)) / T
    xt = (t - t.amax(-1, keepdim=True)) / T
    es, et = xs.exp(), xt.exp()
    u = xt - xs
    small = u.abs() <= _series_max(acc)
    pu, _ = _p_series(torch.where(small, u, torch.zeros_like(u)))
    y_terms = torch.where(small, es * (u + pu), et - es)
    zs = es.sum(-1, keepdim=True, dtype=torch.float64)
    zt = et.sum(-1, keepdim=True, dtype=torch.float64)
    y = y_terms.sum(-1, keepdim=True, dtype=torch.float64)
    # A row with a NaN or +inf logit, or only -inf ones, has no softmax: Z is NaN or 0 there.
    valid = (zs >= 1) & (zs < float("inf")) & (zt >= 1) & (zt < float("inf"))
    log_ratio = torch.log1p(y / zs)
    lq = xs - zs.log().to(acc)
    lp = xt - zt.log().to(acc)
    hi = log_ratio.to(acc)
    r = (u - hi) - (log_ratio - hi.double()).to(acc)  # hi + lo: the rounding of log(Zt/Zs) kept
    return lq, lp, r, valid.squeeze(-1)


def distill_terms(s, t, temperature, kind, beta):
    """Per row ``(divergence [N], ∂divergence/∂(s/T) [N, V], valid [N])`` in fp32 (fp64 for fp64).

    Each divergence is a sum of non-negative terms, none of them a difference of O(1) quantities:
    with r = log p − log q and ψ(x) = x + e⁻ˣ − 1 >= 0,

    * forward  KL(p‖q) = Σ p ψ(r)                  (Σ p e⁻ʳ = Σ q = 1)
    * reverse  KL(q‖p) = Σ q ψ(−r)
    * jsd      β Σ p ψ(A) + (1 − β) Σ q ψ(B),  A = log p − log m = −log1p((1−β) expm1(−r)),
      B = log q − log m = −log1p(β expm1(r))

    ψ, expm1 and the gradients ``q − p = −q expm1(r)`` use series where |r| <= 0.5 (1e-2 in fp64
    math) and the closed
    forms (p ψ(r) = p r + q − p, …, whose limit where p = 0 is q) elsewhere, so the loss is accurate (and never negative) at any T: at a
    large T it is O(1/T²) while log p and log q are O(log V).  Invalid rows (a NaN or +inf logit,
    or every logit -inf, in either input) give NaN.
    """
    T = float(temperature)
    lq, lp, r, valid = _row_stats(s, t, T)
    q, p = lq.exp(), lp.exp()
    small = r.abs() <= _series_max(r.dtype)
    rs = torch.where(small, r, torch.zeros_like(r))
    p_pos, p_neg = _p_series(rs)  # P(r), P(-r)
    zero = torch.zeros_like(r)
    if kind == "forward":
        term = torch.where(small, p * p_neg, p * r + (q - p))
        loss = torch.where(p > 0, term, q).sum(-1)  # p ψ(r) = p r + q − p -> q as p -> 0
        g = torch.where(small, -q * (rs + p_pos), q - p)
    elif kind == "reverse":
        term = torch.where(small, q * p_pos, (p - q) - q * r)
        loss = torch.where(q > 0, term, p).sum(-1)
        g = torch.where(q > 0, q * (-r - loss[:, None]), zero)
    elif kind == "jsd":
        b = beta
        # small |r|: A and B from expm1 and log1p (both O(r)), ψ by the series (|A|, |B| <= |r|)
        a_small = -torch.log1p((1 - b) * (p_neg - rs))
        b_small = -torch.log1p(b * (p_pos + rs))
        # large |r|: log m as a logaddexp of log p + log β and log q + log(1 − β)
        lm = torch.logaddexp(lp + math.log(b), lq + math.log1p(-b))
        a_big, b_big = lp - lm, lq - lm
        a_ = torch.where(small, a_small, a_big)
        b_ = torch.where(small, b_small, b_big)
        _, psi_a = _p_series(torch.where(small, a_, zero))
        _, psi_b = _p_series(torch.where(small, b_, zero))
        tp = torch.where(small, p * psi_a, p * a_big + (1 - b) * (q - p))
        tq = torch.where(small, q * psi_b, q * b_big + b * (p - q))
        kl_pm = torch.where(p > 0, tp, (1 - b) * q).sum(-1)  # p ψ(A) = p A + m − p -> m as p -> 0
        kl_qm = torch.where(q > 0, tq, b * p).sum(-1)
        loss = b * kl_pm + (1 - b) * kl_qm
        g = torch.where(q > 0, (1 - b) * q * (b_ - kl_qm[:, None]), zero)  # q (h − Σ q h), h = (1−β) B
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    nan = torch.full_like(loss, float("nan"))
    loss = torch.where(valid, loss, nan)
    g = torch.where(valid[:, None], g, nan[:, None])
    return loss, g, valid


def distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad):
    """Reference backend: row losses and the weighted gradient (see :func:`distill_terms`)."""
    T = float(temperature)
    loss, g, _ = distill_terms(s, t, T, kind, beta)
    w = row_weight.to(loss.dtype)
    live = w != 0
    # T² · divergence, T² taken in float64 (no overflow of a huge T² in fp32 before the product)
    loss_rows = torch.where(live, (loss.double() * (T * T)).to(loss.dtype), torch.zeros_like(loss))
    grad = None
    if need_grad:
        # d(T² · L)/ds = T² · (1/T) · dL/d(s/T) = T · g
        grad = torch.where(live[:, None], g * (T * w[:, None]), torch.zeros_like(g)).to(s.dtype)
    return loss_rows, grad
