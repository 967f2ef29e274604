"""LoRA: its config and its injection into models."""

import dataclasses

from ...layers.base import AdapterHost
from ...layers.lora import LoRALinear
from ...layers.saved import ModulesToSave
from ..base import Method, register_method
from .config import LoRAConfig
from .model import inject_lora


def _to_json(config: LoRAConfig, model, name: str) -> dict:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and name in m.lora_A]
    # Record what the layers are, not what the config left to detection: PEFT reads these keys.
    targets = config.target_modules or sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    cfg = config.to_peft_dict(target_modules=targets)
    cfg["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    # Likewise the modules that train in full (a head found by task type or model class): PEFT
    # wraps exactly these when it loads the file.
    saved = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave) and name in m.modules_to_save]
    cfg["modules_to_save"] = sorted({n.rsplit(".", 1)[-1] for n in saved}) or None
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return cfg


def _from_json(d: dict, source: str) -> LoRAConfig:
    return LoRAConfig.from_peft_dict(d, source=source)


def _for_load(config: LoRAConfig) -> LoRAConfig:
    # Saved weights replace the init, so a random one is skipped.  PiSSA is not: its init also
    # rewrote the base (W_res = W - s·B₀A₀, the top-r SVD part), and the trained A, B only reproduce
    # the trained model on that residual, so loading re-derives it from the original base, as PEFT
    # does (the SVD is deterministic; a randomized pissa_niter_N one is seeded by torch's generator).
    if config.init.startswith("pissa"):
        return config
    return dataclasses.replace(config, init="default")


def _bias_tensors(model, config: LoRAConfig, name: str) -> dict:
    """PEFT's ``bias``: "lora_only", the base biases of the layers adapter ``name`` wraps; "all",
    every bias parameter of the base model (not those of adapter modules)."""
    if config.bias == "none":
        return {}
    out = {}
    if config.bias == "lora_only":
        for n, m in model.named_modules():
            if isinstance(m, LoRALinear) and name in m.lora_A and m.base_layer.bias is not None:
                out[f"{n}.base_layer.bias"] = m.base_layer.bias
        return out
    adapter_params = set()
    for _, host in model.named_modules():
        if isinstance(host, AdapterHost):
            for a in host.adapter_names():
                adapter_params.update(id(t) for t in host.adapter_tensors(a).values())
    for n, p in model.named_parameters():
        if n.rsplit(".", 1)[-1] == "bias" and id(p) not in adapter_params:
            out[n] = p
    return out


METHOD = register_method(Method("LORA", LoRAConfig, inject_lora, _to_json, _from_json, _for_load, _bias_tensors))

__all__ = ["LoRAConfig", "inject_lora"]
