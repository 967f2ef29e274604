"""Ops: autograd wrappers with input checks and backend dispatch (see peftcore.backends)."""

from .lora import lora_linear

__all__ = ["lora_linear"]
