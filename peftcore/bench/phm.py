"""PHM linear (Compacter) benchmark: y = x H + b with H = Σᵢ kron(rule[i], W_left[i] @ W_right[i]).

A case is one PHM layer ``in → out`` or a Compacter bottleneck block ``in → mid → out`` (down
projection, GELU, up projection; both layers share the rule, as in Compacter).  Everything is
trainable: x, the rule, the factors and the biases get gradients (``inputs``).

Providers:
    linear       dense ``nn.Linear`` layer(s) of the same shape with trainable weights: the floor
                 (what the PHM layer replaces; its weight is set to H, so it computes the same y).
    materialize  AdapterHub's ``PHMLayer`` formula: build H with n ``torch.kron`` and a sum on every
                 forward, then ``x @ H + b``, autograd through it (the baseline to beat).
    reference, cpp, triton, cuda
                 ``peftcore.ops.phm_linear(..., backend=name)``: H is never formed.

Shape keys: tokens (M), in, mid (the bottleneck width of a block; None for a single layer), out,
n (phm_dim), k (rank of the factors).  The floor does not depend on n or k: its rows carry
``n: null, k: null`` and are measured once per (tokens, in, mid, out).
"""

from __future__ import annotations

import itertools

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

OURS = ("reference", "cpp", "triton", "cuda")
PROVIDERS = ("linear", "materialize") + OURS
DEFAULT_N, DEFAULT_K = 4, 1  # Compacter's phm_dim and phm_rank (AdapterHub's CompacterConfig)
CHECK_TOL = {"float32": 1e-3, "float64": 1e-9}  # fp32 allows TF32 kernels (~3e-4); half: 5e-2

PRESETS = {
    # The measurement: BERT-base-sized hidden 1024, reduction factor 32, 2048 tokens.
    # layers: (in, mid, out, k); mid None is a single PHM layer.
    "cpu": {
        "tokens": [2048], "layers": [(1024, 32, 1024, 1), (1024, None, 32, 1), (32, None, 1024, 1)],
        "n": [4], "dtype": ["float32"], "device": "cpu",
    },
    # Compacter blocks at reduction 32 on 1024- and 4096-wide models, and a square 4096 PHM layer
    # (PHM as a full projection, where the rank k starts to matter).
    "gpu": {
        "tokens": [8192, 16384],
        "layers": [(1024, 32, 1024, 1), (4096, 128, 4096, 1), (4096, None, 4096, 1), (4096, None, 4096, 8)],
        "n": [4], "dtype": ["bfloat16"], "device": "cuda",
    },
    # Seconds, for tests: widths divisible by n but not by any block size.
    "smoke": {
        "tokens": [67], "layers": [(44, 12, 36, 1), (44, None, 28, 2)], "n": [4], "dtype": ["float32"],
        "device": None,
    },
}

# Targets from the issue: CPU full (fwd+bwd) within 1.10x of dense linear; on an H100 >= 1.5x faster
# than the materializing formula.  ``shape`` values that are tuples mean "any of".
TARGETS = [
    {
        "name": "CPU fp32 2048 tok, n 4, k 1: default backend full <= 1.10x dense nn.Linear",
        "device_type": "cpu", "dtype": "float32", "shape": {"tokens": 2048, "n": 4, "k": 1},
        "max_ratio_to_floor": 1.10, "min_speedup_vs_baseline": None,
    },
    {
        "name": "GPU bf16 8192/16384 tok: default backend full >= 1.5x faster than materialize",
        "device_type": "cuda", "dtype": "bfloat16", "shape": {"tokens": (8192, 16384)},
        "max_ratio_to_floor": None, "min_speedup_vs_baseline": 1.5,
    },
]

EXTRA_COLS = (("check_rel_err", "out rel err", "{:.1e}"),)


# ----------------------------------------------------------------------------- shared helpers


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def check_tol(dtype: str) -> float:
    """Largest output rel err a provider may have in ``dtype`` before it is skipped as wrong."""
    return CHECK_TOL.get(dtype, 5e-2)


def parse_layer(spec: str) -> tuple:
    """``IN x MID x OUT`` (a block) or ``IN x OUT`` (a single layer), e.g. ``1024x32x1024``."""
    parts = [int(v) for v in spec.lower().split("x")]
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) == 3:
        return tuple(parts)
    raise ValueError(f"a layer is INxOUT or INxMIDxOUT, got {spec!r}")


def phm_factors(width_in: int, width_out: int, n: int, k: int, device, dt, bias: bool = True):
    """Random (w_left [n, in/n, k], w_right [n, k, out/n], bias [out]) giving outputs of order 1."""
    p, q = width_in // n, width_out // n
    wl = (torch.randn(n, p, k, device=device) / p**0.5).to(dt)
    wr = (torch.randn(n, k, q, device=device) / k**0.5).to(dt)
    b = (torch.randn(width_out, device=device) * 0.1).to(dt) if bias else None
    return wl, wr, b


# ----------------------------------------------------------------------------- the bench


class PHMBench(Bench):
    op = "phm"
    floor = "linear"
    baseline = "materialize"
    providers = PROVIDERS
    presets = PRESETS
    cpu_peak_memory = True  # shows the materialized n x in x out stack of the baseline
    extra_cols = EXTRA_COLS

    def __init__(self):
        self._refs: dict = {}

    def add_args(self, p) -> None:
        g = p.add_argument_group("phm filters (comma-separated lists; each replaces the preset's list)")
        g.add_argument("--tokens", type=csv(int), help="token counts M, e.g. 2048,8192")
        g.add_argument("--layers", type=csv(parse_layer),
                       help="layer geometries INxMIDxOUT (a down+up block) or INxOUT (one layer), "
                            "e.g. 1024x32x1024,4096x4096")
        g.add_argument("--block", type=csv(parse_bool),
                       help="1: only down+up blocks (in->mid->out), 0: only single layers")
        g.add_argument("--n", "--phm-dim", dest="phm_dim", type=csv(int), help="phm_dim n (default 4)")
        g.add_argument("--k", "--rank", dest="rank", type=csv(int),
                       help="ranks k of the factors (replaces each layer's k)")

    # ------------------------------------------------------------------ cases

    def cases(self, args) -> list[Case]:
        ps = self.presets[args.preset]
        providers = self.chosen_providers(args)
        if args.layers:
            ks = args.rank or [DEFAULT_K]
            layers = [(i, m, o, k) for (i, m, o), k in itertools.product(args.layers, ks)]
        else:
            layers = list(ps["layers"])
            if args.rank:
                geoms = list(dict.fromkeys((i, m, o) for i, m, o, _ in layers))
                layers = [(i, m, o, k) for (i, m, o), k in itertools.product(geoms, args.rank)]
        if args.block is not None:
            layers = [lay for lay in layers if (lay[1] is not None) in args.block]
        if not layers:
            raise SystemExit("--block/--layers leave no layer to measure")
        ns = args.phm_dim or ps["n"]
        for (i, m, o, _), n in itertools.product(layers, ns):
            if any(w % n for w in (i, o, m or n)):
                raise SystemExit(f"phm_dim {n} must divide every width of layer {i}x{m}x{o}")
        dtypes = [dtype_name(d) for d in (args.dtype or ps["dtype"])]
        grid = itertools.product(dtypes, args.tokens or ps["tokens"], layers, ns)
        return self.grid_cases(((dt, {"tokens": tok, "in": i, "mid": m, "out": o, "n": n, "k": k})
                                for dt, tok, (i, m, o, k), n in grid), providers)

    def floor_shape(self, shape: dict) -> dict:
        """The dense floor does not depend on n or k: measured once."""
        return {**shape, "n": None, "k": None}

    def default_provider(self, device, dtype: str) -> str | None:
        return registry_default("phm_linear", device, dtype)

    # ------------------------------------------------------------------ providers

    @staticmethod
    def tensors(shape: dict, dt: torch.dtype, device) -> dict:
        """The case's inputs, the same for every provider (fixed seed): x, the shared rule, and per
        layer (w_left, w_right, bias).  The floor's rows (n, k None) use Compacter's n 4, k 1."""
        n, k = shape["n"] or DEFAULT_N, shape["k"] or DEFAULT_K
        widths = [shape["in"]] + ([shape["mid"]] if shape["mid"] is not None else []) + [shape["out"]]
        torch.manual_seed(0)
        x = torch.randn(shape["tokens"], widths[0], device=device).to(dt)
        rule = (torch.randn(n, n, n, device=device) / n).to(dt)
        layers = [phm_factors(a, b, n, k, device, dt) for a, b in itertools.pairwise(widths)]
        return {"x": x, "rule": rule, "layers": layers}

    def expected(self, shape: dict, dt: torch.dtype, device) -> torch.Tensor:
        """The case's output by the formula in fp64 (cached for the providers of one shape)."""
        from ..reference.phm import phm_linear_formula

        key = (tuple(self.floor_shape(shape).items()), shape["n"] or DEFAULT_N, shape["k"] or DEFAULT_K,
               str(dt), str(device))
        if key not in self._refs:
            self._refs.clear()
            t = self.tensors(shape, dt, device)
            with torch.no_grad():
                h = t["x"].double()
                rule = t["rule"].double()
                for j, (wl, wr, b) in enumerate(t["layers"]):
                    h = F.gelu(h) if j else h
                    h = phm_linear_formula(h, rule, wl.double(), wr.double(), b.double())
            self._refs[key] = h
        return self._refs[key]

    def setup(self, case: Case, device: torch.device) -> Setup:
        shape, prov = case.shape, case.provider
        dt = dtype_of(case.dtype)
        if prov in OURS:
            require_backend("phm_linear", prov, device, dt)
        elif prov not in ("linear", "materialize"):
            raise Skip(f"unknown provider {prov!r}")
        t = self.tensors(shape, dt, device)
        x, rule = t["x"].requires_grad_(True), t["rule"]

        if prov == "linear":
            layers = self._dense(t, device, dt)
            params = [p for lin in layers for p in lin.parameters()]

            def forward():
                h = x
                for j, lin in enumerate(layers):
                    h = lin(F.gelu(h) if j else h)
                return h
        else:
            rule.requires_grad_(True)
            factors = [(wl.requires_grad_(True), wr.requires_grad_(True), b.requires_grad_(True))
                       for wl, wr, b in t["layers"]]
            params = [rule] + [p for f in factors for p in f]
            layer = self._phm_fn(prov)

            def forward():
                h = x
                for j, (wl, wr, b) in enumerate(factors):
                    h = layer(F.gelu(h) if j else h, rule, wl, wr, b)
                return h

        with torch.no_grad():
            y = forward()
        err = rel_err(y, self.expected(shape, dt, device))
        if not err <= check_tol(case.dtype):
            raise Skip(f"wrong result: output rel err {err:.2e} against the fp64 formula "
                       f"(> {check_tol(case.dtype):.0e})")
        return Setup(forward=forward, inputs=[x] + params, params=params, info={"check_rel_err": err})

    @staticmethod
    def _dense(t: dict, device, dt) -> list[torch.nn.Linear]:
        """nn.Linear layers holding the case's H (materialized once, outside the timed region)."""
        from ..reference.phm import phm_weight

        layers = []
        for wl, wr, b in t["layers"]:
            h = phm_weight(t["rule"], wl, wr)  # [in, out]
            lin = torch.nn.Linear(h.shape[0], h.shape[1], device=device, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(h.t())
                lin.bias.copy_(b)
            layers.append(lin)
        return layers

    @staticmethod
    def _phm_fn(prov: str):
        if prov == "materialize":
            from ..reference.phm import phm_linear_formula

            return phm_linear_formula
        from ..ops import phm_linear

        def layer(x, rule, wl, wr, b):
            return phm_linear(x, rule, wl, wr, b, backend=prov)

        return layer

    # ------------------------------------------------------------------ metrics

    @staticmethod
    def _widths(shape: dict) -> list[tuple[int, int]]:
        w = [shape["in"]] + ([shape["mid"]] if shape["mid"] is not None else []) + [shape["out"]]
        return list(itertools.pairwise(w))

    def flops(self, case: Case, mode: str) -> float:
        """Multiply-adds x 2 of the provider's own algorithm, summed over the layers (GELU ignored).

        linear: 2MKN forward; dx and dW backward.  materialize: the same GEMMs plus building H
        (n Kronecker products and their sum, ~2nKN) forward and its gradient back to the factors
        and the rule (~4nKN) backward.  ours: the factored contraction of peftcore.reference.phm,
        2Mnk(K + N + n²) forward and 2Mnk(2K + 2N + 3n²) backward (u recomputed).
        """
        s, prov = case.shape, case.provider
        m, n, k = s["tokens"], s["n"] or DEFAULT_N, s["k"] or DEFAULT_K
        fwd = bwd = 0.0
        for kk, nn in self._widths(s):
            dense = 2.0 * m * kk * nn
            if prov == self.floor:
                fwd, bwd = fwd + dense, bwd + 2 * dense
            elif prov == self.baseline:
                fwd, bwd = fwd + dense + 2.0 * n * kk * nn, bwd + 2 * dense + 4.0 * n * kk * nn
            else:
                fwd += 2.0 * m * n * k * (kk + nn + n * n)
                bwd += 2.0 * m * n * k * (2 * kk + 2 * nn + 3 * n * n)
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]

    def gemm_shapes(self, case: Case) -> list[tuple[int, int, int]]:
        """The dense floor's GEMMs per layer: y (M, K, N), dx (M, N, K), dW (N, M, K)."""
        m = case.shape["tokens"]
        return [g for k, n in self._widths(case.shape) for g in ((m, k, n), (m, n, k), (n, m, k))]

    def bytes_moved(self, case: Case, mode: str) -> float:
        """Least traffic, the same for every provider: fwd reads x and writes y; bwd reads dy and x
        and writes dx (the factors, and a block's M x mid activations, are left out)."""
        s = case.shape
        m, item = s["tokens"], dtype_of(case.dtype).itemsize
        fwd = m * (s["in"] + s["out"]) * item
        bwd = m * (2 * s["in"] + s["out"]) * item
        return float({"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode])

    def meta(self, device) -> dict:
        return {
            "floor_label": "floor (dense nn.Linear)",
            "notes": [
                ("case: one PHM layer in->out (mid –) or a Compacter block in->mid->out (down, GELU, up; one "
                 "rule shared by both layers); x, rule, factors and biases all trainable"),
                ("linear (floor): nn.Linear layer(s) of the same widths holding H, weights trainable; "
                 "materialize (baseline): AdapterHub's formula, H = sum_i kron(rule[i], W_left[i] @ W_right[i]) "
                 "built every forward, then x @ H + b; reference/cpp/triton/cuda: peftcore.ops.phm_linear"),
                ("TFLOP/s: each provider's own algorithm (see PHMBench.flops); GB/s: least traffic "
                 "(fwd x + y, bwd dy + x + dx), the same for every provider"),
                ("out rel err: ||y - y_fp64|| / ||y_fp64|| against the formula in fp64 on the benchmark "
                 "inputs; above 1e-3 (fp32) or 5e-2 (half) the provider is skipped as a wrong result"),
            ],
        }

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        return shape_targets(rows, meta, self.floor, self.baseline, TARGETS, "full")


BENCH = PHMBench()
