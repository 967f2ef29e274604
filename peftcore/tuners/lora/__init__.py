"""LoRA: its config and its injection into models."""

from .config import LoRAConfig
from .model import inject_lora

__all__ = ["LoRAConfig", "inject_lora"]
