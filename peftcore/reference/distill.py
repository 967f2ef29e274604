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

Math is fp32 (fp64 for fp64 inputs) whatever the input dtype.
"""

from __future__ import annotations

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


def distill_fwd(s, t, temperature, kind, beta, row_weight, need_grad):
    """Reference backend: row losses and the weighted gradient in closed form."""
    T = float(temperature)
    ls, lt = _log_softmax(s, T), _log_softmax(t, T)
    q, p = ls.exp(), lt.exp()
    w = row_weight.to(ls.dtype)
    live = w != 0
    if kind == "forward":
        loss = _xlogy_ratio(lt, ls).sum(-1)
        g = q - p  # ∂KL(p‖q)/∂(s/T)
    elif kind == "reverse":
        elem = _xlogy_ratio(ls, lt)
        loss = elem.sum(-1)
        ratio = torch.where(q > 0, ls - lt, torch.zeros_like(ls))
        g = q * (ratio - loss[:, None])
    elif kind == "jsd":
        lm = torch.logsumexp(
            torch.stack([lt + torch.log(torch.tensor(beta, dtype=ls.dtype)), ls + torch.log(torch.tensor(1 - beta, dtype=ls.dtype))]),
            dim=0,
        )
        loss = beta * _xlogy_ratio(lt, lm).sum(-1) + (1 - beta) * _xlogy_ratio(ls, lm).sum(-1)
        h = (1 - beta) * torch.where(q > 0, ls - lm, torch.zeros_like(ls))  # ∂L/∂q
        g = q * (h - (q * h).sum(-1, keepdim=True))
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    loss_rows = torch.where(live, loss * T * T, torch.zeros_like(loss))  # fp32 (fp64 for fp64 inputs)
    grad = None
    if need_grad:
        # d(T² · L)/ds = T² · (1/T) · dL/d(s/T) = T · g
        grad = torch.where(live[:, None], g * (T * w[:, None]), torch.zeros_like(g)).to(s.dtype)
    return loss_rows, grad
