"""Soft-label distillation loss benchmark: ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, mean over rows.

The student logits ``s`` ``[N, V]`` get a gradient, the teacher's ``t`` do not; the loss is a scalar
and the backward is seeded with 1 (``loss.backward()``).

Providers:
    torch_eager    two ``log_softmax`` and ``F.kl_div(log_target=True, reduction="batchmean")``
                   times T², in the logits' dtype: what a training script writes (the baseline).
    torch_compile  the same function under ``torch.compile(dynamic=False)``; its warm-up seconds
                   are recorded (``compile_warmup_s``).  Not run in the smoke preset unless asked for.
    liger          ``log_softmax`` (torch) of both, then liger-kernel's ``LigerKLDIVLoss(log_target=
                   True)``.  Liger applies no T²: its loss is ours / T² (the check allows for it).
    reference, triton, cpp, cuda
                   ``peftcore.losses.distill_kl(..., backend=name)``.

Shape keys: tokens (N, rows), vocab (V), temperature (T).  Memory is also given in units of one
logits tensor (N·V·itemsize): ``peak_mem_logits``, ``saved_logits``.
"""

from __future__ import annotations

import importlib.util
import itertools
import time

import torch
import torch.nn.functional as F

from .harness import (Bench, Case, Setup, Skip, csv, default_vs_baseline, dtype_name, dtype_of, find_target,
                      registry_default, require_backend, speedup)

OURS = ("reference", "triton", "cpp", "cuda")
PROVIDERS = ("torch_eager", "torch_compile", "liger") + OURS
COMPILE_MAX_S = 120.0  # a torch.compile warm-up longer than this is recorded as a skip
CHECK_TOL = {"float32": 1e-3, "float64": 1e-6}  # relative error of the loss; half precision: 5e-2

PRESETS = {
    # The demo-scale head on a laptop-class CPU: 4096 tokens of a 32k vocabulary (Llama-2 / Mistral).
    # 11 rounds: its calls take up to a second, and 25 would double the run for little precision.
    "cpu": dict(tokens=[4096], vocab=[32000], temperature=[2.0], dtype=["float32"], device="cpu", rounds=11),
    # 8192 tokens against the Llama-2 (32k), Llama-3 (128k) and Gemma (256k) vocabularies.
    "gpu": dict(tokens=[8192], vocab=[32000, 128256, 256000], temperature=[2.0], dtype=["bfloat16"],
                device="cuda"),
    # Seconds, for tests: odd sizes so no kernel hits only its fast path.
    "smoke": dict(tokens=[67], vocab=[1001], temperature=[2.0], dtype=["float32"], device=None),
}

TARGETS = [
    dict(name="CPU fp32 4096 x 32000: default backend full >= 4x faster than torch eager",
         device_type="cpu", dtype="float32", shape=dict(tokens=4096, vocab=32000),
         min_speedup_vs_baseline=4.0, max_peak_mem=None),
    dict(name="GPU bf16 8192 x 128256: full >= 3x faster than torch eager, peak above inputs <= 1.5 logits "
              "(the gradient is 1; any other logits-sized tensor would make it >= 2)",
         device_type="cuda", dtype="bfloat16", shape=dict(tokens=8192, vocab=128256),
         min_speedup_vs_baseline=3.0, max_peak_mem=1.5),
]

EXTRA_COLS = (
    ("peak_mem_logits", "peak × logits", "{:.2f}"),
    ("saved_logits", "saved × logits", "{:.2f}"),
    ("check_rel_err", "loss rel err", "{:.1e}"),
)


# ----------------------------------------------------------------------------- shared helpers


def eager_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The plain-PyTorch distillation loss (the baseline): T² · KL(p_t ‖ p_s), batchmean."""
    ls = torch.log_softmax(s / temperature, dim=-1)
    lt = torch.log_softmax(t / temperature, dim=-1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * (temperature * temperature)


def kl_rows_fp64(s_chunk: torch.Tensor, t_chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over the rows of a chunk of KL(p_t ‖ p_s) at temperature T, in fp64 (no T²)."""
    ls = torch.log_softmax(s_chunk.double() / temperature, dim=-1)
    lt = torch.log_softmax(t_chunk.double() / temperature, dim=-1)
    return torch.where(lt > -float("inf"), lt.exp() * (lt - ls), torch.zeros_like(lt)).sum()


def rel_err(value: float, ref: float) -> float:
    return abs(value - ref) / max(abs(ref), 1e-30)


def check_tol(dtype: str) -> float:
    return CHECK_TOL.get(dtype, 5e-2)


def liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        return None


def require_liger(device: torch.device, what: str):
    """Import ``liger_kernel.transformers`` for a CUDA run, or raise Skip saying why not.

    The device is checked first: liger-kernel's ops are Triton GPU kernels, and importing it costs
    seconds that a CPU run would spend only to skip it.
    """
    if device.type != "cuda":
        where = "installed" if importlib.util.find_spec("liger_kernel") else "not installed"
        raise Skip(f"liger-kernel's {what} is a Triton GPU kernel; no CPU path (liger-kernel {where})")
    try:
        import liger_kernel.transformers as lt
    except Exception as e:
        raise Skip(f"liger_kernel not importable ({type(e).__name__}: {e}); pip install liger-kernel") from None
    return lt


def compiled(fn, device: torch.device):
    """``torch.compile(fn, dynamic=False)`` after a dynamo reset, or Skip with the reason."""
    try:
        import torch._dynamo

        torch._dynamo.reset()  # a fresh compile per case: honest warm-up times, no recompile limit
        return torch.compile(fn, dynamic=False)
    except Exception as e:
        raise Skip(f"torch.compile unavailable on {device.type} ({type(e).__name__}: {e})") from None


def warm_up(forward, inputs):
    """Run one forward + backward (compiles and autotunes); returns (loss value, seconds)."""
    t0 = time.perf_counter()
    y = forward()
    torch.autograd.grad(y, inputs)
    if inputs[0].device.type == "cuda":
        torch.cuda.synchronize(inputs[0].device)
    return float(y.detach().float()), time.perf_counter() - t0


def logits_units(row: dict, logits_bytes: int) -> None:
    """Add peak_mem_logits / saved_logits: the row's memory in units of one logits tensor."""
    row["logits_bytes"] = logits_bytes
    peak, saved = row.get("peak_mem_bytes"), row.get("saved_bytes")
    row["peak_mem_logits"] = peak / logits_bytes if peak is not None else None
    row["saved_logits"] = saved / logits_bytes if saved is not None else None


# ----------------------------------------------------------------------------- the bench


class DistillBench(Bench):
    op = "distill"
    floor = None  # no provider bounds it from below; GB/s against the copy ceiling does that job
    baseline = "torch_eager"
    providers = PROVIDERS
    presets = PRESETS
    cpu_peak_memory = True
    extra_cols = EXTRA_COLS

    def __init__(self):
        self._compile_skip: str | None = None
        self._refs: dict = {}

    def add_args(self, p) -> None:
        g = p.add_argument_group("distill filters (comma-separated lists; each replaces the preset's list)")
        g.add_argument("--tokens", type=csv(int), help="rows N (tokens), e.g. 4096,8192")
        g.add_argument("--vocab", type=csv(int), help="vocabulary sizes V, e.g. 32000,128256")
        g.add_argument("--temperature", type=csv(float), help="temperatures T (default 2)")

    def cases(self, args) -> list[Case]:
        preset = self.presets[args.preset]
        providers = self.chosen_providers(args)
        self._compile_skip = None
        if args.preset == "smoke" and "torch_compile" not in (args.providers or []):
            self._compile_skip = ("not run in the smoke preset: the inductor warm-up takes 6-25 s cold on 2 "
                                  "CPU cores; ask for it with --providers torch_compile")
        dtypes = [dtype_name(d) for d in (args.dtype or preset["dtype"])]
        cases = []
        for dt, n, v, temp in itertools.product(dtypes, args.tokens or preset["tokens"],
                                                args.vocab or preset["vocab"],
                                                args.temperature or preset["temperature"]):
            shape = {"tokens": n, "vocab": v, "temperature": temp}
            cases += [Case(shape=dict(shape), dtype=dt, provider=p) for p in providers]
        return cases

    def default_provider(self, device, dtype: str) -> str | None:
        return registry_default("distill_kl", device, dtype, registers="peftcore.losses.distill")

    # ------------------------------------------------------------------ providers

    def _reference(self, s, t, temperature) -> float:
        """fp64 loss of the case's inputs, in row chunks (no full-size fp64 copy)."""
        key = (tuple(s.shape), str(s.dtype), s.device.type, temperature)
        if key not in self._refs:
            self._refs.clear()
            with torch.no_grad():
                total = sum(float(kl_rows_fp64(s[i:i + 1024], t[i:i + 1024], temperature))
                            for i in range(0, s.shape[0], 1024))
            self._refs[key] = total / s.shape[0] * temperature**2
        return self._refs[key]

    def setup(self, case: Case, device: torch.device) -> Setup:
        sh, prov = case.shape, case.provider
        dt = dtype_of(case.dtype)
        n, v, temp = sh["tokens"], sh["vocab"], float(sh["temperature"])
        info: dict = {}
        scale = 1.0  # provider loss x scale = our convention's loss
        if prov == "torch_compile" and self._compile_skip:
            raise Skip(self._compile_skip)
        if prov == "liger":
            lk = require_liger(device, "KL divergence")
        if prov in OURS:
            forward_impl = self._ours(prov, device, dt)

        torch.manual_seed(0)
        s = torch.randn(n, v, device=device, dtype=dt).mul_(2.0).requires_grad_(True)
        t = torch.randn(n, v, device=device, dtype=dt).mul_(2.0)

        if prov == "torch_eager":
            def forward():
                return eager_kl(s, t, temp)
        elif prov == "torch_compile":
            fn = compiled(eager_kl, device)

            def forward():
                return fn(s, t, temp)
        elif prov == "liger":
            loss = lk.LigerKLDIVLoss(reduction="batchmean", log_target=True)
            scale = temp * temp
            info["loss_convention"] = "liger: KL without T² (value x T² is compared)"

            def forward():
                return loss(torch.log_softmax(s / temp, dim=-1), torch.log_softmax(t / temp, dim=-1))
        elif prov in OURS:
            def forward():
                return forward_impl(s, t, temp)
        else:
            raise Skip(f"unknown provider {prov!r}")

        try:
            value, secs = warm_up(forward, [s])
        except Exception as e:
            if prov == "torch_compile":
                raise Skip(f"torch.compile failed on {device.type} ({type(e).__name__}: {str(e)[:200]})") from None
            raise
        if prov == "torch_compile":
            info["compile_warmup_s"] = round(secs, 2)
            if secs > COMPILE_MAX_S:
                raise Skip(f"torch.compile warm-up took {secs:.0f} s (> {COMPILE_MAX_S:.0f} s) on {device.type}")
        ref = self._reference(s.detach(), t, temp)
        err = rel_err(value * scale, ref)
        info["check_rel_err"] = err
        if not err <= check_tol(case.dtype):
            raise Skip(f"wrong result: loss {value * scale:.6g} vs fp64 reference {ref:.6g} "
                       f"(rel err {err:.2e} > {check_tol(case.dtype):.0e})")
        return Setup(forward=forward, inputs=[s], params=[], loss=True, info=info)

    @staticmethod
    def _ours(prov: str, device, dt):
        from ..losses import distill_kl

        require_backend("distill_kl", prov, device, dt)

        def forward(s, t, temp):
            return distill_kl(s, t, temp, reduction="batchmean", backend=prov)

        return forward

    # ------------------------------------------------------------------ metrics

    def bytes_moved(self, case: Case, mode: str) -> float | None:
        """The least traffic: fwd reads both logits; full also writes the student's gradient."""
        n, v = case.shape["tokens"], case.shape["vocab"]
        size = n * v * dtype_of(case.dtype).itemsize
        return {"fwd": 2.0 * size, "full": 3.0 * size}.get(mode)

    def finish_row(self, case: Case, mode: str, row: dict) -> None:
        n, v = case.shape["tokens"], case.shape["vocab"]
        logits_units(row, n * v * dtype_of(case.dtype).itemsize)

    def meta(self, device) -> dict:
        return {
            "libraries": {"liger_kernel": liger_version()},
            "plot_memory": True,
            "notes": [
                "loss: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over rows; the backward is seeded with 1 "
                "(loss.backward()), the student logits get the gradient, the teacher's none",
                "GB/s: least traffic (fwd: read both logits; full: and write the gradient) / p50; bwd has none",
                "peak × logits / saved × logits: peak_mem_bytes / saved_bytes over one logits tensor "
                "(N·V·itemsize); the gradient alone is 1",
                "loss rel err: |provider loss - fp64 reference| / |reference| on the benchmark inputs "
                "(liger's loss x T^2, since Liger applies no T^2)",
            ],
        }

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        return evaluate_targets(rows, meta, self.baseline, TARGETS, logits_peak=True)


def evaluate_targets(rows, meta, baseline, targets, logits_peak: bool) -> list[dict]:
    """Per (dtype, shape), full mode: the default provider's speedup over the baseline and its peak
    memory (in logits units, or relative to the baseline's peak), with status where a target applies."""
    out = []
    for dt, shape, prov, ours, base in default_vs_baseline(rows, meta, "full", None, baseline):
        fast = speedup(ours, base)
        if logits_peak:
            peak, unit = (ours or {}).get("peak_mem_logits"), "logits"
        else:
            peak = (ours["peak_mem_bytes"] / base["peak_mem_bytes"]
                    if ours and base and ours["peak_mem_bytes"] is not None and base["peak_mem_bytes"]
                    else None)
            unit = f"× {baseline}"
        target = find_target(targets, meta.get("device_type"), dt, shape)
        status = None
        if target:
            if ours is None:
                status = "n/a (default backend not measured)"
            else:
                ok = fast is not None and fast >= target["min_speedup_vs_baseline"]
                if target["max_peak_mem"] is not None:
                    ok = ok and peak is not None and peak <= target["max_peak_mem"]
                status = "PASS" if ok else "FAIL"
        out.append({
            "dtype": dt, "shape": shape,
            "default_backend": prov, "ratio_to_floor": None, "speedup_vs_baseline": fast,
            "peak_mem": peak, "peak_mem_unit": unit,
            "target": target["name"] if target else None,
            "max_ratio_to_floor": None,
            "min_speedup_vs_baseline": target["min_speedup_vs_baseline"] if target else None,
            "max_peak_mem": target["max_peak_mem"] if target else None,
            "status": status,
            "unstable": bool((ours or {}).get("unstable")),
        })
    return out


BENCH = DistillBench()
