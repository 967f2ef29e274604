"""Saving and loading adapters in Hugging Face PEFT's layout.

A directory holds ``adapter_config.json`` (PEFT's keys) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, so ``peft.PeftModel.from_pretrained``
reads what peftcore writes and :func:`load_adapter` reads what PEFT writes.  Each file is written
to a temporary file beside it, flushed and fsynced, then renamed over the target: a reader sees the
old file or the new one, never half of one.  Loading reads safetensors only (no pickle), and checks
every key and shape before any weight changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .model import adapter_configs, apply, lora_layers
from .tuners.lora import LoRAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of adapter ``name`` (contiguous CPU copies)."""
    out = {}
    for mod_name, layer in lora_layers(model):
        if name in layer.lora_A:
            for part in ("lora_A", "lora_B"):
                w = getattr(layer, part)[name].weight
                out[f"{PREFIX}{mod_name}.{part}.weight"] = w.detach().to("cpu").contiguous().clone()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the only adapter, or ``"default"``) to directory ``path``.

    Returns the directory.  Creates it if needed; replaces an adapter already there atomically,
    file by file (weights first, then the config that names them).
    """
    from safetensors.torch import save

    configs = adapter_configs(model)
    if not configs:
        raise ValueError("model has no peftcore adapter to save: call peftcore.apply first")
    if name is None:
        name = next(iter(configs)) if len(configs) == 1 else "default"
    if name not in configs:
        raise KeyError(f"model has no adapter named {name!r} (has {sorted(configs)})")
    config = configs[name]
    tensors = adapter_state_dict(model, name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.lora_A]
    # Record what the layers are, not what the config left to detection: PEFT reads these keys.
    targets = config.target_modules or sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
    cfg = config.to_peft_dict(target_modules=targets)
    cfg["fan_in_fan_out"] = any(layer.fan_in_fan_out for _, layer in layers)
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    payload = save(tensors, metadata={"format": "pt"})
    _atomic_write(path / WEIGHTS_NAME, lambda f: f.write(payload))
    text = json.dumps(cfg, indent=2, sort_keys=True).encode()
    _atomic_write(path / CONFIG_NAME, lambda f: f.write(text))
    return path


def read_adapter(path: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory without touching any model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter path {str(path)!r} is not a directory")
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: an adapter directory holds {CONFIG_NAME}")
    if not w_file.is_file():
        pickled = [p.name for p in path.glob("adapter_model.bin")]
        hint = " (adapter_model.bin is a pickle: peftcore loads safetensors only)" if pickled else ""
        raise FileNotFoundError(f"{w_file} not found{hint}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
    config = LoRAConfig.from_peft_dict(raw, source=str(cfg_file))
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_file} is not a valid safetensors file: {e}") from e
    return config, tensors


def _match_keys(model: nn.Module, name: str, tensors: dict, source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = dict(lora_layers(model))
    pairs, seen = [], set()
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{source}: key {key!r} does not start with {PREFIX!r} (PEFT's layout)")
        rest = key[len(PREFIX):]
        # PEFT may keep the adapter name in the key (".lora_A.<name>.weight"); accept both.
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.{name}.weight"):
                if rest.endswith(suffix):
                    mod = rest[: -len(suffix)]
                    break
            else:
                continue
            break
        else:
            raise ValueError(f"{source}: unsupported key {key!r} (only lora_A/lora_B weights load)")
        layer = layers.get(mod)
        if layer is None or name not in layer.lora_A:
            raise ValueError(
                f"{source}: adapter was saved for another model: {mod!r} has no LoRA layer here"
            )
        target = getattr(layer, part)[name].weight
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"{source}: adapter was saved for another model: {key} has shape {tuple(value.shape)}, "
                f"this model expects {tuple(target.shape)}"
            )
        pairs.append((target, value))
        seen.add((mod, part))
    missing = [f"{m}.{p}" for m, layer in layers.items() if name in layer.lora_A
               for p in ("lora_A", "lora_B") if (m, p) not in seen]
    if missing:
        raise ValueError(f"{source}: adapter is missing weights for {missing[:4]} (saved for another model?)")
    return pairs


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", activate: bool = True) -> nn.Module:
    """Load the adapter in directory ``path`` (saved by peftcore or PEFT) into ``model`` as ``name``.

    If the model has no adapter ``name`` yet, it is injected from the saved config first.  Every
    key and shape is checked before any weight is written; on an error the model is unchanged
    (an adapter injected for this load is removed again).
    """
    config, tensors = read_adapter(path)
    source = str(Path(path) / WEIGHTS_NAME)
    injected = name not in adapter_configs(model)
    if injected:
        # Saved weights replace the initialization; PiSSA must not rewrite the base weights here.
        config.init = "default"
        apply(model, config, name=name, activate=activate)
    try:
        pairs = _match_keys(model, name, tensors, source)
    except Exception:
        if injected:
            from .model import delete_adapter

            delete_adapter(model, name)
        raise
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    return model
