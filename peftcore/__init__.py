"""peftcore: a kernel-optimized runtime for transfer learning and parameter-efficient fine-tuning.

    import peftcore as pc
    model = pc.apply(model, pc.LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"]))
    pc.save_adapter(model, "out/"); pc.load_adapter(model, "out/")
    y = pc.ops.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.1)

    pc.apply(model, pc.BottleneckConfig(placement="pfeiffer"), name="lang_en")
    pc.apply(model, pc.CompacterConfig(), name="task")
    pc.set_active(model, pc.Stack("lang_en", "task"))     # MAD-X: task adapter on a language adapter
    with pc.adapter_batch(model, ["a", "b", "a"]): ...   # one LoRA adapter per example

Importing peftcore probes no device, compiles nothing and loads no extension.
"""

import importlib.machinery as _machinery
import sys as _sys
from pathlib import Path as _Path


class _SourceKernelsFinder:
    """Finds ``peftcore.kernels`` in a checkout's top-level ``kernels/`` folder.

    That folder has no ``__init__.py`` so that it can never shadow the PyPI package ``kernels``
    (see kernels/README.md).  A wheel installs its files as ``peftcore/kernels/``, found the usual
    way; a source checkout (the repository root on ``sys.path``) or an editable install has no such
    folder, and setuptools' editable finder only maps packages that have an ``__init__.py``, so this
    finder answers for that one name, with a namespace package over that one folder.
    """

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peftcore.kernels":
            return None
        spec = _machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [self.folder]
        return spec


def _map_source_kernels() -> None:
    here = _Path(__file__).resolve().parent
    src = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (src / "common.py").is_file():
        return
    if not any(isinstance(f, _SourceKernelsFinder) for f in _sys.meta_path):
        _sys.meta_path.append(_SourceKernelsFinder(str(src)))


_map_source_kernels()

from . import distill, integrations, losses, ops, quant  # noqa: E402
from .io import load_adapter, read_adapter, save_adapter
from .layers import LoRALinear
from .integrations import reference_model
from .layers.base import Stack
from .model import (
    active_adapters,
    adapter_batch,
    adapter_configs,
    apply,
    count_parameters,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    set_active,
    train_adapter,
    unmerge,
)
from .tuners.bottleneck import BottleneckConfig, CompacterConfig, CompacterPlusPlusConfig
from .tuners.lora import LoRAConfig
from .quant import NF4Config, quantize
from .tuners.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    extend_prompt_mask,
    prompt_length,
    strip_prompt,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "SaveAdapterCallback":  # imports transformers, so only when asked for
        return integrations.SaveAdapterCallback
    raise AttributeError(f"module 'peftcore' has no attribute {name!r}")

__all__ = [
    "BottleneckConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "LoRAConfig",
    "LoRALinear",
    "NF4Config",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "SaveAdapterCallback",
    "Stack",
    "active_adapters",
    "adapter_batch",
    "adapter_configs",
    "apply",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "distill",
    "extend_prompt_mask",
    "load_adapter",
    "losses",
    "merge",
    "merge_and_unload",
    "integrations",
    "ops",
    "prompt_length",
    "quant",
    "quantize",
    "read_adapter",
    "reference_model",
    "save_adapter",
    "set_active",
    "strip_prompt",
    "train_adapter",
    "unmerge",
]
