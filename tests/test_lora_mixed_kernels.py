"""Backends of ``lora_mixed_linear`` (triton, cpp, cuda) against the float64 reference.

The op (``peftcore.ops.lora_mixed_linear`` under ``torch.no_grad``) and the raw backend functions
``lora_mixed_fwd`` are compared with :func:`peftcore.reference.lora_mixed.lora_mixed_fwd` run in
float64, on random batches: one-token examples, adapter index -1, one adapter for all, a different
adapter per example, odd K/N/R, repeated non-consecutive segments, with and without bias, x with
a padded row stride.  Also: the tile table, the checks on bad input (Python wrapper and binding),
and real sizes on a GPU (marked ``gpu``, skipped on CPU).  Triton runs under its interpreter on
the CPU, so the shapes there are tiny.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton kernels

from peftcore import native
from peftcore.native import dl
from peftcore.native import lora_mixed as nmix
from peftcore.ops import lora_mixed_linear
from peftcore.reference.lora_mixed import lora_mixed_fwd as ref_fwd

from pc_testing import rel_err

CUDA = torch.cuda.is_available()
REASON = native.unavailable_reason()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"peftcore._C unavailable: {REASON}")
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
MODES = ("random", "with_base", "one", "distinct", "all_base")


def _tk():
    """The Triton module, or a skip when triton cannot import."""
    return pytest.importorskip("peftcore.kernels.lora_mixed", reason="triton not importable")


def _backend_or_skip(backend: str):
    if backend in ("cpp", "cuda") and REASON is not None:
        pytest.skip(f"peftcore._C unavailable: {REASON}")
    if backend == "triton":
        _tk()
    if backend == "cuda":
        reason = native.unavailable_reason(cuda=True)
        if reason is not None:
            pytest.skip(f"cuda backend unavailable: {reason}")


def _raw(backend: str):
    _backend_or_skip(backend)
    return _tk().lora_mixed_fwd if backend == "triton" else nmix.lora_mixed_fwd


def make_batch(B, S, K, N, R, J, mode, bias, seed, pad=0):
    """float64 inputs of the op: x [B, S, K] (row stride K + pad), stacks, scaling, adapter_index."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = rnd(B, S, K + pad)[..., :K]
    t = {"x": x, "weight": rnd(N, K) / K**0.5, "bias": rnd(N) if bias else None,
         "lora_a": rnd(J, R, K) / K**0.5, "lora_b": rnd(J, N, R) / R**0.5,
         "scaling": torch.rand(J, generator=g) * 2 + 0.5}
    if mode == "one":
        idx = torch.full((B,), int(torch.randint(0, J, (1,), generator=g)))
    elif mode == "distinct":
        idx = torch.randperm(J, generator=g)[:B]
    elif mode == "all_base":
        idx = torch.full((B,), -1)
    else:
        idx = torch.randint(-1 if mode == "with_base" else 0, J, (B,), generator=g)
        if mode == "with_base":
            idx[int(torch.randint(0, B, (1,), generator=g))] = -1
    t["adapter_index"] = idx.to(torch.int32)
    return t


def cast(t, dtype, device="cpu"):
    """The batch in ``dtype`` on ``device`` (scaling and adapter_index keep their dtypes)."""
    out = {}
    for k, v in t.items():
        if v is not None and k not in ("scaling", "adapter_index"):
            v = v.to(dtype)
        out[k] = v.to(device) if v is not None else None
    return out


def op(t, backend):
    with torch.no_grad():
        return lora_mixed_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"],
                                 t["adapter_index"], backend=backend)


def rows_of(t):
    S = t["x"].shape[1]
    return t["adapter_index"].repeat_interleave(S).to(torch.int32)


# ------------------------------------------------------------------------------------------ equivalence


@given(B=st.integers(1, 5), S=st.sampled_from([1, 2, 5, 17]), K=st.integers(1, 40), N=st.integers(1, 40),
       R=st.integers(1, 20), J=st.integers(1, 4), mode=st.sampled_from(MODES), bias=st.booleans(),
       backend=st.sampled_from(["triton", "cpp"]), seed=st.integers(0, 2**16))
@settings(**SETTINGS)
def test_op_matches_float64_reference(B, S, K, N, R, J, mode, bias, backend, seed):
    _backend_or_skip(backend)
    if mode == "distinct":
        J = max(J, B)
    t = make_batch(B, S, K, N, R, J, mode, bias, seed)
    want = op(t, "reference")
    y = op(cast(t, torch.float32), backend)
    assert y.dtype == torch.float32 and y.shape == (B, S, N)
    assert rel_err(y, want) < TOL[torch.float32], (backend, mode)
    base = (rows_of(t) < 0).reshape(B, S)
    if base.any():  # base-only rows are torch's linear, untouched
        t32 = cast(t, torch.float32)
        lin = torch.nn.functional.linear(t32["x"].reshape(B * S, K), t32["weight"], t32["bias"])
        assert torch.equal(y[base], lin.reshape(B, S, N)[base])


@needs_ext
@given(B=st.integers(1, 6), S=st.sampled_from([1, 3, 33]), K=st.integers(1, 70), N=st.integers(1, 70),
       R=st.integers(1, 24), J=st.integers(1, 5), mode=st.sampled_from(MODES), bias=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(**SETTINGS)
def test_cpp_float64_matches_reference(B, S, K, N, R, J, mode, bias, seed):
    if mode == "distinct":
        J = max(J, B)
    t = make_batch(B, S, K, N, R, J, mode, bias, seed)
    y = op(t, "cpp")
    assert y.dtype == torch.float64
    assert rel_err(y, op(t, "reference")) < TOL[torch.float64]


@st.composite
def segment_rows(draw, J):
    """rows as runs of adapters; adapters repeat in non-adjacent runs, -1 runs included."""
    runs = draw(st.lists(st.tuples(st.integers(-1, J - 1), st.integers(1, 20)), min_size=1, max_size=6))
    return torch.tensor([a for a, n in runs for _ in range(n)], dtype=torch.int32)


@given(data=st.data(), K=st.integers(1, 37), N=st.integers(1, 37), R=st.integers(1, 17), J=st.integers(1, 3),
       bias=st.booleans(), pad=st.sampled_from([0, 3]), backend=st.sampled_from(["triton", "cpp"]),
       seed=st.integers(0, 2**16))
@settings(**SETTINGS)
def test_raw_backend_on_segments(data, K, N, R, J, bias, pad, backend, seed):
    """The raw contract: rows with repeated segments, x with a padded row stride, y fresh."""
    fwd = _raw(backend)
    rows = data.draw(segment_rows(J))
    t = make_batch(1, rows.shape[0], K, N, R, J, "one", bias, seed, pad=pad)
    x64 = t["x"][0]
    args64 = (x64, t["weight"], t["bias"], t["lora_a"], t["lora_b"], t["scaling"].float(), rows)
    want = ref_fwd(*args64)
    f32 = [a.float() if a is not None and a.is_floating_point() else a for a in args64]
    f32[0] = t["x"][0].float() if pad == 0 else torch.zeros(rows.shape[0], K + pad)[:, :K].copy_(x64)
    assert f32[0].stride(0) == K + pad
    y = fwd(*f32)
    assert y.shape == (rows.shape[0], N) and y.is_contiguous()
    assert rel_err(y, want) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    _backend_or_skip("triton")
    t = make_batch(4, 9, 37, 29, 7, 3, "with_base", True, 5)
    want = op(t, "reference")
    y = op(cast(t, dtype), "triton")
    plain = op(cast(t, dtype), "reference")  # torch in the same dtype
    assert y.dtype == dtype
    e = rel_err(y, want)
    assert e < 1e-2 and e <= 2 * rel_err(plain, want) + 1e-6, (e, rel_err(plain, want))


def test_triton_k_splits_and_rank_blocks():
    """One tile, K = 70 and R = 20: the shrink runs several K splits and (interpreter) rank blocks."""
    tk = _tk()
    t = make_batch(1, 3, 70, 21, 20, 2, "one", True, 8)
    if not CUDA:
        assert tk._k_splits(2, 70, torch.device("cpu"))[0] == 3
    y = op(cast(t, torch.float32, "cuda" if CUDA else "cpu"), "triton")
    assert rel_err(y, op(t, "reference")) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_non_contiguous_x_and_empty_batches(backend):
    _backend_or_skip(backend)
    t = make_batch(3, 4, 19, 11, 5, 2, "random", True, 9)
    t32 = cast(t, torch.float32)
    want = op(t, "reference")
    # Column-strided x: the op copies it; a transposed [S, B] layout: reshape copies.
    t32["x"] = torch.stack([t32["x"], torch.zeros_like(t32["x"])], -1)[..., 0]
    assert t32["x"].stride(-1) == 2
    assert rel_err(op(t32, backend), want) < TOL[torch.float32]
    t32["x"] = t["x"].float().transpose(0, 1).contiguous().transpose(0, 1)
    assert rel_err(op(t32, backend), want) < TOL[torch.float32]
    # No rows at all, and a batch that is all base-only.
    t0 = dict(t32, x=t32["x"][:0], adapter_index=t32["adapter_index"][:0])
    assert op(t0, backend).shape == (0, 4, 11)
    tb = dict(t32, adapter_index=torch.full((3,), -1, dtype=torch.int32))
    lin = torch.nn.functional.linear(t32["x"].reshape(12, 19), t32["weight"], t32["bias"])
    assert torch.equal(op(tb, backend), lin.reshape(3, 4, 11))


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_raw_output_is_detached(backend):
    fwd = _raw(backend)
    t = cast(make_batch(1, 6, 8, 5, 3, 2, "one", True, 1), torch.float32)
    w = t["weight"].clone().requires_grad_(True)
    y = fwd(t["x"][0], w, t["bias"], t["lora_a"], t["lora_b"], t["scaling"], rows_of(t))
    assert not y.requires_grad and y.grad_fn is None


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_raw_broadcast_and_overlapping_rows(backend):
    """x rows with stride 0 (one row repeated) or overlapping (stride 2 < K) are read correctly."""
    fwd = _raw(backend)
    t = cast(make_batch(1, 1, 9, 7, 3, 2, "one", True, 12), torch.float32)
    base = torch.randn(100, generator=torch.Generator().manual_seed(2))
    rows = torch.tensor([0] * 5 + [-1] * 3 + [1] * 9 + [0] * 3, dtype=torch.int32)
    floats = [t[k] for k in ("weight", "bias", "lora_a", "lora_b")]
    for x in (base[:9].expand(20, 9), base.as_strided((20, 9), (2, 1))):
        want = ref_fwd(x.double(), *(f.double() for f in floats), t["scaling"], rows)
        assert rel_err(fwd(x, *floats, t["scaling"], rows), want) < TOL[torch.float32]


@needs_ext
def test_cpp_same_result_for_any_thread_count():
    t = cast(make_batch(6, 40, 67, 53, 9, 3, "random", True, 4), torch.float32)
    outs = []
    for n in (1, 2, 3):
        native.set_num_threads(n)
        try:
            outs.append(op(t, "cpp"))
        finally:
            native.set_num_threads(None)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ------------------------------------------------------------------------------------------ tile table


def test_plan_tiles_segments():
    rows = torch.tensor([0] * 5 + [2] * 17 + [-1] * 3 + [1] + [0] * 11, dtype=torch.int32)
    tiles, bm = nmix.plan(rows, 3, (16,))
    assert bm == 16
    assert tiles.dtype == torch.int32 and tiles.is_contiguous()
    assert tiles.tolist() == [[0, 5, 0], [5, 21, 2], [21, 22, 2], [25, 26, 1], [26, 37, 0]]
    # Tall tiles for long segments, short ones when most segments are a single row.
    assert nmix.plan(torch.zeros(300, dtype=torch.int32), 1, (16, 64))[1] == 64
    assert nmix.plan(torch.arange(40, dtype=torch.int32) % 4, 4, (16, 64))[1] == 16
    assert nmix.plan(torch.full((7,), -1, dtype=torch.int32), 2, (16,))[0].shape == (0, 3)
    assert nmix.plan(torch.empty(0, dtype=torch.int32), 2, (16,))[0].shape == (0, 3)
    with pytest.raises(ValueError, match=r"rows values must be in \[-1, 3\)"):
        nmix.plan(torch.tensor([0, 3], dtype=torch.int32), 3, (16,))
    with pytest.raises(ValueError, match="rows values"):
        nmix.plan(torch.tensor([-2, 0], dtype=torch.int32), 3, (16,))


# ------------------------------------------------------------------------------------------ bad input


def _good():
    t = cast(make_batch(1, 6, 8, 5, 3, 2, "one", True, 1), torch.float32)
    return {"x": t["x"][0], "weight": t["weight"], "bias": t["bias"], "lora_a": t["lora_a"],
            "lora_b": t["lora_b"], "scaling": t["scaling"], "rows": rows_of(t)}


BAD = [
    ({"rows": torch.zeros(6, dtype=torch.int64)}, TypeError, "rows must be int32"),
    ({"rows": torch.zeros(5, dtype=torch.int32)}, ValueError, "rows must be 1-D of length 6"),
    ({"rows": torch.zeros(12, dtype=torch.int32)[::2]}, ValueError, "rows must be contiguous"),
    ({"rows": torch.full((6,), 2, dtype=torch.int32)}, ValueError, r"rows values must be in \[-1, 2\)"),
    ({"rows": torch.zeros(6, dtype=torch.int32, device="meta")}, ValueError, "rows is on meta"),
    ({"scaling": torch.ones(2, dtype=torch.float64)}, TypeError, "scaling must be float32"),
    ({"scaling": torch.ones(3)}, ValueError, "scaling must be 1-D of length 2"),
    ({"x": torch.randn(8, 6).t()}, ValueError, "x must have a unit column stride"),
    ({"x": torch.randn(6, 7)}, ValueError, r"weight must be \[N, K=7\]"),
    ({"x": torch.randn(6, 8, 1)}, ValueError, "x must be 2-D"),
    ({"weight": torch.randn(5, 8, dtype=torch.float64)}, TypeError, "weight has dtype torch.float64"),
    ({"bias": torch.randn(4)}, ValueError, r"bias must be \[N=5\]"),
    ({"lora_a": torch.randn(2, 3, 7)}, ValueError, r"lora_a must be \[J, R, K=8\]"),
    ({"lora_b": torch.randn(2, 5, 4)}, ValueError, r"lora_b must be \[J=2, N=5, R=3\]"),
    ({"lora_b": torch.randn(3, 5, 2)}, ValueError, "lora_b must be"),
    ({"lora_a": "a"}, TypeError, "lora_a must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("bad,exc,match", BAD)
def test_bad_inputs_rejected(backend, bad, exc, match):
    fwd = _raw(backend)
    args = _good()
    fwd(**args)
    with pytest.raises(exc, match=match):
        fwd(**{**args, **bad})


@needs_ext
def test_cpp_specific_rejections():
    args = _good()
    with pytest.raises(ValueError, match="lora_a must be contiguous"):
        nmix.lora_mixed_fwd(**{**args, "lora_a": args["lora_a"].transpose(1, 2).contiguous().transpose(1, 2)})
    with pytest.raises(TypeError, match="float32 or float64"):
        nmix.lora_mixed_fwd(**{k: (v.half() if v.is_floating_point() and k != "scaling" else v)
                               for k, v in args.items()})


def test_triton_rejects_float64():
    fwd = _raw("triton")
    args = _good()
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fwd(**{k: (v.double() if v.is_floating_point() and k != "scaling" else v) for k, v in args.items()})


@needs_ext
def test_binding_rejects_bad_segments_and_pointers():
    C = native.load()
    x, a, b = torch.randn(6, 8), torch.randn(2, 3, 8), torch.randn(2, 5, 3)
    s, y = torch.ones(2), torch.zeros(6, 5)
    seg_a, seg_n = torch.tensor([0, -1, 1], dtype=torch.int32), torch.tensor([3, 1, 2])
    good = {"x": x, "a": a, "b": b, "scaling": s, "seg_adapter": seg_a, "seg_len": seg_n, "y": y}

    def call(fn=C.lora_mixed_fwd, **kw):
        fn(**{k: dl(v) if isinstance(v, torch.Tensor) else v for k, v in {**good, **kw}.items()})

    call()
    want = torch.cat([x[:3] @ a[0].t() @ b[0].t(), torch.zeros(1, 5), x[4:] @ a[1].t() @ b[1].t()])
    assert rel_err(y, want) < 1e-5
    for adapters, lengths, match in [
        ([0, -1, 2], [3, 1, 2], "segment 2 has adapter 2"),
        ([0, -2, 1], [3, 1, 2], "segment 1 has adapter -2"),
        ([0, -1, 1], [3, 0, 3], "segment 1 has length 0"),
        ([0, -1, 1], [3, 1, 3], "segment 2 has length 3"),  # runs past M
        ([0, -1, 1], [3, 1, 1], "segment lengths add up to 5"),
    ]:
        sa, sn = torch.tensor(adapters, dtype=torch.int32), torch.tensor(lengths)
        with pytest.raises(ValueError, match=match):
            call(seg_adapter=sa, seg_len=sn)
    for bad, err, match in [
        ({"x": x.data_ptr()}, TypeError, "x must be a DLPack capsule"),
        ({"b": torch.randn(2, 6, 3)}, ValueError, r"b must have shape \[J, N, R\] = \[2, 5, 3\]"),
        ({"seg_len": seg_n[:2]}, ValueError, r"seg_len must have shape \[num_segs\] = \[3\]"),
        ({"seg_len": seg_n.int()}, TypeError, "seg_len must have dtype int64"),
        ({"y": torch.zeros(6, 10)[:, ::2]}, ValueError, "y must have a unit column stride"),
        ({"y": torch.zeros(30).as_strided((6, 5), (4, 1))}, ValueError, "y row stride 4 is smaller than its row"),
        ({"seg_adapter": torch.zeros(7, dtype=torch.int32), "seg_len": torch.ones(7, dtype=torch.int64)},
         ValueError, "seg_adapter has 7 segments, more than M=6"),
        ({"a": torch.randn(2, 0, 8), "b": torch.randn(2, 5, 0)}, ValueError, "rank R must be in"),
        ({"a": torch.randn(0, 3, 8)}, ValueError, "J >= 1 adapters"),
        ({"x": x.bfloat16()}, TypeError, "x must have dtype float32 or float64"),
    ]:
        with pytest.raises(err, match=match):
            call(**bad)
    with pytest.raises(ValueError, match="block_m must be 16 or 64"):
        C.cuda_lora_mixed_workspace(4, 32, 64, 8)
    cuda = {k: v for k, v in good.items() if k not in ("seg_adapter", "seg_len")}
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        C.cuda_lora_mixed_fwd(**{k: dl(v) for k, v in cuda.items()}, tiles=dl(torch.zeros(1, 3, dtype=torch.int32)),
                              block_m=16, workspace=None, stream=0)


def test_segments_of_rows():
    rows = torch.tensor([1, 1, -1, 0, 0, 0, 1], dtype=torch.int32)
    adapter, length = nmix.segments(rows, 2)
    assert adapter.tolist() == [1, -1, 0, 1] and length.tolist() == [2, 1, 3, 1]
    assert adapter.dtype == torch.int32 and length.dtype == torch.int64
    with pytest.raises(ValueError, match=r"rows values must be in \[-1, 1\)"):
        nmix.segments(rows, 1)


# ------------------------------------------------------------------------------------------ GPU

GPU = "cuda"  # a module attribute, so the GPU tests' logic can be dry-run on the CPU with cpp
GPU_SHAPES = [  # (B, S, K, N, R, J, mode)
    (8, 256, 1024, 1024, 16, 4, "random"),  # prefill
    (32, 1, 4096, 4096, 64, 8, "with_base"),  # decode, every row its own tile
    (5, 77, 1030, 1000, 12, 3, "distinct"),  # odd sizes, R not a power of two
    (3, 300, 512, 2048, 8, 1, "one"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_backends_match_float64(backend, dtype, shape):
    _backend_or_skip(backend)
    B, S, K, N, R, J, mode = shape
    t = make_batch(B, S, K, N, R, J, mode, True, 17)
    want = op(cast(t, torch.float64, GPU), "reference")
    td = cast(t, dtype, GPU)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # ieee fp32 dots, and torch's plain GEMMs in fp32
    try:
        y = op(td, backend)
        plain = op(td, "reference")
        y2 = op(td, backend)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert y.dtype == dtype and y.shape == (B, S, N)
    e = rel_err(y, want)
    if dtype == torch.float32:
        assert e < 1e-5, e
    else:
        assert e < 1e-2 and e <= 2 * rel_err(plain, want) + 1e-6, (e, rel_err(plain, want))
    assert torch.equal(y, y2)  # deterministic (K-split partials summed in order)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_raw_segments_and_padded_rows(backend):
    fwd = _raw(backend)
    rows = torch.tensor([0] * 70 + [1] * 3 + [-1] * 20 + [0] * 130 + [2], dtype=torch.int32)
    t = make_batch(1, rows.shape[0], 777, 301, 24, 3, "one", False, 3, pad=5)
    args = [t["x"][0], t["weight"], None, t["lora_a"], t["lora_b"], t["scaling"].float(), rows]
    want = ref_fwd(*[a.to(GPU) if a is not None else None for a in args])
    dev = [a.to(GPU) if a is not None else None for a in args]
    dev[0] = torch.zeros(rows.shape[0], 782, device=GPU)[:, :777].copy_(args[0])
    dev[1:5] = [a.float() if a is not None else None for a in dev[1:5]]
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        y = fwd(*dev)
    finally:
        torch.set_float32_matmul_precision(prev)
    assert rel_err(y, want) < 1e-5
