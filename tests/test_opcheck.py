"""``torch.library.opcheck`` for every peftcore op on every backend that runs here.

opcheck checks the schema (no hidden mutation or aliasing), the fake implementation against the
real one (shapes, dtypes, strides), the registered autograd formula and AOTAutograd tracing with
dynamic shapes: what ``torch.compile`` relies on.
"""

import pytest
import torch

import peftcore  # noqa: F401  (registers the ops)
from peftcore import backends

OPS = torch.ops.peftcore
CPU_BACKENDS = ["reference", "cpp", "triton"]


def _backend(op, name, dtype=torch.float32):
    reason = backends.why_not(op, name, "cpu", dtype)
    if reason:
        pytest.skip(f"{name} unavailable here: {reason}")
    return name


def _randn(*shape, grad=True, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(shape, generator=g).requires_grad_(grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_lora_linear(backend, p, bias, grad):
    be = _backend("lora_linear", backend)
    x, w, a, b = _randn(7, 5, grad=grad), _randn(6, 5), _randn(3, 5, grad=grad), _randn(6, 3, grad=grad)
    args = (x, w, _randn(6) if bias else None, a, b, 0.5, p, 5 if p else 0, be)
    torch.library.opcheck(OPS.lora_linear.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lora_linear_backward(backend):
    be = _backend("lora_linear", backend)
    x, w, a, b = _randn(7, 5, grad=False), _randn(6, 5, grad=False), _randn(3, 5, grad=False), _randn(6, 3, grad=False)
    y, xa, seed = OPS.lora_linear(x, w, None, a, b, 0.5, 0.1, 3, be)
    for needs in ([True] * 5, [True, False, False, True, True], [False, False, False, False, True]):
        torch.library.opcheck(OPS.lora_linear_backward.default,
                              (torch.randn_like(y), x, xa, w, a, b, 0.5, 0.1, seed, needs, be))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_phm_linear(backend, bias):
    be = _backend("phm_linear", backend)
    n, P, k, Q = 2, 3, 2, 4
    args = (_randn(7, n * P), _randn(n, n, n), _randn(n, P, k), _randn(n, k, Q), _randn(n * Q) if bias else None, be)
    torch.library.opcheck(OPS.phm_linear.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_mixed_linear(backend, bias):
    be = _backend("lora_mixed", backend)
    rows = torch.tensor([0, 0, 1, 1, -1, -1, 2, 2], dtype=torch.int32)
    args = (_randn(8, 5), _randn(6, 5), _randn(6) if bias else None, _randn(3, 2, 5), _randn(3, 6, 2),
            torch.tensor([0.5, 1.0, 2.0]), rows, be)
    torch.library.opcheck(OPS.lora_mixed_linear.default, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("per_row", [True, False])
def test_distill_kl(backend, kind, per_row):
    be = _backend("distill_kl", backend)
    args = (_randn(7, 13), _randn(7, 13, grad=False), torch.rand(7), 2.0, kind, 0.3, per_row, True, be)
    torch.library.opcheck(OPS.distill_kl.default, args)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_linear_distill(backend, alpha):
    be = _backend("distill_kl", backend)
    labels = torch.randint(0, 11, (9,), generator=torch.Generator().manual_seed(0))
    labels[2] = -100
    args = (_randn(9, 6), _randn(11, 6), _randn(9, 5, grad=False), _randn(11, 5, grad=False), _randn(11), None,
            labels if alpha > 0 else None, 2.0, alpha, "forward", 0.5, -100, 4, False, [True, True, True], be)
    torch.library.opcheck(OPS.fused_linear_distill.default, args)


def test_every_op_is_registered_with_fake_and_autograd():
    """Each public op's forward is a custom op with a fake kernel (Meta) and an autograd kernel."""
    names = ["lora_linear", "phm_linear", "lora_mixed_linear", "distill_kl", "fused_linear_distill"]
    for name in names:
        op = getattr(OPS, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCUDA"), name


def test_backward_allocates_no_zero_gradient_for_the_extra_outputs():
    """Autograd must not materialize zero gradients for an op's extra outputs: for distill_kl that
    was an [N, V] zero fill per backward (its precomputed gradient is an output of the op)."""
    from peftcore.bench.memory import cpu_peak_memory
    from peftcore.losses import distill_kl

    s, t = torch.randn(256, 4096, requires_grad=True), torch.randn(256, 4096)
    loss = distill_kl(s, t, temperature=2.0, backend="reference")
    peak = cpu_peak_memory(lambda: torch.autograd.grad(loss, [s]))
    assert peak < s.numel() * s.element_size() // 2  # the stored gradient is returned, nothing [N, V] new


@pytest.mark.parametrize("backend", ["reference", "cpp"])  # its backends so far (no triton kernel yet)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("adapter", [True, False])
def test_nf4_lora_linear(backend, p, adapter):
    from peftcore.quant import quantize_nf4

    be = _backend("nf4_lora_linear", backend)
    packed, state = quantize_nf4(_randn(6, 64, grad=False), 64, True)
    x = _randn(7, 64)
    a, b = (_randn(3, 64), _randn(6, 3)) if adapter else (None, None)
    args = (x, packed, state.block_absmax(), 6, 64, 64, _randn(6), a, b, 0.5, p if adapter else 0.0,
            5 if p and adapter else 0, be)
    torch.library.opcheck(OPS.nf4_lora_linear.default, args)
