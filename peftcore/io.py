"""Saving and loading adapters of every method: safetensors weights plus a JSON config, by name.

A directory holds ``adapter_config.json`` (``peft_type`` names the method) and
``adapter_model.safetensors`` keyed ``base_model.model.<module path>.<key>``, the keys each adapter
host gives (:meth:`~peftcore.layers.base.AdapterHost.adapter_tensors`; they never contain the
adapter's name, so an adapter saved as one name loads as another).  LoRA adapters are exactly Hugging
Face PEFT's layout (``<module>.lora_A.weight`` / ``.lora_B.weight`` and PEFT's config keys), so
``peft.PeftModel.from_pretrained`` reads what peftcore writes and :func:`load_adapter` reads what
PEFT writes.  Replacing an adapter is atomic as a whole, even if the writer is killed (see "the
on-disk update" below), and a reader racing a writer gets a complete adapter or the retryable
:class:`AdapterChanged`.  Files are untrusted input: the config is bounded (size, nesting) and
every field type-checked, each file is read once into memory and parsed from those bytes
(safetensors only, no pickle), weights must be floating point, and every key, shape and dtype is
checked before any weight changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .model import adapter_configs, apply, delete_adapter, hosts, lora_layers
from .transaction import before_inplace, transaction
from .tuners import method_for_config, method_for_type
from .tuners.lora import LoRAConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT may keep the adapter's name in a LoRA key (".lora_A.<name>.weight"); we write it without.
_PEFT_NAMED = re.compile(r"\.(lora_A|lora_B)\.[^.]+\.weight$")


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


# --- the on-disk update ----------------------------------------------------------------------------
# A save must replace two files as one.  The weights file records, in its safetensors metadata
# (META_KEY; PEFT and every safetensors reader ignore it), the sha256 of the config it belongs
# with, and the new config goes first to a side file named by that hash.  The order: (1) write the
# side config, (2) replace the weights, (3) rename the side config over the config.  A reader
# takes the weights, then the config whose hash they name: the main file, else the side file (a
# save stopped between (2) and (3)).  Killed before (2): the old pair is whole (the side file is a
# stray); between (2) and (3): the new weights and their side config; after (3): the new pair.
# adapter_config.json stays exactly PEFT's file.  Writers hold an flock on the directory, so the
# next save can finish an interrupted one (roll the side config forward) and safely remove every
# stray temporary.  A config edited by hand (no side file, nothing changing) loads as it is.
META_KEY = "peftcore_config_sha256"
_PENDING = ".peftcore-pending-"  # + <sha256 of the config> + ".json"
_TMP = ".peftcore-tmp-"
_OLD_TMPS = (f".{CONFIG_NAME}.", f".{WEIGHTS_NAME}.")  # mkstemp names of peftcore <= this version
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
LOAD_ATTEMPTS = 50  # reads of a directory a writer keeps changing before AdapterChanged


class AdapterChanged(RuntimeError):
    """The adapter directory changed while it was read (another process is saving it), on every one
    of the bounded attempts :func:`read_adapter` makes.  Retryable: read it again."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pending_name(digest: str) -> str:
    return f"{_PENDING}{digest}.json"


def _config_hash_of(weights: bytes) -> str | None:
    """META_KEY from a safetensors file's header (None if absent or the header is unreadable: the
    full parse later reports a damaged file)."""
    if len(weights) < 8:
        return None
    n = int.from_bytes(weights[:8], "little")
    if n > min(len(weights) - 8, 100 << 20):
        return None
    try:
        meta = json.loads(weights[8:8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError, RecursionError):
        return None
    h = meta.get(META_KEY) if isinstance(meta, dict) else None
    return h if isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) else None


def _fsync_dir(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fsync(fd)


_staging = threading.local()  # {final path: where _atomic_write puts it for now}


def _atomic_write(path: Path, write) -> None:
    """Write the file ``path`` (``write(f)`` fills it): to a temporary beside it, fsynced, renamed
    over its place, which is ``path`` itself unless the save in progress stages it elsewhere (the
    weights go to their pending name first)."""
    target = getattr(_staging, "map", {}).get(path, path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP}{path.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive flock on the directory itself (released by the kernel if the holder dies);
    yields the directory's fd (for fsync), or None where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, the hash check still holds
        yield None
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing drops the lock


def _recover(directory: Path) -> None:
    """Under the writers' lock: finish a save that was stopped between replacing the weights and
    renaming their config in, then delete every temporary a stopped save left."""
    cfg_file = directory / CONFIG_NAME
    try:
        digest = _config_hash_of((directory / WEIGHTS_NAME).read_bytes())
    except FileNotFoundError:
        digest = None
    if digest is not None:
        pending = directory / _pending_name(digest)
        if pending.is_file():
            try:
                current = _sha256(cfg_file.read_bytes())
            except FileNotFoundError:
                current = None
            if current != digest and _sha256(pending.read_bytes()) == digest:
                os.replace(pending, cfg_file)
    for f in directory.iterdir():
        n = f.name
        if n.startswith((_TMP, _PENDING)) or (n.startswith(_OLD_TMPS) and n.endswith(".tmp")):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                f.unlink()


def _sorted_metadata(payload: bytes) -> bytes:
    """``payload`` with its header's metadata in sorted key order: safetensors writes a map in hash
    order, and a save must give the same bytes every time (ranks, repeated saves)."""
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data on 8 bytes
    return len(text).to_bytes(8, "little") + text + payload[8 + n:]


def _write_adapter(directory: Path, cfg: dict, tensors: dict) -> None:
    """Replace the adapter in ``directory`` by ``cfg`` + ``tensors`` as one (see above)."""
    from safetensors.torch import save

    text = json.dumps(cfg, indent=2, sort_keys=True).encode()
    digest = _sha256(text)
    payload = _sorted_metadata(save(tensors, metadata={"format": "pt", META_KEY: digest}))
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory) as dir_fd:
        _recover(directory)
        pending, cfg_file = directory / _pending_name(digest), directory / CONFIG_NAME
        weights_replaced = False
        _staging.map = {cfg_file: pending}
        try:
            _atomic_write(cfg_file, lambda f: f.write(text))  # staged: lands at `pending`
            _atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(payload))
            weights_replaced = True
            os.replace(pending, cfg_file)
        except BaseException:
            if not weights_replaced:  # else the new weights need it until the next save rolls it in
                with contextlib.suppress(OSError):
                    os.unlink(pending)
            raise
        finally:
            _staging.map = {}
        if dir_fd is not None:
            _fsync_dir(dir_fd)


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the only adapter, or ``"default"``) to directory ``path``.

    Any method: ``adapter_config.json`` (its ``peft_type`` names the method; for LoRA exactly PEFT's
    file) and ``adapter_model.safetensors`` (its metadata holds the sha256 of the config).
    Returns the directory.  Creates it if needed.  Replacing an adapter already there is atomic as
    a whole: if the save is interrupted at any point (even killed), :func:`load_adapter` reads the
    complete old adapter or the complete new one, never a mix, and the next save removes what the
    interrupted one left.  Concurrent saves into one directory are serialized (a file lock).

    Data-parallel models save what the single-process model would, byte for byte.  A DDP or
    ``torch.compile`` wrapper is unwrapped (keys never gain ``module.``).  On a model sharded with
    FSDP2 (``fully_shard``) saving is **collective**: every rank must call it, since each tensor is
    gathered across ranks (a rank that does not call it leaves the others waiting in the gather);
    global rank 0 alone writes, and every rank returns once the files exist (a write that fails on
    rank 0 raises on every rank).  A model of plain tensors (DDP) communicates nothing: call it on
    rank 0 only, or on every rank (each then writes the same bytes, one after the other).
    """
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
            _write_adapter(path, cfg, tensors)
    return path


# --- reading: every byte is untrusted --------------------------------------------------------------
def _json_depth(text: str) -> int:
    """Nesting depth of JSON ``text`` (brackets outside strings), without recursion."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", text)  # linear: the alternatives never overlap
    depth = best = 0
    for ch in re.sub(r"[^\[\]{}]", "", bare):
        depth += 1 if ch in "[{" else -1
        best = max(best, depth)
    return best


def _parse_config(data: bytes, cfg_file: Path) -> dict:
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_file}: {len(data):,} bytes is larger than an adapter config can be "
                         f"(at most {MAX_CONFIG_BYTES:,})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON (not UTF-8: {e})") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{cfg_file} is nested {depth} levels deep; an adapter config has at most {MAX_JSON_DEPTH}")
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_config(directory: Path, digest: str | None) -> tuple[bytes | None, str | None]:
    """The config bytes the weights name (main file, else the pending side file), or
    ``(None, sha256 of the main file)`` when neither matches ``digest``."""
    cfg_file = directory / CONFIG_NAME
    try:
        with open(cfg_file, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        data = None
    if digest is None:
        if data is None:
            raise FileNotFoundError(f"{cfg_file} not found: an adapter directory holds {CONFIG_NAME}")
        return data, None
    current = None if data is None else _sha256(data)
    if current == digest:
        return data, current
    try:
        with open(directory / _pending_name(digest), "rb") as f:
            side = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if data is None:
            raise FileNotFoundError(f"{cfg_file} not found: an adapter directory holds {CONFIG_NAME}") from None
        return None, current
    return (side, digest) if _sha256(side) == digest else (None, current)


def read_adapter(path: str | os.PathLike) -> tuple[object, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory without touching any model: ``(config, tensors)``.

    Each file is read once into memory and parsed from those bytes.  Weights saved by peftcore
    record the sha256 of their config: the pair read is always one that a save wrote together.  A
    directory another process keeps changing while it is read raises :class:`AdapterChanged` after
    :data:`LOAD_ATTEMPTS` tries (retryable).  Every error names the file (and the field or key).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter path {str(path)!r} is not a directory")
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    previous = None
    for attempt in range(LOAD_ATTEMPTS):
        try:
            w_bytes = w_file.read_bytes()
        except FileNotFoundError:
            pickled = [p.name for p in path.glob("adapter_model.bin")]
            hint = " (adapter_model.bin is a pickle: peftcore loads safetensors only)" if pickled else ""
            raise FileNotFoundError(f"{w_file} not found{hint}") from None
        digest = _config_hash_of(w_bytes)
        cfg_bytes, current = _read_config(path, digest)
        if cfg_bytes is not None:
            break
        state = (digest, current)
        if state == previous and attempt >= 2:  # nothing moves and no save pending: edited by hand
            with open(cfg_file, "rb") as f:
                cfg_bytes = f.read(MAX_CONFIG_BYTES + 1)
            break
        previous = state
        time.sleep(min(0.001 * 2**attempt, 0.05))
    else:
        raise AdapterChanged(f"{path}: the adapter changed while it was being read, {LOAD_ATTEMPTS} times "
                             f"(another process is saving it): read it again")
    raw = _parse_config(cfg_bytes, cfg_file)
    config = method_for_type(raw.get("peft_type", "LORA"), str(cfg_file)).from_json(raw, str(cfg_file))
    tensors = _parse_weights(w_bytes, w_file)
    return config, tensors


def _parse_weights(data: bytes, w_file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError, and others on odd bytes
        raise ValueError(f"{w_file} is not a valid safetensors file: {type(e).__name__}: {e}") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{w_file}: tensor {key!r} has dtype {t.dtype}; adapter weights must be floating "
                             f"point (an integer, bool or complex tensor would be cast, losing values)")
    return tensors


def _match_keys(model: nn.Module, name: str, tensors: dict, source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    expected = adapter_parameters(model, name)
    pairs, seen = [], {}
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
        if k in seen:
            raise ValueError(f"{source}: keys {seen[k]!r} and {key!r} are both the weight {k!r} "
                             f"(PEFT's names with and without the adapter name): the file is ambiguous")
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"{source}: adapter was saved for another model: {key} has shape {tuple(value.shape)}, "
                f"this model expects {tuple(target.shape)}"
            )
        pairs.append((target, value))
        seen[k] = key
    missing = [k[len(PREFIX):] for k in expected if k not in seen]
    if missing:
        raise ValueError(f"{source}: adapter is missing weights for {missing[:4]} (saved for another model?)")
    return pairs


# Fields that only say where an adapter goes or how it starts: where it goes is checked key by key
# when the weights land, how it starts is overwritten by them.  Every other field must agree for
# weights to load into an adapter that exists.
_PLACE_OR_INIT = {
    "base_model_name_or_path", "extra", "backend", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "modules_to_save", "task_type", "fan_in_fan_out", "attn_output_modules",
    "ffn_output_modules", "ffn_input_modules", "init_range", "phm_init_range", "phm_c_init",
    "hypercomplex_nonlinearity", "init_text", "tokenizer_name_or_path",
}
_FILE_KEYS = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}


def _config_differences(model: nn.Module, name: str, existing, loaded) -> list[str]:
    if type(existing) is not type(loaded):
        return [f"method: {type(existing).__name__} (model) vs {type(loaded).__name__} (file)"]
    a = dataclasses.asdict(method_for_config(existing).for_load(existing))
    b = dataclasses.asdict(method_for_config(loaded).for_load(loaded))
    skip = set(_PLACE_OR_INIT) | (set() if isinstance(existing, LoRAConfig) else {"init"})
    out = [f"{_FILE_KEYS.get(k, k) if isinstance(existing, LoRAConfig) else k}: {a[k]!r} (model) vs {b[k]!r} (file)"
           for k in a if k not in skip and a[k] != b.get(k)]
    if isinstance(loaded, LoRAConfig) and loaded.fan_in_fan_out is not None:
        layers = [m for _, m in lora_layers(model) if name in m.lora_A]
        if layers and any(m.fan_in_fan_out != loaded.fan_in_fan_out for m in layers):
            out.append(f"fan_in_fan_out: {not loaded.fan_in_fan_out} (model) vs {loaded.fan_in_fan_out} (file)")
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", activate: bool = True,
                 replace: bool = False) -> nn.Module:
    """Load the adapter in directory ``path`` (saved by peftcore, or a LoRA saved by PEFT) as ``name``.

    If the model has no adapter ``name`` yet, it is injected from the saved config first.  If it
    has one, the weights load into it only when its config agrees with the file's (rank, alpha,
    rsLoRA, dropout, ...; an FSDP-sharded model loads this way); any difference is an error naming
    the fields, unless ``replace=True``: then the adapter is deleted and injected again from the
    file's config.  Every key, shape and dtype is checked before any weight is written; on any
    error the model is unchanged (all or nothing, the old adapter included).  A directory another
    process is saving into reads as the old or the new adapter, or raises :class:`AdapterChanged`.
    """
    model = distributed.unwrap(model)
    config, tensors = read_adapter(path)
    cfg_file, source = str(Path(path) / CONFIG_NAME), str(Path(path) / WEIGHTS_NAME)
    existing = adapter_configs(model).get(name)
    if existing is not None and not replace:
        diff = _config_differences(model, name, existing, config)
        if diff:
            raise ValueError(
                f"{cfg_file}: the model already has an adapter {name!r} whose config differs from the file's "
                f"({'; '.join(diff)}): pass replace=True to replace it by the file's adapter, or load it under "
                f"another name"
            )
    if existing is not None and replace:
        for c in (config, existing):
            if isinstance(c, LoRAConfig) and c.init.startswith("pissa"):
                raise ValueError(f"{cfg_file}: replace=True with a PiSSA adapter (it rewrites the base weights) is not "
                                 f"supported: load it into a fresh model")
    # All or nothing (peftcore.transaction): on any error below, the modules, hooks, requires_grad
    # flags and the old adapter's own parameter objects and values are back as they were.
    with transaction(model):
        if existing is not None and replace:
            delete_adapter(model, name)
        if existing is None or replace:
            _inject(model, config, name, activate, cfg_file)
        pairs = _match_keys(model, name, tensors, source)
        for target, _ in pairs:  # weights written in place are kept for the undo (adapter-sized)
            before_inplace(target)
        distributed.copy_into(pairs)  # a sharded (FSDP2) target keeps its own slice
    return model


def _inject(model: nn.Module, config, name: str, activate: bool, cfg_file: str) -> None:
    try:
        apply(model, method_for_config(config).for_load(config), name=name, activate=activate)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{cfg_file}: {e}") from e
