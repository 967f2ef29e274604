"""Ops: autograd wrappers with input checks and backend dispatch (see peftcore.backends)."""

from .lora import lora_linear
from .lora_mixed import lora_mixed_linear
from .nf4_lora import nf4_lora_linear
from .phm import phm_linear

__all__ = ["lora_linear", "lora_mixed_linear", "nf4_lora_linear", "phm_linear"]
