"""peftcore._C and the cpp/cuda backends of lora_linear: the mask bit for bit, the kernels against the
float64 formula, the whole op against the reference, the loader, and the binding-level checks."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore import native
from peftcore.native import dl
from peftcore.ops import lora_linear
from peftcore.reference.lora import lora_linear_formula
from peftcore.reference.rng import dropout_threshold, hash32_int, keep_mask

from pc_testing import rel_err

REASON = native.unavailable_reason()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"peftcore._C unavailable: {REASON}")
FP32_TOL = 1e-5
FP64_TOL = 1e-12
TOL = {torch.float32: FP32_TOL, torch.float64: FP64_TOL}


def _C():
    return native.load()


def _strided(rows, cols, dtype, g, pad=0, device="cpu"):
    """[rows, cols] with row stride cols + pad (non-contiguous when pad > 0)."""
    base = torch.randn(rows, cols + pad, generator=g, dtype=torch.float64).to(dtype)
    return base.to(device)[:, :cols]


def _ref_mask(m, k, seed, p):
    return keep_mask(m, k, seed, p).double() if p > 0 else torch.ones(m, k, dtype=torch.float64)


def _close(out, ref, plain, tol, what=""):
    """rel_err(out, ref) < tol; or, for a reduction whose result cancels (say a 1x1 sum of hundreds
    of terms, where no fp32 method gets 1e-5), no worse than twice plain PyTorch in the same dtype."""
    e = rel_err(out, ref)
    if e < tol:
        return
    ep = rel_err(plain, ref)
    assert e <= 2 * ep, f"{what}: rel err {e:.3g} > tol {tol:g} and > 2x plain torch's {ep:.3g}"


# ------------------------------------------------------------------------------------------ loader


def test_import_peftcore_does_not_load_extension():
    code = "import sys, peftcore, peftcore.ops, peftcore.native; assert 'peftcore._C' not in sys.modules, 'loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_build_info_and_reasons():
    info = native.build_info()
    assert "built" in info and "info_file" in info
    json.dumps(info)  # printable by `peftcore info`
    reason = native.unavailable_reason(cuda=True)
    if not torch.cuda.is_available():
        assert isinstance(reason, str) and reason
    if REASON is not None:
        assert REASON.startswith("peftcore._C") or "disabled" in REASON


@needs_ext
def test_cuda_part_compiled_where_nvcc_is():
    """Where the build found nvcc (CI has one, without a GPU), the CUDA kernels must have compiled."""
    info = native.build_info()
    why = str(info.get("cuda_reason") or "")
    if not info.get("cuda") and ("nvcc not found" in why or "PEFTCORE_CUDA=0" in why):
        pytest.skip(f"built without CUDA on purpose or without nvcc: {why}")
    assert info.get("cuda"), f"nvcc was found but the CUDA kernels did not compile: {why}"
    assert _C().CUDA and _C().build_config()["cuda_archs"]


@needs_ext
def test_one_openmp_runtime_shared_with_torch():
    """The module's libgomp resolves to the one torch loaded: one pool, no two sets of spinning threads."""
    native.load()
    if sys.platform != "linux":
        pytest.skip("reads /proc/self/maps")
    gomps = [p for p in native._omp_runtimes() if "gomp" in p]
    assert len(gomps) <= 1, gomps


@needs_ext
def test_threads_setting():
    assert native.num_threads() == torch.get_num_threads()
    native.set_num_threads(1)
    try:
        assert native.num_threads() == 1
    finally:
        native.set_num_threads(None)
    with pytest.raises(ValueError):
        native.set_num_threads(0)


# ------------------------------------------------------------------------------------------ mask


@needs_ext
@given(x=st.integers(0, 2**32 - 1))
def test_hash32_matches_reference(x):
    assert _C().hash32(x) == hash32_int(x)


@needs_ext
@given(m=st.integers(1, 70), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       p=st.sampled_from([0.0, 1e-7, 0.1, 0.5, 0.9, 0.999999]))
def test_keep_mask_bit_exact(m, k, seed, p):
    out = torch.empty(m, k, dtype=torch.uint8)
    _C().keep_mask(dl(out), seed, dropout_threshold(p))
    assert torch.equal(out.bool(), keep_mask(m, k, seed, p))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(m=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2**31 - 1), p=st.sampled_from([0.1, 0.5]))
def test_down_fwd_mask_bit_exact(dtype, m, k, seed, p):
    """With x = 1 and A = I the projection returns the mask itself: the kernel's own mask, bit for bit."""
    x = torch.ones(m, k, dtype=dtype)
    a = torch.eye(k, dtype=dtype)
    xa = torch.empty(m, k, dtype=dtype)
    _C().down_fwd(dl(x), dl(a), dl(xa), seed, dropout_threshold(p), 1.0)
    assert torch.equal(xa != 0, keep_mask(m, k, seed, p))


# ------------------------------------------------------------------------------------------ kernels


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(m=st.integers(1, 70), k=st.integers(1, 150), r=st.integers(1, 40), pad=st.sampled_from([0, 3]),
       p=st.sampled_from([0.0, 0.1, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_down_fwd_matches_float64(dtype, m, k, r, pad, p, seed):
    g = torch.Generator().manual_seed(seed % 9973)
    x = _strided(m, k, dtype, g, pad)
    a = torch.randn(r, k, generator=g, dtype=torch.float64).to(dtype)
    xa = torch.empty(m, r, dtype=dtype)
    _C().down_fwd(dl(x), dl(a), dl(xa), seed, dropout_threshold(p), 1.0 / (1.0 - p))
    mask = _ref_mask(m, k, seed, p) / (1.0 - p)
    ref = (x.double() * mask) @ a.double().t()
    _close(xa, ref, (x * mask.to(dtype)) @ a.t(), TOL[dtype], "xa")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(m=st.integers(1, 300), k=st.integers(1, 150), r=st.integers(1, 40), pad=st.sampled_from([0, 5]),
       p=st.sampled_from([0.0, 0.1, 0.5]), outs=st.sampled_from(["both", "dx", "da"]),
       seed=st.integers(0, 2**31 - 1))
def test_down_bwd_matches_float64(dtype, m, k, r, pad, p, outs, seed):
    g = torch.Generator().manual_seed(seed % 9973)
    x = _strided(m, k, dtype, g, 3)
    a = torch.randn(r, k, generator=g, dtype=torch.float64).to(dtype)
    gr = torch.randn(m, r, generator=g, dtype=torch.float64).to(dtype)
    dx_store = torch.randn(m, k + pad, generator=g, dtype=torch.float64).to(dtype)
    dx0 = dx_store.clone()
    dx = dx_store[:, :k] if outs in ("both", "dx") else None
    da = torch.empty(r, k, dtype=dtype) if outs in ("both", "da") else None
    _C().down_bwd(dl(gr), dl(a), dl(x), dl(dx), dl(da), seed, dropout_threshold(p), 1.0 / (1.0 - p))
    mask = _ref_mask(m, k, seed, p) / (1.0 - p)
    if dx is not None:
        ref = dx0[:, :k].double() + mask * (gr.double() @ a.double())
        _close(dx, ref, dx0[:, :k] + mask.to(dtype) * (gr @ a), TOL[dtype], "dx")
        assert torch.equal(dx_store[:, k:], dx0[:, k:])  # the row padding is untouched
    else:
        assert torch.equal(dx_store, dx0)
    if da is not None:
        _close(da, gr.double().t() @ (x.double() * mask), gr.t() @ (x * mask.to(dtype)), TOL[dtype], "da")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(m=st.integers(1, 40), k=st.integers(1, 90), n=st.integers(1, 70), r=st.integers(1, 20),
       p=st.sampled_from([0.0, 0.1, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_down_fwd_fused_up_projection(dtype, m, k, n, r, p, seed):
    """down_fwd with y: xa as before and y += scaling * xa Bᵀ in the same pass (y row-strided)."""
    g = torch.Generator().manual_seed(seed % 9973)
    x = _strided(m, k, dtype, g, 2)
    a = torch.randn(r, k, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(n, r, generator=g, dtype=torch.float64).to(dtype)
    y_store = torch.randn(m, n + 3, generator=g, dtype=torch.float64).to(dtype)
    y0 = y_store.clone()
    y = y_store[:, :n]
    xa = torch.empty(m, r, dtype=dtype)
    _C().down_fwd(dl(x), dl(a), dl(xa), seed, dropout_threshold(p), 1.0 / (1.0 - p), y=dl(y), b=dl(b),
                  scaling=0.625)
    mask = _ref_mask(m, k, seed, p) / (1.0 - p)
    ref_xa = (x.double() * mask) @ a.double().t()
    plain_xa = (x * mask.to(dtype)) @ a.t()
    _close(xa, ref_xa, plain_xa, TOL[dtype], "xa")
    ref_y = y0[:, :n].double() + 0.625 * ref_xa @ b.double().t()
    _close(y, ref_y, y0[:, :n] + 0.625 * plain_xa @ b.t(), TOL[dtype], "y")
    assert torch.equal(y_store[:, n:], y0[:, n:])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(m=st.integers(1, 300), k=st.integers(1, 90), n=st.integers(1, 70), r=st.integers(1, 20),
       p=st.sampled_from([0.0, 0.1, 0.5]), outs=st.sets(st.sampled_from(["dx", "da", "db"]), min_size=1),
       seed=st.integers(0, 2**31 - 1))
def test_lora_bwd_fused_matches_float64(dtype, m, k, n, r, p, outs, seed):
    """lora_bwd: g = scaling dy B inside, then dx += dropout(g A), dA = gᵀ dropout(x), dB = scaling dyᵀ xa."""
    g = torch.Generator().manual_seed(seed % 9973)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x, dy = _strided(m, k, dtype, g, 3), _strided(m, n, dtype, g, 2)
    a, b, xa = rnd(r, k), rnd(n, r), rnd(m, r)
    dx0 = rnd(m, k)
    dx = dx0.clone() if "dx" in outs else None
    da = torch.empty(r, k, dtype=dtype) if "da" in outs else None
    db = torch.empty(n, r, dtype=dtype) if "db" in outs else None
    s = 1.5
    _C().lora_bwd(dl(dy), dl(b), dl(xa), dl(a), dl(x), dl(dx), dl(da), dl(db), seed, dropout_threshold(p),
                  1.0 / (1.0 - p), s)
    mask = _ref_mask(m, k, seed, p) / (1.0 - p)
    g64, g32 = s * dy.double() @ b.double(), s * dy @ b
    if dx is not None:
        _close(dx, dx0.double() + mask * (g64 @ a.double()), dx0 + mask.to(dtype) * (g32 @ a), TOL[dtype], "dx")
    if da is not None:
        _close(da, g64.t() @ (x.double() * mask), g32.t() @ (x * mask.to(dtype)), TOL[dtype], "da")
    if db is not None:
        _close(db, s * dy.double().t() @ xa.double(), s * dy.t() @ xa, TOL[dtype], "db")


@needs_ext
@pytest.mark.parametrize("shape", [(1000, 300, 16), (257, 2000, 8), (4096, 64, 4)])
def test_down_bwd_deterministic_across_thread_counts(shape):
    m, k, r = shape
    g = torch.Generator().manual_seed(0)
    x, a, gr = (torch.randn(*s, generator=g) for s in ((m, k), (r, k), (m, r)))
    n = 96
    dy, b, xa = (torch.randn(*s, generator=g) for s in ((m, n), (n, r), (m, r)))
    outs = []
    for nt in (1, 2, 3):
        da, da2, db = torch.empty(r, k), torch.empty(r, k), torch.empty(n, r)
        dx, dx2 = torch.zeros(m, k), torch.zeros(m, k)
        _C().down_bwd(dl(gr), dl(a), dl(x), dl(dx), dl(da), 7, dropout_threshold(0.1), 1 / 0.9, nt)
        _C().lora_bwd(dl(dy), dl(b), dl(xa), dl(a), dl(x), dl(dx2), dl(da2), dl(db), 7, dropout_threshold(0.1),
                      1 / 0.9, 2.0, nt)
        outs.append((dx, da, dx2, da2, db))
    for other in outs[1:]:
        for t0, t1 in zip(outs[0], other):
            assert torch.equal(t0, t1)


@needs_ext
def test_empty_rows():
    k, r = 10, 3
    da = torch.full((r, k), 5.0)
    x = torch.empty(0, k)
    a, gr = torch.randn(r, k), torch.empty(0, r)
    _C().down_bwd(dl(gr), dl(a), dl(x), None, dl(da), 1, dropout_threshold(0.5), 2.0)
    assert torch.equal(da, torch.zeros(r, k))


# ------------------------------------------------------------------------------------------ binding checks


@needs_ext
def test_binding_rejects_bad_arguments():
    C = _C()
    x, a, xa = torch.randn(4, 8), torch.randn(2, 8), torch.empty(4, 2)
    good = lambda: dict(x=dl(x), a=dl(a), xa=dl(xa), seed=1, threshold=100, scale=1.0)  # noqa: E731
    C.down_fwd(**good())
    for bad, err, match in [
        (dict(x=x.data_ptr()), TypeError, "x must be a DLPack capsule"),
        (dict(x=dl(torch.randn(8, 4)[:, ::2])), ValueError, "x must have a unit column stride"),
        (dict(a=dl(torch.randn(0, 8))), ValueError, "rank R must be in"),
        (dict(xa=dl(torch.empty(3, 2))), ValueError, r"xa must have shape \[M, R\] = \[4, 2\], got \[3, 2\]"),
        (dict(threshold=2**24 + 1), ValueError, "threshold must be in"),
        (dict(seed=-1), ValueError, "seed must be in"),
        (dict(x=dl(x.half())), TypeError, "x must have dtype float32 or float64, got float16"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
    ]:
        with pytest.raises(err, match=match):
            C.down_fwd(**{**good(), **bad})
    with pytest.raises(ValueError, match="dx overlaps x"):
        C.down_bwd(dl(xa), dl(a), dl(x), dl(x), None, 1, 0, 1.0)
    with pytest.raises(TypeError, match="g is required"):
        C.down_bwd(None, dl(a), dl(x), None, dl(torch.empty(2, 8)), 1, 0, 1.0)
    if not C.CUDA:
        with pytest.raises(ValueError, match="x must be a CUDA tensor"):
            C.cuda_down_fwd(dl(x), dl(a), dl(xa), 1, 0, 1.0, 0)


@needs_ext
def test_python_wrappers_check_tensors():
    from peftcore.native import lora as nl

    x, a = torch.randn(4, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="unit column stride"):
        nl.down_fwd(torch.randn(8, 4).t(), a, 0.1, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        nl.down_fwd(x.half(), a.half(), 0.1, 1)
    with pytest.raises(TypeError, match="dtype"):
        nl.down_fwd(x, a.double(), 0.1, 1)
    with pytest.raises(ValueError, match="lora_a must be"):
        nl.down_fwd(x, torch.randn(2, 7), 0.1, 1)


# ------------------------------------------------------------------------------------------ whole op


def _op_inputs(lead, k, n, r, bias, noncontig, g):
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = mk(*lead, 2 * k)[..., ::2] if noncontig else mk(*lead, k)
    return dict(x=x, weight=mk(n, k) / k**0.5, bias=mk(n) if bias else None, lora_a=mk(r, k) / k**0.5,
                lora_b=mk(n, r) / r**0.5)


def _op_run(t, dtype, dy, scaling, p, seed, backend, grad_w):
    leaves = {}
    for key, v in t.items():
        if v is None:
            leaves[key] = None
            continue
        leaves[key] = v.detach().to(dtype, copy=True).requires_grad_(key != "weight" or grad_w)
    if backend == "formula":
        y = lora_linear_formula(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"],
                                scaling, p, seed)
    else:
        y = lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_a"], leaves["lora_b"], scaling,
                        dropout_p=p, seed=seed, backend=backend)
    y.backward(dy.to(dtype))
    return y, {key: v.grad for key, v in leaves.items() if v is not None and v.requires_grad}


@needs_ext
@given(m=st.integers(1, 45), k=st.integers(1, 90), n=st.integers(1, 50), r=st.integers(1, 20),
       p=st.sampled_from([0.0, 0.1, 0.5]), bias=st.booleans(), three_d=st.booleans(), noncontig=st.booleans(),
       grad_w=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**31 - 1))
def test_lora_linear_cpp_matches_float64_and_reference(m, k, n, r, p, bias, three_d, noncontig, grad_w, dtype, seed):
    g = torch.Generator().manual_seed(seed % 9973)
    lead = (2, (m + 1) // 2) if three_d else (m,)
    t = _op_inputs(lead, k, n, r, bias, noncontig, g)
    dy = torch.randn(*lead, n, generator=g, dtype=torch.float64)  # not all ones
    y, grads = _op_run(t, dtype, dy, 0.75, p, seed, "cpp", grad_w)
    y64, g64 = _op_run(t, torch.float64, dy, 0.75, p, seed, "formula", grad_w)
    yref, gref = _op_run(t, dtype, dy, 0.75, p, seed, "reference", grad_w)
    assert y.dtype == dtype and y.shape == (*lead, n)
    _close(y, y64, yref, TOL[dtype], "y")
    assert set(grads) == set(g64)
    for key in g64:
        assert grads[key].shape == g64[key].shape, key
        _close(grads[key], g64[key], gref[key], TOL[dtype], key)


@needs_ext
def test_lora_linear_cpp_larger_shape_and_empty():
    g = torch.Generator().manual_seed(3)
    t = _op_inputs((300,), 257, 130, 16, True, False, g)
    dy = torch.randn(300, 130, generator=g, dtype=torch.float64)
    y, grads = _op_run(t, torch.float32, dy, 2.0, 0.1, 99, "cpp", False)
    y64, g64 = _op_run(t, torch.float64, dy, 2.0, 0.1, 99, "formula", False)
    assert rel_err(y, y64) < FP32_TOL
    for key in g64:
        assert rel_err(grads[key], g64[key]) < FP32_TOL, key
    # no rows at all
    t0 = {key: (v[:0] if key == "x" else v) for key, v in t.items()}
    y, grads = _op_run(t0, torch.float32, dy[:0], 2.0, 0.1, 99, "cpp", False)
    assert y.shape == (0, 130) and torch.count_nonzero(grads["lora_a"]) == 0


@needs_ext
def test_lora_linear_cpp_broadcast_and_overlapping_inputs():
    """Row stride 0 (an expanded row, an expanded grad) and overlapping rows read correctly."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(400, generator=g, dtype=torch.float64)
    w, a, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 9), (3, 9), (6, 3)))
    for x in (base[:9].expand(40, 9), base.as_strided((40, 9), (4, 1))):
        outs = {}
        for backend in ("cpp", "reference"):
            xx = x.detach().clone().requires_grad_(True) if backend == "reference" else x.detach().requires_grad_(True)
            aa = a.clone().requires_grad_(True)
            y = lora_linear(xx, w, None, aa, b, 0.5, dropout_p=0.25, seed=77, backend=backend)
            y.sum().backward()  # dy is an expanded tensor of ones
            outs[backend] = (y, aa.grad)
        assert rel_err(outs["cpp"][0], outs["reference"][0]) < FP64_TOL
        assert rel_err(outs["cpp"][1], outs["reference"][1]) < FP64_TOL


@needs_ext
def test_lora_linear_cpp_same_mask_as_reference_in_forward():
    """Large dropout makes any mask disagreement visible far above rounding."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 48, generator=g)
    w, a, b = torch.randn(24, 48, generator=g), torch.randn(8, 48, generator=g), torch.randn(24, 8, generator=g)
    y = lora_linear(x, w, None, a, b, 1.0, dropout_p=0.7, seed=2024, backend="cpp")
    yref = lora_linear(x, w, None, a, b, 1.0, dropout_p=0.7, seed=2024, backend="reference")
    assert rel_err(y, yref) < FP32_TOL


# ------------------------------------------------------------------------------------------ GPU


def _cuda_or_skip():
    reason = native.unavailable_reason(cuda=True)
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cuda_keep_mask_bit_exact(p):
    _cuda_or_skip()
    m, k, seed = 1037, 771, 123457
    out = torch.empty(m, k, dtype=torch.uint8, device="cuda")
    _C().cuda_keep_mask(dl(out), seed, dropout_threshold(p), torch.cuda.current_stream().cuda_stream)
    assert torch.equal(out.cpu().bool(), keep_mask(m, k, seed, p))
    # and the projection kernel's own mask
    x, a = torch.ones(70, 64, device="cuda"), torch.eye(64, device="cuda")
    from peftcore.native import lora as nl

    xa = nl.down_fwd(x, a, p, seed)
    assert torch.equal((xa != 0).cpu(), keep_mask(70, 64, seed, p))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 100, 5), (300, 257, 16), (2049, 1030, 40), (4096, 512, 64)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_kernels_match_float64(dtype, shape, p):
    _cuda_or_skip()
    from peftcore.native import lora as nl

    m, k, r = shape
    seed = 4242
    g = torch.Generator().manual_seed(1)
    x = _strided(m, k, dtype, g, 3, device="cuda")
    a = torch.randn(r, k, generator=g, dtype=torch.float64).to(dtype).cuda()
    gr = torch.randn(m, r, generator=g, dtype=torch.float64).to(dtype).cuda()
    dx0 = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype).cuda()
    mask = _ref_mask(m, k, seed, p).cuda() / (1.0 - p)
    tol = FP32_TOL if dtype == torch.float32 else 1e-2
    xa = nl.down_fwd(x, a, p, seed)
    ref = (x.double() * mask) @ a.double().t()
    assert rel_err(xa, ref) < tol
    plain = (x * mask.to(dtype)) @ a.t()  # torch in the same dtype: the kernel must be about as good
    assert rel_err(xa, ref) <= 2 * rel_err(plain, ref) + 1e-6
    dx = dx0.clone()
    da = nl.down_bwd(gr, a, x, dx, p, seed, True)
    ref_dx = dx0.double() + mask * (gr.double() @ a.double())
    ref_da = gr.double().t() @ (x.double() * mask)
    assert rel_err(dx, ref_dx) < tol
    assert rel_err(da, ref_da) < tol
    assert da.dtype == dtype
    da2 = nl.down_bwd(gr, a, x, None, p, seed, True)
    assert torch.equal(da, da2)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_linear_cuda_matches_reference(dtype, p):
    _cuda_or_skip()
    g = torch.Generator().manual_seed(7)
    t = {key: (v.cuda() if v is not None else None) for key, v in _op_inputs((3, 77), 130, 96, 16, True, True, g).items()}
    dy = torch.randn(3, 77, 96, generator=g, dtype=torch.float64).cuda()
    y, grads = _op_run(t, dtype, dy, 2.0, p, 31337, "cuda", False)
    y64, g64 = _op_run(t, torch.float64, dy, 2.0, p, 31337, "formula", False)
    yt, gt = _op_run(t, dtype, dy, 2.0, p, 31337, "reference", False)
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    assert rel_err(y, y64) < tol
    assert rel_err(y, y64) <= 2 * rel_err(yt, y64) + 1e-6
    for key in g64:
        assert rel_err(grads[key], g64[key]) < tol, key
        assert rel_err(grads[key], g64[key]) <= 2 * rel_err(gt[key], g64[key]) + 1e-6, key
