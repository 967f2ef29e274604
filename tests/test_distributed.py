"""Data-parallel training of LoRA adapters (DDP, FSDP2 ``fully_shard``) on 2 gloo CPU ranks.

One launch of two worker processes (this file run as a script, rendezvous through a file, so no
port can be taken from under it) runs every scenario; the tests below read what the ranks wrote.
The reference is one process training the same tiny Llama on the whole global batch: with dropout
0, a mean loss over equal halves and gradients averaged across ranks, data-parallel training
computes the same update up to float rounding, so adapters must agree to ~1e-6 and files saved
from a sharded model must be the files the single process writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD, BATCH, SEQ, STEPS, LR = 2, 4, 9, 3, 0.5
TIMEOUT_S = 150
ATOL = 1e-6


def _why_unavailable() -> str | None:
    dist = torch.distributed
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "the gloo backend of torch.distributed is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError:
        return "torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6"
    return None


# --------------------------------------------------------------------------- the worker (one rank)


def _build(r: int = 4, seed: int = 3):
    import peftcore as pc
    from pc_testing import tiny_model

    model, targets = tiny_model("llama")
    pc.apply(model, pc.LoRAConfig(r=r, alpha=8, dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B: the adapter changes outputs and every weight gets a gradient
        for _, layer in pc.model.lora_layers(model):
            for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    return model


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, ids):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()  # mean over this rank's tokens
        opt.step()
    return model


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _err(fn):
    """Run ``fn`` (no collective inside may be left half-done); its exception as text, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return None


def _worker(rank: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    import peftcore as pc
    from peftcore import distributed as pcd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (BATCH, SEQ), generator=g)
    eval_ids = torch.randint(0, 97, (3, SEQ), generator=g)
    half = ids[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD]
    res: dict = {}
    writes = []  # files this rank wrote through peftcore.io
    real_write = pc.io._atomic_write
    pc.io._atomic_write = lambda path, write: (writes.append(path.name), real_write(path, write))[1]

    # Single process on the whole global batch (rank 0 only; every rank holds the same data).
    if rank == 0:
        ref = _build()
        pc.save_adapter(ref, out / "ref_init")
        _train(ref, ids)
        pc.save_adapter(ref, out / "ref")
        res["ref_state"] = pc.io.adapter_state_dict(ref, "default")
        res["ref_logits"] = _logits(ref, eval_ids)
        ref3 = _build(r=3, seed=5)  # r=3 on 2 ranks: lora_A splits unevenly (2 + 1 rows)
        pc.save_adapter(ref3, out / "ref3")
        res["ref3_logits"] = _logits(ref3, eval_ids)
    dist.barrier()

    # DDP: each rank trains on its half; DDP averages the gradients.
    ddp = DDP(_build())
    _train(ddp, half)
    res["ddp_state"] = pc.io.adapter_state_dict(ddp, "default")  # keys without DDP's "module."
    writes.clear()
    res["ddp_save_err"] = _err(lambda: pc.save_adapter(ddp, out / "ddp")) if rank == 0 else None
    fresh_ddp = DDP(_build(seed=11))
    res["ddp_load_err"] = _err(lambda: pc.load_adapter(fresh_ddp, out / "ref"))
    res["ddp_loaded_state"] = pc.io.adapter_state_dict(fresh_ddp.module, "default")

    # FSDP2: every decoder layer and the root sharded; the adapters become Shard(0) DTensors.
    fsdp = _shard(_build(), mesh)
    layer = fsdp.model.layers[0].self_attn.q_proj
    res["placements"] = str(layer.lora_A["default"].weight.placements)
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(pcd.is_dtensor(m.lora_A["default"].weight)))
    writes.clear()
    pc.save_adapter(fsdp, out / "fsdp_init")  # collective: every rank calls it
    res["fsdp_init_writes"] = list(writes)
    _train(fsdp, half)
    h.remove()
    res["dtensor_in_forward"] = seen
    res["dtensor_outside_forward"] = pcd.is_dtensor(layer.lora_A["default"].weight)
    res["fsdp_state"] = pc.io.adapter_state_dict(fsdp, "default")
    pc.save_adapter(fsdp, out / "fsdp")
    res["fsdp_logits"] = _logits(fsdp, eval_ids)

    # Load back into fresh sharded models: the trained adapter, and the uneven r=3 one.
    fresh = _shard(_build(seed=11), mesh)
    pc.load_adapter(fresh, out / "fsdp")
    res["fresh_state"] = pc.io.adapter_state_dict(fresh, "default")
    res["fresh_logits"] = _logits(fresh, eval_ids)
    fresh3 = _shard(_build(r=3, seed=12), mesh)
    pc.load_adapter(fresh3, out / "ref3")
    res["fresh3_local_rows"] = fresh3.model.layers[0].self_attn.q_proj.lora_A["default"].weight.to_local().shape[0]
    pc.save_adapter(fresh3, out / "fsdp3")
    res["fresh3_logits"] = _logits(fresh3, eval_ids)

    # A failed write on rank 0 (the target is a file, not a directory) must raise on every rank.
    (out / "not_a_dir").write_bytes(b"") if rank == 0 else None
    dist.barrier()
    res["failed_save_err"] = _err(lambda: pc.save_adapter(fresh3, out / "not_a_dir"))

    # Placements: Replicate round-trips, Partial (a pending reduction) is refused before any collective.
    rep = distribute_tensor(torch.zeros(4, 3), mesh, [Replicate()])
    value = torch.arange(12.0).reshape(4, 3)
    pcd.copy_into([(rep, value)])
    gathered = pcd.full_state_dict({"k": rep})["k"]
    res["replicate_ok"] = torch.equal(rep.to_local(), value) and torch.equal(gathered, value)
    partial = DTensor.from_local(torch.ones(4, 3), mesh, [Partial()])
    res["partial_save_err"] = _err(lambda: pcd.full_state_dict({"x.lora_A.weight": partial}))
    res["partial_load_err"] = _err(lambda: pcd.copy_into([(partial, value)]))
    res["partial_untouched"] = torch.equal(partial.to_local(), torch.ones(4, 3))

    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Launch the 2 ranks once; returns (out dir, [rank 0 results, rank 1 results], seconds)."""
    why = _why_unavailable()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - t0)))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s (a collective hung?)")
    failed = [(r, p.returncode, log) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{log[-4000:]}" for r, rc, log in failed)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)], time.perf_counter() - t0


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _files(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors")), json.loads((path / "adapter_config.json").read_text())


def test_ddp_training_matches_single_process(ranks):
    _, res, _ = ranks
    ref = res[0]["ref_state"]
    assert sorted(ref) == sorted(res[0]["ddp_state"])  # no "module." in any key
    assert all(k.startswith("base_model.model.model.layers.") for k in ref)
    for r in range(WORLD):
        assert _max_diff(res[r]["ddp_state"], ref) <= ATOL
    # The update moved the weights far more than the tolerance: the comparison has teeth.
    init, _ = _files(ranks[0] / "ref_init")
    assert _max_diff(init, ref) > 1e-3


def test_fsdp2_training_matches_single_process(ranks):
    _, res, _ = ranks
    assert res[0]["placements"] == "(Shard(dim=0),)"
    # FSDP2 all-gathers before each forward: the custom op sees plain tensors, DTensors otherwise.
    assert res[0]["dtensor_in_forward"] and not any(res[0]["dtensor_in_forward"])
    assert res[0]["dtensor_outside_forward"]
    for r in range(WORLD):
        assert _max_diff(res[r]["fsdp_state"], res[0]["ref_state"]) <= ATOL
    assert (res[0]["fsdp_logits"] - res[0]["ref_logits"]).abs().max() <= 1e-5


def test_fsdp2_save_writes_the_single_process_files(ranks):
    out, res, _ = ranks
    # Untrained: the gathered shards are the very same numbers, so the files are byte for byte equal.
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "fsdp_init" / name).read_bytes() == (out / "ref_init" / name).read_bytes()
        assert (out / "fsdp3" / name).read_bytes() == (out / "ref3" / name).read_bytes()  # uneven shards
    (w, cfg), (w_ref, cfg_ref) = _files(out / "fsdp"), _files(out / "ref")
    assert cfg == cfg_ref and {k: (v.shape, v.dtype) for k, v in w.items()} == {
        k: (v.shape, v.dtype) for k, v in w_ref.items()}
    assert _max_diff(w, w_ref) <= ATOL


def test_load_into_fresh_fsdp2_model_reproduces_outputs(ranks):
    out, res, _ = ranks
    saved, _ = _files(out / "fsdp")
    for r in range(WORLD):
        assert _max_diff(res[r]["fresh_state"], saved) == 0.0  # each rank kept its exact slice
        assert torch.equal(res[r]["fresh_logits"], res[r]["fsdp_logits"])
        assert res[r]["fresh3_local_rows"] == (2, 1)[r]  # r=3 rows split 2 + 1
        assert (res[r]["fresh3_logits"] - res[0]["ref3_logits"]).abs().max() <= 1e-5
    assert (res[0]["fresh_logits"] - res[0]["ref_logits"]).abs().max() <= 1e-5


def test_unsupported_placements_raise_clearly(ranks):
    _, res, _ = ranks
    for r in range(WORLD):
        assert res[r]["replicate_ok"]
        for key in ("partial_save_err", "partial_load_err"):
            assert res[r][key] is not None and res[r][key].startswith("ValueError")
            assert "Partial" in res[r][key] and "Shard(dim), _StridedShard or Replicate" in res[r][key]
        assert "x.lora_A.weight" in res[r]["partial_save_err"]
        assert res[r]["partial_untouched"]




def test_ddp_wrapper_saves_and_loads(ranks):
    out, res, _ = ranks
    assert res[0]["ddp_save_err"] is None
    w, _ = _files(out / "ddp")
    assert _max_diff(w, res[0]["ref_state"]) <= ATOL
    ref, _ = _files(out / "ref")
    for r in range(WORLD):
        assert res[r]["ddp_load_err"] is None
        assert _max_diff(res[r]["ddp_loaded_state"], ref) == 0.0


def test_sharded_save_writes_on_rank0_only_and_fails_on_every_rank(ranks):
    _, res, _ = ranks
    assert sorted(res[0]["fsdp_init_writes"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert res[1]["fsdp_init_writes"] == []
    assert res[0]["failed_save_err"].startswith("FileExistsError")
    assert res[1]["failed_save_err"].startswith("RuntimeError: rank 0 failed to write")


def test_unwrap_compiled_model_keys():
    """torch.compile's wrapper prefixes names with ``_orig_mod.``; saved keys must not change."""
    import peftcore as pc

    model = _build()
    compiled = torch.compile(model)  # compiles nothing until called
    assert pc.distributed.unwrap(compiled) is model
    assert pc.distributed.unwrap(torch.nn.DataParallel(compiled)) is model  # nested wrappers
    plain, wrapped = pc.io.adapter_state_dict(model, "default"), pc.io.adapter_state_dict(compiled, "default")
    assert list(plain) == list(wrapped) and _max_diff(plain, wrapped) == 0.0


if __name__ == "__main__":  # one rank: python test_distributed.py RANK OUT_DIR
    _worker(int(sys.argv[1]), Path(sys.argv[2]))
