"""Triton LoRA kernels (peftcore.kernels.lora) against the float64 reference.

On a machine without CUDA the kernels run under the Triton interpreter, so every shape here is
tiny (smaller than a few interpreter tiles, never a multiple of one) and example counts are small.
Tests marked ``gpu`` use real sizes and skip on CPU.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from pc_testing import CUDA, DEV, SETTINGS, gpu, gpu_configs, needs_cuda

if not torch.cuda.is_available():
    # Must precede the first import of triton-decorated kernels (triton.jit reads it then).
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

tk = importlib.import_module("peftcore.kernels.lora")  # kernels/ is installed as peftcore.kernels
from peftcore.kernels import rng as trng  # noqa: E402
from peftcore.ops import lora_linear  # noqa: E402
from peftcore.reference import lora as ref  # noqa: E402
from peftcore.reference import rng as rrng  # noqa: E402

ALL = (True, True, True, True, True)


def rel(out, want):
    """||out - want|| / ||want|| in float64 (0 when both are exactly zero)."""
    if out is None or want is None:
        assert out is None and want is None
        return 0.0
    out, want = out.double().cpu(), want.double().cpu()
    assert out.shape == want.shape
    den = want.norm().item()
    return (out - want).norm().item() / den if den > 0 else out.norm().item()


def d64(t):
    return None if t is None else t.detach().double()


def make(M, K, N, R, dtype, bias=True, pad=0, gen_seed=0, wt_t=False):
    """Random LoRA inputs; x (and dy) with row stride K + pad; weight optionally a transposed view."""
    g = torch.Generator().manual_seed(gen_seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(M, K + pad)[:, :K]
    w = rnd(K, N).t() if wt_t else rnd(N, K)
    w = w / K**0.5
    b = rnd(N) if bias else None
    a = rnd(R, K) / K**0.5
    bl = rnd(N, R) / R**0.5
    dy = rnd(M, N + pad)[:, :N]
    cast = lambda t: None if t is None else t.to(DEV, dtype)  # noqa: E731
    # .to() keeps strides, so the padded row stride / transposed weight survive the cast.
    return [cast(t) for t in (x, w, b, a, bl, dy)]


def run_both(x, w, b, a, bl, dy, s, p, seed, needs=ALL):
    y, xa = tk.lora_fwd(x, w, b, a, bl, s, p, seed)
    grads = tk.lora_bwd(dy, x, xa, w, a, bl, s, p, seed, needs)
    yr, xar = ref.lora_fwd(d64(x), d64(w), d64(b), d64(a), d64(bl), s, p, seed)
    gr = ref.lora_bwd(d64(dy), d64(x), xar, d64(w), d64(a), d64(bl), s, p, seed, needs)
    return (y, xa, *grads), (yr, xar, *gr)


NAMES = ("y", "xa", "dx", "dweight", "dbias", "da", "db")


# --------------------------------------------------------------------------- RNG


@triton.jit(do_not_specialize=["seed_key", "threshold"])
def _mask_kernel(out_ptr, row0, col0, M, K, seed_key, threshold, BM: tl.constexpr, BK: tl.constexpr):
    # out_ptr: [M, K] int8 keep mask of rows row0.. and columns col0..
    rows = row0 + tl.program_id(0) * BM + tl.arange(0, BM)
    cols = col0 + tl.program_id(1) * BK + tl.arange(0, BK)
    keep = trng._keep_mask(trng._row_keys(rows, seed_key), cols, threshold)
    om = tl.program_id(0) * BM + tl.arange(0, BM)
    ok = tl.program_id(1) * BK + tl.arange(0, BK)
    tl.store(out_ptr + om[:, None] * K + ok[None, :], keep.to(tl.int8), mask=(om[:, None] < M) & (ok[None, :] < K))


def _ref_mask(row0, col0, M, K, seed, p):
    m = torch.arange(row0, row0 + M, dtype=torch.int64)
    k = torch.arange(col0, col0 + K, dtype=torch.int64)
    rk = rrng.hash32(m ^ rrng.hash32_int(seed))
    bits = rrng.hash32(rk[:, None] ^ rrng._mul32(k, rrng.GOLDEN)[None, :])
    return (bits >> 8) >= rrng.dropout_threshold(p)


@pytest.mark.parametrize("seed", [0, 1, 77, 2**31 - 1])
@pytest.mark.parametrize("p", [1e-7, 0.1, 0.5, 0.97])
def test_mask_bit_exact(seed, p):
    M, K = 19, 37
    out = torch.empty((M, K), dtype=torch.int8, device=DEV)
    _mask_kernel[(2, 3)](out, 0, 0, M, K, trng.seed_key(seed), rrng.dropout_threshold(p), BM=16, BK=16)
    assert torch.equal(out.bool().cpu(), rrng.keep_mask(M, K, seed, p))


def test_mask_bit_exact_large_indices():
    # Row and column indices near the top of the int32 range: the uint32 casts must not sign-extend.
    M, K, row0, col0 = 7, 21, 2**31 - 7, 2**24 - 5
    out = torch.empty((M, K), dtype=torch.int8, device=DEV)
    _mask_kernel[(1, 2)](out, row0, col0, M, K, trng.seed_key(123457), rrng.dropout_threshold(0.3), BM=16, BK=16)
    assert torch.equal(out.bool().cpu(), _ref_mask(row0, col0, M, K, 123457, 0.3))


def test_seed_key_is_the_reference_hash_as_int32():
    for s in (0, 5, 2**31 - 1, 987654321):
        assert trng.seed_key(s) % 2**32 == rrng.hash32_int(s) and -(2**31) <= trng.seed_key(s) < 2**31


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_xa_kernel_mask_pattern(p):
    # With lora_a = I (R = K), xa = dropout(x) exactly: its zero pattern is the keep mask.
    M, K, seed = 21, 19, 4242
    x = (torch.rand(M, K) + 0.5).to(DEV)  # no zeros
    eye = torch.eye(K, device=DEV)
    _, xa = tk.lora_fwd(x, torch.zeros(3, K, device=DEV), None, eye, torch.zeros(3, K, device=DEV), 1.0, p, seed)
    keep = rrng.keep_mask(M, K, seed, p)
    assert torch.equal((xa != 0).cpu(), keep)
    torch.testing.assert_close(xa.cpu(), x.cpu() * keep / (1 - p), rtol=1e-6, atol=0)


def test_dx_kernel_mask_pattern():
    # With W = 0, dx is the masked rank-r term alone: zero exactly where the mask drops.
    M, K, N, R, p, seed = 23, 26, 9, 4, 0.4, 99
    x, _, _, a, bl, dy = make(M, K, N, R, torch.float32, gen_seed=3)
    w = torch.zeros(N, K, device=DEV)
    _, xa = tk.lora_fwd(x, w, None, a, bl, 1.0, p, seed)
    dx = tk.lora_bwd(dy, x, xa, w, a, bl, 1.0, p, seed, (True, False, False, False, False))[0]
    assert torch.equal((dx != 0).cpu(), rrng.keep_mask(M, K, seed, p))


# --------------------------------------------------------------------------- fp32 equivalence


@settings(max_examples=20, **SETTINGS)
@given(
    M=st.integers(1, 40),
    K=st.integers(1, 45),
    N=st.integers(1, 37),
    R=st.sampled_from([1, 2, 5, 16, 33]),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    bias=st.booleans(),
    pad=st.sampled_from([0, 3]),
    wt_t=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    gen_seed=st.integers(0, 2**16),
)
def test_fp32_matches_reference(M, K, N, R, p, bias, pad, wt_t, seed, gen_seed):
    x, w, b, a, bl, dy = make(M, K, N, R, torch.float32, bias, pad, gen_seed, wt_t)
    s = 0.75
    outs, refs = run_both(x, w, b, a, bl, dy, s, p, seed, (True, True, bias, True, True))
    for name, o, r in zip(NAMES, outs, refs):
        assert rel(o, r) < 1e-5, f"{name}: rel err {rel(o, r):.2e}"
        if o is not None:
            assert o.dtype == torch.float32


@pytest.mark.parametrize(
    "M,K,N,R,p",
    [
        (37, 45, 29, 33, 0.0),  # R > 16: R_PAD 64, one rank-r step
        (19, 33, 21, 130, 0.3),  # R_PAD 256: rank-r prologue loops over R in steps of 64
        (1, 1, 1, 1, 0.5),
        (65, 17, 3, 256, 0.1),  # max rank; several dA row splits
    ],
)
def test_fp32_edge_shapes(M, K, N, R, p):
    x, w, b, a, bl, dy = make(M, K, N, R, torch.float32, bias=True, pad=1, gen_seed=M + K)
    outs, refs = run_both(x, w, b, a, bl, dy, 1.3, p, 31337)
    for name, o, r in zip(NAMES, outs, refs):
        assert rel(o, r) < 1e-5, f"{name}: rel err {rel(o, r):.2e}"


@pytest.mark.parametrize(
    "needs",
    [(False, False, False, True, True), (True, False, False, False, False), (False, True, True, False, False)],
)
def test_partial_needs(needs):
    x, w, b, a, bl, dy = make(13, 20, 11, 3, torch.float32, gen_seed=7)
    outs, refs = run_both(x, w, b, a, bl, dy, 2.0, 0.25, 5, needs)
    for name, o, r, need in zip(NAMES[2:], outs[2:], refs[2:], needs):
        assert (o is None) == (not need), name
        assert rel(o, r) < 1e-5, name


@pytest.mark.parametrize("M,K,N", [(0, 8, 5), (5, 0, 3), (5, 4, 0)])
def test_degenerate_shapes(M, K, N):
    # An empty batch, a zero-width input, a zero-width output: no launch with an empty grid.
    x, w, b, a, bl, dy = make(M, K, N, 2, torch.float32, gen_seed=1)
    outs, refs = run_both(x, w, b, a, bl, dy, 1.0, 0.1, 3)
    for name, o, r in zip(NAMES, outs, refs):
        assert o.shape == r.shape and rel(o, r) < 1e-5, name


def test_da_split_is_deterministic():
    x, w, b, a, bl, dy = make(70, 24, 9, 5, torch.float32, gen_seed=11)
    _, xa = tk.lora_fwd(x, w, b, a, bl, 1.0, 0.2, 8)
    first = tk.lora_bwd(dy, x, xa, w, a, bl, 1.0, 0.2, 8, (False, False, False, True, False))[3]
    again = tk.lora_bwd(dy, x, xa, w, a, bl, 1.0, 0.2, 8, (False, False, False, True, False))[3]
    assert torch.equal(first, again)
    assert triton.cdiv(70, tk._da_rows_per_split(70, 24, x.device)) > 1 or CUDA  # several row splits


# --------------------------------------------------------------------------- half precision


@settings(max_examples=8, **SETTINGS)
@given(
    M=st.integers(2, 40),
    K=st.integers(2, 45),
    N=st.integers(2, 37),
    R=st.sampled_from([1, 8, 33]),
    p=st.sampled_from([0.0, 0.2]),
    gen_seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_matches_reference(dtype, M, K, N, R, p, gen_seed):
    x, w, b, a, bl, dy = make(M, K, N, R, dtype, True, 2, gen_seed)
    s, seed = 0.5, 2024
    outs, refs = run_both(x, w, b, a, bl, dy, s, p, seed)
    # Plain PyTorch in the same dtype (the reference functions run in half) sets the bar.
    yt, xat = ref.lora_fwd(x, w, b, a, bl, s, p, seed)
    torch_outs = (yt, xat, *ref.lora_bwd(dy, x, xat, w, a, bl, s, p, seed, ALL))
    unit = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    for name, o, r, t in zip(NAMES, outs, refs, torch_outs):
        assert o.dtype == dtype, name
        err, err_torch = rel(o, r), rel(t, r)
        assert err < 1e-2, f"{name}: rel err {err:.2e}"
        # At most about twice plain PyTorch's error.  The floor, half an ulp over sqrt(numel), only
        # matters for outputs of a few elements that PyTorch happens to round exactly.
        floor = 0.5 * unit / o.numel() ** 0.5
        assert err <= 2 * err_torch + floor, f"{name}: {err:.2e} vs torch {err_torch:.2e}"


# --------------------------------------------------------------------------- through the op


def _op_grads(backend, x, w, b, a, bl, dy, s, p, seed):
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, a, bl)]
    y = lora_linear(*leaves, s, dropout_p=p, seed=seed, backend=backend)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("layout", ["3d", "transposed", "strided_last"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_op_triton_vs_reference(layout, p):
    g = torch.Generator().manual_seed(17)
    B, T, K, N, R = 3, 7, 22, 13, 5
    if layout == "3d":
        x = torch.randn(B, T, K, generator=g)
    elif layout == "transposed":  # [T, B, K] viewed as [B, T, K]: reshape must copy
        x = torch.randn(T, B, K, generator=g).transpose(0, 1)
    else:  # last dim not contiguous: the op makes it so
        x = torch.randn(B, T, 2 * K, generator=g)[..., ::2]
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    a = torch.randn(R, K, generator=g) / K**0.5
    bl = torch.randn(N, R, generator=g)
    dy = torch.randn(B, T, N, generator=g)
    x, w, b, a, bl, dy = (t.to(DEV) for t in (x, w, b, a, bl, dy))
    x.requires_grad_(True)
    w.requires_grad_(layout == "3d")  # frozen base weight except in one case
    for t in (b, a, bl):
        t.requires_grad_(True)
    y, grads = _op_grads("triton", x, w, b, a, bl, dy, 1.5, p, 1234)
    yr, grads_r = _op_grads("reference", *(d64(t).requires_grad_(t.requires_grad) for t in (x, w, b, a, bl)), d64(dy),
                            1.5, p, 1234)
    assert y.shape == (B, T, N) and y.dtype == torch.float32
    assert rel(y, yr) < 1e-5
    for name, gt, gr in zip(("x", "weight", "bias", "lora_a", "lora_b"), grads, grads_r):
        assert rel(gt, gr) < 1e-5, f"grad {name}: {rel(gt, gr):.2e}"


def test_op_half_through_triton():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=g).to(DEV, torch.bfloat16).requires_grad_(True)
    w = (torch.randn(12, 16, generator=g) / 4).to(DEV, torch.bfloat16)
    a = (torch.randn(4, 16, generator=g) / 4).to(DEV, torch.bfloat16).requires_grad_(True)
    bl = torch.randn(12, 4, generator=g).to(DEV, torch.bfloat16).requires_grad_(True)
    y = lora_linear(x, w, None, a, bl, 2.0, dropout_p=0.1, seed=3, backend="triton")
    y.float().square().sum().backward()
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, bl))
    yr = ref.lora_linear_formula(x64, w.double(), None, a64, b64, 2.0, 0.1, 3)
    yr.square().sum().backward()
    assert y.dtype == torch.bfloat16 and rel(y, yr) < 1e-2
    for t, r in ((x, x64), (a, a64), (bl, b64)):
        assert t.grad.dtype == torch.bfloat16 and rel(t.grad, r.grad) < 2e-2


# --------------------------------------------------------------------------- configs


def test_pinned_config_parsing():
    parsed = tk._parse_pinned("BLOCK_M=64,num_warps=4; dx:BLOCK_N=32 ;xa:BLOCK_K=128")
    assert parsed == {"*": {"BLOCK_M": 64, "num_warps": 4}, "dx": {"BLOCK_N": 32}, "xa": {"BLOCK_K": 128}}
    with pytest.raises(ValueError, match="unknown key"):
        tk._parse_pinned("BLOCK_Q=1")
    with pytest.raises(ValueError, match="unknown kernel"):
        tk._parse_pinned("foo:BLOCK_M=1")


def test_pinned_config_applies(monkeypatch):
    monkeypatch.setenv(tk.CONFIG_ENV, "BLOCK_M=64,num_stages=2;fwd:BLOCK_N=256")
    (fwd,) = tk._configs("fwd")
    (xa,) = tk._configs("xa")
    assert fwd.kwargs["BLOCK_M"] == 64 and fwd.kwargs["BLOCK_N"] == 256 and fwd.num_stages == 2
    assert xa.kwargs["BLOCK_M"] == 64 and "BLOCK_N" not in xa.kwargs


def test_pruner_respects_shared_memory():
    for kernel, ptr in (("fwd", "x_ptr"), ("dx", "dy_ptr"), ("xa", "x_ptr"), ("da", "x_ptr")):
        prune = tk._pruner(kernel, ptr)["early_config_prune"]
        for dtype in (torch.bfloat16, torch.float32):
            for r_pad in (16, 256):
                kw = {"R_PAD": r_pad} if kernel in ("xa", "da") else {"BLOCK_R": min(r_pad, 64)}
                kept = prune(gpu_configs(tk, kernel), {ptr: torch.empty(1, dtype=dtype)}, **kw)
                assert kept, (kernel, dtype, r_pad)
                elt = torch.empty(0, dtype=dtype).element_size()
                for c in kept:
                    assert tk._smem_bytes(kernel, c.kwargs, c.num_stages, elt, r_pad) <= tk._SMEM_BUDGET


# --------------------------------------------------------------------------- GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,p", [(16, 0.0), (16, 0.1), (64, 0.05), (256, 0.1)])
def test_gpu_large_half(dtype, R, p):
    M, K, N = 4096 + 3, 2048 + 8, 3072 - 5
    x, w, b, a, bl, dy = make(M, K, N, R, dtype, True, 0, 1)
    outs, refs = run_both(x, w, b, a, bl, dy, 2.0, p, 77)
    yt, xat = ref.lora_fwd(x, w, b, a, bl, 2.0, p, 77)
    torch_outs = (yt, xat, *ref.lora_bwd(dy, x, xat, w, a, bl, 2.0, p, 77, ALL))
    for name, o, r, t in zip(NAMES, outs, refs, torch_outs):
        err, err_torch = rel(o, r), rel(t, r)
        assert err < 1e-2 and err <= 2 * err_torch + 1e-4, f"{name}: {err:.2e} vs torch {err_torch:.2e}"


@gpu
@needs_cuda
def test_gpu_tf32_vs_ieee():
    M, K, N, R = 1024 + 5, 1024 + 16, 768 + 3, 16
    x, w, b, a, bl, dy = make(M, K, N, R, torch.float32, True, 0, 2)
    yr, _ = ref.lora_fwd(d64(x), d64(w), d64(b), d64(a), d64(bl), 1.0, 0.1, 9)
    y_ieee, _ = tk.lora_fwd(x, w, b, a, bl, 1.0, 0.1, 9, input_precision="ieee")
    y_tf32, _ = tk.lora_fwd(x, w, b, a, bl, 1.0, 0.1, 9, input_precision="tf32")
    assert rel(y_ieee, yr) < 1e-5
    assert rel(y_tf32, yr) < 3e-3  # TF32 keeps 10 mantissa bits
    assert rel(y_tf32, yr) > rel(y_ieee, yr)


@gpu
@needs_cuda
def test_gpu_dropout_mask_and_determinism():
    M, K = 8192, 4096
    x = torch.rand(M, K, device="cuda") + 0.5
    eye = torch.eye(128, K, device="cuda")  # xa = first 128 columns of dropout(x)
    z = torch.zeros(8, K, device="cuda")
    _, xa = tk.lora_fwd(x, z, None, eye, torch.zeros(8, 128, device="cuda"), 1.0, 0.1, 123, input_precision="ieee")
    assert torch.equal((xa != 0).cpu(), _ref_mask(0, 0, M, 128, 123, 0.1))
    dy, bl = torch.randn(M, 8, device="cuda"), torch.randn(8, 128, device="cuda")
    da1 = tk.lora_bwd(dy, x, xa, z, eye, bl, 1.0, 0.1, 123, (False, False, False, True, False))[3]
    da2 = tk.lora_bwd(dy, x, xa, z, eye, bl, 1.0, 0.1, 123, (False, False, False, True, False))[3]
    assert torch.equal(da1, da2)
