"""fused_linear_distill against the unfused computation (materialized logits + autograd)."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from peftcore import backends
from peftcore.losses import fused_linear_distill
from peftcore.losses.fused_linear import BUDGET_ENV, ChunkPlan, plan_chunks
from peftcore.reference.distill import row_losses

from pc_testing import rel_err

IGN = -100


def _inputs(n=37, v=50, hs=16, ht=24, dtype=torch.float64, lead=None, bias=True, ignored=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    d = dict(
        student_hidden=r(*lead, hs).requires_grad_(),
        student_head=(r(v, hs) / hs**0.5).requires_grad_(),
        teacher_hidden=r(*lead, ht),
        teacher_head=r(v, ht) / ht**0.5 * 2,
        student_bias=r(v).requires_grad_() if bias else None,
        teacher_bias=r(v) if bias else None,
    )
    labels = torch.randint(0, v, lead, generator=g)
    if ignored:
        labels.view(-1)[::4] = IGN
    return d, labels


def _unfused(d, labels, temperature=1.0, alpha=0.0, kind="forward", beta=0.5, ignore_index=IGN, wide=torch.float64,
             teacher_own_dtype=False):
    """The plain computation in ``wide`` precision: materialized logits, reference KL, F.cross_entropy."""
    c = lambda x: None if x is None else x.to(wide)  # noqa: E731  (differentiable cast)
    s = c(d["student_hidden"]) @ c(d["student_head"]).T
    if d["student_bias"] is not None:
        s = s + c(d["student_bias"])
    ct = (lambda x: x) if teacher_own_dtype else c  # teacher logits rounded to the teacher's dtype
    t = ct(d["teacher_hidden"]) @ ct(d["teacher_head"]).T
    if d["teacher_bias"] is not None:
        t = t + ct(d["teacher_bias"])
    t = t.to(wide)
    v = s.shape[-1]
    s, t = s.reshape(-1, v), t.detach().reshape(-1, v)
    live = torch.ones(s.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    loss = (1 - alpha) * (row_losses(s, t, temperature, kind, beta) * live).sum() / live.sum().clamp_min(1)
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(s, labels.reshape(-1), ignore_index=ignore_index)
    return loss


def _grads(loss, d, scale=2.5):
    want = [k for k in ("student_hidden", "student_head", "student_bias") if d[k] is not None and d[k].requires_grad]
    gs = torch.autograd.grad(loss * scale, [d[k] for k in want])
    return dict(zip(want, gs))


def _compare(d, labels, tol, **kw):
    own = kw.pop("teacher_own_dtype", False)
    loss = fused_linear_distill(**d, labels=labels, backend=kw.pop("backend", "reference"), **kw)
    kw.pop("chunk_size", None), kw.pop("memory_budget", None)
    kw["teacher_own_dtype"] = own
    ref = _unfused(d, labels, **kw)
    assert loss.dtype == (torch.float64 if d["student_hidden"].dtype == torch.float64 else torch.float32)
    assert rel_err(loss.reshape(1), ref.reshape(1)) < tol
    got, want = _grads(loss, d), _grads(ref, d)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == d[k].dtype and got[k].shape == d[k].shape
        assert rel_err(got[k], want[k]) < tol, k
    return got


CASES = [(kind, alpha, lab) for kind in ("forward", "reverse", "jsd") for alpha in (0.0, 0.3, 1.0)
         for lab in ("none", "ignored") if not (alpha > 0 and lab == "none")]


@pytest.mark.parametrize("kind,alpha,lab", CASES)
@pytest.mark.parametrize("chunk_size", [1, 7, None, 1000])
def test_matches_unfused_fp64(kind, alpha, lab, chunk_size):
    d, labels = _inputs()
    labels = None if lab == "none" else labels
    _compare(d, labels, 1e-10, temperature=2.0, alpha=alpha, kind=kind, beta=0.3, chunk_size=chunk_size)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_matches_unfused_fp32(kind, chunk_size):
    d, labels = _inputs(n=61, v=97, hs=24, ht=40, dtype=torch.float32)
    _compare(d, labels, 1e-5, temperature=1.5, alpha=0.3, kind=kind, chunk_size=chunk_size)


def test_3d_inputs_noncontiguous_and_flat_labels():
    d, labels = _inputs(lead=(3, 11))
    _compare(d, labels, 1e-10, temperature=3.0, alpha=0.5, chunk_size=4)
    d["student_hidden"] = d["student_hidden"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not d["student_hidden"].is_contiguous()
    _compare(d, labels, 1e-10, alpha=0.5, chunk_size=8)
    _compare(d, labels.reshape(-1), 1e-10, alpha=0.5, chunk_size=8)  # [N] labels for [B, L, H] rows


def test_mixed_teacher_dtype_and_no_bias():
    d, labels = _inputs(dtype=torch.float32, bias=False)
    d["teacher_hidden"], d["teacher_head"] = d["teacher_hidden"].bfloat16(), d["teacher_head"].bfloat16()
    _compare(d, labels, 1e-5, alpha=0.2, chunk_size=6, teacher_own_dtype=True)


def test_memory_budget_argument_and_env(monkeypatch):
    d, labels = _inputs(v=64)
    per_row = plan_chunks(37, 64, 16, torch.float64, torch.float64, "cpu", alpha=0.3).bytes_per_row
    _compare(d, labels, 1e-10, alpha=0.3, memory_budget=5 * per_row)
    monkeypatch.setenv(BUDGET_ENV, str(6 * per_row / 2**20))
    assert plan_chunks(37, 64, 16, torch.float64, torch.float64, "cpu", alpha=0.3).rows == 6
    _compare(d, labels, 1e-10, alpha=0.3)


def test_plan_chunks_budget_balance_and_floor():
    mb = 1 << 20
    p = plan_chunks(1025, 1000, 64, torch.float32, torch.float32, "cpu", memory_budget=1024 * 12000)
    # balanced: two chunks of 513 rounded up to a multiple of 8, not 1024 + 1
    assert p == ChunkPlan(rows=520, chunks=2, bytes_per_row=12000, head_acc=None)
    p = plan_chunks(4096, 32000, 512, torch.float32, torch.float32, "cpu")
    assert p.rows * p.bytes_per_row <= 128 * mb and p.chunks == -(-4096 // p.rows)
    assert plan_chunks(4096, 32000, 512, torch.float32, torch.float32, "cpu", alpha=0.5).bytes_per_row == 16 * 32000
    assert plan_chunks(4096, 32000, 512, torch.float32, torch.float32, "cpu", alpha=1.0).bytes_per_row == 8 * 32000
    # half precision: one chunk when it costs no more than budget + the fp32 [V, H] accumulator
    p = plan_chunks(2048, 128256, 4096, torch.bfloat16, torch.bfloat16, "cuda")
    assert p.chunks == 1 and p.head_acc is None
    p = plan_chunks(16384, 128256, 4096, torch.bfloat16, torch.bfloat16, "cuda")
    assert p.head_acc == torch.float32 and p.rows >= 1024  # the CUDA floor on the default budget
    p = plan_chunks(16384, 128256, 4096, torch.bfloat16, torch.bfloat16, "cuda", head_grad=False)
    assert p.head_acc is None
    p = plan_chunks(100, 50, 8, torch.bfloat16, torch.bfloat16, "cpu", chunk_size=7)
    assert (p.rows, p.chunks, p.head_acc) == (7, 15, torch.float32)


def _alloc_profile(fn, tmp_path):
    """(largest single allocation, peak bytes allocated) while ``fn`` runs, from the CPU profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    mem = [e["args"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    return max(a["Bytes"] for a in mem), max(a["Total Allocated"] for a in mem)


def test_frozen_head_gets_no_grad_and_no_head_buffer(tmp_path):
    n, v, h = 24, 300, 200  # a [V, H] fp32 buffer (240 kB) dwarfs every [rows, V] / [N, H] one
    d, labels = _inputs(n=n, v=v, hs=h, ht=8, dtype=torch.float32, bias=False)
    head_bytes = v * h * 4

    def run():
        fused_linear_distill(**d, labels=labels, alpha=0.5, chunk_size=4, backend="reference").backward()

    largest, _ = _alloc_profile(run, tmp_path)
    assert largest >= head_bytes and d["student_head"].grad is not None  # the detector sees a head grad
    d["student_head"].requires_grad_(False)
    d["student_hidden"].grad = None
    largest, _ = _alloc_profile(run, tmp_path)
    assert largest < head_bytes
    d2, _ = _inputs(n=n, v=v, hs=h, ht=8, dtype=torch.float32, bias=False)
    d2["student_head"].requires_grad_(False)
    loss = fused_linear_distill(**d2, labels=labels, alpha=0.5, chunk_size=4, backend="reference")
    loss.backward()
    assert d2["student_head"].grad is None
    ref = _unfused(d2, labels, alpha=0.5)
    assert rel_err(d2["student_hidden"].grad, _grads(ref, d2, 1.0)["student_hidden"]) < 1e-5
    # frozen hidden, trainable head
    d3, _ = _inputs(n=n, v=v, hs=h, ht=8, bias=True)
    d3["student_hidden"].requires_grad_(False)
    _compare(d3, labels, 1e-10, alpha=0.5, chunk_size=5)


def test_no_full_logits_and_lower_peak(tmp_path):
    n, v, h = 256, 2000, 32
    d, labels = _inputs(n=n, v=v, hs=h, ht=h, dtype=torch.float32)
    logits_bytes = n * v * 4
    fused = lambda: fused_linear_distill(**d, labels=labels, alpha=0.3, backend="reference",  # noqa: E731
                                         memory_budget=logits_bytes // 8).backward()
    unfused = lambda: _unfused(d, labels, alpha=0.3, wide=torch.float32).backward()  # noqa: E731
    f_largest, f_peak = _alloc_profile(fused, tmp_path)
    u_largest, u_peak = _alloc_profile(unfused, tmp_path)
    assert f_largest < logits_bytes <= u_largest
    assert f_peak < 0.5 * u_peak


def test_half_precision_close_to_torch():
    d, labels = _inputs(n=131, v=200, hs=48, ht=40, dtype=torch.float32)
    ref = _unfused(d, labels, temperature=2.0, alpha=0.3)
    want = _grads(ref, d, 1.0)
    for dt in (torch.bfloat16, torch.float16):
        dh = {k: None if x is None else x.detach().to(dt).requires_grad_(x.requires_grad) for k, x in d.items()}
        plain = _unfused(dh, labels, temperature=2.0, alpha=0.3, wide=dt)  # torch in the same dtype
        plain_g = _grads(plain, dh, 1.0)
        for chunk in (None, 16):  # one chunk; several with the fp32 head accumulator
            loss = fused_linear_distill(**dh, labels=labels, temperature=2.0, alpha=0.3, chunk_size=chunk,
                                        backend="reference")
            assert loss.dtype == torch.float32 and rel_err(loss.reshape(1), ref.reshape(1)) < 1e-2
            got = _grads(loss, dh, 1.0)
            for k in want:
                assert got[k].dtype == dt
                assert rel_err(got[k], want[k]) <= 2 * rel_err(plain_g[k], want[k]) + 1e-4, (dt, chunk, k)


def test_autocast_casts_like_linear():
    d, labels = _inputs(n=40, v=64, hs=32, ht=24, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_distill(**d, labels=labels, alpha=0.3, chunk_size=16, backend="reference")
    got = _grads(loss, d, 1.0)
    dh = {k: None if x is None else x.detach().bfloat16().requires_grad_(x.requires_grad) for k, x in d.items()}
    want_loss = fused_linear_distill(**dh, labels=labels, alpha=0.3, chunk_size=16, backend="reference")
    want = _grads(want_loss, dh, 1.0)
    assert loss.item() == want_loss.item()
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()), k


def test_all_rows_ignored_and_empty():
    d, labels = _inputs()
    loss = fused_linear_distill(**d, labels=torch.full_like(labels, IGN), alpha=0.5, backend="reference")
    assert loss.item() == 0.0
    for g in _grads(loss, d).values():
        assert g.abs().max() == 0
    e, _ = _inputs(n=0)
    loss = fused_linear_distill(**e, backend="reference")
    assert loss.item() == 0.0
    g = _grads(loss, e)
    assert g["student_hidden"].shape == (0, 16) and g["student_head"].abs().max() == 0


def test_no_grad_and_retained_graph():
    d, labels = _inputs()
    with torch.no_grad():
        loss = fused_linear_distill(**d, labels=labels, alpha=0.5, backend="reference")
    assert not loss.requires_grad and abs(loss.item() - _unfused(d, labels, alpha=0.5).item()) < 1e-12
    loss = fused_linear_distill(**d, labels=labels, alpha=0.5, backend="reference")
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # grads were scaled in place: never twice
        (loss * 2).backward()


@pytest.mark.parametrize("name", ["cpp", "triton", "cuda"])
def test_other_distill_backends(name):
    dev = "cuda" if torch.cuda.is_available() and name != "cpp" else "cpu"
    try:
        backends.implementation("distill_kl", backends.select("distill_kl", dev, torch.float32, name))
    except (backends.BackendUnavailable, ImportError) as e:
        pytest.skip(f"distill_kl backend {name} not available here: {e}")
    if dev == "cpu" and name != "cpp":
        pytest.skip("Triton under the CPU interpreter is covered by the distill_kl tests")
    if name == "cpp":
        from peftcore import native

        if not hasattr(native.load(), "distill_fwd"):
            pytest.skip("peftcore._C was built before the distill kernels: rebuild the extension")
    d, labels = _inputs(n=45, v=130, dtype=torch.float32)
    d = {k: None if x is None else x.detach().to(dev).requires_grad_(x.requires_grad) for k, x in d.items()}
    labels = labels.to(dev)
    for kind in ("forward", "reverse", "jsd"):
        loss = fused_linear_distill(**d, labels=labels, alpha=0.3, kind=kind, chunk_size=8, backend=name)
        ref = _unfused({k: None if x is None else x.cpu() for k, x in d.items()}, labels.cpu(), alpha=0.3, kind=kind)
        assert rel_err(loss.cpu().reshape(1), ref.reshape(1)) < 1e-5
        got = _grads(loss, d)
        ref_d = {k: None if x is None else x.detach().cpu().requires_grad_(x.requires_grad) for k, x in d.items()}
        want = _grads(_unfused(ref_d, labels.cpu(), alpha=0.3, kind=kind), ref_d)
        for k in want:
            assert rel_err(got[k].cpu(), want[k]) < 1e-5, (kind, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_cuda_half_multi_chunk(dt):
    d, labels = _inputs(n=517, v=1000, hs=128, ht=96, dtype=torch.float32)
    ref = _unfused(d, labels, temperature=2.0, alpha=0.3)
    want = _grads(ref, d, 1.0)
    dh = {k: None if x is None else x.detach().cuda().to(dt).requires_grad_(x.requires_grad) for k, x in d.items()}
    plain_g = _grads(_unfused(dh, labels.cuda(), temperature=2.0, alpha=0.3, wide=dt), dh, 1.0)
    for chunk in (None, 64):
        loss = fused_linear_distill(**dh, labels=labels.cuda(), temperature=2.0, alpha=0.3, chunk_size=chunk)
        assert rel_err(loss.cpu().reshape(1), ref.reshape(1)) < 1e-2
        got = _grads(loss, dh, 1.0)
        for k in want:
            assert rel_err(got[k].cpu(), want[k]) <= 2 * rel_err(plain_g[k].cpu(), want[k]) + 1e-4, (chunk, k)


@given(n=st.integers(1, 40), v=st.integers(2, 60), hs=st.integers(1, 20), ht=st.integers(1, 20),
       chunk=st.one_of(st.none(), st.integers(1, 50)), alpha=st.sampled_from([0.0, 0.5, 1.0]),
       kind=st.sampled_from(["forward", "reverse", "jsd"]), temperature=st.floats(0.5, 4.0), seed=st.integers(0, 99))
def test_hypothesis_shapes(n, v, hs, ht, chunk, alpha, kind, temperature, seed):
    d, labels = _inputs(n=n, v=v, hs=hs, ht=ht, seed=seed)
    labels.view(-1)[0] = 0  # at least one live row
    _compare(d, labels, 1e-9, temperature=temperature, alpha=alpha, kind=kind, chunk_size=chunk)


def _bad(**over):
    d, labels = _inputs(n=6, v=10, hs=4, ht=5, dtype=torch.float32)
    kw = dict(d, labels=labels, backend="reference")
    kw.update(over)
    return kw


@pytest.mark.parametrize("over,err,match", [
    (dict(student_hidden=torch.randn(7, 4)), ValueError, "leading"),
    (dict(student_head=torch.randn(11, 4)), ValueError, "vocabularies must match"),
    (dict(student_head=torch.randn(10, 3)), ValueError, "H must match"),
    (dict(teacher_head=torch.randn(10, 4)), ValueError, "H must match"),
    (dict(student_head=torch.randn(10, 4, 1)), ValueError, "2-D"),
    (dict(student_hidden=torch.ones(6, 4, dtype=torch.long)), TypeError, "floating point"),
    (dict(teacher_head=torch.ones(10, 5, dtype=torch.int32)), TypeError, "floating point"),
    (dict(student_head=torch.randn(10, 4, dtype=torch.float64)), TypeError, "must match"),
    (dict(student_bias=torch.randn(9)), ValueError, "student_bias"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha=0.5, labels=None), ValueError, "labels is None"),
    (dict(labels=torch.tensor([0, 1, 2, 10, 3, 4])), ValueError, r"\[0, V\)"),
    (dict(labels=torch.tensor([0, 1, -1, 5, 3, 4])), ValueError, "found -1"),
    (dict(labels=torch.zeros(6)), TypeError, "integer"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "shape"),
    (dict(kind="kl"), ValueError, "kind"),
    (dict(kind="jsd", beta=1.0), ValueError, "beta"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(memory_budget=-5), ValueError, "memory_budget"),
    (dict(backend="nope"), ValueError, "backend"),
    (dict(backend="cuda"), backends.BackendUnavailable, "unavailable"),
])
def test_bad_inputs(over, err, match):
    if over.get("backend") == "cuda" and torch.cuda.is_available():
        pytest.skip("cuda is available here")
    with pytest.raises(err, match=match):
        fused_linear_distill(**_bad(**over))


def test_labels_with_custom_ignore_index():
    d, labels = _inputs()
    labels = torch.where(labels == IGN, torch.full_like(labels, 7777), labels)
    _compare(d, labels, 1e-10, alpha=0.4, chunk_size=9, ignore_index=7777)
