"""Plain training-loop helpers for text classifiers (``peftcore demo`` and its distillation row).

``encode`` tokenizes once; ``batches`` pads each batch to its longest text; ``train_loop`` runs
AdamW with linear warm-up and decay on cross-entropy; ``evaluate`` gives test accuracy.  A model
here is called as ``model(input_ids, attention_mask) -> logits [B, C]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Encoded:
    ids: list  # list[list[int]], unpadded
    labels: list


def encode(tok, texts, labels, max_length):
    enc = tok(list(texts), truncation=True, max_length=max_length)
    return Encoded(enc["input_ids"], list(labels))


def batches(data: Encoded, batch_size, pad_id, device, generator=None):
    """Yield ``(input_ids, attention_mask, labels)`` padded to the batch's longest text."""
    import torch

    n = len(data.ids)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else range(n)
    order = list(order)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        width = max(len(data.ids[j]) for j in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, j in enumerate(idx):
            seq = data.ids[j]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        y = torch.tensor([data.labels[j] for j in idx], dtype=torch.long)
        yield ids.to(device), mask.to(device), y.to(device)


def count(params):
    return sum(p.numel() for p in params)


def progress_bar(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=True, disable=not enabled, dynamic_ncols=True)


def train_loop(model, params, train, cfg, pad_id, device, seed, desc, progress):
    import torch

    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train.ids) / cfg["batch_size"])
    total = steps_per_epoch * cfg["epochs"]
    warmup = max(1, total // 10)
    # Linear warm-up then linear decay: the usual BERT fine-tuning schedule.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with progress_bar(total, desc, progress) as bar:
        for _ in range(cfg["epochs"]):
            for ids, mask, y in batches(train, cfg["batch_size"], pad_id, device, gen):
                loss = torch.nn.functional.cross_entropy(model(ids, mask), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def evaluate(model, test, pad_id, device):
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, y in batches(test, 64, pad_id, device):
            correct += (model(ids, mask).argmax(-1) == y).sum().item()
    return correct / max(1, len(test.ids))
