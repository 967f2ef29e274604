"""The cpp and cuda backends of phm_linear (peftcore.native.phm): the whole op and the raw backend
functions against the float64 formula and the reference, determinism, and the argument checks.

``python tests/test_native_phm.py`` prints the CPU benchmark quoted in peftcore/native/phm.py.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftcore import native
from peftcore.native import dl
from peftcore.ops import phm_linear
from peftcore.reference import phm as ref
from peftcore.reference.phm import phm_linear_formula

import dlpack_testing as dlc
from pc_testing import rel_err

REASON = native.unavailable_reason()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"peftcore._C unavailable: {REASON}")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
NAMES = ("x", "rule", "w_left", "w_right", "bias")


def _nat():
    from peftcore.native import phm

    return phm


def _close(out, ref64, plain, tol, what=""):
    """rel_err(out, ref64) < tol; or, for a sum whose result cancels, at most twice the error of
    plain PyTorch in the same dtype."""
    e = rel_err(out, ref64)
    if e < tol:
        return
    ep = rel_err(plain, ref64)
    assert e <= 2 * ep, f"{what}: rel err {e:.3g} > tol {tol:g} and > 2x plain torch's {ep:.3g}"


def _inputs(g, lead, n, P, Q, k, bias=True, layout="dense"):
    """float64 leaves of the op: x ``[*lead, n·P]`` in the given layout, the factors, bias."""
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    width = n * P
    if layout == "colstep":  # column stride 2: the op copies it
        x = mk(*lead, 2 * width)[..., ::2]
    elif layout == "rowpad":  # unit column stride, row stride > width: reaches the kernel as is
        x = mk(*lead, width + 3)[..., :width]
    else:
        x = mk(*lead, width)
    return {"x": x, "rule": mk(n, n, n), "w_left": mk(n, P, k) / P**0.5, "w_right": mk(n, k, Q) / k**0.5,
            "bias": mk(n * Q) if bias else None}


def _run(t, dtype, dy, backend, grads):
    """y and the gradients of the leaves named in ``grads``, through the op or the formula."""
    leaves = {}
    for key, v in t.items():
        if v is None:
            leaves[key] = None
            continue
        # x keeps its layout (a strided view of a detached copy) so the kernel sees the strides
        base = v.detach().to(dtype, copy=True) if key != "x" else _same_layout(v, dtype)
        leaves[key] = base.requires_grad_(key in grads)
    args = [leaves[key] for key in NAMES]
    y = phm_linear_formula(*args) if backend == "formula" else phm_linear(*args, backend=backend)
    y.backward(dy.to(dtype))
    return y, {key: leaves[key].grad for key in grads if leaves[key] is not None}


def _same_layout(v, dtype):
    """v converted to dtype with the same strides (a fresh buffer, no autograd history)."""
    buf = torch.empty_strided(v.size(), v.stride(), dtype=dtype, device=v.device)
    buf.copy_(v.detach())
    return buf


# ------------------------------------------------------------------------------------------ whole op


@needs_ext
@given(m=st.integers(1, 40), n=st.sampled_from([1, 2, 3, 4]), P=st.integers(0, 10).map(lambda v: 2 * v + 1),
       Q=st.integers(0, 10).map(lambda v: 2 * v + 1), k=st.sampled_from([1, 2, 3]), bias=st.booleans(),
       three_d=st.booleans(), layout=st.sampled_from(["dense", "colstep", "rowpad"]),
       grads=st.sets(st.sampled_from(NAMES), min_size=1), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_phm_linear_cpp_matches_float64_and_reference(m, n, P, Q, k, bias, three_d, layout, grads, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lead = (2, (m + 1) // 2) if three_d else (m,)
    t = _inputs(g, lead, n, P, Q, k, bias, layout)
    grads = (grads if bias else grads - {"bias"}) or {"x"}
    dy = torch.randn(*lead, n * Q, generator=g, dtype=torch.float64)  # not all ones
    y, gr = _run(t, dtype, dy, "cpp", grads)
    y64, g64 = _run(t, torch.float64, dy, "formula", grads)
    yref, gref = _run(t, dtype, dy, "reference", grads)
    assert y.dtype == dtype and y.shape == (*lead, n * Q)
    _close(y, y64, yref, TOL[dtype], "y")
    assert set(gr) == set(g64), "gradients flow to exactly the leaves that require them"
    for key in g64:
        assert gr[key].shape == g64[key].shape and gr[key].dtype == dtype, key
        _close(gr[key], g64[key], gref[key], TOL[dtype], key)


@needs_ext
@pytest.mark.parametrize("shape", [(1024, 32, 4, 1), (32, 1024, 4, 1), (768, 48, 4, 1), (512, 512, 4, 8),
                                   (96, 60, 12, 2)])
def test_phm_linear_cpp_compacter_shapes(shape):
    """The shapes of interest (segments that are whole SIMD vectors, and ones that are not), with
    enough rows for several chunks in the backward."""
    i, o, n, k = shape
    g = torch.Generator().manual_seed(i + o)
    t = _inputs(g, (300,), n, i // n, o // n, k, True, "rowpad")
    dy = torch.randn(300, o, generator=g, dtype=torch.float64)
    y, gr = _run(t, torch.float32, dy, "cpp", set(NAMES))
    y64, g64 = _run(t, torch.float64, dy, "formula", set(NAMES))
    yref, gref = _run(t, torch.float32, dy, "reference", set(NAMES))
    _close(y, y64, yref, 1e-5, "y")
    for key in NAMES:
        _close(gr[key], g64[key], gref[key], 1e-5, key)


@needs_ext
def test_phm_linear_cpp_broadcast_rows():
    """Row stride 0 in x (an expanded row) and in dy (``y.sum()`` hands back expanded ones)."""
    g = torch.Generator().manual_seed(4)
    n, P, Q, k = 4, 5, 3, 2
    t = _inputs(g, (1,), n, P, Q, k)
    x = t["x"].expand(37, n * P)
    outs = {}
    for backend in ("cpp", "reference"):
        leaves = [x.detach().requires_grad_(True)] + [t[key].clone().requires_grad_(True) for key in NAMES[1:]]
        y = phm_linear(*leaves, backend=backend)
        y.sum().backward()
        outs[backend] = [y] + [v.grad for v in leaves]
    for a, b in zip(outs["cpp"], outs["reference"]):
        assert rel_err(a, b) < 1e-12


# ------------------------------------------------------------------------------------------ raw functions


@needs_ext
@given(m=st.integers(0, 70), n=st.sampled_from([1, 2, 3, 4]), P=st.integers(1, 40), Q=st.integers(1, 40),
       k=st.sampled_from([1, 2, 3]), bias=st.booleans(), needs=st.tuples(*[st.booleans()] * 5),
       seed=st.integers(0, 2**31 - 1))
def test_raw_backend_matches_reference_contract(m, n, P, Q, k, bias, needs, seed):
    """phm_fwd/phm_bwd return what the reference returns: y, the intermediate t, and exactly the
    gradients ``needs`` asks for (None for the others); M = 0 gives zero weight gradients."""
    nat = _nat()
    g = torch.Generator().manual_seed(seed)
    t = _inputs(g, (m,), n, P, Q, k, bias, "rowpad")
    args = [t[key] for key in NAMES]
    y, tt = nat.phm_fwd(*args)
    y_r, tt_r = ref.phm_fwd(*args)
    assert y.shape == (m, n * Q) and tt.shape == (m, n, n, k)
    assert rel_err(y, y_r) < 1e-12 and rel_err(tt, tt_r) < 1e-12
    dy = torch.randn(m, n * Q + 2, generator=g, dtype=torch.float64)[:, : n * Q]
    got = nat.phm_bwd(dy, t["x"], tt, t["rule"], t["w_left"], t["w_right"], needs)
    want = ref.phm_bwd(dy, t["x"], tt_r, t["rule"], t["w_left"], t["w_right"], needs)
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert rel_err(a, b) < 1e-12 or (b.abs().max() == 0 and a.abs().max() == 0), name


@needs_ext
@pytest.mark.parametrize("shape", [(1000, 4, 40, 24, 2), (2051, 4, 256, 8, 1), (777, 3, 7, 21, 3)])
def test_deterministic_across_thread_counts(shape):
    """The weight gradients are summed per fixed row chunk, in chunk order: bit-identical results
    for every thread count."""
    nat = _nat()
    m, n, P, Q, k = shape
    g = torch.Generator().manual_seed(m)
    t = {key: (v.float() if v is not None else None) for key, v in _inputs(g, (m,), n, P, Q, k).items()}
    dy = torch.randn(m, n * Q, generator=g)
    outs = []
    try:
        for nt in (1, 2, 3):
            native.set_num_threads(nt)
            y, tt = nat.phm_fwd(*[t[key] for key in NAMES])
            grads = nat.phm_bwd(dy, t["x"], tt, t["rule"], t["w_left"], t["w_right"], (True,) * 5)
            outs.append((y, tt) + grads)
    finally:
        native.set_num_threads(None)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ checks


@needs_ext
def test_python_wrappers_reject_bad_tensors():
    nat = _nat()
    n, P, Q, k, m = 2, 3, 5, 2, 4
    x, rule, wl, wr, b = torch.randn(m, n * P), torch.randn(n, n, n), torch.randn(n, P, k), torch.randn(n, k, Q), None
    _y, t = nat.phm_fwd(x, rule, wl, wr, b)
    dy = torch.randn(m, n * Q)
    for args, err, match in [
        ((x.half(), rule.half(), wl.half(), wr.half(), b), TypeError, "cpp phm_linear backend takes dtype float32 or float64"),
        ((x, rule.double(), wl, wr, b), TypeError, "rule has dtype torch.float64 but x has torch.float32"),
        ((x, rule, wl.to("meta"), wr, b), ValueError, "w_left is on meta but x is on cpu"),
        ((x.to("meta"), rule, wl, wr, b), ValueError, "native backends run on cpu or cuda"),
        ((torch.randn(n * P, m).t(), rule, wl, wr, b), ValueError, "x must have a unit column stride"),
        ((x[0], rule, wl, wr, b), ValueError, r"x must be 2-D"),
        ((x, torch.randn(n, n, n + 1), wl, wr, b), ValueError, r"rule must be a \[n, n, n\] tensor"),
        ((x, rule, torch.randn(n + 1, P, k), wr, b), ValueError, r"w_left must be \[n=2, in/n, rank\]"),
        ((x, rule, torch.randn(n, P, 0), wr, b), ValueError, "rank >= 1"),
        ((torch.randn(m, n * P + 1), rule, wl, wr, b), ValueError, r"x must be \[M, n·P = 6\]"),
        ((x, rule, wl, torch.randn(n, k + 1, Q), b), ValueError, r"w_right must be \[n=2, rank=2, out/n\]"),
        ((x, rule, wl, wr, torch.randn(n * Q + 1)), ValueError, r"bias must have shape \[10\]"),
        ((x, rule, wl, wr, [0.0] * (n * Q)), TypeError, "bias must be a torch.Tensor"),
    ]:
        with pytest.raises(err, match=match):
            nat.phm_fwd(*args)
    for args, err, match in [
        ((dy[:, :-1], x, t, rule, wl, wr, (True,) * 5), ValueError, r"dy must have shape \[4, 10\]"),
        ((dy, x, t[:, :1], rule, wl, wr, (True,) * 5), ValueError, r"t must have shape \[4, 2, 2, 2\]"),
        ((dy.double(), x, t, rule, wl, wr, (True,) * 5), TypeError, "dy has dtype"),
        ((dy, x, t, rule, wl, wr, (True,) * 4), ValueError, "needs must be 5 bools"),
    ]:
        with pytest.raises(err, match=match):
            nat.phm_bwd(*args)


@needs_ext
def test_binding_rejects_bad_arguments():
    """The entry points check what an address cannot show, before any kernel runs."""
    C = native.load()
    n, P, Q, k, m = 2, 3, 5, 2, 4
    x, rule, wl, wr = torch.randn(m, n * P), torch.randn(n, n, n), torch.randn(n, P, k), torch.randn(n, k, Q)
    y, t = torch.empty(m, n * Q), torch.empty(m, n, n, k)
    good = {"x": x, "rule": rule, "w_left": wl, "w_right": wr, "bias": None, "y": y, "t": t}

    def fwd(**kw):
        C.phm_fwd(**{k: dl(v) if isinstance(v, torch.Tensor) else v for k, v in {**good, **kw}.items()})

    fwd()
    assert rel_err(y, ref.phm_fwd(x, rule, wl, wr, None)[0]) < 1e-6
    overlapping = torch.randn(m * n * P)
    for bad, err, match in [
        ({"x": x.data_ptr()}, TypeError, "x must be a DLPack capsule"),
        ({"w_left": torch.randn(n, P + 1, k)}, ValueError, r"x must have shape \[M, n\*P\] = \[4, 8\]"),
        ({"x": overlapping.as_strided((m, n * P), (n * P - 1, 1))}, ValueError,
         "x row stride 5 is smaller than its row length 6"),
        ({"rule": torch.randn(n, n, n + 1)}, ValueError, "rule must have shape"),
        ({"w_right": torch.randn(n, k + 1, Q)}, ValueError, "w_right must have shape"),
        ({"y": torch.empty(m, n * Q - 1)}, ValueError, "y must have shape"),
        ({"t": torch.empty(m, n, n, k + 1)}, ValueError, "t must have shape"),
        ({"w_left": torch.randn(n, P, 0)}, ValueError, "rank k must be >= 1"),
        ({"x": x.half()}, TypeError, "x must have dtype float32 or float64"),
        ({"x": y[:, : n * P]}, ValueError, "y overlaps x"),
    ]:
        with pytest.raises(err, match=match):
            fwd(**bad)
    dy = torch.randn(m, n * Q)
    with pytest.raises(TypeError, match="dy is required"):
        C.phm_bwd(None, dl(x), dl(t), dl(rule), dl(wl), dl(wr), None, None, None, None, dl(torch.empty(n * Q)))
    with pytest.raises(ValueError, match="dbias must have shape"):
        C.phm_bwd(dl(dy), dl(x), dl(t), dl(rule), dl(wl), dl(wr), None, None, None, None, dl(torch.empty(n * Q - 1)))
    # CUDA entry points: refused before any kernel runs (no GPU needed)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        C.cuda_phm_fwd(dl(x), dl(rule), dl(wl.transpose(1, 2).contiguous()), dl(wr), None, dl(y), dl(t), 0)
    # CUDA-labelled capsules of host memory: the checks run, no kernel does
    n2, P2, Q2 = 32, 3, 5  # phm_dim 32 with rank 1 does not fit the CUDA kernels' shared memory
    big = [torch.randn(4, n2 * P2), torch.randn(n2, n2, n2), torch.randn(n2, 1, P2), torch.randn(n2, 1, Q2)]
    outs = [torch.empty(4, n2 * Q2), torch.empty(4, n2, n2, 1)]
    with pytest.raises(ValueError, match="use the triton or reference backend"):
        C.cuda_phm_fwd(*map(dlc.cuda, big), None, *map(dlc.cuda, outs), 0)
    ws = C.cuda_phm_bwd_workspace(4096, 4, 256, 8, 1)
    assert ws > 0 and ws % 4 == 0 and C.cuda_phm_bwd_workspace(0, 4, 256, 8, 1) == 0
    m2 = 4096
    args = [torch.empty(m2, n * Q), torch.empty(m2, n * P), torch.empty(m2, n, n, k), rule,
            wl.transpose(1, 2).contiguous(), wr]
    with pytest.raises(ValueError, match="workspace holds 4 bytes"):
        C.cuda_phm_bwd(*map(dlc.cuda, args), None, dlc.cuda(torch.empty(n, n, n)), None, None, None,
                       dlc.cuda(torch.empty(4, dtype=torch.uint8)), 0)


# ------------------------------------------------------------------------------------------ GPU


def _cuda_or_skip():
    reason = native.unavailable_reason(cuda=True)
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 3, 17, 33, 2), (300, 4, 256, 8, 1), (300, 4, 8, 256, 1),
                                   (2048, 4, 1024, 1024, 8), (70, 12, 5, 4, 8), (5000, 2, 3, 1, 1)])
def test_phm_linear_cuda_matches_float64(dtype, shape):
    """fp32 near 1e-5 of the float64 formula; half types within 2x torch's own error in that dtype."""
    _cuda_or_skip()
    m, n, P, Q, k = shape
    g = torch.Generator().manual_seed(m + n)
    t = {key: (v.cuda() if v is not None else None) for key, v in _inputs(g, (m,), n, P, Q, k, True, "rowpad").items()}
    dy = torch.randn(m, n * Q, generator=g, dtype=torch.float64).cuda()
    y, gr = _run(t, dtype, dy, "cuda", set(NAMES))
    y64, g64 = _run(t, torch.float64, dy, "formula", set(NAMES))
    yt, gt = _run(t, dtype, dy, "formula", set(NAMES))  # plain torch in the same dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for key, a, b, plain in [("y", y, y64, yt)] + [(key, gr[key], g64[key], gt[key]) for key in NAMES]:
        assert a.dtype == dtype, key
        if dtype == torch.float32:
            _close(a, b, plain, tol, key)
        else:
            assert rel_err(a, b) < tol, key
            assert rel_err(a, b) <= 2 * rel_err(plain, b) + 1e-6, key


@pytest.mark.gpu
def test_phm_cuda_deterministic_needs_and_empty():
    _cuda_or_skip()
    nat = _nat()
    g = torch.Generator().manual_seed(9)
    m, n, P, Q, k = 3001, 4, 96, 40, 2
    t = {key: v.float().cuda() for key, v in _inputs(g, (m,), n, P, Q, k).items()}
    args = [t[key] for key in NAMES]
    dy = torch.randn(m, n * Q, generator=g).cuda()
    _y, tt = nat.phm_fwd(*args)
    full = nat.phm_bwd(dy, t["x"], tt, t["rule"], t["w_left"], t["w_right"], (True,) * 5)
    again = nat.phm_bwd(dy, t["x"], tt, t["rule"], t["w_left"], t["w_right"], (True,) * 5)
    for a, b in zip(full, again):
        assert torch.equal(a, b)
    for i in range(5):  # one gradient at a time: the same values, the others None
        needs = tuple(j == i for j in range(5))
        one = nat.phm_bwd(dy, t["x"], tt, t["rule"], t["w_left"], t["w_right"], needs)
        assert all((v is None) == (j != i) for j, v in enumerate(one))
        assert torch.equal(one[i], full[i])
    y0, t0 = nat.phm_fwd(t["x"][:0], *args[1:])
    zero = nat.phm_bwd(dy[:0], t["x"][:0], t0, t["rule"], t["w_left"], t["w_right"], (True,) * 5)
    assert y0.shape == (0, n * Q) and zero[0].shape == (0, n * P)
    assert all(torch.count_nonzero(v) == 0 for v in zero[1:])


# ------------------------------------------------------------------------------------------ benchmark


def _bench_shape(i, o, n, k, m, rounds):
    """fwd+bwd times (ms) of dense nn.Linear, the cpp backend and the reference: torch.utils.benchmark
    medians, the providers interleaved round by round (the median round is kept) so that load from
    other processes on a shared machine falls on all of them alike."""
    import statistics

    import torch.utils.benchmark as tb

    lin = torch.nn.Linear(i, o)
    x = torch.randn(m, i, requires_grad=True)
    dy = torch.randn(m, o)
    fac = [torch.randn(*s, requires_grad=True) for s in ((n, n, n), (n, i // n, k), (n, k, o // n), (o,))]
    runs = {"dense": lambda: lin(x).backward(dy)}
    for backend in ("cpp", "reference"):
        runs[backend] = lambda b=backend: phm_linear(x, *fac, backend=b).backward(dy)
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, f in runs.items():
            times[key].append(tb.Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.5).median * 1e3)
    return {key: statistics.median(v) for key, v in times.items()}


def _bench(threads=None, rounds=5, m=2048,
           shapes=((1024, 32, 4, 1), (32, 1024, 4, 1), (768, 48, 4, 1), (4096, 4096, 4, 8))):
    """Prints the CPU comparison (fp32, x and every parameter requiring grad)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, M = {m}, fwd+bwd, all grads")
    for i, o, n, k in shapes:
        ms = _bench_shape(i, o, n, k, m, rounds if i * o < 2**20 else 1)
        print(f"{i:>5} -> {o:<5} n {n} k {k}: " + "  ".join(f"{key} {v:8.3f} ms" for key, v in ms.items())
              + f"   cpp/dense {ms['cpp'] / ms['dense']:.2f}  reference/cpp {ms['reference'] / ms['cpp']:.1f}")


if __name__ == "__main__":
    import sys

    _bench(int(sys.argv[1]) if len(sys.argv) > 1 else None)
