"""Pure-PyTorch PHM (parameterized hypercomplex multiplication) linear, the layer of Compacter.

With n = phm_dim, P = in/n, Q = out/n and k = the rank of the factorized weights:

    H = Σᵢ kron(rule[i], W_left[i] @ W_right[i])          H: [in, out]
    y = x @ H + bias

rule ``[n, n, n]``, W_left ``[n, P, k]``, W_right ``[n, k, Q]`` (AdapterHub's ``PHMLayer``
convention).  Written out, with x viewed as ``[M, n, P]`` (block a, offset p) and y as
``[M, n, Q]`` (block b, offset q):

    y[m, b, q] = Σ_{i,a,p,r} x[m, a, p] · rule[i, a, b] · W_left[i, p, r] · W_right[i, r, q]

so H never has to exist: contract x with W_left, mix the blocks with the rule, contract with
W_right.  Every backend computes the same intermediates on 2-D views:

``phm_fwd(x, rule, w_left, w_right, bias) -> (y, t)``
    x ``[M, in]`` (last dim contiguous), bias ``[out]`` or None.  Returns y ``[M, out]`` and
    t ``[M, n, n, k]`` with ``t[m, a, i, r] = Σ_p x[m, a, p] · W_left[i, p, r]``, saved for backward.

``phm_bwd(dy, x, t, rule, w_left, w_right, needs) -> (dx, drule, dw_left, dw_right, dbias)``
    dy ``[M, out]``; ``needs`` is a 5-tuple of bools for (x, rule, w_left, w_right, bias); a gradient
    that is not needed is returned as None.  With u = rule-mixed t and du = dy contracted with
    W_right (both ``[M, n, n, k]``, indexed [m, b, i, r]):

        u[m,b,i,r]   = Σ_a rule[i,a,b] t[m,a,i,r]        du[m,b,i,r] = Σ_q dy[m,b,q] W_right[i,r,q]
        dW_right[i,r,q] = Σ_{m,b} u[m,b,i,r] dy[m,b,q]   drule[i,a,b] = Σ_{m,r} t[m,a,i,r] du[m,b,i,r]
        dt[m,a,i,r]  = Σ_b rule[i,a,b] du[m,b,i,r]
        dx[m,a,p]    = Σ_{i,r} dt[m,a,i,r] W_left[i,p,r]  dW_left[i,p,r] = Σ_{m,a} x[m,a,p] dt[m,a,i,r]

Cost: about 2·M·n·k·(in + out) multiply-adds each way instead of M·in·out for a dense layer, so
for Compacter's rank-1 factors the op is bound by reading x and dy, not by arithmetic.
"""

from __future__ import annotations

import torch


def check_factors(rule, w_left, w_right) -> tuple[int, int, int, int]:
    """``(n, P, k, Q)`` of the factors after checking their shapes agree (clear errors otherwise).

    Shared by the op and the backends that check their own inputs."""
    if rule.dim() != 3 or not (rule.shape[0] == rule.shape[1] == rule.shape[2]) or rule.shape[0] < 1:
        raise ValueError(f"rule must be [n, n, n] with n = phm_dim >= 1, got shape {tuple(rule.shape)}")
    n = rule.shape[0]
    if w_left.dim() != 3 or w_left.shape[0] != n or w_left.shape[2] < 1:
        raise ValueError(f"w_left must be [n={n}, in/n, rank], got shape {tuple(w_left.shape)}")
    p, k = w_left.shape[1], w_left.shape[2]
    if w_right.dim() != 3 or w_right.shape[0] != n or w_right.shape[1] != k or w_right.shape[2] < 1:
        raise ValueError(f"w_right must be [n={n}, rank={k}, out/n], got shape {tuple(w_right.shape)}")
    return n, p, k, w_right.shape[2]


def phm_weight(rule: torch.Tensor, w_left: torch.Tensor, w_right: torch.Tensor) -> torch.Tensor:
    """H ``[in, out]`` built the way AdapterHub builds it (n Kronecker products, summed).

    The materializing formula: the oracle of the tests and the baseline of ``bench phm``.
    """
    w = torch.bmm(w_left, w_right)  # [n, P, Q]
    rule = rule.contiguous()  # torch.kron refuses some strided views
    return torch.stack([torch.kron(rule[i], w[i]) for i in range(rule.shape[0])]).sum(0)


def phm_linear_formula(x, rule, w_left, w_right, bias=None):
    """Differentiable closed form ``x @ H + bias`` for tests (autograd through plain ops)."""
    y = x @ phm_weight(rule, w_left, w_right)
    return y if bias is None else y + bias


def phm_fwd(x, rule, w_left, w_right, bias):
    m = x.shape[0]
    n, p, _ = w_left.shape
    q = w_right.shape[2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xv = x.reshape(m, n, p).to(acc)
    t = torch.einsum("map,ipr->mair", xv, w_left.to(acc))
    u = torch.einsum("iab,mair->mbir", rule.to(acc), t)
    y = torch.einsum("mbir,irq->mbq", u, w_right.to(acc)).reshape(m, n * q)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), t.to(x.dtype)


def phm_bwd(dy, x, t, rule, w_left, w_right, needs):
    need_x, need_rule, need_wl, need_wr, need_bias = needs
    m = x.shape[0]
    n, p, _ = w_left.shape
    q = w_right.shape[2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dyv = dy.reshape(m, n, q).to(acc)
    t, rule_a, wl, wr = t.to(acc), rule.to(acc), w_left.to(acc), w_right.to(acc)
    dx = drule = dwl = dwr = dbias = None
    du = torch.einsum("mbq,irq->mbir", dyv, wr)
    if need_wr:
        u = torch.einsum("iab,mair->mbir", rule_a, t)
        dwr = torch.einsum("mbir,mbq->irq", u, dyv).to(w_right.dtype)
    if need_rule:
        drule = torch.einsum("mair,mbir->iab", t, du).to(rule.dtype)
    if need_x or need_wl:
        dt = torch.einsum("iab,mbir->mair", rule_a, du)
        if need_x:
            dx = torch.einsum("mair,ipr->map", dt, wl).reshape(m, n * p).to(x.dtype)
        if need_wl:
            dwl = torch.einsum("map,mair->ipr", x.reshape(m, n, p).to(acc), dt).to(w_left.dtype)
    if need_bias:
        dbias = dy.to(acc).sum(0).to(dy.dtype)
    return dx, drule, dwl, dwr, dbias
