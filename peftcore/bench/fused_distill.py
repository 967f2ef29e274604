"""Fused-linear distillation benchmark: output heads and the distillation loss in one op.

The student's logits are ``student_hidden [N, Hs] @ student_head [V, Hs]ᵀ``, the teacher's
``teacher_hidden [N, Ht] @ teacher_head [V, Ht]ᵀ``; the loss is ``T² · KL(softmax(t/T) ‖
softmax(s/T))``, mean over rows.  The gradient goes to the student's hidden states (and to its
head with ``head_grad``); the teacher gets none.

Providers:
    unfused_torch  both logits materialised with a matmul (the teacher's under ``no_grad``), the
                   eager loss of :mod:`peftcore.bench.distill`, autograd backward (the baseline).
    liger          liger-kernel's ``LigerFusedLinearJSD(jsd_beta=0, temperature=T)``: with beta 0
                   it is the forward KL(teacher ‖ student), mean over rows, but without T² (its
                   loss is ours / T²; the check allows for it) and with no hard-label term.
    ours           ``peftcore.losses.fused_linear_distill(..., labels=None, alpha=0)``.

Shape keys: tokens (N), hs, ht (hidden sizes), vocab (V), temperature, head_grad.
"""

from __future__ import annotations

import itertools

import torch

from .distill import (check_tol, eager_kl, evaluate_targets, kl_rows_fp64, liger_version, logits_units, rel_err,
                      require_liger, warm_up)
from .harness import Bench, Case, Setup, Skip, csv, dtype_name, dtype_of, parse_bool

PROVIDERS = ("unfused_torch", "liger", "ours")

PRESETS = {
    # A MiniLM-sized student (512) under a BERT-base-sized teacher (768) with a 32k vocabulary.
    # 11 rounds, as distill's: calls of up to a second.
    "cpu": dict(tokens=[1024, 4096], hs=[512], ht=[768], vocab=[32000], temperature=[2.0],
                head_grad=[False], dtype=["float32"], device="cpu", rounds=11),
    # A 1B-class student (2048) under an 8B-class teacher (4096), Llama-3's 128k vocabulary.
    "gpu": dict(tokens=[1024, 2048, 4096, 8192, 16384], hs=[2048], ht=[4096], vocab=[128256],
                temperature=[2.0], head_grad=[False], dtype=["bfloat16"], device="cuda"),
    # Seconds, for tests: odd sizes.
    "smoke": dict(tokens=[67], hs=[24], ht=[40], vocab=[1001], temperature=[2.0], head_grad=[False],
                  dtype=["float32"], device=None),
}

# At every N of the cpu and gpu presets: faster than unfused and at most 20% of its extra memory.
TARGETS = [
    dict(name=f"{kind} {dt}, Hs {hs} / Ht {ht}, V {v}: full <= unfused time, peak above inputs <= 0.2x unfused's",
         device_type=dev, dtype=dt, shape=dict(hs=hs, ht=ht, vocab=v),
         min_speedup_vs_baseline=1.0, max_peak_mem=0.2)
    for kind, dev, dt, hs, ht, v in (("CPU", "cpu", "float32", 512, 768, 32000),
                                     ("GPU", "cuda", "bfloat16", 2048, 4096, 128256))
]

EXTRA_COLS = (
    ("peak_mem_logits", "peak × logits", "{:.2f}"),
    ("chunks", "chunks", "{}"),
    ("check_rel_err", "loss rel err", "{:.1e}"),
)


def fused_linear_distill_fn():
    """``peftcore.losses.fused_linear_distill``, or Skip while it does not import."""
    try:
        from ..losses import fused_linear_distill
    except ImportError:
        try:
            from ..losses.fused_linear import fused_linear_distill
        except Exception as e:
            raise Skip(f"peftcore.losses.fused_linear_distill does not import ({type(e).__name__}: {e})") from None
    return fused_linear_distill


def _plan_info(n, v, hs, dt, device, head_grad) -> dict:
    """How ours splits the rows and which distill_kl backend it uses (recorded in the rows)."""
    info: dict = {}
    try:
        from .. import backends
        from ..losses.fused_linear import plan_chunks

        plan = plan_chunks(n, v, hs, dt, dt, device, alpha=0.0, head_grad=head_grad)
        info.update(chunk_rows=plan.rows, chunks=plan.chunks)
        info["kl_backend"] = backends.select("distill_kl", device, dt)
    except Exception as e:  # informational only
        info["plan_error"] = f"{type(e).__name__}: {e}"
    return info


class FusedDistillBench(Bench):
    op = "fused_distill"
    floor = None  # the GEMMs are the floor: see pct_of_gemm_ceiling
    baseline = "unfused_torch"
    providers = PROVIDERS
    presets = PRESETS
    cpu_peak_memory = True
    extra_cols = EXTRA_COLS

    def __init__(self):
        self._refs: dict = {}

    def add_args(self, p) -> None:
        g = p.add_argument_group("fused-distill filters (comma-separated lists; each replaces the preset's list)")
        g.add_argument("--tokens", type=csv(int), help="rows N (tokens), e.g. 1024,4096")
        g.add_argument("--hs", type=csv(int), help="student hidden sizes")
        g.add_argument("--ht", type=csv(int), help="teacher hidden sizes")
        g.add_argument("--vocab", type=csv(int), help="vocabulary sizes V")
        g.add_argument("--temperature", type=csv(float), help="temperatures T (default 2)")
        g.add_argument("--head-grad", dest="head_grad", type=csv(parse_bool),
                       help="0: student head frozen (LoRA, the default); 1: it gets a gradient too")

    def cases(self, args) -> list[Case]:
        ps = self.presets[args.preset]
        providers = self.chosen_providers(args)
        dtypes = [dtype_name(d) for d in (args.dtype or ps["dtype"])]
        grid = itertools.product(
            dtypes, args.tokens or ps["tokens"], args.hs or ps["hs"], args.ht or ps["ht"],
            args.vocab or ps["vocab"], args.temperature or ps["temperature"],
            args.head_grad if args.head_grad is not None else ps["head_grad"])
        cases = []
        for dt, n, hs, ht, v, temp, hg in grid:
            shape = {"tokens": n, "hs": hs, "ht": ht, "vocab": v, "temperature": temp, "head_grad": hg}
            cases += [Case(shape=dict(shape), dtype=dt, provider=p) for p in providers]
        return cases

    def default_provider(self, device, dtype: str) -> str | None:
        return "ours"

    # ------------------------------------------------------------------ providers

    def _reference(self, xs, ws, xt, wt, temperature) -> float:
        """Loss of the case's inputs, 1024 rows at a time: fp32 matmuls (fp64 would take ~10 s on a
        small CPU), the softmax and KL in fp64."""
        key = (tuple(xs.shape), tuple(ws.shape), tuple(xt.shape), str(xs.dtype), xs.device.type, temperature)
        if key not in self._refs:
            self._refs.clear()
            with torch.no_grad():
                ws32, wt32 = ws.float(), wt.float()
                total = 0.0
                for i in range(0, xs.shape[0], 1024):
                    s = xs[i:i + 1024].float() @ ws32.t()
                    t = xt[i:i + 1024].float() @ wt32.t()
                    total += float(kl_rows_fp64(s, t, temperature))
            self._refs[key] = total / xs.shape[0] * temperature**2
        return self._refs[key]

    def setup(self, case: Case, device: torch.device) -> Setup:
        sh, prov = case.shape, case.provider
        dt = dtype_of(case.dtype)
        n, hs, ht, v, temp = sh["tokens"], sh["hs"], sh["ht"], sh["vocab"], float(sh["temperature"])
        head_grad = bool(sh["head_grad"])
        info: dict = {}
        scale = 1.0
        if prov == "liger":
            lk = require_liger(device, "fused linear JSD")
        elif prov == "ours":
            fld = fused_linear_distill_fn()
        elif prov != "unfused_torch":
            raise Skip(f"unknown provider {prov!r}")

        torch.manual_seed(0)
        # Logits of standard deviation ~2, like a trained head's.
        xs = torch.randn(n, hs, device=device, dtype=dt).requires_grad_(True)
        ws = torch.randn(v, hs, device=device, dtype=dt).mul_(2.0 / hs**0.5).requires_grad_(head_grad)
        xt = torch.randn(n, ht, device=device, dtype=dt)
        wt = torch.randn(v, ht, device=device, dtype=dt).mul_(2.0 / ht**0.5)

        if prov == "unfused_torch":
            def forward():
                s = xs @ ws.t()
                with torch.no_grad():
                    t = xt @ wt.t()
                return eager_kl(s, t, temp)
        elif prov == "liger":
            loss = lk.LigerFusedLinearJSD(jsd_beta=0.0, temperature=temp)
            scale = temp * temp
            info["loss_convention"] = "liger: forward KL (jsd_beta=0) without T² (value x T² is compared)"

            def forward():
                return loss(xs, ws, xt, wt, None)
        else:
            info.update(_plan_info(n, v, hs, dt, device, head_grad))

            def forward():
                return fld(xs, ws, xt, wt, labels=None, temperature=temp, alpha=0.0)

        inputs = [xs, ws] if head_grad else [xs]
        value, _ = warm_up(forward, inputs)
        ref = self._reference(xs.detach(), ws.detach(), xt, wt, temp)
        err = rel_err(value * scale, ref)
        info["check_rel_err"] = err
        if not err <= check_tol(case.dtype):
            raise Skip(f"wrong result: loss {value * scale:.6g} vs reference {ref:.6g} "
                       f"(rel err {err:.2e} > {check_tol(case.dtype):.0e})")
        return Setup(forward=forward, inputs=inputs, params=[ws, wt], loss=True, info=info)

    # ------------------------------------------------------------------ metrics

    def flops(self, case: Case, mode: str) -> float:
        """The GEMMs any implementation must do: both heads forward; dX (and dW with head_grad) back."""
        s = case.shape
        n, v = s["tokens"], s["vocab"]
        fwd = 2.0 * n * v * (s["hs"] + s["ht"])
        bwd = 2.0 * n * v * s["hs"] * (2 if s["head_grad"] else 1)
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

    def gemm_shapes(self, case: Case) -> list[tuple[int, int, int]]:
        """Both heads (N, H, V), dX (N, V, Hs) and, with head_grad, dW (V, N, Hs)."""
        s = case.shape
        n, v, hs = s["tokens"], s["vocab"], s["hs"]
        return [(n, hs, v), (n, s["ht"], v), (n, v, hs)] + ([(v, n, hs)] if s["head_grad"] else [])

    def finish_row(self, case: Case, mode: str, row: dict) -> None:
        """Memory in units of one student-logits tensor."""
        s = case.shape
        logits_units(row, s["tokens"] * s["vocab"] * dtype_of(case.dtype).itemsize)

    def meta(self, device) -> dict:
        return {
            "libraries": {"liger_kernel": liger_version()},
            "plot_memory": True,
            "notes": [
                "loss: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over rows, t = teacher_hidden @ teacher_head^T, "
                "s = student_hidden @ student_head^T; no hard-label term (alpha 0); backward seeded with 1",
                "TFLOP/s: the GEMMs any implementation must do (fwd: both heads; bwd: dX, and dW with "
                "head_grad) / p50; a fused op that recomputes logits in the backward does more",
                "peak × logits: peak_mem_bytes over one student-logits tensor (N·V·itemsize); the targets "
                "compare ours' peak with unfused_torch's",
                "liger (LigerFusedLinearJSD, jsd_beta=0): forward KL at temperature T, mean over rows, "
                "without T^2; its loss x T^2 is checked against the reference",
            ],
        }

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        return evaluate_targets(rows, meta, self.baseline, TARGETS, logits_peak=False)


BENCH = FusedDistillBench()
