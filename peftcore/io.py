"""Saving and loading adapters of every method: safetensors weights plus a JSON config, by name.

A directory holds ``adapter_config.json`` (``peft_type`` names the method) and
``adapter_model.safetensors`` keyed ``base_model.model.<module path>.<key>``, the keys each adapter
host gives (:meth:`~peftcore.layers.base.AdapterHost.adapter_tensors`; they never contain the
adapter's name, so an adapter saved as one name loads as another).  LoRA adapters are exactly Hugging
Face PEFT's layout (``<module>.lora_A.weight`` / ``.lora_B.weight`` and PEFT's config keys), so
``peft.PeftModel.from_pretrained`` reads what peftcore writes and :func:`load_adapter` reads what
PEFT writes.  Each file is written to a temporary file beside it, flushed and fsynced, then renamed
over the target: a reader sees the old file or the new one, never half of one.  Loading reads
safetensors only (no pickle), and checks every key and shape before any weight changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .model import adapter_configs, apply, delete_adapter, hosts
from .tuners import method_for_config, method_for_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT may keep the adapter's name in a LoRA key (".lora_A.<name>.weight"); we write it without.
_PEFT_NAMED = re.compile(r"\.(lora_A|lora_B)\.[^.]+\.weight$")


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


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name`` by their key on disk (``base_model.model.<path>.<key>``)."""
    out: dict[str, nn.Parameter] = {}
    for path, host in hosts(model):
        if name in host.adapter_names():
            for key, p in host.adapter_tensors(name).items():
                out[f"{PREFIX}{path}.{key}" if path else f"{PREFIX}{key}"] = p
    config = adapter_configs(model).get(name)
    if config is not None:  # base-model tensors the method saves with the adapter (LoRA's bias=)
        for key, p in method_for_config(config).extra_tensors(model, config, name).items():
            out.setdefault(f"{PREFIX}{key}", p)
    return out


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Tensors of adapter ``name`` keyed as on disk (full, contiguous CPU copies).

    A wrapped model (DDP, ``torch.compile``) gives the keys of the model inside.  If the adapter is
    sharded (FSDP2 DTensors) each tensor is gathered: a collective, so every rank must call this.
    """
    return distributed.full_state_dict(adapter_parameters(distributed.unwrap(model), name))


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the only adapter, or ``"default"``) to directory ``path``.

    Any method: ``adapter_config.json`` (its ``peft_type`` names the method; for LoRA exactly
    PEFT's file) and ``adapter_model.safetensors``.  Returns the directory.  Creates it if needed;
    replaces an adapter already there atomically, file by file (weights first, then the config
    that names them).

    Data-parallel models save what the single-process model would, byte for byte.  A DDP or
    ``torch.compile`` wrapper is unwrapped (keys never gain ``module.``).  On a model sharded with
    FSDP2 (``fully_shard``) saving is **collective**: every rank must call it, since each tensor is
    gathered across ranks (a rank that does not call it leaves the others waiting in the gather);
    global rank 0 alone writes, and every rank returns once the files exist (a write that fails on
    rank 0 raises on every rank).  A model of plain tensors (DDP) communicates nothing: call it on
    rank 0 only, or on every rank (each then writes the same bytes, atomically).
    """
    from safetensors.torch import save

    model = distributed.unwrap(model)
    configs = adapter_configs(model)
    if not configs:
        raise ValueError("model has no peftcore adapter to save: call peftcore.apply first")
    if name is None:
        name = next(iter(configs)) if len(configs) == 1 else "default"
    if name not in configs:
        raise KeyError(f"model has no adapter named {name!r} (has {sorted(configs)})")
    config = configs[name]
    cfg = method_for_config(config).to_json(config, model, name)
    tensors = adapter_state_dict(model, name)  # collective if the adapter is sharded
    path = Path(path)
    with distributed.rank_zero_writes(adapter_parameters(model, name)) as here:
        if here:
            path.mkdir(parents=True, exist_ok=True)
            payload = save(tensors, metadata={"format": "pt"})
            _atomic_write(path / WEIGHTS_NAME, lambda f: f.write(payload))
            text = json.dumps(cfg, indent=2, sort_keys=True).encode()
            _atomic_write(path / CONFIG_NAME, lambda f: f.write(text))
    return path


def read_adapter(path: str | os.PathLike) -> tuple[object, dict[str, torch.Tensor]]:
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
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    config = method_for_type(raw.get("peft_type", "LORA"), str(cfg_file)).from_json(raw, str(cfg_file))
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_file} is not a valid safetensors file: {e}") from e
    return config, tensors


def _match_keys(model: nn.Module, name: str, tensors: dict, source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    expected = adapter_parameters(model, name)
    pairs, seen = [], set()
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{source}: key {key!r} does not start with {PREFIX!r} (PEFT's layout)")
        k = key if key in expected else _PEFT_NAMED.sub(r".\1.weight", key)
        target = expected.get(k)
        if target is None:
            raise ValueError(
                f"{source}: adapter was saved for another model: {key!r} has no counterpart here "
                f"(this model's adapter {name!r} has e.g. {sorted(expected)[:2]})"
            )
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"{source}: adapter was saved for another model: {key} has shape {tuple(value.shape)}, "
                f"this model expects {tuple(target.shape)}"
            )
        pairs.append((target, value))
        seen.add(k)
    missing = [k[len(PREFIX):] for k in expected if k not in seen]
    if missing:
        raise ValueError(f"{source}: adapter is missing weights for {missing[:4]} (saved for another model?)")
    return pairs


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", activate: bool = True) -> nn.Module:
    """Load the adapter in directory ``path`` (saved by peftcore, or a LoRA saved by PEFT) as ``name``.

    If the model has no adapter ``name`` yet, it is injected from the saved config first.  Every
    key and shape is checked before any weight is written; on an error the model is unchanged
    (an adapter injected for this load is removed again).
    """
    model = distributed.unwrap(model)
    config, tensors = read_adapter(path)
    source = str(Path(path) / WEIGHTS_NAME)
    injected = name not in adapter_configs(model)
    if injected:
        apply(model, method_for_config(config).for_load(config), name=name, activate=activate)
    try:
        pairs = _match_keys(model, name, tensors, source)
    except Exception:
        if injected:
            delete_adapter(model, name)
        raise
    distributed.copy_into(pairs)  # a sharded (FSDP2) target keeps its own slice
    return model
