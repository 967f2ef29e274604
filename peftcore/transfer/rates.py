"""Layer-wise learning-rate decay (discriminative rates) as plain torch optimizer param groups."""

from __future__ import annotations

from .groups import layer_groups

NO_DECAY = ("bias", "norm", "LayerNorm")


def param_groups(model, lr: float, *, layer_decay: float = 1.0, weight_decay: float = 0.0,
                 no_decay=NO_DECAY, groups=None, adapter_lr: float | None = None, trainable_only: bool = False):
    """Optimizer param groups: layer group i of L (0 = input, L-1 = head) gets
    ``lr * layer_decay ** (L - 1 - i)``; each layer is split into a weight-decay dict and a
    no-decay dict (a parameter whose name contains one of ``no_decay``).  Adapter parameters take
    their layer's rate, or ``adapter_lr``.  Every parameter appears once; ``trainable_only`` drops
    frozen ones (keep them, the default, for gradual unfreezing: a parameter without a gradient
    is skipped by torch's optimizers).  Dicts carry ``name``; any torch scheduler works on them.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    groups = layer_groups(model) if groups is None else groups
    adapters = set()
    if adapter_lr is not None:
        from .groups import _adapter_ids

        adapters = _adapter_ids(model)
    out, L = [], len(groups)
    for i, g in enumerate(groups):
        rate = lr * layer_decay ** (L - 1 - i)
        buckets = {}
        for n, p in g.params:
            if trainable_only and not p.requires_grad:
                continue
            decay = 0.0 if any(k in n for k in no_decay) else weight_decay
            r = adapter_lr if id(p) in adapters else rate
            buckets.setdefault((r, decay), []).append(p)
        for (r, decay), ps in buckets.items():
            out.append({"params": ps, "lr": r, "weight_decay": decay, "name": f"{g.name}{'' if decay else '.no_decay'}"})
    return out
