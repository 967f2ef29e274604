"""LoRA: its config and its injection into models."""

import dataclasses

from ...layers.lora import LoRALinear
from ..base import Method, register_method
from .config import LoRAConfig
from .model import inject_lora


def _to_json(config: LoRAConfig, model, name: str) -> dict:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and name in m.lora_A]
    # Record what the layers are, not what the config left to detection: PEFT reads these keys.
    targets = config.target_modules or sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    cfg = config.to_peft_dict(target_modules=targets)
    cfg["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return cfg


def _from_json(d: dict, source: str) -> LoRAConfig:
    return LoRAConfig.from_peft_dict(d, source=source)


def _for_load(config: LoRAConfig) -> LoRAConfig:
    # Saved weights replace the init: PiSSA must not rewrite the base weights again.
    return dataclasses.replace(config, init="default")


METHOD = register_method(Method("LORA", LoRAConfig, inject_lora, _to_json, _from_json, _for_load))

__all__ = ["LoRAConfig", "inject_lora"]
