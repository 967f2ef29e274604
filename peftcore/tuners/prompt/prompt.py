"""Putting soft prompts into a transformers model: a forward pre-hook, no source edits."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...layers.prompt import PromptEmbeddings
from .._validate import check_fits
from .config import PromptTuningConfig

PROMPT_ATTR = "peftcore_prompt"  # where the PromptEmbeddings host lives on the transformers model


def find_transformers_model(model: nn.Module) -> nn.Module:
    """The module whose forward takes ``input_ids``: ``model`` itself if it has
    ``get_input_embeddings``, else the outermost transformers ``PreTrainedModel`` inside it."""
    if callable(getattr(model, "get_input_embeddings", None)):
        return model
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a test dependency
        PreTrainedModel = ()
    for m in model.modules():
        if PreTrainedModel and isinstance(m, PreTrainedModel):
            return m
    raise TypeError(
        f"{type(model).__name__} is not a transformers model and contains none (prompt and prefix "
        "tuning need a module with get_input_embeddings())"
    )


def _input_embeddings(tm: nn.Module) -> nn.Module:
    emb = tm.get_input_embeddings()
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
        raise TypeError(f"{type(tm).__name__}.get_input_embeddings() must return an embedding with a 2-D weight")
    return emb


def text_init(config: PromptTuningConfig, emb: nn.Module) -> torch.Tensor:
    """The embeddings of ``config.init_text``'s tokens, repeated or cut to ``num_virtual_tokens``:
    ``[num_virtual_tokens, hidden]`` (PEFT's text initialization)."""
    from transformers import AutoTokenizer

    try:
        # A local directory only, never remote code: a saved config must not run code on load.
        tok = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, trust_remote_code=False)
    except Exception as e:
        raise ValueError(
            f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} could not be loaded as a tokenizer: {e}"
        ) from e
    ids = list(tok(config.init_text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text={config.init_text!r} tokenizes to no tokens")
    p = config.num_virtual_tokens
    ids = (ids * math.ceil(p / len(ids)))[:p]
    vocab = emb.weight.shape[0]
    if max(ids) >= vocab:
        raise ValueError(
            f"tokenizer {config.tokenizer_name_or_path!r} gives token id {max(ids)} but the model's "
            f"embedding has {vocab} rows: the tokenizer does not belong to this model"
        )
    with torch.no_grad():
        return emb(torch.tensor(ids, dtype=torch.long, device=emb.weight.device)).detach()


def inject_prompt_tuning(model: nn.Module, config: PromptTuningConfig, name: str) -> list[str]:
    """Add soft prompt ``name`` to ``model``; returns the qualified name of the prompt host.

    The host (:class:`~peftcore.layers.PromptEmbeddings`) becomes ``<transformers model>.peftcore_prompt``
    and hooks the transformers model's forward (see :func:`find_transformers_model`).  Nothing
    changes on error.
    """
    if not isinstance(config, PromptTuningConfig):
        raise TypeError(f"config must be a PromptTuningConfig, got {type(config).__name__}")
    tm = find_transformers_model(model)
    emb = _input_embeddings(tm)
    hidden = emb.weight.shape[1]
    host = existing_host(tm, PROMPT_ATTR, PromptEmbeddings, name, "prompt tuning")
    p = config.num_virtual_tokens
    # The init tensor and the parameter copied from it: twice p x hidden.
    check_fits("PromptTuningConfig.num_virtual_tokens", 2 * p * hidden, emb.weight.element_size(), emb.weight.device)
    # Saved weights replace the initialization on load: skip the tokenizer there (see _from_json).
    if config.init == "text" and not getattr(config, "_weights_follow", False):
        weight = text_init(config, emb)
    else:
        weight = torch.randn(p, hidden, device=emb.weight.device, dtype=emb.weight.dtype)
    if host is None:
        host = PromptEmbeddings(hidden)
        tm.add_module(PROMPT_ATTR, host)
        tm.register_forward_pre_hook(host.pre_forward, with_kwargs=True)
    host.add_adapter(name, weight.to(emb.weight.dtype))
    return [_path(model, host)]


def existing_host(tm: nn.Module, attr: str, cls: type, name: str, method: str):
    """The ``cls`` host already at ``tm.<attr>`` (None if there is none), refusing a second ``name``."""
    host = getattr(tm, attr, None)
    if host is not None:
        if not isinstance(host, cls):
            raise TypeError(f"{type(tm).__name__}.{attr} exists and is not a {cls.__name__}")
        if name in host.adapter_names():
            raise ValueError(f"{method} adapter {name!r} already exists")
    return host


def _path(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _prompt_hosts(model: nn.Module) -> list[PromptEmbeddings]:
    return [m for m in model.modules() if isinstance(m, PromptEmbeddings)]


def prompt_length(model: nn.Module) -> int:
    """Virtual tokens the active soft prompt puts in front of every sequence (0: none active)."""
    return sum(h.num_virtual_tokens() for h in _prompt_hosts(model))


def extend_prompt_mask(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """``attention_mask`` ``[b, s]`` with ones for the active prompt's ``p`` virtual tokens in
    front: ``[b, p + s]``, aligned with the model's outputs (for pooling over its sequence output)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    p = prompt_length(model)
    return torch.cat((attention_mask.new_ones(attention_mask.shape[0], p), attention_mask), dim=1)


def strip_prompt(model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """An output ``[b, p + s, ...]`` without the active prompt's ``p`` virtual positions: ``[b, s, ...]``."""
    p = prompt_length(model)
    if hidden_states.dim() < 2 or hidden_states.shape[1] < p:
        raise ValueError(f"expected [batch, {p} + seq, ...], got shape {tuple(hidden_states.shape)}")
    return hidden_states[:, p:]
