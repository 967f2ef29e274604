"""Every public op on every backend takes its tensor arguments in any layout (issue 10, section 1).

For each op of :mod:`peftcore.ops` and :mod:`peftcore.losses` and each of its tensor arguments
(plus the upstream gradient), the argument is replaced by a view of the same values in a strided
layout (every other element of the last or the first dim, a transposed view, a column slice at a
storage offset) or by an expanded, stride-0 tensor, and the op's output and every gradient are
compared, on every backend this machine has, with the reference run in float64 on contiguous
copies.  A launcher that hands a kernel a pointer without its strides reads the wrong elements (or
past the storage) and fails here by orders of magnitude; the tolerance is the fp32 one of the
equivalence tests.

Sizes are tiny and odd (the Triton kernels run under the interpreter on a CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

import peftcore as pc
from peftcore import backends

from pc_testing import rel_err

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared two-core machine a thread pool turns each of these tiny ops
    from microseconds into tens of milliseconds of spinning."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ---------------------------------------------------------------------------------------------
# Layouts: each takes a contiguous tensor and returns one of the same shape in another layout.
# The strided ones keep the values; the expanded ones repeat the first slice along a dim.
# ---------------------------------------------------------------------------------------------


def _step_last(v):  # v[..., ::2] of a buffer twice as wide: column stride 2
    buf = torch.full((*v.shape[:-1], 2 * v.shape[-1]), float("nan") if v.is_floating_point() else 0,
                     dtype=v.dtype, device=v.device)
    buf[..., ::2] = v
    return buf[..., ::2]


def _step_first(v):  # v[::2] of a buffer twice as tall: row stride doubled
    buf = torch.full((2 * v.shape[0], *v.shape[1:]), float("nan") if v.is_floating_point() else 0,
                     dtype=v.dtype, device=v.device)
    buf[::2] = v
    return buf[::2]


def _transposed(v):  # a .t() / .transpose(-1, -2) view: unit stride on the first of the last two dims
    return v.transpose(-1, -2).contiguous().transpose(-1, -2)


def _col_slice(v):  # columns 3 .. 3 + n of a wider buffer: a storage offset and a longer row stride
    n = v.shape[-1]
    buf = torch.full((*v.shape[:-1], n + 7), float("nan") if v.is_floating_point() else 0,
                     dtype=v.dtype, device=v.device)
    buf[..., 3:3 + n] = v
    return buf[..., 3:3 + n]


def _expand_first(v):  # stride 0 on dim 0 (for a 1-D tensor: one value repeated)
    return v.narrow(0, 0, 1).expand(v.shape)


def _expand_last(v):  # stride 0 on the last dim
    return v.narrow(-1, 0, 1).expand(v.shape)


LAYOUTS = {
    "step_last": (_step_last, 1),
    "step_first": (_step_first, 2),
    "transposed": (_transposed, 2),
    "col_slice": (_col_slice, 1),
    "expand_first": (_expand_first, 1),
    "expand_last": (_expand_last, 2),
}  # name -> (function, least number of dims it applies to)


def _available(op: str) -> list[str]:
    """The backends of ``op`` that can run here on fp32 tensors of DEV (cuda only on a GPU)."""
    out = []
    for name in ("reference", "cpp", "triton", "cuda"):
        try:
            if backends.select(op, torch.device(DEV), torch.float32, name) == name:
                out.append(name)
        except Exception:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Ops: each case builds contiguous fp32 arguments (a dict), says which take gradients, and how to
# call the op on them with a backend.
# ---------------------------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rnd(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEV)


def _lora_case():
    g = _gen(1)
    M, K, N, R = 7, 21, 19, 5
    args = {"x": _rnd(g, M, K), "weight": _rnd(g, N, K, scale=K**-0.5), "bias": _rnd(g, N),
            "lora_a": _rnd(g, R, K, scale=K**-0.5), "lora_b": _rnd(g, N, R, scale=R**-0.5)}

    def call(a, backend):
        return pc.ops.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], 0.75, backend=backend)

    return "lora_linear", args, list(args), call, (M, N)


def _phm_case():
    g = _gen(2)
    n, P, k, Q, M = 2, 9, 3, 7, 6
    args = {"x": _rnd(g, M, n * P), "rule": _rnd(g, n, n, n), "w_left": _rnd(g, n, P, k, scale=P**-0.5),
            "w_right": _rnd(g, n, k, Q, scale=k**-0.5), "bias": _rnd(g, n * Q)}

    def call(a, backend):
        return pc.ops.phm_linear(a["x"], a["rule"], a["w_left"], a["w_right"], a["bias"], backend=backend)

    return "phm_linear", args, list(args), call, (M, n * Q)


def _lora_mixed_case():
    g = _gen(3)
    B, K, N, J, R = 6, 19, 17, 3, 4
    args = {"x": _rnd(g, B, K), "weight": _rnd(g, N, K, scale=K**-0.5), "bias": _rnd(g, N),
            "lora_a": _rnd(g, J, R, K, scale=K**-0.5), "lora_b": _rnd(g, J, N, R, scale=R**-0.5),
            "scaling": torch.tensor([0.5, 2.0, -1.25], device=DEV),
            "adapter_index": torch.tensor([1, 1, -1, 0, 2, 2], device=DEV)}

    def call(a, backend):
        return pc.ops.lora_mixed_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["scaling"],
                                        a["adapter_index"], backend=backend)

    return "lora_mixed", args, ["x", "weight", "bias", "lora_a", "lora_b"], call, (B, N)


def _distill_case(kind):
    g = _gen(4)
    N, V = 6, 37
    args = {"student_logits": _rnd(g, N, V, scale=2.0), "teacher_logits": _rnd(g, N, V, scale=2.0),
            "mask": torch.tensor([True, True, False, True, True, True], device=DEV)}

    def call(a, backend):
        return pc.losses.distill_kl(a["student_logits"], a["teacher_logits"], temperature=1.5, reduction="none",
                                    mask=a["mask"], backend=backend, kind=kind, beta=0.3)

    return "distill_kl", args, ["student_logits"], call, (N,)


def _fused_case():
    g = _gen(5)
    N, V, Hs, Ht = 7, 23, 9, 11
    args = {"student_hidden": _rnd(g, N, Hs), "student_head": _rnd(g, V, Hs, scale=Hs**-0.5),
            "teacher_hidden": _rnd(g, N, Ht), "teacher_head": _rnd(g, V, Ht, scale=Ht**-0.5),
            "labels": torch.tensor([3, -100, 0, 22, 5, 5, 17], device=DEV),
            "student_bias": _rnd(g, V, scale=0.3), "teacher_bias": _rnd(g, V, scale=0.3)}

    def call(a, backend):
        return pc.losses.fused_linear_distill(
            a["student_hidden"], a["student_head"], a["teacher_hidden"], a["teacher_head"], labels=a["labels"],
            temperature=2.0, alpha=0.4, chunk_size=3, student_bias=a["student_bias"],
            teacher_bias=a["teacher_bias"], backend=backend)

    return "distill_kl", args, ["student_hidden", "student_head", "student_bias"], call, ()


def _nf4_case():
    from peftcore.quant import quantize_nf4

    g = _gen(6)
    M, K, N, R = 7, 40, 19, 5
    qw = quantize_nf4(_rnd(g, N, K, scale=K**-0.5).cpu(), 32, True)
    qw = (qw[0].to(DEV), qw[1])
    args = {"x": _rnd(g, M, K), "bias": _rnd(g, N), "lora_a": _rnd(g, R, K, scale=K**-0.5),
            "lora_b": _rnd(g, N, R, scale=R**-0.5)}

    def call(a, backend):  # the 4-bit weight is not a float tensor: its layout is the format's
        return pc.ops.nf4_lora_linear(a["x"], qw, a["bias"], a["lora_a"], a["lora_b"], 0.75, backend=backend)

    return "nf4_lora_linear", args, list(args), call, (M, N)


CASES = {
    "lora_linear": _lora_case,
    "nf4_lora_linear": _nf4_case,
    "phm_linear": _phm_case,
    "lora_mixed_linear": _lora_mixed_case,
    "distill_kl[forward]": lambda: _distill_case("forward"),
    "distill_kl[reverse]": lambda: _distill_case("reverse"),
    "distill_kl[jsd]": lambda: _distill_case("jsd"),
    "fused_linear_distill": _fused_case,
}
UPSTREAM = "grad_output"  # the pseudo-argument: the gradient flowing into the op's output


def _params():
    out = []
    for case_name, make in CASES.items():
        spec, args, _, _, out_shape = make()
        names = list(args) + ([UPSTREAM] if len(out_shape) else [])
        for backend in _available(spec):
            for arg in names:
                dims = len(out_shape) if arg == UPSTREAM else args[arg].dim()
                for layout, (_, least) in LAYOUTS.items():
                    if dims >= least:
                        out.append(pytest.param(case_name, backend, arg, layout,
                                                id=f"{case_name}-{backend}-{arg}-{layout}"))
    return out


def _run(call, args, grad_names, backend, upstream):
    """Output and the gradients of ``grad_names`` (w.r.t. the tensors as given, in their layouts)."""
    args = dict(args)
    for n in grad_names:
        args[n] = args[n].detach().requires_grad_()
    out = call(args, backend)
    grads = torch.autograd.grad(out, [args[n] for n in grad_names], grad_outputs=upstream)
    return out.detach(), dict(zip(grad_names, grads))


@pytest.mark.parametrize("case_name,backend,arg,layout", _params())
def test_layout_matches_reference_on_contiguous_copies(case_name, backend, arg, layout):
    _, args, grad_names, call, out_shape = CASES[case_name]()
    fn = LAYOUTS[layout][0]
    g = _gen(9)
    upstream = _rnd(g, *out_shape) if out_shape else torch.tensor(1.7, device=DEV)
    if arg == UPSTREAM:
        upstream = fn(upstream)
        assert not upstream.is_contiguous() or upstream.storage_offset() > 0
    else:
        args[arg] = fn(args[arg])
        moved = args[arg]
        assert not moved.is_contiguous() or moved.storage_offset() > 0, f"{layout} left {arg} contiguous"
    # The oracle: float64 contiguous copies of the very values the op sees, on the reference.
    ref_args = {k: (v.detach().double() if v.is_floating_point() else v).contiguous() for k, v in args.items()}
    want, want_g = _run(call, ref_args, grad_names, "reference", upstream.double().contiguous())
    got, got_g = _run(call, args, grad_names, backend, upstream)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all(), f"non-finite output: {got}"
    _close("output", got, want)
    for n in grad_names:
        assert got_g[n].shape == args[n].shape
        _close(f"grad of {n}", got_g[n], want_g[n])


def _close(what, got, want):
    """fp32's relative error against the float64 oracle, plus an absolute floor for a result that is
    0 in exact arithmetic (an expanded head's identical rows give the hidden state no gradient)."""
    err = (got.double() - want).norm().item()
    bound = 2e-5 * want.norm().item() + 1e-6 * want.numel() ** 0.5
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (relative {rel_err(got, want):.3g})"


def test_every_public_op_is_covered():
    """The cases above cover every op and loss the packages export (a new export needs a case)."""
    exported = set(pc.ops.__all__) | set(pc.losses.__all__)
    covered = {name.split("[")[0] for name in CASES}
    assert exported <= covered, f"no layout case for {sorted(exported - covered)}"


def test_every_backend_here_is_exercised():
    """cpp and the (interpreted) Triton backend are part of the sweep wherever they can run."""
    params = _params()
    seen = {p.values[1] for p in params}
    assert "reference" in seen
    want = {b for b in ("cpp", "triton") if b in _available("lora_linear")}
    assert want <= seen
