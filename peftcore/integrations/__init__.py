"""Glue to the libraries users train with: transformers' Trainer and save/load, TRL, accelerate.

* :mod:`peftcore.integrations.transformers`: the adapter-aware ``save_pretrained`` that
  :func:`peftcore.apply` gives a transformers model, :class:`SaveAdapterCallback`, and
  :func:`reference_model` (an adapter-free view sharing the weights: DPO's reference).
"""

from . import transformers as _transformers
from .transformers import reference_model, save_adapters

__all__ = ["SaveAdapterCallback", "reference_model", "save_adapters"]


def __getattr__(name: str):
    if name == "SaveAdapterCallback":  # a TrainerCallback: built when first asked for (imports transformers)
        return _transformers.SaveAdapterCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
