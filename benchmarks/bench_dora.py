"""DoRA against PEFT's DoRA (and both against plain LoRA), forward + backward of one linear layer.

    python benchmarks/bench_dora.py [--tokens 2048] [--rounds 9] [--out benchmarks/results]

Shapes: 1024 -> 1024 and 2048 -> 8192, r 16, dropout 0.1, fp32, 2048 tokens (the QLoRA bench's).
Providers are timed interleaved (one call each per round, the order rotating), and ratios are the
medians of per-round ratios (DESIGN.md).  PEFT's DoRA builds B·A through an identity matrix and
the norm of W + s·BA at full size every step; peftcore's computes the norm from W·Aᵀ and A·Aᵀ
(rank-r products) with ‖W‖² cached, and runs the rest through the fused LoRA op.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from run_meta import run_meta  # benchmarks/run_meta.py (the script's own folder is on sys.path)


def layer_pair(k, n, r, p, use_dora):
    import peft

    import peftcore as pc

    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(k, n, bias=False)
    holder.lin.load_state_dict(lin.state_dict())
    holder = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p,
                                                          target_modules=["lin"], use_dora=use_dora), holder)
    theirs = holder.lin
    ours = pc.LoRALinear(lin)
    ours.add_adapter("default", pc.LoRAConfig(r=r, alpha=2 * r, dropout=p, use_dora=use_dora))
    ours.set_active(["default"])
    with torch.no_grad():
        b = torch.randn(n, r) * r**-0.5
        theirs.lora_B["default"].weight.copy_(b)
        ours.lora_B["default"].weight.copy_(b)
        ours.lora_A["default"].weight.copy_(theirs.lora_A["default"].weight)
    for m in (theirs, ours):
        m.train()
        for name, prm in m.named_parameters():
            prm.requires_grad_("lora_" in name)
    return theirs, ours


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for k, n in ((1024, 1024), (2048, 8192)):
        r, p = 16, 0.1
        peft_lora, ours_lora = layer_pair(k, n, r, p, False)
        peft_dora, ours_dora = layer_pair(k, n, r, p, True)
        frozen = torch.nn.Linear(k, n, bias=False).requires_grad_(False)
        x = torch.randn(args.tokens, k, requires_grad=True)
        g = torch.randn(args.tokens, n)
        provs = {"frozen linear": frozen, "PEFT LoRA": peft_lora, "peftcore LoRA": ours_lora,
                 "PEFT DoRA": peft_dora, "peftcore DoRA": ours_dora}

        def step(m):
            x.grad = None
            m(x).backward(g)

        for m in provs.values():
            step(m)
        names = list(provs)
        times = {nm: [] for nm in names}
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for nm in order:
                t0 = time.perf_counter()
                step(provs[nm])
                times[nm].append(time.perf_counter() - t0)
        for nm in names:
            ratio = lambda other: statistics.median(a / b for a, b in zip(times[nm], times[other]))  # noqa: E731
            rows.append({"shape": f"{args.tokens} x {k} -> {n}", "r": r, "dropout": p, "provider": nm,
                         "p50_ms": 1e3 * statistics.median(times[nm]), "x_floor": ratio("frozen linear"),
                         "x_peft_dora": ratio("PEFT DoRA")})
            print(f"{k}->{n} {nm:15} {rows[-1]['p50_ms']:8.1f} ms  x floor {rows[-1]['x_floor']:.2f}  "
                  f"x PEFT DoRA {rows[-1]['x_peft_dora']:.2f}", flush=True)
    meta = run_meta(f"python benchmarks/bench_dora.py --tokens {args.tokens} --rounds {args.rounds}", args.threads,
                    mode="forward + backward (fp32)")
    commit = meta["commit"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dora_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# DoRA vs PEFT's DoRA, forward + backward (`{meta['command']}`)", "",
             f"CPU, {args.threads} threads, torch {torch.__version__}, commit {commit[:10]}, {meta['timestamp']}; "
             f"{args.rounds} interleaved rounds, ratios are medians of per-round ratios.", "",
             "| shape | provider | p50 ms | × frozen linear | × PEFT DoRA (lower is faster) |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']}, r {r['r']}, p {r['dropout']} | {r['provider']} | {r['p50_ms']:.1f} | "
              f"{r['x_floor']:.2f} | {r['x_peft_dora']:.2f} |" for r in rows]
    (out / "dora_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
