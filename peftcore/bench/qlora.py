"""QLoRA linear benchmark: y = x · dequant(Wq)ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ, W 4-bit NF4 and frozen.

Providers:
    floor        the frozen full-precision linear alone, ``F.linear(x, W, b)`` (dx only in backward):
                 what a 4-bit layer cannot beat.
    torch_dequant the whole weight dequantized every call (``dequantize_nf4``), then
                 ``peftcore.ops.lora_linear`` on it: what a plain implementation does.
    peft_bnb     PEFT's LoRA around bitsandbytes' ``Linear4bit`` (nf4, double quantization, fp32
                 compute): the baseline to beat (bitsandbytes dequantizes the whole weight into a
                 temporary every call on the CPU).
    reference, cpp
                 ``peftcore.ops.nf4_lora_linear(..., backend=name)``: the weight dequantized a panel
                 (at most 1/16 of it) at a time.

Shape keys: tokens (M), in (K), out (N), r, dropout, bias.  Block size 64 with double quantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .harness import Setup, Skip, dtype_of, registry_default, require_backend
from .lora import LoRABench

OURS = ("reference", "cpp")
PROVIDERS = ("floor", "torch_dequant", "peft_bnb") + OURS
SEED = 1234

PRESETS = {
    # The CPU shapes: a square projection and a Llama-style up projection.
    "cpu": dict(tokens=[2048], in_out=[(1024, 1024), (2048, 8192)], r=[16], dropout=[0.1, 0.0],
                dtype=["float32"], bias=[False], device="cpu"),
    "gpu": dict(tokens=[8192], in_out=[(4096, 4096), (4096, 14336)], r=[16], dropout=[0.0, 0.1],
                dtype=["bfloat16"], bias=[False], device="cuda"),
    "smoke": dict(tokens=[64], in_out=[(64, 96)], r=[4], dropout=[0.0, 0.1], dtype=["float32"], bias=[True],
                  device=None),
}

TARGETS = [
    dict(name="CPU fp32 2048 tok, 1024->1024, r16, p0.1: full <= 1.2x the fp32 frozen linear, >= 1.25x faster than "
              "PEFT + bitsandbytes", device_type="cpu", dtype="float32",
         shape=dict(tokens=2048, **{"in": 1024}, out=1024, r=16, dropout=0.1), max_ratio_to_floor=1.2,
         min_speedup_vs_baseline=1.25),
    dict(name="CPU fp32 2048 tok, 2048->8192, r16, p0.1: full <= 1.2x the fp32 frozen linear, >= 1.25x faster than "
              "PEFT + bitsandbytes", device_type="cpu", dtype="float32",
         shape=dict(tokens=2048, **{"in": 2048}, out=8192, r=16, dropout=0.1), max_ratio_to_floor=1.2,
         min_speedup_vs_baseline=1.25),
    dict(name="GPU bf16 8192 tok, 4096->4096, r16: full <= 1.15x the bf16 frozen linear", device_type="cuda",
         dtype="bfloat16", shape=dict(tokens=8192, **{"in": 4096}, out=4096, r=16), max_ratio_to_floor=1.15,
         min_speedup_vs_baseline=None),
]


class QLoRABench(LoRABench):
    op = "qlora"
    floor = "floor"
    baseline = "peft_bnb"
    providers = PROVIDERS
    presets = PRESETS
    target_list = TARGETS
    cpu_peak_memory = True  # the dequantized copies (whole for bnb and torch_dequant, panels for ours) show here

    def default_provider(self, device, dtype: str) -> str | None:
        return registry_default("nf4_lora_linear", device, dtype)

    def setup(self, case, device: torch.device) -> Setup:
        from ..quant import NF4Linear, dequantize_nf4

        s, prov = case.shape, case.provider
        dt = dtype_of(case.dtype)
        m, k, n = s["tokens"], s["in"], s["out"]
        torch.manual_seed(0)
        x = torch.randn(m, k, device=device, dtype=dt).requires_grad_(True)
        lin = torch.nn.Linear(k, n, bias=bool(s["bias"]), device=device, dtype=dt)
        w, b = lin.weight.detach(), (lin.bias.detach() if lin.bias is not None else None)
        frozen = [w] + ([b] if b is not None else [])
        if prov == "floor":
            return Setup(forward=lambda: F.linear(x, w, b), inputs=[x], params=frozen)
        r, p = s["r"], float(s["dropout"])
        scaling = 2.0
        if prov == "peft_bnb":
            return self._setup_bnb(lin, x, r, p, device, dt)
        q = NF4Linear.from_linear(lin, 64, True, dt)
        a = (torch.randn(r, k, device=device) / k**0.5).to(dt).requires_grad_(True)
        bb = (torch.randn(n, r, device=device) / r**0.5).to(dt).requires_grad_(True)
        seed = SEED if p > 0 else None
        stored = [q.weight_packed, q.absmax, q.absmax2, q.offset] + ([q.bias] if q.bias is not None else [])
        if prov == "torch_dequant":
            from ..ops import lora_linear

            def forward():
                wq = dequantize_nf4(q.weight_packed, q.state)
                return lora_linear(x, wq, q.bias, a, bb, scaling, dropout_p=p, seed=seed)

            return Setup(forward=forward, inputs=[x, a, bb], params=stored + [a, bb])
        if prov not in OURS:
            raise Skip(f"unknown provider {prov!r}")
        from ..ops import nf4_lora_linear

        require_backend("nf4_lora_linear", prov, device, dt)

        def forward():
            return nf4_lora_linear(x, q, q.bias, a, bb, scaling, dropout_p=p, seed=seed, backend=prov)

        return Setup(forward=forward, inputs=[x, a, bb], params=stored + [a, bb])

    @staticmethod
    def _setup_bnb(lin, x, r, p, device, dt) -> Setup:
        try:
            import bitsandbytes as bnb
            import peft
        except Exception as e:
            raise Skip(f"bitsandbytes/peft not importable ({type(e).__name__}: {e})") from None
        k, n = lin.in_features, lin.out_features
        q = bnb.nn.Linear4bit(k, n, bias=lin.bias is not None, compute_dtype=dt, compress_statistics=True,
                              quant_type="nf4")
        q.load_state_dict(lin.state_dict())
        q = q.to(device)  # bitsandbytes quantizes on the move to a device
        holder = torch.nn.Module()
        holder.lin = q
        holder = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p,
                                                              target_modules=["lin"]), holder)
        layer = holder.lin
        layer.train()
        lora = []
        for name, prm in layer.named_parameters():
            prm.requires_grad_("lora_" in name)
            if "lora_" in name:
                lora.append(prm)
        if not lora:
            raise Skip(f"peft did not wrap bitsandbytes' Linear4bit (got {type(layer).__name__})")
        with torch.no_grad():
            for mod in layer.lora_B.values():
                mod.weight.normal_(0, r**-0.5)
        return Setup(forward=lambda: layer(x), inputs=[x] + lora, params=list(layer.parameters()))


BENCH = QLoRABench()
