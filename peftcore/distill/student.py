"""Students initialized from their teacher: keep the embeddings and a subset of the layers."""

from __future__ import annotations

import copy

from torch import nn

# attribute names that hold a layer's position in the stack (KV caches and per-layer settings use it)
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index")


def _layer_stack(model: nn.Module, n: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The one ``nn.ModuleList`` of length ``n`` in ``model`` (BERT's ``encoder.layer``, GPT-2's
    ``h``, Llama's ``layers``), as ``(parent, attribute, list)``."""
    found = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                found.append((f"{name}.{child_name}" if name else child_name, mod, child_name, child))
    if len(found) != 1:
        where = ", ".join(f[0] for f in found) or "none"
        raise ValueError(
            f"cannot tell the layer stack: expected exactly one nn.ModuleList of num_hidden_layers={n} "
            f"modules, found {len(found)} ({where})"
        )
    _, parent, attr, stack = found[0]
    return parent, attr, stack


def shrink_encoder(model: nn.Module, layers) -> nn.Module:
    """A copy of ``model`` keeping only the transformer layers ``layers`` (0-based, in that order).

    Everything outside the layer stack (embeddings, final norms, heads) is copied as is; the
    teacher is not modified.  ``config.num_hidden_layers`` (and ``config.layer_types`` when present)
    and each kept layer's ``layer_idx`` follow the new stack.  DistilBERT initializes its student
    this way (every other teacher layer); ``uniform_layer_map`` gives a spread-out choice:

        keep = [t for _, t in uniform_layer_map(2, teacher.config.num_hidden_layers)]
        student = shrink_encoder(teacher, keep)     # 6-layer MiniLM -> layers 2 and 5

    Works for transformers models with one ``nn.ModuleList`` of ``config.num_hidden_layers``
    layers (BERT-, GPT-2- and Llama-style); raises ValueError when it cannot find it.
    """
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ValueError("model must be a transformers model whose config has num_hidden_layers")
    layers = list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer to keep")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"layer index {i!r} out of range for a model with {n} layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat, got {layers}")
    _layer_stack(model, n)  # fail before the copy when the stack cannot be found
    student = copy.deepcopy(model)
    parent, attr, stack = _layer_stack(student, n)
    kept = nn.ModuleList([stack[i] for i in layers])
    for new_idx, layer in enumerate(kept):
        for mod in layer.modules():
            for a in _LAYER_INDEX_ATTRS:
                if isinstance(getattr(mod, a, None), int):
                    setattr(mod, a, new_idx)
    setattr(parent, attr, kept)
    student.config.num_hidden_layers = len(layers)
    types = getattr(student.config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) == n:
        student.config.layer_types = [types[i] for i in layers]
    return student
