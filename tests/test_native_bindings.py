"""Every binding of peftcore._C refuses inconsistent operands with a TypeError/ValueError naming the
binding and the argument, before any kernel runs; and the peftcore.native wrappers refuse
mismatched shapes.

The bindings take DLPack capsules and derive every size from the shapes.  The cases below are
generated per binding and per operand (not a capsule, wrong dtype, wrong dims, one row short,
non-unit column stride, overlapping output rows, read-only output, output overlapping an input, a
CPU capsule for a CUDA binding), plus the reproducers that wrote out of bounds or crashed when the
bindings took integer addresses and trusted the sizes given to them.  The cuda_* bindings are
checked with host memory labelled as CUDA (tests/dlpack_testing.py): their checks run before any
CUDA call, so this needs no GPU.
"""

from __future__ import annotations

import pytest
import torch

import dlpack_testing as dlc
from peftcore import native
from peftcore.native import dl
from peftcore.reference.rng import dropout_threshold

REASON = native.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"peftcore._C unavailable: {REASON}")

THR = dropout_threshold(0.25)


def _C():
    return native.load()


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


# Per binding: tensors (name -> tensor), outputs, scalars, and a 2-D float input that sets the sizes.
def _specs():
    M, K, N, R = 6, 8, 5, 2
    n, P, Q, k = 2, 3, 5, 2
    lora_fwd = dict(x=_r(M, K), a=_r(R, K), xa=torch.empty(M, R), y=_r(M, N), b=_r(N, R))
    lora_bwd = dict(dy=_r(M, N), b=_r(N, R), xa=_r(M, R), a=_r(R, K), x=_r(M, K), dx=_r(M, K),
                    da=torch.empty(R, K), db=torch.empty(N, R))
    down_bwd = dict(g=_r(M, R), a=_r(R, K), x=_r(M, K), dx=_r(M, K), da=torch.empty(R, K))
    distill = dict(s=_r(M, K), t=_r(M, K), row_weight=torch.ones(M), loss=torch.empty(M), grad=torch.empty(M, K))
    mixed = dict(x=_r(M, K), a=_r(2, 3, K), b=_r(2, N, 3), scaling=torch.ones(2),
                 seg_adapter=torch.tensor([0, -1, 1], dtype=torch.int32), seg_len=torch.tensor([3, 1, 2]),
                 y=torch.zeros(M, N))
    phm_f = dict(x=_r(M, n * P), rule=_r(n, n, n), w_left=_r(n, P, k), w_right=_r(n, k, Q), bias=_r(n * Q),
                 y=torch.empty(M, n * Q), t=torch.empty(M, n, n, k))
    phm_b = dict(dy=_r(M, n * Q), x=_r(M, n * P), t=_r(M, n, n, k), rule=_r(n, n, n), w_left=_r(n, P, k),
                 w_right=_r(n, k, Q), dx=torch.empty(M, n * P), drule=torch.empty(n, n, n),
                 dw_left=torch.empty(n, P, k), dw_right=torch.empty(n, k, Q), dbias=torch.empty(n * Q))
    rng = dict(seed=3, threshold=THR, scale=4 / 3)
    cuda_phm_f = {**phm_f, "w_left_t": phm_f["w_left"].transpose(1, 2).contiguous()}
    del cuda_phm_f["w_left"]
    cuda_phm_b = {**phm_b, "w_left_t": phm_b["w_left"].transpose(1, 2).contiguous()}
    del cuda_phm_b["w_left"]
    ws = torch.zeros(1 << 20, dtype=torch.uint8)
    return {
        "down_fwd": (lora_fwd, {"xa", "y"}, {**rng, "scaling": 0.5}),
        "down_bwd": (down_bwd, {"dx", "da"}, rng),
        "lora_bwd": (lora_bwd, {"dx", "da", "db"}, {**rng, "scaling": 0.5}),
        "keep_mask": (dict(out=torch.empty(M, K, dtype=torch.uint8)), {"out"}, dict(seed=3, threshold=THR)),
        "distill_fwd": (distill, {"loss", "grad"}, dict(temperature=2.0, kind="jsd", beta=0.3)),
        "lora_mixed_fwd": (mixed, {"y"}, {}),
        "phm_fwd": (phm_f, {"y", "t"}, {}),
        "phm_bwd": (phm_b, {"dx", "drule", "dw_left", "dw_right", "dbias"}, {}),
        # rows [2, 4) of an NF4 [6, 8] weight in blocks of 16: 24 bytes, 3 scales
        "nf4_dequant_rows": (dict(packed=torch.randint(0, 256, (24,), dtype=torch.uint8), absmax=torch.rand(3),
                                  out=torch.empty(2, K)), {"out"}, dict(n=6, start=2, blocksize=16)),
        "cuda_down_fwd": ({k: lora_fwd[k] for k in ("x", "a", "xa")}, {"xa"}, {**rng, "stream": 0}),
        "cuda_down_bwd": ({**down_bwd, "workspace": ws}, {"dx", "da", "workspace"}, {**rng, "stream": 0}),
        "cuda_keep_mask": (dict(out=torch.empty(M, K, dtype=torch.uint8)), {"out"},
                           dict(seed=3, threshold=THR, stream=0)),
        "cuda_distill_fwd": (distill, {"loss", "grad"}, dict(temperature=2.0, kind="forward", beta=0.5, stream=0)),
        "cuda_lora_mixed_fwd": ({**{k: v for k, v in mixed.items() if not k.startswith("seg")},
                                 "tiles": torch.tensor([[0, 3, 0], [4, 6, 1]], dtype=torch.int32), "workspace": ws},
                                {"y", "workspace"}, dict(block_m=16, stream=0)),
        "cuda_phm_fwd": (cuda_phm_f, {"y", "t"}, dict(stream=0)),
        "cuda_phm_bwd": ({**cuda_phm_b, "workspace": ws}, {"dx", "drule", "dw_left", "dw_right", "dbias", "workspace"},
                         dict(stream=0)),
    }


BINDINGS = list(_specs())
CPU_BINDINGS = [b for b in BINDINGS if not b.startswith("cuda_")]
CUDA_BINDINGS = [b for b in BINDINGS if b.startswith("cuda_")]


def _call(name, tensors, scalars, wrap=None, **override):
    """Call binding `name`: tensors as capsules (CPU, or labelled CUDA for cuda_*), `override` raw."""
    if wrap is None:
        wrap = dlc.cuda if name.startswith("cuda_") else dl
    args = {k: wrap(v) for k, v in tensors.items()}
    args.update(scalars)
    args.update(override)
    return getattr(_C(), name)(**args)


def _raises(name, err, match, tensors, scalars, **override):
    with pytest.raises(err, match=match) as info:
        _call(name, tensors, scalars, **override)
    assert f"peftcore._C.{name}: " in str(info.value)


# ------------------------------------------------------------------------------------------ valid calls


@pytest.mark.parametrize("name", CPU_BINDINGS)
def test_valid_cpu_call_runs(name):
    tensors, outs, scalars = _specs()[name]
    before = {k: tensors[k].clone() for k in outs}
    _call(name, tensors, scalars)
    assert any(not torch.equal(tensors[k], before[k]) for k in outs), "the call wrote no output"
    for k in outs:
        if tensors[k].is_floating_point():
            assert torch.isfinite(tensors[k]).all(), k


@pytest.mark.parametrize("name", CUDA_BINDINGS)
def test_valid_cuda_call_passes_the_checks(name):
    """With consistent operands a cuda_* binding passes every check and stops only at the CUDA part:
    a build without it, or (built with it) a machine where the current device cannot be queried."""
    if not _C().CUDA:
        match = "built without CUDA"
    elif not torch.cuda.is_available():
        match = "cannot query the current CUDA device"
    else:
        pytest.skip("a GPU is visible: a labelled host capsule would reach a kernel")
    tensors, _, scalars = _specs()[name]
    with pytest.raises(ValueError, match=match):
        _call(name, tensors, scalars)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_BINDINGS)
def test_cuda_binding_refuses_operands_off_the_current_device(name):
    reason = native.unavailable_reason(cuda=True)
    if reason is not None:
        pytest.skip(f"needs a CUDA GPU and the CUDA kernels: {reason}")
    cur = torch.cuda.current_device()
    tensors, _, scalars = _specs()[name]
    with pytest.raises(ValueError, match=f"operands are on cuda:{cur + 1} but the current device is cuda:{cur}"):
        _call(name, tensors, scalars, wrap=lambda t: dlc.cuda(t, cur + 1))  # refused before any launch


# ------------------------------------------------------------------------------------------ per operand


def _operand_cases():
    for name, (tensors, outs, _) in _specs().items():
        for arg, t in tensors.items():
            yield name, arg, t, arg in outs


OPERANDS = list(_operand_cases())
IDS = [f"{b}-{a}" for b, a, _, _ in OPERANDS]


@pytest.mark.parametrize("name,arg,t,is_out", OPERANDS, ids=IDS)
def test_not_a_capsule(name, arg, t, is_out):
    tensors, _, scalars = _specs()[name]
    for bad in (tensors[arg], tensors[arg].data_ptr(), object()):
        _raises(name, TypeError, f"{arg} must be a DLPack capsule", tensors, scalars, **{arg: bad})
    # a capsule of another kind
    import ctypes

    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    _raises(name, TypeError, "capsule named 'other'", tensors, scalars, **{arg: new(tensors[arg].data_ptr(), b"other", None)})


@pytest.mark.parametrize("name,arg,t,is_out", OPERANDS, ids=IDS)
def test_wrong_dtype(name, arg, t, is_out):
    tensors, _, scalars = _specs()[name]
    # float32 -> a dtype the kernels never take: float16 on the CPU, float64 on CUDA
    f32 = torch.float64 if name.startswith("cuda_") else torch.float16
    other = {torch.float32: f32, torch.uint8: torch.int32, torch.int32: torch.int64, torch.int64: torch.int32}[t.dtype]
    tensors[arg] = tensors[arg].to(other)
    _raises(name, TypeError, f"{arg} must have dtype", tensors, scalars)


@pytest.mark.parametrize("name,arg,t,is_out", OPERANDS, ids=IDS)
def test_wrong_dims(name, arg, t, is_out):
    tensors, _, scalars = _specs()[name]
    tensors[arg] = tensors[arg].unsqueeze(0)
    _raises(name, ValueError, rf"{arg} must be {t.dim()}-D, got {t.dim() + 1}-D", tensors, scalars)


@pytest.mark.parametrize("name,arg,t,is_out", OPERANDS, ids=IDS)
def test_one_short(name, arg, t, is_out):
    """An operand one element short in any dim (an output too small, an input too short) is refused."""
    tensors, _, scalars = _specs()[name]
    if arg == "workspace":
        pytest.skip("workspace size: test_workspace_too_small")
    if name.endswith("keep_mask"):
        pytest.skip("out is the only operand: its shape is the size")
    for d in range(t.dim()):
        if t.shape[d] < 2 or (arg == "tiles" and d == 0):  # any number of tiles is consistent
            continue
        if name == "nf4_dequant_rows" and arg == "out" and d == 0:  # fewer rows: a smaller panel, valid
            continue
        short = dict(tensors)
        short[arg] = t.narrow(d, 0, t.shape[d] - 1)
        _raises(name, ValueError, None, short, scalars)


@pytest.mark.parametrize("name,arg,t,is_out", [c for c in OPERANDS if c[2].dim() >= 2], ids=[
    i for i, c in zip(IDS, OPERANDS) if c[2].dim() >= 2])
def test_non_unit_column_stride(name, arg, t, is_out):
    tensors, _, scalars = _specs()[name]
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    tensors[arg] = wide[..., ::2]
    _raises(name, ValueError, f"{arg} must (have a unit column stride|be contiguous)", tensors, scalars)


@pytest.mark.parametrize("name,arg,t,is_out", [c for c in OPERANDS if c[3] and c[2].dim() == 2], ids=[
    i for i, c in zip(IDS, OPERANDS) if c[3] and c[2].dim() == 2])
def test_overlapping_output_rows(name, arg, t, is_out):
    tensors, _, scalars = _specs()[name]
    rows, cols = t.shape
    buf = torch.zeros(rows * cols, dtype=t.dtype)
    tensors[arg] = buf.as_strided((rows, cols), (cols - 1, 1))
    _raises(name, ValueError, f"{arg} (row stride {cols - 1} is smaller|must be contiguous)", tensors, scalars)


@pytest.mark.parametrize("name,arg,t,is_out", [c for c in OPERANDS if c[3]], ids=[
    i for i, c in zip(IDS, OPERANDS) if c[3]])
def test_read_only_output(name, arg, t, is_out):
    tensors, _, scalars = _specs()[name]
    dev = 2 if name.startswith("cuda_") else 1
    _raises(name, ValueError, f"{arg} is an output but its capsule is flagged read-only", tensors, scalars,
            **{arg: dlc.capsule(t, dev, read_only=True)})


@pytest.mark.parametrize("name,arg,t,is_out", [c for c in OPERANDS if c[3] and not c[0].endswith("keep_mask")],
                         ids=[i for i, c in zip(IDS, OPERANDS) if c[3] and not c[0].endswith("keep_mask")])
def test_output_overlapping_another_operand(name, arg, t, is_out):
    """An output sharing memory with an input: the kernel cannot write it while reading that one."""
    tensors, _, scalars = _specs()[name]
    other = next(iter(tensors))  # an input of every binding but keep_mask
    o = tensors[other]
    osz, asz = o.numel() * o.element_size(), t.numel() * t.element_size()
    big = torch.zeros(osz + asz + 16, dtype=torch.uint8)
    shift = (osz - 1) // 16 * 16  # 16-byte aligned, inside `other`'s bytes
    tensors[other] = big[:osz].view(o.dtype).view(o.shape).copy_(o)
    tensors[arg] = big[shift:shift + asz].view(t.dtype).view(t.shape)
    _raises(name, ValueError, f"{arg} overlaps {other} in memory", tensors, scalars)


@pytest.mark.parametrize("name,arg,t,is_out", [c for c in OPERANDS if not c[3] and c[0] in CPU_BINDINGS],
                         ids=[i for i, c in zip(IDS, OPERANDS) if not c[3] and c[0] in CPU_BINDINGS])
def test_input_none(name, arg, t, is_out):
    tensors, _, scalars = _specs()[name]
    if name == "down_fwd" and arg == "b" or name == "phm_fwd" and arg == "bias":
        _call(name, tensors, scalars, **{arg: None}, **({"y": None} if arg == "b" else {}))  # optional
        return
    if name == "phm_bwd" and arg == "w_left":
        _raises(name, TypeError, "w_left is required", tensors, scalars, w_left=None)  # dx asks for it
        _call(name, tensors, scalars, w_left=None, dx=None)
        return
    _raises(name, TypeError, f"{arg} is required, got None", tensors, scalars, **{arg: None})


# ------------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize("name", CUDA_BINDINGS)
def test_cuda_binding_refuses_cpu_capsules(name):
    tensors, _, scalars = _specs()[name]
    _raises(name, ValueError, "must be a CUDA tensor, got DLPack device type 1", tensors, scalars, wrap=dl)
    # one CPU operand among CUDA ones
    for arg, t in tensors.items():
        _raises(name, ValueError, f"{arg} must be a CUDA tensor", tensors, scalars, **{arg: dl(t)})


@pytest.mark.parametrize("name", [b for b in CUDA_BINDINGS if b != "cuda_keep_mask"])  # one operand
def test_cuda_binding_refuses_mixed_devices(name):
    tensors, _, scalars = _specs()[name]
    last = list(tensors)[-1]
    _raises(name, ValueError, f"{last} is on cuda:1, the other operands on cuda:0", tensors, scalars,
            **{last: dlc.cuda(tensors[last], 1)})


@pytest.mark.parametrize("name", CPU_BINDINGS)
def test_cpu_binding_refuses_cuda_capsules(name):
    tensors, _, scalars = _specs()[name]
    arg = list(tensors)[-1]
    _raises(name, ValueError, f"{arg} must be a CPU tensor", tensors, scalars, **{arg: dlc.cuda(tensors[arg])})


# ------------------------------------------------------------------------------------------ capsule forms


def test_forged_capsules_null_misaligned_lanes_consumed_versioned():
    tensors, _, scalars = _specs()["down_fwd"]
    x = tensors["x"]
    _raises("down_fwd", ValueError, "x has a null data pointer", tensors, scalars, x=dlc.capsule(x, data=0))
    _raises("down_fwd", ValueError, "x is not aligned to its element size 4", tensors, scalars,
            x=dlc.capsule(x, data=x.data_ptr() + 2))
    _raises("down_fwd", TypeError, r"x must have dtype .*lanes 4", tensors, scalars, x=dlc.capsule(x, lanes=4))
    cap = dl(x)
    torch.utils.dlpack.from_dlpack(cap)  # consumes it
    _raises("down_fwd", ValueError, "already consumed", tensors, scalars, x=cap)
    # a versioned, writable capsule is accepted
    _call("down_fwd", tensors, scalars, xa=dlc.capsule(tensors["xa"], read_only=False))
    # an empty operand may have a null pointer
    _C().keep_mask(dlc.capsule(torch.empty(0, 4, dtype=torch.uint8), data=0), 1, THR)


def test_scalar_checks_kept():
    tensors, _, scalars = _specs()["down_fwd"]
    for kw, match in [({"seed": -1}, "seed must be in"), ({"seed": 2**32}, "seed must be in"),
                      ({"threshold": 2**24 + 1}, "threshold must be in"), ({"scale": float("inf")}, "scale must"),
                      ({"scaling": float("nan")}, "scaling must be finite"), ({"nthreads": -1}, "nthreads must")]:
        _raises("down_fwd", ValueError, match, tensors, scalars, **kw)
    t2, _, s2 = _specs()["distill_fwd"]
    for kw, match in [({"kind": "kl"}, "kind must be"), ({"temperature": 0.0}, "temperature"),
                      ({"beta": 1.0}, "beta must be in")]:
        _raises("distill_fwd", ValueError, match, t2, s2, **kw)
    t3, _, s3 = _specs()["cuda_lora_mixed_fwd"]
    _raises("cuda_lora_mixed_fwd", ValueError, "block_m must be 16 or 64", t3, s3, block_m=32)
    t4, _, s4 = _specs()["nf4_dequant_rows"]
    for kw, match in [({"start": 5}, r"rows \[5, 7\) are outside the weight's 6 rows"), ({"start": -1}, "outside"),
                      ({"n": 7}, "packed holds 24 bytes"), ({"blocksize": 15}, "blocksize must be even"),
                      ({"blocksize": 8}, "absmax holds 3 scales"), ({"n": 0}, "out of range"),
                      ({"n": 2**40}, "out of range"), ({"nthreads": -1}, "nthreads must")]:
        _raises("nf4_dequant_rows", ValueError, match, t4, s4, **kw)


@pytest.mark.parametrize("name", ["cuda_down_bwd", "cuda_lora_mixed_fwd", "cuda_phm_bwd"])
def test_workspace_too_small(name):
    if not _C().CUDA and name != "cuda_phm_bwd":
        pytest.skip("without CUDA the stubs size this workspace at 0 bytes")  # phm's sizing is header-only
    tensors, _, scalars = _specs()[name]
    M = 4096  # big enough that every kernel needs scratch
    if name == "cuda_down_bwd":
        tensors.update(g=_r(M, 2), x=_r(M, 8), dx=_r(M, 8))
    elif name == "cuda_lora_mixed_fwd":
        tensors.update(x=_r(M, 8), y=torch.zeros(M, 5))
    else:
        tensors.update(dy=_r(M, 10), x=_r(M, 6), t=_r(M, 2, 2, 2), dx=torch.empty(M, 6))
    tensors["workspace"] = torch.zeros(4, dtype=torch.uint8)
    _raises(name, ValueError, "workspace holds 4 bytes", tensors, scalars)


# ------------------------------------------------------------------------------------------ reproducers

# The cases that, with integer addresses and trusted sizes, wrote past a buffer (oob), crashed or
# hung; the same operands now, as capsules.
REPRODUCERS = {
    "down_fwd: xa too small (M 4 -> 4096)": ("down_fwd", dict(x=_r(4096, 8), a=_r(2, 8), xa=torch.empty(4, 2)),
                                             dict(seed=1, threshold=0, scale=1.0), r"xa must have shape \[M, R\] = \[4096, 2\], got \[4, 2\]"),
    "down_fwd: y too small (N 4 -> 512)": ("down_fwd", dict(x=_r(64, 8), a=_r(2, 8), xa=torch.empty(64, 2),
                                                            y=torch.empty(64, 4), b=_r(512, 2)),
                                           dict(seed=1, threshold=0, scale=1.0), r"b must have shape \[N, R\] = \[4, 2\]"),
    "down_bwd: da too small (K 8 -> 4096)": ("down_bwd", dict(g=_r(16, 2), a=_r(2, 4096), x=_r(16, 4096), dx=None,
                                                              da=torch.empty(2, 8)),
                                             dict(seed=1, threshold=0, scale=1.0), "da must have shape"),
    "down_bwd: dx too small (M 4 -> 2048)": ("down_bwd", dict(g=_r(2048, 2), a=_r(2, 8), x=_r(2048, 8),
                                                              dx=torch.empty(4, 8), da=None),
                                             dict(seed=1, threshold=0, scale=1.0), "dx must have shape"),
    "lora_bwd: db too small (N 4 -> 2048)": ("lora_bwd", dict(dy=_r(16, 2048), b=_r(2048, 2), xa=_r(16, 2), a=_r(2, 8),
                                                              x=_r(16, 8), dx=None, da=None, db=torch.empty(4, 2)),
                                             dict(seed=1, threshold=0, scale=1.0, scaling=1.0), "db must have shape"),
    "lora_bwd: dx too small (M 4 -> 2048)": ("lora_bwd", dict(dy=_r(2048, 8), b=_r(8, 2), xa=_r(2048, 2), a=_r(2, 8),
                                                              x=_r(2048, 8), dx=torch.empty(4, 8), da=None, db=None),
                                             dict(seed=1, threshold=0, scale=1.0, scaling=1.0), "dx must have shape"),
    "distill_fwd: loss too small (N 4 -> 4096)": ("distill_fwd", dict(s=_r(4096, 16), t=_r(4096, 16),
                                                                      row_weight=torch.ones(4096), loss=torch.empty(4),
                                                                      grad=None),
                                                  dict(temperature=1.0, kind="forward"), "loss must have shape"),
    "distill_fwd: grad too small (V 16 -> 4096)": ("distill_fwd", dict(s=_r(16, 4096), t=_r(16, 4096),
                                                                       row_weight=torch.ones(16), loss=torch.empty(16),
                                                                       grad=torch.empty(16, 16)),
                                                   dict(temperature=1.0, kind="forward"), "grad must have shape"),
    "lora_mixed_fwd: y too small (N 4 -> 1024)": ("lora_mixed_fwd", dict(x=_r(64, 8), a=_r(1, 2, 8), b=_r(1, 1024, 2),
                                                                         scaling=torch.ones(1),
                                                                         seg_adapter=torch.zeros(1, dtype=torch.int32),
                                                                         seg_len=torch.tensor([64]), y=torch.empty(64, 4)),
                                                  {}, r"b must have shape \[J, N, R\] = \[1, 4, 2\]"),
    "phm_fwd: y too small (Q 2 -> 1024)": ("phm_fwd", dict(x=_r(64, 8), rule=_r(2, 2, 2), w_left=_r(2, 4, 1),
                                                           w_right=_r(2, 1, 1024), bias=None, y=torch.empty(64, 4),
                                                           t=torch.empty(64, 2, 2, 1)), {}, "y must have shape"),
    "phm_fwd: t too small (M 4 -> 4096)": ("phm_fwd", dict(x=_r(4096, 8), rule=_r(2, 2, 2), w_left=_r(2, 4, 4),
                                                           w_right=_r(2, 4, 2), bias=None, y=torch.empty(4096, 4),
                                                           t=torch.empty(4, 2, 2, 4)), {}, "t must have shape"),
    "phm_bwd: dx too small (M 4 -> 4096)": ("phm_bwd", dict(dy=_r(4096, 4), x=_r(4096, 8), t=_r(4096, 2, 2, 1),
                                                            rule=_r(2, 2, 2), w_left=_r(2, 4, 1), w_right=_r(2, 1, 2),
                                                            dx=torch.empty(4, 8), drule=None, dw_left=None,
                                                            dw_right=None, dbias=None), {}, "dx must have shape"),
}


@pytest.mark.parametrize("case", list(REPRODUCERS))
def test_reproducer_now_raises(case):
    name, tensors, scalars, match = REPRODUCERS[case]
    raw = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731  (bytes: NaN garbage compares)
    guards = {k: raw(t).clone() for k, t in tensors.items() if t is not None}
    with pytest.raises(ValueError, match=match):
        getattr(_C(), name)(**{k: dl(t) for k, t in tensors.items()}, **scalars)
    for k, g in guards.items():  # nothing was written
        assert torch.equal(raw(tensors[k]), g), k


def test_reproducer_int_addresses_and_wrong_dtype_refused():
    C = _C()
    a, xa = _r(2, 8), torch.empty(64, 2)
    with pytest.raises(TypeError, match="down_fwd: x must be a DLPack capsule"):
        C.down_fwd(4096, dl(a), dl(xa), 1, 0, 1.0)  # was: an unmapped address, SIGSEGV
    with pytest.raises(TypeError, match="keep_mask: out must be a DLPack capsule"):
        C.keep_mask(4096, 1, THR)
    with pytest.raises(TypeError, match="keep_mask: out must have dtype uint8, got float32"):
        C.keep_mask(dl(torch.empty(64, 64)), 1, THR)
    with pytest.raises(TypeError, match="down_fwd: x must have dtype float32 or float64, got float16"):
        C.down_fwd(dl(_r(64, 8, dtype=torch.float16)), dl(a), dl(xa), 1, 0, 1.0)  # was: read as float32
    with pytest.raises(TypeError, match="down_fwd: a must have dtype float32, got float64"):
        C.down_fwd(dl(_r(64, 8)), dl(a.double()), dl(xa), 1, 0, 1.0)


# ------------------------------------------------------------------------------------------ wrappers


def test_lora_wrappers_cross_check_shapes():
    from peftcore.native import lora

    M, K, N, R = 64, 16, 8, 4
    x, w, a, b = _r(M, K), _r(N, K), _r(R, K), _r(N, R)
    y, xa = lora.lora_fwd(x, w, None, a, b, 1.0, 0.1, 1)
    assert y.shape == (M, N) and xa.shape == (M, R)
    for args, match in [
        ((x, w, None, a, _r(4096, R)), r"lora_b must be \[N=8, R=4\]"),  # was: a hang (heap corrupted)
        ((x, w, None, _r(R, 4096), b), r"lora_a must be \[R, K=16\]"),
        ((x, _r(N, K + 1), None, a, b), r"weight must be \[N, K=16\]"),
        ((x, w, _r(N + 1), a, b), r"bias must be \[N=8\]"),
        ((x, w, None, a, _r(N, R + 1)), r"lora_b must be \[N=8, R=4\]"),
        ((x, w, None, a.unsqueeze(0), b), "lora_a must be 2-D"),
        ((x, w, None, a.double(), b), "lora_a has dtype torch.float64"),
    ]:
        for p in (0.0, 0.1):
            with pytest.raises(ValueError if "dtype" not in match else TypeError, match=match):
                lora.lora_fwd(*args, 1.0, p, 1)
    dy = _r(M, N)
    needs = (True, True, True, True, True)
    lora.lora_bwd(dy, x, xa, w, a, b, 1.0, 0.1, 1, needs)
    for kw, match in [
        (dict(xa=_r(4, R)), r"xa must be \[M=64, R=4\]"),  # was: silent out-of-bounds reads
        (dict(a=_r(R, 4096)), r"lora_a must be \[R, K=16\]"),
        (dict(dy=_r(M, N + 1)), r"dy must be \[M=64, N=8\]"),
        (dict(dy=_r(M - 1, N)), r"dy must be \[M=64, N=8\]"),
        (dict(b=_r(N + 3, R)), r"lora_b must be \[N=8, R=4\]"),
    ]:
        args = dict(dy=dy, x=x, xa=xa, weight=w, lora_a=a if "a" not in kw else kw["a"],
                    lora_b=b if "b" not in kw else kw["b"])
        args.update({k: v for k, v in kw.items() if k in ("dy", "xa")})
        for p in (0.0, 0.1):
            with pytest.raises(ValueError, match=match):
                lora.lora_bwd(args["dy"], args["x"], args["xa"], args["weight"], args["lora_a"], args["lora_b"],
                              1.0, p, 1, needs)
    with pytest.raises(ValueError, match=r"lora_a must be \[R, 16\]"):
        lora.down_fwd(x, _r(R, K + 1), 0.1, 1)
    with pytest.raises(ValueError, match="shapes: g"):
        lora.down_bwd(_r(M + 1, R), a, x, None, 0.1, 1, True)


def test_other_wrappers_cross_check_shapes():
    from peftcore.native import distill, lora_mixed, phm

    n, P, Q, k, M = 2, 3, 5, 2, 6
    x, rule, wl, wr = _r(M, n * P), _r(n, n, n), _r(n, P, k), _r(n, k, Q)
    y, t = phm.phm_fwd(x, rule, wl, wr, None)
    with pytest.raises(ValueError, match="x must be"):
        phm.phm_fwd(_r(M, n * P + 1), rule, wl, wr, None)
    with pytest.raises(ValueError, match="w_right must be"):
        phm.phm_fwd(x, rule, wl, _r(n, k + 1, Q), None)
    with pytest.raises(ValueError, match="bias must have shape"):
        phm.phm_fwd(x, rule, wl, wr, _r(n * Q + 1))
    with pytest.raises(ValueError, match="t must have shape"):
        phm.phm_bwd(_r(M, n * Q), x, t[:-1], rule, wl, wr, (True,) * 5)
    with pytest.raises(ValueError, match="dy must have shape"):
        phm.phm_bwd(_r(M, n * Q + 1), x, t, rule, wl, wr, (True,) * 5)
    s = _r(4, 7)
    with pytest.raises(ValueError, match="same shape"):
        distill.distill_fwd(s, _r(4, 8), 1.0, "forward", 0.5, torch.ones(4), True)
    with pytest.raises(ValueError, match="row_weight must have shape"):
        distill.distill_fwd(s, _r(4, 7), 1.0, "forward", 0.5, torch.ones(5), True)
    xm, wm = _r(6, 8), _r(5, 8)
    am, bm, sc, rows = _r(2, 3, 8), _r(2, 5, 3), torch.ones(2), torch.tensor([0, 0, 1, 1, -1, 0], dtype=torch.int32)
    lora_mixed.lora_mixed_fwd(xm, wm, None, am, bm, sc, rows)
    with pytest.raises(ValueError, match="lora_b must be"):
        lora_mixed.lora_mixed_fwd(xm, wm, None, am, _r(2, 6, 3), sc, rows)
    with pytest.raises(ValueError, match="rows must be 1-D of length 6"):
        lora_mixed.lora_mixed_fwd(xm, wm, None, am, bm, sc, rows[:5])
