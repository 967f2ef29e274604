"""Layer groups from the input to the head, and fastai's ``freeze_to``.

``layer_groups(model)``: ``[input group, block 0, ..., block L-1, head group]``.  The blocks are the
longest ``nn.ModuleList`` of modules of one class (BERT/RoBERTa ``encoder.layer``, DistilBERT
``transformer.layer``, Llama/Mistral/Qwen2 ``model.layers``, GPT-2 ``transformer.h``), or the
matches of ``pattern`` (a regex whose first group is the block index).  Parameters registered
before the first block (embeddings, prompt embeddings) form the input group; everything after the
last block (final norm, pooler, classifier/score/lm_head, a wrapper's own head) forms the head
group.  Tied weights appear once (``named_parameters`` deduplicates: GPT-2's ``lm_head`` tied to
``wte`` is in the input group).  Adapter parameters fall into the group of the block they sit in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass
class LayerGroup:
    """One group: ``name`` ("embeddings", the block's module path, or "head") and its parameters."""

    name: str
    params: list = field(default_factory=list)  # [(qualified name, nn.Parameter)]

    def parameters(self):
        return [p for _, p in self.params]


def _blocks(model: nn.Module):
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    return best


def layer_groups(model: nn.Module, *, pattern: str | None = None) -> list[LayerGroup]:
    """The parameters of ``model`` in groups from the input to the head (see the module docstring).

    Raises ValueError naming ``pattern`` when the model has no block list and no pattern is given,
    or when the pattern matches no parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if pattern is not None:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None
        if rx.groups < 1:
            raise ValueError(f"pattern {pattern!r} needs a capture group giving the block index")
        index = {}
        for n, _ in named:
            m = rx.search(n)
            if m:
                index[n] = int(m.group(1))
        if not index:
            raise ValueError(f"pattern {pattern!r} matches no parameter name")
        order = sorted(set(index.values()))
        names = {i: f"block.{i}" for i in order}
        block_of = {n: order.index(i) for n, i in index.items()}
    else:
        found = _blocks(model)
        if found is None:
            raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks; pass pattern= (a regex whose "
                             r"first group is the block index, e.g. r'encoder\.layer\.(\d+)\.')")
        prefix, blocks = found
        ids = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
        block_of = {n: ids[id(p)] for n, p in named if id(p) in ids}
        names = {i: f"{prefix}.{i}" if prefix else str(i) for i in range(len(blocks))}
        order = list(range(len(blocks)))
    groups = [LayerGroup("embeddings")] + [LayerGroup(names[i] if pattern is None else names[order[i]])
                                           for i in range(len(order))] + [LayerGroup("head")]
    seen_block = False
    for n, p in named:
        if n in block_of:
            groups[1 + block_of[n]].params.append((n, p))
            seen_block = True
        else:
            groups[-1 if seen_block else 0].params.append((n, p))
    return groups


def _norm_params(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, NORMS) or "RMSNorm" in type(m).__name__
            for p in m.parameters(recurse=False)}


def freeze_to(model: nn.Module, n: int, *, groups: list[LayerGroup] | None = None, train_norm: bool = False,
              params: str = "all") -> list[LayerGroup]:
    """Freeze ``groups[:n]`` and unfreeze ``groups[n:]`` (fastai): ``n = -1`` trains only the head
    group, ``0`` everything; negative n counts from the top.  Returns the groups.

    Norms: a LayerNorm/RMSNorm/BatchNorm parameter follows its group; ``train_norm=True`` keeps
    every norm parameter trainable in frozen groups too (fastai's ``train_bn``).  Freezing sets
    ``requires_grad`` only: a BatchNorm in a frozen group still updates its running statistics in
    ``train()`` mode (put it in eval mode to stop that).
    ``params``: ``"all"``, ``"base"`` (leave adapter parameters as they are) or ``"adapters"``
    (touch only adapter parameters: LoRA + gradual unfreezing of the adapters).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if params not in ("all", "base", "adapters"):
        raise ValueError(f"params must be 'all', 'base' or 'adapters', got {params!r}")
    groups = layer_groups(model) if groups is None else groups
    if abs(n) > len(groups):
        raise ValueError(f"n={n}: the model has {len(groups)} layer groups")
    cut = n if n >= 0 else len(groups) + n
    norms = _norm_params(model) if train_norm else set()
    adapter_ids = _adapter_ids(model) if params != "all" else set()
    for i, g in enumerate(groups):
        for _, p in g.params:
            if params == "base" and id(p) in adapter_ids or params == "adapters" and id(p) not in adapter_ids:
                continue
            p.requires_grad_(i >= cut or id(p) in norms)
    return groups


def _adapter_ids(model: nn.Module) -> set[int]:
    from ..layers.base import AdapterHost

    ids = set()
    for m in model.modules():
        if isinstance(m, AdapterHost):
            base = {id(p) for n, p in m.named_parameters() if n.startswith("base_layer.")}
            ids |= {id(p) for p in m.parameters() if id(p) not in base}
    return ids
