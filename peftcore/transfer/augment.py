"""Text augmentation that needs no download: EDA's word edits within the sentence, and cutoff.

Word edits (Wei & Zou 2019, without WordNet): random swap, deletion and insertion of words of the
same sentence, whitespace-tokenized.  Cutoff (Shen et al. 2020): zero the embeddings of random real
tokens, or of one contiguous span, leaving padding and (by default) the first and last real tokens
([CLS], [SEP]) alone; the attention mask is not changed.  All of it is seeded: ``TextAugmenter``
draws from a hash of (seed, index, epoch), so the result never depends on call order.
"""

from __future__ import annotations

import hashlib
import random

import torch


def _rng(rng):
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    return rng


def random_swap(text: str, n: int = 1, *, rng: random.Random) -> str:
    """Swap two random words, ``n`` times."""
    words = text.split()
    for _ in range(n if len(words) > 1 else 0):
        i, j = _rng(rng).sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def random_deletion(text: str, p: float = 0.1, *, rng: random.Random) -> str:
    """Drop each word with probability ``p``; one word is always kept."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p!r}")
    words = text.split()
    kept = [w for w in words if _rng(rng).random() >= p]
    return " ".join(kept) if kept else (rng.choice(words) if words else text)


def random_insertion(text: str, n: int = 1, *, rng: random.Random) -> str:
    """Insert a copy of a random word of the sentence at a random position, ``n`` times."""
    words = text.split()
    for _ in range(n if words else 0):
        words.insert(_rng(rng).randrange(len(words) + 1), rng.choice(words))
    return " ".join(words)


class TextAugmenter:
    """``aug(text, index, epoch)``: swap, delete and insert fractions of the words, deterministic in
    (seed, index, epoch).  ``is_random = True``: a feature cache refuses it (features of augmented
    inputs cannot be reused across epochs)."""

    is_random = True

    def __init__(self, swap: float = 0.1, delete: float = 0.1, insert: float = 0.1, *, seed: int = 0):
        for name, v in (("swap", swap), ("delete", delete), ("insert", insert)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        self.swap, self.delete, self.insert, self.seed = swap, delete, insert, seed

    def __call__(self, text: str, index: int = 0, epoch: int = 0) -> str:
        digest = hashlib.sha256(f"{self.seed}/{index}/{epoch}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        n = len(text.split())
        out = random_swap(text, round(self.swap * n), rng=rng)
        out = random_deletion(out, self.delete, rng=rng) if self.delete else out
        return random_insertion(out, round(self.insert * n), rng=rng)

    def augment_batch(self, texts, epoch: int = 0, start: int = 0):
        return [self(t, start + i, epoch) for i, t in enumerate(texts)]


def _real_positions(attention_mask, keep_first, keep_last):
    pos = []
    for row in attention_mask.bool():
        idx = row.nonzero().flatten().tolist()
        if keep_last and len(idx) > 1:
            idx = idx[:-1]
        if keep_first and idx:
            idx = idx[1:]
        pos.append(idx)
    return pos


def _check(embeds, attention_mask, ratio):
    if embeds.dim() != 3 or attention_mask.shape != embeds.shape[:2]:
        raise ValueError(f"embeds must be [B, T, H] and attention_mask [B, T]; got {tuple(embeds.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")


def token_cutoff(embeds, attention_mask, ratio: float = 0.1, *, generator=None, keep_first=True, keep_last=True):
    """Zero the embeddings of ``round(ratio * n)`` random real tokens per row (``[B, T, H]``, new tensor)."""
    _check(embeds, attention_mask, ratio)
    keep = torch.ones(embeds.shape[:2], dtype=embeds.dtype, device=embeds.device)
    for b, idx in enumerate(_real_positions(attention_mask, keep_first, keep_last)):
        k = round(ratio * len(idx))
        if k:
            chosen = torch.randperm(len(idx), generator=generator)[:k]
            keep[b, torch.tensor(idx)[chosen]] = 0
    return embeds * keep.unsqueeze(-1)


def span_cutoff(embeds, attention_mask, ratio: float = 0.1, *, generator=None, keep_first=True, keep_last=True):
    """Zero one contiguous span of ``round(ratio * n)`` real tokens per row (``[B, T, H]``, new tensor)."""
    _check(embeds, attention_mask, ratio)
    keep = torch.ones(embeds.shape[:2], dtype=embeds.dtype, device=embeds.device)
    for b, idx in enumerate(_real_positions(attention_mask, keep_first, keep_last)):
        k = round(ratio * len(idx))
        if k:
            s = int(torch.randint(0, len(idx) - k + 1, (1,), generator=generator))
            keep[b, torch.tensor(idx[s : s + k])] = 0
    return embeds * keep.unsqueeze(-1)
