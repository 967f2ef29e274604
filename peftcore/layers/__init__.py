"""nn.Modules users hold: LoRA layers, bottleneck / Compacter adapters, prompt and prefix encoders."""

from .base import AdapterHost, Stack
from .bottleneck import BottleneckAdapter, BottleneckSlot, PHMLinear, PHMRuleBank
from .lora import LoRALinear
from .prompt import PrefixEncoder, PrefixProjection, PromptEmbeddings
from .saved import ModulesToSave

__all__ = [
    "AdapterHost",
    "BottleneckAdapter",
    "BottleneckSlot",
    "LoRALinear",
    "ModulesToSave",
    "PHMLinear",
    "PHMRuleBank",
    "PrefixEncoder",
    "PrefixProjection",
    "PromptEmbeddings",
    "Stack",
]
