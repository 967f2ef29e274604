"""Training a new head on a frozen backbone: features recomputed every epoch vs FeatureCache.

    python benchmarks/bench_feature_cache.py [--epochs 20] [--out benchmarks/results]

On the shipped textcls set with the packaged all-MiniLM-L6-v2: (a) what timm / Lightning loops do,
the frozen backbone's forward (no_grad, eval) in every batch of every epoch; (b) FeatureCache: one
extraction, then the epochs on the cached [N, H] features; (c) (b) again from the cache file in a
new FeatureCache object.  Same seed, batch order and head init: the accuracies agree.  One run of
each, timed one after another (the effect is far larger than the machine's drift).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from run_meta import run_meta  # benchmarks/run_meta.py (the script's own folder is on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from peftcore.assets import default_model_dir, load_encoder, load_tokenizer
    from peftcore.data import load_textcls
    from peftcore.transfer import FeatureCache
    from peftcore.transfer.classifier import mean_pool

    model_dir = default_model_dir()
    tok, enc = load_tokenizer(model_dir), load_encoder(model_dir).eval()
    (tr, ytr, names), (te, yte, _) = load_textcls("train"), load_textcls("test")
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    @torch.no_grad()
    def feats(texts):
        b = tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        return mean_pool(enc(**b).last_hidden_state, b["attention_mask"])

    def train_head(get_batch, n):
        torch.manual_seed(0)
        head = torch.nn.Linear(enc.config.hidden_size, len(names))
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0.01)
        for epoch in range(args.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            for i in range(0, n, 32):
                idx = order[i : i + 32]
                loss = F.cross_entropy(head(get_batch(idx)), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return head

    rows = []
    t0 = time.perf_counter()
    head = train_head(lambda idx: feats([tr[i] for i in idx.tolist()]), len(tr))
    acc = (head(feats(te)).argmax(-1) == yte).float().mean().item()
    rows.append({"provider": "recompute every epoch", "seconds": time.perf_counter() - t0, "accuracy": acc})
    with tempfile.TemporaryDirectory() as root:
        for label in ("FeatureCache, first run (extraction + epochs)", "FeatureCache, second run (from the file)"):
            t0 = time.perf_counter()
            cache = FeatureCache(root)
            xtr = cache.features(enc, tr, tokenizer=tok, max_length=64)
            xte = cache.features(enc, te, tokenizer=tok, max_length=64)
            head = train_head(lambda idx: xtr[idx], len(tr))
            acc = (head(xte).argmax(-1) == yte).float().mean().item()
            rows.append({"provider": label, "seconds": time.perf_counter() - t0, "accuracy": acc, "hit": cache.last_hit})
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = base / r["seconds"]
    meta = run_meta(f"python benchmarks/bench_feature_cache.py --epochs {args.epochs}", args.threads,
                    epochs=args.epochs, head="linear", data=f"textcls {len(tr)} train / {len(te)} test")
    commit = meta["commit"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_cache_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Head training on frozen MiniLM features, {args.epochs} epochs (`{meta['command']}`)", "",
             f"CPU, {args.threads} threads, torch {torch.__version__}, commit {commit[:10]}, {meta['timestamp']}", "",
             "| provider | seconds (end to end) | speed-up | test accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['provider']} | {r['seconds']:.2f} | {r['speedup']:.1f}x | {r['accuracy']:.3f} |" for r in rows]
    (out / "feature_cache_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
