"""LoRA linear benchmark: y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ with W, b frozen, A, B trained.

Providers:
    floor      the frozen base linear alone, ``F.linear(x, W, b)``; its backward computes dx only.
               The cost no LoRA implementation can go under; measured once per (tokens, in, out).
    hf_peft    ``peft.tuners.lora.layer.Linear`` around an ``nn.Linear`` (the baseline to beat).
    reference, triton, cpp, cuda
               ``peftcore.ops.lora_linear(..., backend=name)``.

Shape keys: tokens (M, leading dims flattened), in (K), out (N), r, dropout, bias.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .harness import (Bench, Case, Setup, Skip, csv, default_vs_baseline, dtype_name, dtype_of, find_target,
                      parse_bool, registry_default, require_backend, speedup, target_row)

OURS = ("reference", "triton", "cpp", "cuda")
PROVIDERS = ("floor", "hf_peft") + OURS
SEED = 1234

PRESETS = {
    # The demo's scale on a laptop-class CPU (MiniLM / BERT-base projections carry a bias).
    "cpu": dict(tokens=[2048], in_out=[(1024, 1024)], r=[16], dropout=[0.1, 0.0],
                dtype=["float32"], bias=[True], device="cpu"),
    # Llama-class projections: q/o (4096->4096), up/gate (4096->14336), down (14336->4096).
    "gpu": dict(tokens=[2048, 8192, 16384], in_out=[(4096, 4096), (4096, 14336), (14336, 4096)],
                r=[8, 16, 64], dropout=[0.0, 0.1], dtype=["bfloat16"], bias=[False], device="cuda"),
    # Seconds, for tests: odd sizes so no kernel hits only its fast path.
    "smoke": dict(tokens=[64], in_out=[(40, 48)], r=[4], dropout=[0.0, 0.1],
                  dtype=["float32"], bias=[True], device=None),
}

# Headline checks from the project's targets, evaluated on the full (fwd+bwd) mode.
TARGETS = [
    dict(name="CPU fp32 2048 tok, 1024->1024, r16: default backend full <= 1.25x the frozen base linear",
         device_type="cpu", dtype="float32", shape=dict(tokens=2048, **{"in": 1024}, out=1024, r=16),
         max_ratio_to_floor=1.25,
         min_speedup_vs_baseline=None),
    dict(name="H100 bf16 8192 tok, 4096->4096, r16, p0.1: full <= 1.08x floor and >= 1.35x faster than hf_peft",
         device_type="cuda", dtype="bfloat16",
         shape=dict(tokens=8192, **{"in": 4096}, out=4096, r=16, dropout=0.1),
         max_ratio_to_floor=1.08, min_speedup_vs_baseline=1.35),
]


class LoRABench(Bench):
    op = "lora"
    floor = "floor"
    baseline = "hf_peft"
    providers = PROVIDERS
    presets = PRESETS
    target_list = TARGETS

    def add_args(self, p) -> None:
        g = p.add_argument_group("lora filters (comma-separated lists; each replaces the preset's list)")
        g.add_argument("--tokens", type=csv(int), help="token counts M, e.g. 2048,8192")
        g.add_argument("--in", dest="in_features", type=csv(int),
                       help="input features; selects the preset's (in,out) pairs with this in "
                            "(given --out-features too and no pair matches: every --in x --out-features pair)")
        g.add_argument("--out-features", "--out-f", dest="out_features", type=csv(int),
                       help="output features (like --in)")
        g.add_argument("--r", type=csv(int), help="LoRA ranks")
        g.add_argument("--dropout", type=csv(float), help="LoRA dropout probabilities")
        g.add_argument("--bias", type=csv(parse_bool), help="base linear has a bias: 0 and/or 1")

    # ------------------------------------------------------------------ cases

    def cases(self, args) -> list[Case]:
        preset = self.presets[args.preset]
        tokens = args.tokens or preset["tokens"]
        pairs = list(preset["in_out"])
        if args.in_features or args.out_features:
            sel = [(i, o) for i, o in pairs
                   if (not args.in_features or i in args.in_features)
                   and (not args.out_features or o in args.out_features)]
            if not sel:
                if not (args.in_features and args.out_features):
                    raise SystemExit("--in/--out select none of the preset's (in,out) pairs; "
                                     "give both to benchmark new pairs")
                sel = list(itertools.product(args.in_features, args.out_features))
            pairs = sel
        ranks = args.r or preset["r"]
        drops = args.dropout if args.dropout is not None else preset["dropout"]
        biases = args.bias if args.bias is not None else preset["bias"]
        dtypes = [dtype_name(d) for d in (args.dtype or preset["dtype"])]
        providers = self.chosen_providers(args)
        grid = itertools.product(dtypes, tokens, pairs, biases, ranks, drops)
        return self.grid_cases(((dt, {"tokens": m, "in": k, "out": n, "r": r, "dropout": p, "bias": bias})
                                for dt, m, (k, n), bias, r, p in grid), providers)

    def floor_shape(self, shape: dict) -> dict:
        """The floor does not depend on r or dropout: measured once."""
        return {**shape, "r": None, "dropout": None}

    # ------------------------------------------------------------------ providers

    def default_provider(self, device, dtype: str) -> str | None:
        return registry_default("lora_linear", device, dtype)

    def setup(self, case: Case, device: torch.device) -> Setup:
        s, prov = case.shape, case.provider
        dt = dtype_of(case.dtype)
        m, k, n = s["tokens"], s["in"], s["out"]
        torch.manual_seed(0)
        x = torch.randn(m, k, device=device, dtype=dt).requires_grad_(True)
        w = (torch.randn(n, k, device=device) / k**0.5).to(dt)
        b = (torch.randn(n, device=device) * 0.1).to(dt) if s["bias"] else None
        frozen = [w] + ([b] if b is not None else [])

        if prov == "floor":
            return Setup(forward=lambda: F.linear(x, w, b), inputs=[x], params=frozen)

        r, p = s["r"], float(s["dropout"])
        alpha = 2 * r  # scaling 2.0, PEFT's usual alpha = 2r
        scaling = alpha / r

        if prov == "hf_peft":
            return self._setup_peft(x, w, b, r, alpha, p, device, dt)

        if prov not in OURS:
            raise Skip(f"unknown provider {prov!r}")
        from ..ops import lora_linear

        require_backend("lora_linear", prov, device, dt)
        a = (torch.randn(r, k, device=device) / k**0.5).to(dt).requires_grad_(True)
        bb = (torch.randn(n, r, device=device) / r**0.5).to(dt).requires_grad_(True)
        seed = SEED if p > 0 else None

        def forward():
            return lora_linear(x, w, b, a, bb, scaling, dropout_p=p, seed=seed, backend=prov)

        return Setup(forward=forward, inputs=[x, a, bb], params=frozen + [a, bb])

    @staticmethod
    def _setup_peft(x, w, b, r, alpha, p, device, dt) -> Setup:
        try:
            import peft
            from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: F401
        except Exception as e:
            raise Skip(f"peft not importable ({type(e).__name__}: {e})") from None

        # inject_adapter_in_model builds the same peft.tuners.lora.layer.Linear as get_peft_model,
        # and its signature is stable across peft versions (Linear.__init__'s is not: 0.21 takes
        # a LoraConfig, older releases take lora_dropout etc. as keywords).
        holder = torch.nn.Module()
        holder.lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device, dtype=dt)
        with torch.no_grad():
            holder.lin.weight.copy_(w)
            if b is not None:
                holder.lin.bias.copy_(b)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["lin"])
        holder = peft.inject_adapter_in_model(cfg, holder)
        layer = holder.lin
        if not isinstance(layer, PeftLinear):
            raise Skip(f"peft wrapped the linear as {type(layer).__name__}, not lora.layer.Linear")
        layer.to(device=device, dtype=dt)
        layer.train()
        lora_params = []
        for name, prm in layer.named_parameters():
            is_lora = "lora_" in name
            prm.requires_grad_(is_lora)
            if is_lora:
                lora_params.append(prm)
        # PEFT initialises B to zero; a random B gives the same work and nonzero gradients.
        with torch.no_grad():
            for mod in layer.lora_B.values():
                mod.weight.normal_(0, r**-0.5)
        return Setup(forward=lambda: layer(x), inputs=[x] + lora_params, params=list(layer.parameters()))

    # ------------------------------------------------------------------ metrics

    def flops(self, case: Case, mode: str) -> float:
        """Matmul FLOPs the provider must do (elementwise dropout/bias/scale ignored).

        base = 2MKN.  LoRA adds 2Mr(K+N) forward and 4Mr(K+N) backward (dyB, (dyB)A, dA, dB);
        the frozen W gets no gradient, so the backward's base part is dx = dy W only.
        """
        s = case.shape
        m, k, n = s["tokens"], s["in"], s["out"]
        base = 2.0 * m * k * n
        lora = 0.0 if case.provider == self.floor else 2.0 * m * s["r"] * (k + n)
        return {"fwd": base + lora, "bwd": base + 2 * lora, "full": 2 * base + 3 * lora}[mode]

    def gemm_shapes(self, case: Case) -> list[tuple[int, int, int]]:
        """The base GEMMs: y = x Wᵀ (M, K, N) and dx = dy W (M, N, K)."""
        s = case.shape
        return [(s["tokens"], s["in"], s["out"]), (s["tokens"], s["out"], s["in"])]

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        """Per shape (full mode): default backend vs floor and vs hf_peft, with the target if one applies."""
        out = []
        for dt, shape, prov, ours, base in default_vs_baseline(rows, meta, "full", self.floor, self.baseline):
            ratio = ours["ratio_to_floor"] if ours else None
            fast = speedup(ours, base)
            target = find_target(self.target_list, meta.get("device_type"), dt, shape)
            status = None
            if target and ratio is not None:
                ok = ratio <= target["max_ratio_to_floor"]
                if target["min_speedup_vs_baseline"] is not None:
                    ok = ok and fast is not None and fast >= target["min_speedup_vs_baseline"]
                status = "PASS" if ok else "FAIL"
            elif target:
                status = "n/a (default backend not measured)"
            out.append(target_row(dt, shape, prov, ratio, fast, target, status,
                                  unstable=(ours or {}).get("unstable")))
        return out


BENCH = LoRABench()
