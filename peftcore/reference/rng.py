"""Counter-based dropout RNG shared bit-for-bit by every backend.

Every backend (this reference, the Triton kernels, the C++ and CUDA kernels) derives the dropout
mask of element ``(m, k)`` of a 2-D input ``[M, K]`` from ``(seed, m, k)`` alone, so the mask is
never stored: the backward pass regenerates it, and two backends given the same seed drop the
same elements.  All arithmetic is on uint32 with wrap-around::

    hash32(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    sk         = hash32(seed)                    # per call
    rk(m)      = hash32(m ^ sk)                  # per row
    bits(m, k) = hash32(rk(m) ^ (k * 0x9E3779B1))
    keep(m, k) = (bits >> 8) >= threshold(p)     # threshold = round(p * 2**24)

Kept elements are scaled by ``1 / (1 - p)``.  ``hash32`` is Chris Wellons' "lowbias32" mixer.
The integer comparison (rather than a float uniform) makes the decision identical on every device.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
HASH_C1 = 0x7FEB352D
HASH_C2 = 0x846CA68B
GOLDEN = 0x9E3779B1
SEED_MAX = 2**31 - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor holding uint32 values; returns the same representation."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_C1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_C2)
    x = x ^ (x >> 16)
    return x


def hash32_int(x: int) -> int:
    """Scalar version of :func:`hash32` on a Python int (used for the per-call seed key)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * HASH_C1) & MASK32
    x ^= x >> 15
    x = (x * HASH_C2) & MASK32
    x ^= x >> 16
    return x


def dropout_threshold(p: float) -> int:
    """Integer threshold on the 24 high bits of the hash: an element is kept when bits >= it."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return min(int(round(p * (1 << 24))), 1 << 24)


def keep_mask(rows: int, cols: int, seed: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask ``[rows, cols]`` for the 2-D view of an input.  For tests and the reference."""
    thr = dropout_threshold(p)
    sk = hash32_int(seed)
    m = torch.arange(rows, dtype=torch.int64, device=device)
    k = torch.arange(cols, dtype=torch.int64, device=device)
    rk = hash32(m ^ sk)
    kk = _mul32(k, GOLDEN)
    bits = hash32(rk[:, None] ^ kk[None, :])
    return (bits >> 8) >= thr


def check_seed(seed: int) -> int:
    """Validate a dropout seed: a Python int in [0, 2**31)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**31), got {type(seed).__name__}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return seed


def new_seed() -> int:
    """Draw a fresh seed from torch's CPU generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, SEED_MAX, (1,), dtype=torch.int64).item())
