"""``peftcore demo --suite memory``: QLoRA, LoRA and DoRA fine-tune the packaged SmolLM2-135M-Instruct
on the shipped instruction set, beside PEFT's LoRA and PEFT + bitsandbytes QLoRA, in one run.

The skill: answer a customer message's intent in a fixed JSON format (``intent_json_{train,test}
.jsonl``, built from the textcls set: ``{"intent": "<label>"}``), measured by exact match of the
greedy answer.  Each method runs in its own process (so one method's peak cannot hide another's):
it loads the cached model, quantizes it where the method says, returns freed memory to the OS,
then trains ``--steps`` steps with a progress bar.  Per method: trainable parameters, resident bytes
of the base weights, peak process RSS during training (the RSS at its start plus the peak growth,
sampled every 5 ms), seconds per step, held-out loss before and after, and the exact-match rate;
each method also runs with transformers' gradient checkpointing (reentrant, no
``enable_input_require_grads`` by hand) for the activation-memory comparison.

    peftcore demo --suite memory [--steps 20] [--batch-size 4] [--methods qlora,lora,...] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("qlora", "lora", "dora", "peft-lora", "peft-qlora")
DESCRIBE = {
    "qlora": "peftcore QLoRA (NF4 base, double quant) + LoRA r 8, all linear",
    "lora": "peftcore LoRA r 8 on the fp32 base, all linear",
    "dora": "peftcore DoRA r 8 on the fp32 base, all linear",
    "peft-lora": "PEFT LoRA r 8 on the fp32 base, all linear",
    "peft-qlora": "PEFT + bitsandbytes QLoRA (nf4, double quant, fp32 compute) r 8",
}


def _data(split: str, n: int | None):
    from .data import DATA_DIR

    rows = [json.loads(line) for line in (DATA_DIR / f"intent_json_{split}.jsonl").read_text("utf-8").splitlines()
            if line.strip()]
    return rows[:n] if n else rows


def _batch(tok, rows):
    """Prompt + completion + EOS, right-padded; labels only on the completion (and EOS)."""
    import torch

    ids, labels = [], []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(s) for s in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = torch.full((len(ids), width), pad), torch.full((len(ids), width), -100), torch.zeros(len(ids), width,
                                                                                             dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):
        out[0][i, :len(s)] = torch.tensor(s)
        out[1][i, :len(s)] = torch.tensor(lab)
        out[2][i, :len(s)] = 1
    return out


def _eval_loss(model, tok, rows, bs=8) -> float:
    import torch

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            ids, lab, mask = _batch(tok, rows[i:i + bs])
            k = int((lab != -100).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=lab).loss.item() * k
            n += k
    return total / max(n, 1)


def _exact_match(model, tok, rows, bs=8) -> float:
    import torch

    model.eval()
    hits = 0
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        with torch.no_grad():
            for i in range(0, len(rows), bs):
                chunk = rows[i:i + bs]
                enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=12, do_sample=False,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
                for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                    hits += tok.decode(seq, skip_special_tokens=True).strip() == r["completion"].strip()
    finally:
        tok.padding_side = side
    return hits / max(len(rows), 1)


def _load(method: str):
    """(model, tokenizer) set up for ``method``; only the adapter trains."""
    import torch

    from .assets import load_causal_lm, smollm2_cache_dir

    model, tok = load_causal_lm()
    if method in ("qlora", "lora", "dora"):
        import peftcore as pc

        if method == "qlora":
            pc.quantize(model, pc.NF4Config(blocksize=64, double_quant=True))
        pc.apply(model, pc.LoRAConfig(r=8, alpha=16, dropout=0.05, target_modules="all-linear",
                                      use_dora=method == "dora"))
        return model, tok
    import peft

    if method == "peft-qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        path = smollm2_cache_dir()  # load_causal_lm above converted it there
        del model
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, local_files_only=True)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    return peft.get_peft_model(model, cfg), tok


def _base_bytes(model) -> int:
    """Resident bytes of everything but the adapters (weights, NF4 codes and scales, buffers)."""
    total = 0
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" not in n:
            total += t.numel() * t.element_size()
    return total


def worker(method: str, steps: int, batch_size: int, lr: float, n_eval: int, seed: int, progress: bool,
           checkpointing: bool = False) -> dict:
    """One method end to end in this process; returns its row.  ``checkpointing``: transformers'
    gradient checkpointing, reentrant, without ``enable_input_require_grads`` called by hand."""
    import random

    import torch

    from .memory import PeakMemory, _rss_bytes, release_memory
    from .training import progress_bar

    torch.manual_seed(seed)
    release_memory()
    bare_rss = _rss_bytes() or 0  # the interpreter and its libraries, before any model
    model, tok = _load(method)
    # The checkpoint is memory-mapped: a tensor freed by quantization keeps the file's pages mapped
    # while any other tensor of that file lives.  Own copies make RSS count what is really held.
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    release_memory()
    train, held = _data("train", None), _data("test", n_eval)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    row = {"method": method, "what": DESCRIBE[method], "checkpointing": checkpointing,
           "trainable": sum(p.numel() for p in trainable), "base_bytes": _base_bytes(model)}
    row["loss_before"] = _eval_loss(model, tok, held)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    release_memory()
    start_rss = _rss_bytes() or 0
    model.train()
    t0 = time.perf_counter()
    with PeakMemory(torch.device("cpu")) as mem, progress_bar(steps, f"memory demo: {method}", progress) as bar:
        for step in range(steps):
            idx = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
            ids, lab, mask = _batch(tok, [train[i] for i in idx])
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    row["seconds_per_step"] = (time.perf_counter() - t0) / steps
    row["peak_rss_mb"] = start_rss / 2**20 + mem.peak_mb
    row["peak_model_mb"] = row["peak_rss_mb"] - bare_rss / 2**20  # the peak above the bare process
    row["loss_after"] = _eval_loss(model, tok, held)
    row["exact_match"] = _exact_match(model, tok, held)
    return row


def _table(rows, steps, batch_size) -> str:
    lines = [f"SmolLM2-135M-Instruct, {steps} steps of {batch_size} (JSON-intent skill; held-out loss and exact "
             "match of the greedy answer)", "",
             "| method | checkpointing | trainable | base weights MB | peak RSS in training MB (above the bare "
             "process) | s/step | held-out loss before -> after | exact match |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ck = "yes" if r.get("checkpointing") else "no"
        if "error" in r:
            lines.append(f"| {r['what']} | {ck} | – | – | – | – | {r['error']} | – |")
            continue
        lines.append(f"| {r['what']} | {ck} | {r['trainable']:,} | {r['base_bytes'] / 1e6:.1f} | {r['peak_rss_mb']:.0f} "
                     f"({r['peak_model_mb']:.0f}) | {r['seconds_per_step']:.2f} | {r['loss_before']:.3f} -> "
                     f"{r['loss_after']:.3f} | {r['exact_match']:.3f} |")
    return "\n".join(lines)


def run(args) -> list[dict]:
    """The parent: one subprocess per method, then the table (and ``--json``)."""
    methods = [m for m in (args.memory_methods or METHODS)]
    rows = []
    say = (lambda *a: None) if args.quiet else print
    runs = len(methods) * (2 if getattr(args, "memory_checkpointing", True) else 1)
    say(f"memory demo: {len(methods)} methods with and without gradient checkpointing, {args.steps} steps each, "
        f"one process per run (expected about {runs * (25 + 2 * args.steps)} s on a 2-core CPU)")
    modes = (False, True) if getattr(args, "memory_checkpointing", True) else (False,)
    for m in methods:
        for ck in modes:
            cmd = [sys.executable, "-m", "peftcore.memory_demo", "--worker", m, "--steps", str(args.steps),
                   "--batch-size", str(args.memory_batch_size), "--lr", str(args.memory_lr),
                   "--eval", str(args.memory_eval), "--seed", str(args.seed)]
            cmd += (["--checkpointing"] if ck else []) + ([] if args.progress else ["--no-progress"])
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
            line = [x for x in res.stdout.splitlines() if x.startswith("{")]
            if res.returncode != 0 or not line:
                rows.append({"method": m, "what": DESCRIBE[m], "checkpointing": ck, "error": f"exit {res.returncode}"})
                continue
            rows.append(json.loads(line[-1]))
    say(_table(rows, args.steps, args.memory_batch_size))
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, args.json)
    return rows


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m peftcore.memory_demo")
    p.add_argument("--worker", choices=METHODS, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    row = worker(a.worker, a.steps, a.batch_size, a.lr, a.eval, a.seed, a.progress, a.checkpointing)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
