"""Mixed-adapter LoRA serving benchmark: a batch where each example runs its own LoRA adapter.

    y[e] = x[e] Wᵀ + b + scaling[j] · (x[e] A[j]ᵀ) B[j]ᵀ        j = adapter_index[e]

A case is B examples × S tokens through one ``in → out`` linear with J adapters of rank r stacked;
each example's adapter is drawn round-robin (example e gets e mod J) or at random (fixed seed).
Forward only, under ``torch.inference_mode`` (serving): mode ``fwd``.  Adapter j's scaling is
(1 + j mod 4) / 2, so a kernel that applies one adapter's scaling to all fails the output check.

Providers:
    base       the frozen linear alone, ``F.linear(x, W, b)``: the floor.
    loop       ``peftcore.ops.lora_mixed_linear(..., backend="reference")``: a Python loop over the
               adapters present (gather, two small GEMMs, scatter per adapter): the baseline.
    peft       HF PEFT's mixed-batch inference: a one-linear module with J LoRA adapters injected
               (``peft.inject_adapter_in_model``), eval mode, called with ``adapter_names=[...]``.
    cpp, triton, cuda
               ``peftcore.ops.lora_mixed_linear(..., backend=name)``.

Shape keys: batch (B), seq (S), in, out, adapters (J), r, assign (round_robin | random), bias.
The floor's rows carry ``adapters, r, assign: null`` and are measured once per (B, S, in, out, bias).
"""

from __future__ import annotations

import itertools
import warnings

import torch
import torch.nn.functional as F

from .harness import (
    Bench,
    Case,
    Setup,
    Skip,
    csv,
    dtype_name,
    dtype_of,
    parse_bool,
    registry_default,
    require_backend,
    shape_targets,
)
from .phm import check_tol, rel_err

OURS = ("cpp", "triton", "cuda")
PROVIDERS = ("base", "loop", "peft") + OURS
ASSIGN = ("round_robin", "random")
SEED = 1234

PRESETS = {
    # A BERT-large-sized projection (bias) on a CPU server: 1024 tokens as 8 x 128 or 32 x 32.
    "cpu": {
        "batch_seq": [(8, 128), (32, 32)], "in_out": [(1024, 1024)], "adapters": [4, 16], "r": [16],
        "assign": list(ASSIGN), "bias": [True], "dtype": ["float32"], "device": "cpu",
    },
    # Llama-class q/o projection (no bias) in a multi-tenant server: 4k to 64k tokens, 8 or 64 tenants.
    "gpu": {
        "batch_seq": list(itertools.product([32, 128], [128, 512])), "in_out": [(4096, 4096)],
        "adapters": [8, 64], "r": [16], "assign": list(ASSIGN), "bias": [False], "dtype": ["bfloat16"],
        "device": "cuda",
    },
    # Seconds, for tests: odd sizes.
    "smoke": {
        "batch_seq": [(5, 7)], "in_out": [(40, 48)], "adapters": [3], "r": [4], "assign": list(ASSIGN),
        "bias": [True], "dtype": ["float32"], "device": None,
    },
}

# The kernel (the registry's default backend) beats the loop at every shape of the cpu/gpu presets.
TARGETS = [
    {
        "name": f"{kind} {dt}, {w}->{w}: default backend fwd faster than the loop (ratio to loop < 1)",
        "device_type": dev, "dtype": dt, "shape": {"in": w, "out": w},
        "max_ratio_to_floor": None, "min_speedup_vs_baseline": 1.0, "strict": True,
    }
    for kind, dev, dt, w in (("CPU", "cpu", "float32", 1024), ("GPU", "cuda", "bfloat16", 4096))
]

EXTRA_COLS = (("adapters_present", "present", "{}"), ("check_rel_err", "out rel err", "{:.1e}"))


def assignment(batch: int, adapters: int, assign: str) -> torch.Tensor:
    """adapter_index [B] (int64, CPU): round-robin e mod J, or uniform draws with a fixed seed."""
    if assign == "round_robin":
        return torch.arange(batch) % adapters
    if assign == "random":
        g = torch.Generator().manual_seed(SEED)
        return torch.randint(0, adapters, (batch,), generator=g)
    raise ValueError(f"assign must be one of {ASSIGN}, got {assign!r}")


def scalings(adapters: int) -> torch.Tensor:
    """Per-adapter scaling [J]: (1 + j mod 4) / 2, different for neighbours."""
    return torch.tensor([(1 + j % 4) / 2 for j in range(adapters)])


class LoRAMixedBench(Bench):
    op = "lora_mixed"
    floor = "base"
    baseline = "loop"
    providers = PROVIDERS
    presets = PRESETS
    cpu_peak_memory = True  # the loop's per-adapter gathers and copies of y show here
    extra_cols = EXTRA_COLS
    plot_mode = "fwd"  # the only mode

    def __init__(self):
        self._refs: dict = {}

    def add_args(self, p) -> None:
        p.set_defaults(modes=["fwd"])  # serving: there is no backward to time
        g = p.add_argument_group("lora-mixed filters (comma-separated lists; each replaces the preset's list)")
        g.add_argument("--batch", type=csv(int),
                       help="examples B; selects the preset's (B, S) pairs with this B (given --seq too "
                            "and no pair matches: every --batch x --seq pair)")
        g.add_argument("--seq", type=csv(int), help="tokens per example S (like --batch)")
        g.add_argument("--in", dest="in_features", type=csv(int), help="input features (with --out-features)")
        g.add_argument("--out-features", dest="out_features", type=csv(int), help="output features")
        g.add_argument("--adapters", "--j", dest="adapters", type=csv(int), help="adapters J in the stack")
        g.add_argument("--r", type=csv(int), help="LoRA ranks")
        g.add_argument("--assign", type=csv(str), help=f"adapter per example: {', '.join(ASSIGN)}")
        g.add_argument("--bias", type=csv(parse_bool), help="base linear has a bias: 0 and/or 1")

    # ------------------------------------------------------------------ cases

    def cases(self, args) -> list[Case]:
        ps = self.presets[args.preset]
        if any(m != "fwd" for m in args.modes):
            raise SystemExit("lora-mixed is a serving op: forward only (--modes fwd)")
        providers = self.chosen_providers(args)
        pairs = _select(ps["batch_seq"], args.batch, args.seq, "--batch/--seq")
        in_out = _select(ps["in_out"], args.in_features, args.out_features, "--in/--out-features")
        assigns = args.assign or ps["assign"]
        bad = [a for a in assigns if a not in ASSIGN]
        if bad:
            raise SystemExit(f"unknown --assign {bad}; choose from {', '.join(ASSIGN)}")
        dtypes = [dtype_name(d) for d in (args.dtype or ps["dtype"])]
        grid = itertools.product(dtypes, pairs, in_out, args.bias if args.bias is not None else ps["bias"],
                                 args.adapters or ps["adapters"], args.r or ps["r"], assigns)
        return self.grid_cases(((dt, {"batch": b, "seq": s, "in": k, "out": n, "adapters": j, "r": r,
                                      "assign": assign, "bias": bias})
                                for dt, (b, s), (k, n), bias, j, r, assign in grid), providers)

    def floor_shape(self, shape: dict) -> dict:
        """The base linear does not depend on the adapters: measured once."""
        return {**shape, "adapters": None, "r": None, "assign": None}

    def default_provider(self, device, dtype: str) -> str | None:
        name = registry_default("lora_mixed", device, dtype)
        return "loop" if name == "reference" else name

    # ------------------------------------------------------------------ providers

    @staticmethod
    def tensors(shape: dict, dt: torch.dtype, device) -> dict:
        """The case's tensors, the same for every provider (fixed seed).  The floor's rows
        (adapters None) get a one-adapter stack they never use."""
        b, s, k, n = shape["batch"], shape["seq"], shape["in"], shape["out"]
        j, r = shape["adapters"] or 1, shape["r"] or 1
        torch.manual_seed(0)
        x = torch.randn(b, s, k, device=device).to(dt)
        w = (torch.randn(n, k, device=device) / k**0.5).to(dt)
        bias = (torch.randn(n, device=device) * 0.1).to(dt) if shape["bias"] else None
        a = (torch.randn(j, r, k, device=device) / k**0.5).to(dt)
        bb = (torch.randn(j, n, r, device=device) / r**0.5).to(dt)
        idx = assignment(b, j, shape["assign"] or "round_robin").to(device)
        return {"x": x, "w": w, "bias": bias, "a": a, "b": bb, "scaling": scalings(j).to(device), "idx": idx}

    def expected(self, shape: dict, dt: torch.dtype, device, lora: bool) -> torch.Tensor:
        """The case's output in fp64 (the reference loop; the base linear alone when not ``lora``)."""
        from ..reference.lora_mixed import lora_mixed_fwd

        key = (tuple(shape.items()), str(dt), str(device), lora)
        if key not in self._refs:
            if len(self._refs) > 2:
                self._refs.clear()
            t = self.tensors(shape, dt, device)
            x2 = t["x"].double().reshape(-1, shape["in"])
            w, bias = t["w"].double(), t["bias"].double() if t["bias"] is not None else None
            with torch.no_grad():
                if lora:
                    rows = t["idx"].repeat_interleave(shape["seq"]).to(torch.int32)
                    y = lora_mixed_fwd(x2, w, bias, t["a"].double(), t["b"].double(), t["scaling"].double(), rows)
                else:
                    y = F.linear(x2, w, bias)
            self._refs[key] = y.reshape(shape["batch"], shape["seq"], shape["out"])
        return self._refs[key]

    def setup(self, case: Case, device: torch.device) -> Setup:
        shape, prov = case.shape, case.provider
        dt = dtype_of(case.dtype)
        if prov in OURS:
            require_backend("lora_mixed", prov, device, dt)
        elif prov not in ("base", "loop", "peft"):
            raise Skip(f"unknown provider {prov!r}")
        t = self.tensors(shape, dt, device)
        x, w, bias = t["x"], t["w"], t["bias"]
        params = [p for p in (w, bias) if p is not None]
        info: dict = {}

        if prov == "base":
            def fn():
                return F.linear(x, w, bias)
        elif prov == "peft":
            layer, names = self._peft(t, shape, device, dt)
            params = list(layer.parameters())

            def fn():
                return layer(x, adapter_names=names)
        else:
            from ..ops import lora_mixed_linear

            backend = "reference" if prov == "loop" else prov
            a, bb, sc, idx = t["a"], t["b"], t["scaling"], t["idx"]
            params += [a, bb]

            def fn():
                return lora_mixed_linear(x, w, bias, a, bb, sc, idx, backend=backend)

        def forward():
            with torch.inference_mode():
                return fn()

        if prov != "base":
            info["adapters_present"] = len(set(t["idx"].tolist()))
        err = rel_err(forward(), self.expected(shape, dt, device, lora=prov != "base"))
        info["check_rel_err"] = err
        if not err <= check_tol(case.dtype):
            raise Skip(f"wrong result: output rel err {err:.2e} against the fp64 reference "
                       f"(> {check_tol(case.dtype):.0e})")
        return Setup(forward=forward, inputs=[], params=params, info=info)

    @staticmethod
    def _peft(t: dict, shape: dict, device, dt):
        """A one-linear module with the case's J adapters loaded into HF PEFT LoRA layers."""
        try:
            import peft
            from peft.tuners.lora.layer import Linear as PeftLinear
        except Exception as e:  # noqa: BLE001  (a broken install of any kind: skip with its reason)
            raise Skip(f"peft not importable ({type(e).__name__}: {e})") from None
        k, n, r, j = shape["in"], shape["out"], shape["r"], shape["adapters"]
        holder = torch.nn.Module()
        holder.lin = torch.nn.Linear(k, n, bias=t["bias"] is not None, device=device, dtype=dt)
        with torch.no_grad():
            holder.lin.weight.copy_(t["w"])
            if t["bias"] is not None:
                holder.lin.bias.copy_(t["bias"])
        scaling = t["scaling"].tolist()
        with warnings.catch_warnings():  # "multiple adapters in the model": exactly what we want
            warnings.simplefilter("ignore", UserWarning)
            for i in range(j):  # a second injection into a LoRA layer adds an adapter to it
                cfg = peft.LoraConfig(r=r, lora_alpha=scaling[i] * r, lora_dropout=0.0, target_modules=["lin"])
                holder = peft.inject_adapter_in_model(cfg, holder, adapter_name=f"a{i}")
        layer = holder.lin
        if not isinstance(layer, PeftLinear):
            raise Skip(f"peft wrapped the linear as {type(layer).__name__}, not lora.layer.Linear")
        layer.to(device=device, dtype=dt)
        layer.eval()  # PEFT refuses adapter_names in training mode
        with torch.no_grad():
            for i in range(j):
                layer.lora_A[f"a{i}"].weight.copy_(t["a"][i])
                layer.lora_B[f"a{i}"].weight.copy_(t["b"][i])
        missing = [i for i in range(j) if abs(layer.scaling[f"a{i}"] - scaling[i]) > 1e-6]
        if missing:
            raise Skip(f"peft scaling of adapters {missing} differs from lora_alpha / r")
        return layer, [f"a{i}" for i in t["idx"].tolist()]

    # ------------------------------------------------------------------ metrics

    def flops(self, case: Case, mode: str) -> float:
        """2MKN for the base linear, plus 2Mr(K + N) for the LoRA path of every row (M = B·S)."""
        s = case.shape
        m = s["batch"] * s["seq"]
        lora = 0.0 if case.provider == self.floor else 2.0 * m * s["r"] * (s["in"] + s["out"])
        return 2.0 * m * s["in"] * s["out"] + lora

    def gemm_shapes(self, case: Case) -> list[tuple[int, int, int]]:
        """The base linear (B·S, in, out)."""
        s = case.shape
        return [(s["batch"] * s["seq"], s["in"], s["out"])]

    def bytes_moved(self, case: Case, mode: str) -> float:
        """Least traffic: read x, W, b and the adapters present once, write y."""
        s = case.shape
        m, k, n = s["batch"] * s["seq"], s["in"], s["out"]
        elems = m * (k + n) + k * n + (n if s["bias"] else 0)
        if case.provider != self.floor:
            present = len(set(assignment(s["batch"], s["adapters"], s["assign"]).tolist()))
            elems += present * s["r"] * (k + n)
        return float(elems * dtype_of(case.dtype).itemsize)

    def meta(self, device) -> dict:
        return {
            "floor_label": "floor (frozen base linear)",
            "notes": [
                "forward only, under torch.inference_mode (serving); the targets table is on fwd, the only mode",
                ("x [B, S, in]; adapter of example e: round_robin e mod J, or random (torch.randint, seed 1234); "
                 "adapter j's scaling (1 + j mod 4) / 2; present: adapters that occur in the batch"),
                ("base (floor): F.linear alone; loop (baseline): lora_mixed_linear(backend='reference'), a Python "
                 "loop over the adapters present; peft: peft.tuners.lora Linear with J adapters, "
                 "layer(x, adapter_names=[...]) in eval mode; cpp/triton/cuda: lora_mixed_linear(backend=...)"),
                ("out rel err: ||y - y_fp64|| / ||y_fp64|| against the reference loop in fp64 (the base: F.linear); "
                 "above 1e-3 (fp32) or 5e-2 (half) the provider is skipped as a wrong result"),
            ],
        }

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        return shape_targets(rows, meta, self.floor, self.baseline, TARGETS, "fwd")


def _select(pairs, firsts, seconds, flags: str) -> list[tuple]:
    """The preset's pairs matching the filters; every given combination when none matches."""
    if not (firsts or seconds):
        return list(pairs)
    sel = [(a, b) for a, b in pairs if (not firsts or a in firsts) and (not seconds or b in seconds)]
    if sel:
        return sel
    if firsts and seconds:
        return list(itertools.product(firsts, seconds))
    raise SystemExit(f"{flags} select none of the preset's pairs; give both to benchmark new pairs")


BENCH = LoRAMixedBench()
