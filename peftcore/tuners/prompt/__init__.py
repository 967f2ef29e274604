"""Soft prompt tuning and prefix tuning: configs, injection, and their registration.

Both need a transformers model (one with ``get_input_embeddings``, or a module containing a
``PreTrainedModel``).  Prompt tuning prepends learned embeddings to the input (outputs gain ``p``
positions at the front, so pooling must use :func:`extend_prompt_mask` or drop them with
:func:`strip_prompt`; BERT's own pooler reads position 0, which is now the first virtual token, as
in PEFT); prefix tuning prepends learned keys/values inside every self-attention and leaves output
shapes alone.
"""

import dataclasses

from ..base import Method, dataclass_from_json, dataclass_to_json, register_method
from .config import PrefixTuningConfig, PromptTuningConfig
from .prefix import inject_prefix_tuning
from .prompt import (
    extend_prompt_mask,
    inject_prompt_tuning,
    prompt_length,
    strip_prompt,
)


def _json_methods(peft_type: str, cls: type, inject) -> Method:
    def to_json(config, model, name: str) -> dict:
        return dataclass_to_json(config, peft_type)

    def from_json(d: dict, source: str):
        return dataclass_from_json(cls, d, peft_type, source)

    def for_load(config):
        # Loading overwrites the initialization: do not tokenize init_text (the tokenizer directory
        # may not exist where the adapter is loaded).  Not a field, so a re-save writes the config as is.
        config = dataclasses.replace(config)
        object.__setattr__(config, "_weights_follow", True)
        return config

    return register_method(Method(peft_type, cls, inject, to_json, from_json, for_load))


PROMPT_METHOD = _json_methods("PROMPT_TUNING", PromptTuningConfig, inject_prompt_tuning)
PREFIX_METHOD = _json_methods("PREFIX_TUNING", PrefixTuningConfig, inject_prefix_tuning)

__all__ = [
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "extend_prompt_mask",
    "inject_prefix_tuning",
    "inject_prompt_tuning",
    "prompt_length",
    "strip_prompt",
]
