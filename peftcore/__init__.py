"""peftcore: a kernel-optimized runtime for transfer learning and parameter-efficient fine-tuning.

    import peftcore as pc
    model = pc.apply(model, pc.LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "v_proj"]))
    pc.save_adapter(model, "out/"); pc.load_adapter(model, "out/")
    y = pc.ops.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.1)

Importing peftcore probes no device, compiles nothing and loads no extension.
"""

from . import distill, losses, ops
from .io import load_adapter, read_adapter, save_adapter
from .layers import LoRALinear
from .model import (
    active_adapters,
    adapter_configs,
    apply,
    count_parameters,
    delete_adapter,
    disable_adapters,
    merge,
    set_active,
    unmerge,
)
from .tuners.lora import LoRAConfig

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "active_adapters",
    "adapter_configs",
    "apply",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "distill",
    "load_adapter",
    "losses",
    "merge",
    "ops",
    "read_adapter",
    "save_adapter",
    "set_active",
    "unmerge",
]
