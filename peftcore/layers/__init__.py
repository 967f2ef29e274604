"""nn.Modules users hold: LoRA layers (adapters, Compacter and prompts arrive in later issues)."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
