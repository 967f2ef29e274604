"""Putting key/value prefixes into a transformers model through its attention implementation.

transformers' attention modules compute ``q, k, v`` (after RoPE and after the cache update) and
hand them to the function ``ALL_ATTENTION_FUNCTIONS`` holds under ``config._attn_implementation``
(5.x: ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)``; 4.48-4.5x:
``ALL_ATTENTION_FUNCTIONS[impl]`` unless ``impl == "eager"``).  Prefix tuning registers
``peftcore_prefix_eager`` / ``peftcore_prefix_sdpa`` there (and, from 4.53, the matching mask
builder in ``ALL_MASK_ATTENTION_FUNCTIONS``), points the config at it, and marks every
self-attention module with its layer's row of the prefix.  ``past_key_values`` is never touched:
PEFT's prefix tuning broke on cache API changes (peft#1962) and under gradient checkpointing
(peft#869); here the cache holds only real tokens and the prefix is read inside each layer.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

from ...layers.prompt import SLOT, PrefixEncoder, register_implementations, wrap_config
from .._validate import check_fits
from .config import PrefixTuningConfig
from .prompt import existing_host, find_transformers_model

PREFIX_ATTR = "peftcore_prefix"


@functools.cache
def _uses_interface(cls: type) -> bool:
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


def _is_cross(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "Cross" in type(module).__name__


def _layer_index(path: str, module: nn.Module) -> int:
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, int):
        return idx
    nums = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", path)
    if not nums:
        raise ValueError(f"prefix tuning: cannot tell the layer of attention module {path!r} (no layer_idx)")
    return int(nums[0])


def attention_modules(tm: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(layer index, path, module)`` of the self-attention modules that go through transformers'
    AttentionInterface, by layer."""
    found = []
    for path, m in tm.named_modules():
        if isinstance(m, PrefixEncoder) or not _uses_interface(type(m)) or _is_cross(m):
            continue
        if not hasattr(m, "config"):
            continue
        found.append((_layer_index(path, m), path, m))
    found.sort(key=lambda t: t[0])
    idx = [t[0] for t in found]
    if len(set(idx)) != len(idx):
        dup = next(i for i in idx if idx.count(i) > 1)
        paths = [p for i, p, _ in found if i == dup]
        raise ValueError(f"prefix tuning: several self-attention modules claim layer {dup}: {paths}")
    return found


def _shapes(tm: nn.Module) -> tuple[int, int, int]:
    cfg = tm.config
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(hidden, int):
        raise TypeError(f"prefix tuning: {type(cfg).__name__} lacks num_attention_heads/hidden_size")
    n_kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return n_kv, head_dim, hidden


def _check_size(config: PrefixTuningConfig, layers: int, n_kv: int, head_dim: int, hidden: int, w) -> None:
    """Refuse, before anything is allocated, a prefix whose parameters cannot fit in memory."""
    p, row = config.num_virtual_tokens, layers * 2 * n_kv * head_dim
    if config.projection:
        enc = config.encoder_hidden_size or hidden
        numel = p * hidden + hidden * enc + enc + enc * row + row
    else:
        numel = p * row
    check_fits("PrefixTuningConfig.num_virtual_tokens" + (", encoder_hidden_size" if config.projection else ""),
               numel, 4 if w is None else w.element_size(), None if w is None else w.device)


def inject_prefix_tuning(model: nn.Module, config: PrefixTuningConfig, name: str) -> list[str]:
    """Add prefix ``name`` to ``model``; returns the qualified name of the prefix host.

    The host (:class:`~peftcore.layers.PrefixEncoder`) becomes ``<transformers model>.peftcore_prefix``;
    it hooks the backbone (``model.base_model``) to offset positions by ``p`` and to keep the
    attention implementation wrapped.  Supports decoder-only and encoder-only models with eager or
    sdpa attention; anything else is a clear error, and nothing changes on error.
    """
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"config must be a PrefixTuningConfig, got {type(config).__name__}")
    tm = find_transformers_model(model)
    cfg = getattr(tm, "config", None)
    if cfg is None:
        raise TypeError(f"prefix tuning needs a transformers model with a config, got {type(tm).__name__}")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("prefix tuning supports decoder-only and encoder-only models, not encoder-decoder ones")
    host = existing_host(tm, PREFIX_ATTR, PrefixEncoder, name, "prefix tuning")
    found = attention_modules(tm)
    if not found:
        import transformers

        raise ValueError(
            f"prefix tuning: no attention module of {type(tm).__name__} goes through transformers' "
            f"AttentionInterface (transformers {transformers.__version__}), so there is nowhere to put the prefix"
        )
    backbone = getattr(tm, "base_model", tm)
    if config.position_offset and "position_ids" not in inspect.signature(backbone.forward).parameters:
        raise ValueError(
            f"{type(backbone).__name__}.forward takes no position_ids, so positions cannot be offset by "
            "the prefix: use PrefixTuningConfig(position_offset=False)"
        )
    configs = []
    for _, _, m in found:
        if all(m.config is not c for c in configs):
            configs.append(m.config)
    for c in configs:  # validate before changing anything
        impl = c._attn_implementation
        if impl not in (None, "eager", "sdpa") and not str(impl).startswith("peftcore_prefix_"):
            wrap_config(c)  # raises the error naming the implementation
    n_kv, head_dim, hidden = _shapes(tm)
    _check_size(config, len(found), n_kv, head_dim, hidden, next((p for p in tm.parameters()), None))
    if host is None:
        register_implementations()
        host = PrefixEncoder(len(found), n_kv, head_dim, hidden)
        host.configs = configs
        tm.add_module(PREFIX_ATTR, host)
        for row, (_, _, m) in enumerate(found):
            m.__dict__[SLOT] = (host, row)
        for c in configs:
            wrap_config(c)
        backbone.register_forward_pre_hook(host.pre_forward, with_kwargs=True)
        backbone.register_forward_hook(host.post_forward)
    w = next((p for p in tm.parameters()), None)
    host.add_adapter(name, config.num_virtual_tokens, config.projection, config.encoder_hidden_size,
                     config.position_offset, device=None if w is None else w.device,
                     dtype=None if w is None else w.dtype)
    return [next(n for n, m in model.named_modules() if m is host)]
