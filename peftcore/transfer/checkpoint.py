"""Training state in one safetensors file: what ``peftcore finetune --resume`` continues from.

One file, so that a write is atomic as a whole (temporary file, fsync, rename): a run killed at any
moment leaves the previous complete state or the new one.  Tensors (parameters, the optimizer's
moments, torch's RNG state) are safetensors tensors; everything else (step counters, the
optimizer's hyper-parameters, the scheduler's counters, the history) is one JSON document in the
file's metadata.  Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_META = "peftcore_state"


def _optimizer_split(state: dict) -> tuple[dict, dict]:
    """An optimizer ``state_dict()`` as ``(tensors, json-able rest)``."""
    tensors, per_param = {}, {}
    for idx, entries in state["state"].items():
        plain = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous()
            else:
                plain[key] = value
        per_param[str(idx)] = plain
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def _optimizer_join(tensors: dict, rest: dict) -> dict:
    state = {int(k): dict(v) for k, v in rest["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in rest["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_state(path: str | os.PathLike, *, params: dict, optimizer=None, scheduler=None, info: dict,
               extra: dict | None = None) -> None:
    """Write ``params`` (name -> tensor), the optimizer's and scheduler's state, torch's CPU RNG
    state, the JSON-able ``info`` (``doc["info"]`` on load) and ``extra`` (its keys at the top of
    ``doc``) to ``path`` atomically."""
    from safetensors.torch import save

    from ..io import _atomic_write

    tensors = {f"param.{k}": v.detach().to("cpu").contiguous() for k, v in params.items()}
    doc = {**(extra or {}), "info": info}
    if optimizer is not None:
        opt_tensors, doc["optimizer"] = _optimizer_split(optimizer.state_dict())
        tensors.update({k: v.to("cpu") for k, v in opt_tensors.items()})
    if scheduler is not None:
        doc["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    tensors["rng.cpu"] = torch.get_rng_state()
    payload = save(tensors, metadata={_META: json.dumps(doc)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: f.write(payload))


def load_state(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """Read a file written by :func:`save_state`: ``(params, tensors, doc)``.

    Raises ValueError naming the file when it is not such a file (damaged, or another format).
    """
    from safetensors.torch import load

    path = Path(path)
    data = path.read_bytes()
    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then the JSON header
        doc = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][_META])
    except Exception as e:
        raise ValueError(f"{path}: not a peftcore training checkpoint ({type(e).__name__}: {e})") from None
    params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
    return params, tensors, doc


def restore(tensors: dict, doc: dict, *, optimizer=None, scheduler=None) -> None:
    """Load the optimizer, scheduler and RNG state saved by :func:`save_state`."""
    if optimizer is not None and "optimizer" in doc:
        optimizer.load_state_dict(_optimizer_join(tensors, doc["optimizer"]))
    if scheduler is not None and "scheduler" in doc:
        state = dict(scheduler.state_dict())
        state.update(doc["scheduler"])
        scheduler.load_state_dict(state)
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
