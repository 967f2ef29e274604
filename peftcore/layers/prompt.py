"""Soft prompts and attention prefixes: the adapter hosts of prompt tuning and prefix tuning.

Neither edits model source.  :class:`PromptEmbeddings` is a forward pre-hook on a transformers
model that turns ``input_ids`` into ``inputs_embeds`` with the active prompt in front.
:class:`PrefixEncoder` holds per-layer keys/values that an attention implementation registered in
transformers' ``AttentionInterface`` (``peftcore_prefix_sdpa`` / ``peftcore_prefix_eager``)
prepends to each self-attention layer's keys and values right before the original eager or sdpa
computation.  The prefix never enters the KV cache (so cache API changes cannot break it: every
decode step gets it prepended again) and its parameters are read inside the layer's forward (so
gradient checkpointing's recomputation sees them).
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterHost, check_active

SLOT = "_peftcore_prefix"  # attribute of each wrapped attention module: (host, row)
IMPL_PREFIX = "peftcore_prefix_"
BASE_IMPLS = ("eager", "sdpa")
CACHE_KEYS = ("cache", "past_key_values")  # transformers 5 renamed past_key_values -> cache


# --- forward-argument helpers ---------------------------------------------------------------
def as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``module.forward``'s arguments all by name, so a hook can edit ``model(ids)`` like ``model(input_ids=ids)``."""
    out = dict(kwargs)
    if not args:
        return out
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in kinds]
    if len(args) > len(params):
        raise TypeError(f"{type(module).__name__}.forward takes {len(params)} positional arguments, got {len(args)}")
    for pname, a in zip(params, args):
        if pname in out:
            raise TypeError(f"{type(module).__name__}.forward got multiple values for {pname!r}")
        out[pname] = a
    return out


def cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache passed to a forward (0 without one)."""
    for key in CACHE_KEYS:
        c = kwargs.get(key)
        if c is None:
            continue
        if hasattr(c, "get_seq_length"):
            return int(c.get_seq_length())
        if isinstance(c, (tuple, list)):  # legacy tuple cache (transformers 4.x)
            return int(c[0][0].shape[-2]) if len(c) and c[0] is not None else 0
        raise TypeError(f"{key} must be a transformers Cache or a tuple of (key, value), got {type(c).__name__}")
    return 0


def _query_length(kwargs: dict) -> int:
    x = kwargs.get("input_ids")
    x = kwargs.get("inputs_embeds") if x is None else x
    if x is None:
        raise ValueError("the forward needs input_ids or inputs_embeds")
    return x.shape[1]


def remove_hooks(module: nn.Module, owner: object) -> None:
    """Remove the forward (pre-)hooks of ``module`` that are bound methods of ``owner``.

    Found by identity rather than through stored handles: a handle of a deep-copied model would
    still point at the original's hook dictionaries.
    """
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key, fn in list(hooks.items()):
            if getattr(fn, "__self__", None) is owner:
                del hooks[key]
                for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                              "_forward_hooks_always_called"):
                    getattr(module, extra, {}).pop(key, None)


class _SingleActive(nn.Module, AdapterHost):
    """Shared bookkeeping of hosts where at most one adapter is active."""

    kind = "prompt"

    def __init__(self):
        super().__init__()
        self.active: list[str] = []
        self.disabled = False

    def set_active(self, spec) -> None:
        names = check_active(self, spec)
        if len(names) > 1:
            raise ValueError(f"at most one {self.kind} adapter can be active at a time, got {names}")
        self.active = names

    def current_name(self) -> str | None:
        """The adapter in effect (None when none is active or adapters are disabled)."""
        return None if self.disabled or not self.active else self.active[0]


# --- prompt tuning ------------------------------------------------------------------------------
class PromptEmbeddings(_SingleActive):
    """Soft prompts ``[num_virtual_tokens, hidden]`` by adapter name; one active at a time.

    Installed as a forward pre-hook (with kwargs) on a transformers model.  When the KV cache is
    empty (or absent) the hook embeds ``input_ids`` (or takes ``inputs_embeds``), prepends the
    prompt, and extends ``attention_mask`` with ones, token-level integer ``labels`` with -100,
    ``token_type_ids`` with zeros, and ``position_ids`` (virtual tokens take ``0..p-1``, real ones
    shift by ``p``).  With a filled cache (decoding) the prompt is already cached: only a mask that
    lacks the ``p`` virtual positions is extended and positions are shifted.  Outputs therefore
    have ``p`` extra positions at the front.
    """

    kind = "prompt tuning"

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.prompts = nn.ParameterDict()

    def add_adapter(self, name: str, weight: torch.Tensor) -> None:
        """Add prompt ``name`` initialized to ``weight`` ``[num_virtual_tokens, hidden]`` (copied)."""
        if name in self.prompts:
            raise ValueError(f"prompt tuning adapter {name!r} already exists")
        if weight.dim() != 2 or weight.shape[1] != self.hidden_size:
            raise ValueError(f"prompt must be [num_virtual_tokens, {self.hidden_size}], got {tuple(weight.shape)}")
        self.prompts[name] = nn.Parameter(weight.detach().clone())

    def adapter_names(self) -> list[str]:
        return list(self.prompts.keys())

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.prompts[name]}  # PEFT's key for a saved prompt

    def delete_adapter(self, name: str) -> None:
        del self.prompts[name]
        self.active = [n for n in self.active if n != name]

    def num_virtual_tokens(self) -> int:
        """``p`` of the prompt in effect (0 when none)."""
        name = self.current_name()
        return 0 if name is None else self.prompts[name].shape[0]

    def detach_from(self, model: nn.Module, path: str) -> None:
        parent_name = path.rpartition(".")[0]
        remove_hooks(model.get_submodule(parent_name) if parent_name else model, self)
        super().detach_from(model, path)

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        """The forward pre-hook (``register_forward_pre_hook(..., with_kwargs=True)``)."""
        name = self.current_name()
        if name is None:
            return None
        kw = as_kwargs(module, args, kwargs)
        prompt = self.prompts[name]
        p = prompt.shape[0]
        mask = kw.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"prompt tuning needs a 2-D attention_mask [batch, seq], got shape {tuple(mask.shape)} "
                "(4-D masks, e.g. from compiled/static caches, are not supported)"
            )
        past = cache_length(kw)
        if past == 0:
            self._insert(module, kw, prompt)
        else:
            q = _query_length(kw)
            if mask is not None:
                if mask.shape[1] == past + q - p:
                    kw["attention_mask"] = torch.cat((mask.new_ones(mask.shape[0], p), mask), dim=1)
                elif mask.shape[1] != past + q:
                    raise ValueError(
                        f"attention_mask has {mask.shape[1]} columns; with {past} cached and {q} new tokens "
                        f"it must have {past + q - p} (real tokens only) or {past + q} (with the {p} virtual ones)"
                    )
            for key in ("position_ids", "cache_position"):
                if kw.get(key) is not None:
                    kw[key] = kw[key] + p
        return (), kw

    @staticmethod
    def _insert(module: nn.Module, kw: dict, prompt: torch.Tensor) -> None:
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is not None and embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        if embeds is None:
            if ids is None:
                raise ValueError("prompt tuning needs input_ids or inputs_embeds")
            embeds = module.get_input_embeddings()(ids)
        b, s, p = embeds.shape[0], embeds.shape[1], prompt.shape[0]
        dev = embeds.device
        kw["input_ids"] = None
        kw["inputs_embeds"] = torch.cat((prompt.to(dev, embeds.dtype).expand(b, -1, -1), embeds), dim=1)
        mask = kw.get("attention_mask")
        if mask is not None:
            kw["attention_mask"] = torch.cat((mask.new_ones(b, p), mask), dim=1)
        labels = kw.get("labels")
        # Token-level labels only: sequence-level ([b]) and float multi-label targets stay as they are.
        if labels is not None and labels.dim() == 2 and labels.shape[1] == s and not labels.is_floating_point():
            kw["labels"] = torch.cat((labels.new_full((b, p), -100), labels), dim=1)
        tt = kw.get("token_type_ids")
        if tt is not None:
            kw["token_type_ids"] = torch.cat((tt.new_zeros(tt.shape[0], p), tt), dim=1)
        pos = kw.get("position_ids")
        if pos is not None:
            head = torch.arange(p, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], p)
            kw["position_ids"] = torch.cat((head, pos + p), dim=-1)
        cp = kw.get("cache_position")  # transformers 4.x
        if cp is not None:
            kw["cache_position"] = torch.cat((torch.arange(p, device=cp.device, dtype=cp.dtype), cp + p))


# --- prefix tuning ------------------------------------------------------------------------------
class PrefixProjection(nn.Module):
    """PEFT's reparameterization: ``embedding [p, hidden] -> Linear -> tanh -> Linear`` to
    ``[p, num_layers * 2 * n_kv_heads * head_dim]`` (per token: layer, key/value, head, dim)."""

    def __init__(self, p: int, hidden: int, encoder_hidden: int, out: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(p, hidden, **kw)
        self.transform = nn.Sequential(nn.Linear(hidden, encoder_hidden, **kw), nn.Tanh(),
                                       nn.Linear(encoder_hidden, out, **kw))

    def layer(self, row: int, n_kv: int, head_dim: int) -> torch.Tensor:
        """Keys and values of layer ``row``: ``[2, n_kv, p, head_dim]``.

        Only that layer's rows of the last Linear are computed: each layer runs it inside its own
        forward, which is what lets gradient checkpointing recompute it.
        """
        h = self.transform[1](self.transform[0](self.embedding.weight))
        width = 2 * n_kv * head_dim
        last = self.transform[2]
        out = F.linear(h, last.weight[row * width:(row + 1) * width], last.bias[row * width:(row + 1) * width])
        return out.view(-1, 2, n_kv, head_dim).permute(1, 2, 0, 3)


class PrefixEncoder(_SingleActive):
    """Per-layer key/value prefixes by adapter name; one active at a time.

    A free prefix is one parameter ``[num_layers, 2, n_kv_heads, p, head_dim]`` (GQA: ``n_kv_heads``
    is the model's ``num_key_value_heads``); with ``projection`` it is a :class:`PrefixProjection`.
    Row ``i`` belongs to the ``i``-th self-attention layer.
    """

    kind = "prefix tuning"

    def __init__(self, num_layers: int, n_kv_heads: int, head_dim: int, hidden_size: int):
        super().__init__()
        self.num_layers, self.n_kv_heads = int(num_layers), int(n_kv_heads)
        self.head_dim, self.hidden_size = int(head_dim), int(hidden_size)
        self.prefixes = nn.ParameterDict()
        self.projections = nn.ModuleDict()
        self.offsets: dict[str, bool] = {}
        self.configs: list = []  # the transformers configs whose attention implementation is wrapped
        self.calls = 0  # prefixed attention calls in the running forward (0 means a silent no-op)

    def add_adapter(self, name: str, p: int, projection: bool, encoder_hidden_size: int | None,
                    position_offset: bool, device=None, dtype=None) -> None:
        """Add prefix ``name`` of length ``p``, initialized like PEFT (N(0, 1) embedding)."""
        if name in self.adapter_names():
            raise ValueError(f"prefix tuning adapter {name!r} already exists")
        shape = (self.num_layers, 2, self.n_kv_heads, p, self.head_dim)
        if projection:
            out = self.num_layers * 2 * self.n_kv_heads * self.head_dim
            e = encoder_hidden_size or self.hidden_size
            self.projections[name] = PrefixProjection(p, self.hidden_size, e, out, device=device, dtype=dtype)
        else:
            self.prefixes[name] = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
        self.offsets[name] = bool(position_offset)

    def adapter_names(self) -> list[str]:
        return list(self.prefixes.keys()) + list(self.projections.keys())

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        if name in self.prefixes:
            return {"prefix": self.prefixes[name]}
        return dict(self.projections[name].named_parameters())

    def delete_adapter(self, name: str) -> None:
        if name in self.prefixes:
            del self.prefixes[name]
        else:
            del self.projections[name]
        self.offsets.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def num_virtual_tokens(self) -> int:
        """``p`` of the prefix in effect (0 when none)."""
        name = self.current_name()
        if name is None:
            return 0
        if name in self.prefixes:
            return self.prefixes[name].shape[3]
        return self.projections[name].embedding.num_embeddings

    def layer_kv(self, row: int) -> torch.Tensor | None:
        """Keys and values of layer ``row`` of the prefix in effect: ``[2, n_kv, p, head_dim]``."""
        name = self.current_name()
        if name is None:
            return None
        if name in self.prefixes:
            return self.prefixes[name][row]
        return self.projections[name].layer(row, self.n_kv_heads, self.head_dim)

    # --- hooks on the transformers backbone ---
    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of the backbone: keeps the attention wrapped, shifts positions by ``p``."""
        for config in self.configs:
            wrap_config(config)
        self.calls = 0
        name = self.current_name()
        if name is None:
            return None
        p = self.num_virtual_tokens()
        kw = as_kwargs(module, args, kwargs)
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == cache_length(kw) + _query_length(kw) + p:
            # transformers would quietly cut such a mask to the key length: misaligned padding.
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns, {p} more than the tokens: pass the "
                "attention_mask of the real tokens only (prefix tuning adds the prefix columns itself)"
            )
        if not self.offsets[name]:
            return None
        pos = kw.get("position_ids")
        if pos is not None:
            kw["position_ids"] = pos + p
        elif kw.get("cache_position") is not None:  # transformers 4.x derives positions from it
            kw["position_ids"] = kw["cache_position"].unsqueeze(0) + p
        else:
            x = kw.get("input_ids")
            x = kw.get("inputs_embeds") if x is None else x
            q = _query_length(kw)
            kw["position_ids"] = (torch.arange(q, device=x.device) + cache_length(kw) + p).unsqueeze(0)
        return (), kw

    def post_forward(self, module: nn.Module, args, output):
        if self.current_name() is not None and self.calls == 0:
            raise RuntimeError(
                f"prefix tuning: no attention layer of {type(module).__name__} called transformers' "
                "AttentionInterface in this forward, so the prefix had no effect; this model or "
                "transformers version is not supported"
            )

    def detach_from(self, model: nn.Module, path: str) -> None:
        parent_name = path.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        for m in parent.modules():
            remove_hooks(m, self)
            slot = m.__dict__.get(SLOT)
            if slot is not None and slot[0] is self:
                del m.__dict__[SLOT]
        for config in self.configs:
            impl = config._attn_implementation
            if isinstance(impl, str) and impl.startswith(IMPL_PREFIX):
                config._attn_implementation = impl[len(IMPL_PREFIX):]
        self.configs = []
        super().detach_from(model, path)


# --- the attention implementation ---------------------------------------------------------------
def eager_function(module: nn.Module):
    """The ``eager_attention_forward`` of ``module``'s modeling file (eager is not in the interface)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _original(base: str, module: nn.Module):
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = eager_function(module)
    if fn is None:
        raise RuntimeError(f"prefix tuning: {type(module).__module__} defines no eager_attention_forward")
    return fn


def _extend_mask(mask, base, module, query, kv_len, p, kwargs):
    """The attention mask with ``p`` always-visible prefix columns in front."""
    q_len = query.shape[2]
    if mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        # eager without a mask attends everywhere; sdpa would apply is_causal, which is top-left
        # aligned and so wrong once keys outnumber queries: spell the causal mask out instead.
        if base != "sdpa" or q_len == 1 or not is_causal:
            return None
        past = kv_len - q_len
        dev = query.device
        seen = torch.arange(kv_len, device=dev)[None, :] <= torch.arange(q_len, device=dev)[:, None] + past
        return torch.cat((seen.new_ones(q_len, p), seen), dim=1)[None, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"prefix tuning needs a 4-D attention mask or None, got {type(mask).__name__}")
    if mask.shape[-1] != kv_len:
        raise ValueError(
            f"the attention mask covers {mask.shape[-1]} keys but the layer has {kv_len}: pass the "
            "attention_mask of the real tokens only (prefix tuning adds the prefix columns itself)"
        )
    if mask.dtype == torch.bool:
        head = mask.new_ones(*mask.shape[:-1], p)
    elif mask.is_floating_point():
        head = mask.new_zeros(*mask.shape[:-1], p)
    else:
        raise ValueError(f"attention mask must be bool or floating point, got {mask.dtype}")
    return torch.cat((head, mask), dim=-1)


def _make_attention(base: str):
    def prefix_attention(module, query, key, value, attention_mask, *args, **kwargs):
        fn = _original(base, module)
        slot = module.__dict__.get(SLOT)
        kv = None if slot is None else slot[0].layer_kv(slot[1])
        if kv is None:
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        host = slot[0]
        host.calls += 1
        if key.shape[1] != kv.shape[1] or key.shape[-1] != kv.shape[-1] or value.shape[-1] != kv.shape[-1]:
            raise RuntimeError(
                f"prefix tuning: {type(module).__name__} has keys/values of {key.shape[1]} heads x "
                f"{key.shape[-1]}/{value.shape[-1]} dims, the prefix {kv.shape[1]} x {kv.shape[-1]}"
            )
        b, p, kv_len = key.shape[0], kv.shape[2], key.shape[2]
        kv = kv.to(device=key.device, dtype=key.dtype)
        key = torch.cat((kv[0].unsqueeze(0).expand(b, -1, -1, -1), key), dim=2)
        value = torch.cat((kv[1].unsqueeze(0).expand(b, -1, -1, -1), value), dim=2)
        mask = _extend_mask(attention_mask, base, module, query, kv_len, p, kwargs)
        return fn(module, query, key, value, mask, *args, **kwargs)

    prefix_attention.__name__ = f"{IMPL_PREFIX}{base}"
    return prefix_attention


def register_implementations() -> None:
    """Register ``peftcore_prefix_<eager|sdpa>`` in transformers' attention (and mask) interfaces."""
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        import transformers

        raise ImportError(
            f"prefix tuning needs transformers' AttentionInterface (transformers >= 4.50), "
            f"found transformers {transformers.__version__}"
        ) from e
    try:  # transformers >= 4.53 builds masks through this interface; older ones make 4-D float masks
        from transformers.masking_utils import (
            ALL_MASK_ATTENTION_FUNCTIONS,
            AttentionMaskInterface,
        )
    except ImportError:
        AttentionMaskInterface = None
    for base in BASE_IMPLS:
        name = IMPL_PREFIX + base
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention(base))
        if AttentionMaskInterface is not None and name not in AttentionMaskInterface._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def wrap_config(config) -> None:
    """Point ``config`` at the prefix-aware version of its eager/sdpa implementation."""
    impl = config._attn_implementation
    if isinstance(impl, str) and impl.startswith(IMPL_PREFIX):
        return
    if impl is None:
        impl = "eager"  # what transformers falls back to for a standalone config
    if impl not in BASE_IMPLS:
        raise ValueError(
            f"prefix tuning supports the eager and sdpa attention implementations, this model uses "
            f"{impl!r}: call model.set_attn_implementation('sdpa') first"
        )
    config._attn_implementation = IMPL_PREFIX + impl
