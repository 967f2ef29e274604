"""Configs of soft prompt tuning and prefix tuning (plain dataclasses: every field is JSON)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import _validate as V

PROMPT_INITS = ("random", "text")


def _positive_int(value, field: str, cls: str) -> None:
    try:
        V.integer(cls, field, value)
    except TypeError as e:  # a wrong type is a wrong value here (these configs raise ValueError)
        raise ValueError(str(e)) from None


@dataclass
class PromptTuningConfig:
    """Soft prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` learned embeddings
    ``[num_virtual_tokens, hidden]`` prepended to the input embeddings of every forward.

    Args:
        num_virtual_tokens: length ``p`` of the soft prompt.
        init: ``"random"`` (N(0, 1), like PEFT's embedding) or ``"text"``: the model's own token
            embeddings of ``init_text`` tokenized by ``tokenizer_name_or_path``, repeated or cut
            to ``p`` tokens.
        init_text: the text for ``init="text"``.
        tokenizer_name_or_path: a local tokenizer directory (``AutoTokenizer.from_pretrained``; no
            remote code) for ``init="text"``.

    Outputs gain ``p`` positions at the front (``[b, p + s, ...]``): see
    :func:`peftcore.strip_prompt` and :func:`peftcore.extend_prompt_mask`.
    """

    num_virtual_tokens: int
    init: str = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self):
        _positive_int(self.num_virtual_tokens, "num_virtual_tokens", "PromptTuningConfig")
        if not isinstance(self.init, str) or self.init not in PROMPT_INITS:
            raise ValueError(f"init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise ValueError(f"init='text' needs init_text (a non-empty string), got {self.init_text!r}")
            if not isinstance(self.tokenizer_name_or_path, str) or not self.tokenizer_name_or_path:
                raise ValueError(
                    "init='text' needs tokenizer_name_or_path (a local tokenizer directory), "
                    f"got {self.tokenizer_name_or_path!r}"
                )
        elif self.init_text is not None:
            # Most likely a forgotten init="text": the text would be silently ignored otherwise.
            raise ValueError(f"init_text is only used with init='text', but init={self.init!r}")
        if self.init_text is not None and (not isinstance(self.init_text, str) or len(self.init_text) > 1 << 20):
            raise ValueError(f"init_text must be a string of at most 1 MiB, got {type(self.init_text).__name__}")
        if self.tokenizer_name_or_path is not None and not isinstance(self.tokenizer_name_or_path, str):
            raise ValueError(f"tokenizer_name_or_path must be a string path, got {self.tokenizer_name_or_path!r}")


@dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang 2021): learned keys and values ``[n_kv_heads, p, head_dim]``
    prepended to every self-attention layer's keys and values.

    Args:
        num_virtual_tokens: prefix length ``p``.
        projection: PEFT's reparameterization: an embedding ``[p, hidden]`` through
            ``Linear(hidden, encoder_hidden_size) -> tanh -> Linear(encoder_hidden_size,
            num_layers * 2 * n_kv_heads * head_dim)`` instead of a free tensor
            ``[num_layers, 2, n_kv_heads, p, head_dim]``.
        encoder_hidden_size: width of the projection's hidden layer (default: the model's hidden
            size); only with ``projection=True``.
        position_offset: the real tokens take positions ``p, p + 1, ...`` as if the prefix were
            ``p`` cached tokens (PEFT's and the paper's semantics); False keeps positions from 0.
    """

    num_virtual_tokens: int
    projection: bool = False
    encoder_hidden_size: int | None = None
    position_offset: bool = True

    def __post_init__(self):
        _positive_int(self.num_virtual_tokens, "num_virtual_tokens", "PrefixTuningConfig")
        if not isinstance(self.projection, bool):
            raise TypeError(f"projection must be a bool, got {self.projection!r}")
        if not isinstance(self.position_offset, bool):
            raise TypeError(f"position_offset must be a bool, got {self.position_offset!r}")
        if self.encoder_hidden_size is not None:
            if not self.projection:
                raise ValueError("encoder_hidden_size is only used with projection=True")
            _positive_int(self.encoder_hidden_size, "encoder_hidden_size", "PrefixTuningConfig")
