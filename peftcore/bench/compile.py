"""torch.compile benchmark: one LoRA training step of a small Llama, compiled against eager.

The question it answers: does ``torch.compile(model, fullgraph=True)`` of a model holding
peftcore's LoRA layers (one custom op per layer, no graph break) make a training step slower than
running the same model eagerly?  The step is the model's forward with labels (the LM loss) and
the gradient of every trainable (LoRA) parameter.

Providers:
    eager        peftcore's LoRA, eager (the floor every ratio is taken against).
    compiled     the same model under ``torch.compile(fullgraph=True)`` (inductor); compilation
                 happens in the harness's warm-up, outside the timed rounds.
    hf_peft      HF PEFT's LoRA on the same base weights, eager (the baseline).

Shape keys: layers, hidden, tokens (batch x sequence), r, dropout.  The model is a Llama built
from a config (no download), q/k/v/o projections targeted.
"""

from __future__ import annotations

import copy

import torch

from .harness import Bench, Case, Setup, Skip, csv, default_vs_baseline, dtype_name, speedup, target_row

PROVIDERS = ("eager", "compiled", "hf_peft")
TARGETS_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]

PRESETS = {
    "cpu": dict(layers=[2], hidden=[512], batch=4, seq=128, r=[16], dropout=[0.1, 0.0],
                dtype=["float32"], device="cpu"),
    "gpu": dict(layers=[4], hidden=[2048], batch=8, seq=1024, r=[16], dropout=[0.1, 0.0],
                dtype=["bfloat16"], device="cuda"),
    "smoke": dict(layers=[1], hidden=[64], batch=2, seq=16, r=[4], dropout=[0.1],
                  dtype=["float32"], device=None),
}


class CompileBench(Bench):
    op = "compile"
    floor = "eager"
    baseline = "hf_peft"
    providers = PROVIDERS
    presets = PRESETS

    def add_args(self, p) -> None:
        g = p.add_argument_group("compile filters (comma-separated lists; each replaces the preset's list)")
        g.add_argument("--hidden", type=csv(int), help="model widths")
        g.add_argument("--dropout", type=csv(float), help="LoRA dropout probabilities")

    def cases(self, args) -> list[Case]:
        pre = self.presets[args.preset]
        dtypes = [dtype_name(d) for d in (args.dtype or pre["dtype"])]
        drops = args.dropout if args.dropout is not None else pre["dropout"]
        grid = [(dt, {"layers": n, "hidden": h, "tokens": pre["batch"] * pre["seq"], "seq": pre["seq"],
                      "r": r, "dropout": p})
                for dt in dtypes for n in pre["layers"] for h in (args.hidden or pre["hidden"])
                for r in pre["r"] for p in drops]
        return self.grid_cases(grid, self.chosen_providers(args))

    def default_provider(self, device, dtype: str) -> str | None:
        return "compiled"

    def setup(self, case: Case, device: torch.device) -> Setup:
        try:
            import transformers as tf
        except Exception as e:  # noqa: BLE001
            raise Skip(f"transformers not importable ({type(e).__name__}: {e})") from None
        import peftcore as pc

        s, prov = case.shape, case.provider
        dt = getattr(torch, case.dtype)
        h = s["hidden"]
        cfg = tf.LlamaConfig(vocab_size=2048, hidden_size=h, intermediate_size=(8 * h) // 3 // 64 * 64 or 64,
                             num_hidden_layers=s["layers"], num_attention_heads=max(1, h // 64),
                             num_key_value_heads=max(1, h // 64), max_position_embeddings=max(64, s["seq"]))
        torch.manual_seed(0)
        base = tf.LlamaForCausalLM(cfg).to(device=device, dtype=dt)
        seq = s["seq"]
        ids = torch.randint(0, cfg.vocab_size, (s["tokens"] // seq, seq), device=device)
        if prov == "hf_peft":
            try:
                import peft
            except Exception as e:  # noqa: BLE001
                raise Skip(f"peft not importable ({type(e).__name__}: {e})") from None
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=s["r"], lora_alpha=2 * s["r"], lora_dropout=s["dropout"], target_modules=TARGETS_MODULES))
        else:
            model = pc.apply(copy.deepcopy(base), pc.LoRAConfig(r=s["r"], alpha=2 * s["r"], dropout=s["dropout"],
                                                                target_modules=TARGETS_MODULES))
        model.train()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a trained-looking adapter: B != 0 (same work, non-zero gradients)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        params = [p for p in model.parameters() if p.requires_grad]
        run = model
        if prov == "compiled":
            run = torch.compile(model, fullgraph=True)

        def forward():
            return run(input_ids=ids, labels=ids).loss

        return Setup(forward=forward, inputs=params, params=list(model.parameters()), loss=True,
                     info={"trainable": sum(p.numel() for p in params)})

    def targets(self, rows: list[dict], meta: dict) -> list[dict]:
        """Per shape (full mode): compiled vs eager peftcore (no worse: <= 1.0x), and vs HF PEFT."""
        out = []
        for dt, shape, prov, ours, base in default_vs_baseline(rows, meta, "full", self.floor, self.baseline):
            ratio = ours["ratio_to_floor"] if ours else None
            status = None if ratio is None else ("PASS" if ratio <= 1.0 else "FAIL")
            target = {"name": "compiled training step no slower than eager peftcore", "max_ratio_to_floor": 1.0,
                      "min_speedup_vs_baseline": None}
            out.append(target_row(dt, shape, prov, ratio, speedup(ours, base), target, status,
                                  unstable=(ours or {}).get("unstable")))
        return out


BENCH = CompileBench()
