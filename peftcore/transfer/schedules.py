"""ULMFiT's slanted triangular learning rate as a torch scheduler (AllenNLP's formula)."""

from __future__ import annotations

import math

import torch


def slanted_triangular(optimizer, total_steps: int, cut_frac: float = 0.1, ratio: float = 32):
    """``LambdaLR`` multiplying each group's base lr by ``(1 + p (ratio - 1)) / ratio`` at step t,
    with ``cut = floor(T cut_frac)``, ``p = t / cut`` before the cut and
    ``1 - (t - cut) / (T - cut)`` after (Howard & Ruder 2018); past T it stays at ``1 / ratio``."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not 0.0 < cut_frac < 1.0:
        raise ValueError(f"cut_frac must be in (0, 1), got {cut_frac!r}")
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio!r}")
    cut = max(1, math.floor(total_steps * cut_frac))

    def factor(t):
        if t < cut:
            p = t / cut
        else:
            p = 1.0 - (t - cut) / max(1, total_steps - cut)
        return (1.0 + max(p, 0.0) * (ratio - 1.0)) / ratio

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
