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

from . import distill, losses, ops
from .io import load_adapter, read_adapter, save_adapter
from .layers import LoRALinear
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
    set_active,
    train_adapter,
    unmerge,
)
from .tuners.bottleneck import BottleneckConfig, CompacterConfig, CompacterPlusPlusConfig
from .tuners.lora import LoRAConfig
from .tuners.prompt import (
    PrefixTuningConfig,
    PromptTuningConfig,
    extend_prompt_mask,
    prompt_length,
    strip_prompt,
)

__version__ = "0.1.0"

__all__ = [
    "BottleneckConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "LoRAConfig",
    "LoRALinear",
    "PrefixTuningConfig",
    "PromptTuningConfig",
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
    "ops",
    "prompt_length",
    "read_adapter",
    "save_adapter",
    "set_active",
    "strip_prompt",
    "train_adapter",
    "unmerge",
]
