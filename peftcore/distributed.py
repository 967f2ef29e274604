"""Saving and loading adapters of models trained data-parallel: DDP wrappers, FSDP2-sharded parameters.

:mod:`peftcore.io` writes and reads one full tensor per adapter weight.  Data-parallel training
changes what the model hands it in two ways, and this module undoes both:

* **Wrappers** (``DistributedDataParallel``, ``DataParallel``, ``torch.compile``'s
  ``OptimizedModule``) put their own module in front of the user's: ``named_modules`` then yields
  ``module.<path>`` (``_orig_mod.<path>``) and the adapter configs kept on the user's model are not
  found on the wrapper.  :func:`unwrap` returns the model inside, so keys on disk never depend on how
  the model was trained.
* **Sharding** (``torch.distributed.fsdp.fully_shard``) turns each parameter into a ``DTensor``
  whose storage holds only this rank's slice; reading it as a plain tensor fails
  (``Attempted to access the data pointer on an invalid python storage``).  :func:`full_state_dict`
  gathers each one (``DTensor.full_tensor()``, a collective) and :func:`copy_into` writes a full
  saved tensor into the local slice by the parameter's own placements (no communication: every rank
  reads the same file and keeps its part).  A rank's slice is whatever DTensor's sharding says it is
  (``torch.chunk`` along the sharded dim, as FSDP2 uses), so uneven splits need no special case.

Only placements with an unambiguous full value are supported: ``Shard`` (and the ``_StridedShard``
that FSDP2 combined with tensor parallelism produces) and ``Replicate``.  A ``Partial`` parameter
is a sum still waiting to be reduced; saving or loading one raises a clear error rather than
guessing.

Nothing here imports ``torch.distributed.tensor`` or ``fsdp``: a DTensor (an FSDP wrapper) can
only exist once its module was imported, so a check on a model without one is a dict lookup.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator

import torch
from torch import nn

SUPPORTED = "Shard(dim), _StridedShard or Replicate"


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing that package)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _wrapper_types() -> tuple[type, ...]:
    # Only the wrappers whose module is already loaded can be in front of a model.
    out = [nn.DataParallel]
    ddp = getattr(sys.modules.get("torch.nn.parallel.distributed"), "DistributedDataParallel", None)
    if ddp is not None:
        out.append(ddp)
    return tuple(out)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside any DDP / DataParallel / ``torch.compile`` wrappers (nested or not).

    Those wrappers only dispatch to ``.module`` (``._orig_mod``), so saving or loading through the
    inner model is what the wrapped one would do, with the keys a single-process model has.  FSDP2
    (``fully_shard``) needs no unwrapping: it changes the class of the modules in place and keeps
    their names.  The legacy ``FullyShardedDataParallel`` wrapper flattens parameters into
    ``FlatParameter`` s that no longer hold one adapter weight each, so it is refused.
    """
    wrappers = _wrapper_types()
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel"),
                    "FullyShardedDataParallel", None)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif optimized is not None and isinstance(model, optimized):
            model = model._orig_mod
        elif fsdp1 is not None and isinstance(model, fsdp1):
            raise TypeError(
                "peftcore cannot save or load adapters through the legacy FullyShardedDataParallel "
                "wrapper (its FlatParameters merge weights); shard with "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
        else:
            return model


def _check_placements(key: str, t: torch.Tensor) -> None:
    from torch.distributed.tensor import Replicate, Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - older torch
        ok: tuple[type, ...] = (Shard, Replicate)
    else:
        ok = (Shard, _StridedShard, Replicate)
    bad = [p for p in t.placements if not isinstance(p, ok)]
    if bad:
        raise ValueError(
            f"adapter tensor {key!r} is a DTensor with placements {tuple(t.placements)}: peftcore "
            f"saves and loads sharded adapters whose placements are each {SUPPORTED}; {bad[0]!r} has "
            f"no single full value to read or write (reduce or redistribute the parameter first)"
        )


def check_placements(tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` if any DTensor in ``tensors`` (key -> tensor) has a placement peftcore
    cannot gather or scatter.

    Runs before any collective, on every rank alike (the model's structure is the same everywhere),
    so an unsupported model fails on all ranks at once instead of leaving some waiting in a gather.
    """
    for key, t in tensors.items():
        if is_dtensor(t):
            _check_placements(key, t)


def is_sharded(tensors) -> bool:
    """Whether any of ``tensors`` (an iterable of tensors, or a dict of them) is a DTensor, i.e.
    whether saving them takes every rank."""
    return any(is_dtensor(t) for t in (tensors.values() if isinstance(tensors, dict) else tensors))


def full_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full, contiguous CPU copies of ``tensors`` (key -> parameter), each ``[*global shape]``.

    DTensors are gathered with ``full_tensor()``: a collective over the tensor's device mesh, so
    when any tensor is sharded **every rank of that mesh must call this with the same keys in the
    same order** (the same model gives them), or the ranks that did wait forever.  Plain tensors
    (a single-process or DDP model) are copied without any communication.
    """
    check_placements(tensors)
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        t = t.detach()
        if is_dtensor(t):
            t = t.full_tensor()
        out[key] = t.to("cpu").contiguous().clone()
    return out


def copy_into(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each full saved ``value`` into ``target`` (a parameter), casting to its device and dtype.

    A DTensor target keeps only its local slice: the full value is cut by the target's own mesh and
    placements (``distribute_tensor(..., src_data_rank=None)``, local slicing, no communication), so
    loading is not collective, and the slice lands in the storage FSDP2 all-gathers from.  Shapes
    are the caller's to check (they are the global shapes, as saved).
    """
    pairs = list(pairs)
    # Check every target before writing any, so a refused load leaves the model unchanged.
    for target, value in pairs:
        if is_dtensor(target):
            _check_placements(f"of shape {tuple(value.shape)} (load target)", target)
    with torch.no_grad():
        for target, value in pairs:
            if is_dtensor(target):
                from torch.distributed.tensor import distribute_tensor

                local = target.to_local()
                value = value.to(device=local.device, dtype=local.dtype)
                target.copy_(distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None))
            else:
                target.copy_(value.to(device=target.device, dtype=target.dtype))


def _rank() -> int | None:
    """This process's global rank, or None outside an initialized process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return None


@contextlib.contextmanager
def rank_zero_writes(tensors) -> Iterator[bool]:
    """Decide who writes an adapter's files: yields whether this process writes them.

    ``tensors`` are the adapter's parameters (a dict or an iterable).  For a sharded adapter (any
    DTensor among them) saving is collective: every rank gathered the same full tensors, global
    rank 0 alone writes, and on leaving the block rank 0 tells every other rank whether the write
    succeeded (a broadcast over the default process group, which doubles as the barrier), so that
    on return the files exist for every rank, and a failed write on rank 0 raises on every rank
    instead of leaving them waiting.  Every rank of the default process group must enter the block.

    For an adapter of plain tensors (a single process, or DDP whose replicas are identical) nothing
    is communicated and the caller writes: the usual ``if rank == 0: save(...)`` works, and ranks
    that all call it write the same bytes to the same path (each file is replaced atomically).
    """
    rank = _rank() if is_sharded(tensors) else None
    if rank is None:
        yield True
        return
    failure: BaseException | None = None
    try:
        yield rank == 0
    except BaseException as e:  # noqa: BLE001 - reported to the other ranks, then re-raised
        failure = e
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"] if rank == 0 else [None]
    torch.distributed.broadcast_object_list(status, src=0)
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise RuntimeError(f"rank 0 failed to write the adapter files: {status[0]}")
