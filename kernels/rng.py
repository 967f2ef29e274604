"""Counter-based dropout RNG in Triton, bit-identical to ``peftcore.reference.rng``.

The keep decision of element ``(m, k)`` depends on ``(seed, m, k)`` only::

    hash32(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    sk         = hash32(seed)                    # per call, on the host
    rk(m)      = hash32(m ^ sk)                  # per row, once per row block
    bits(m, k) = hash32(rk(m) ^ (k * 0x9E3779B1))
    keep(m, k) = (bits >> 8) >= threshold        # threshold = round(p * 2**24)

All device arithmetic is uint32 with wrap-around.  Every constant is cast to ``tl.uint32``
explicitly: a Python literal below 2**31 would otherwise enter as int32 and one above as uint32,
and a signed operand turns ``>>`` into an arithmetic shift.  The host-side scalar helpers are
those of :mod:`peftcore.reference.rng`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..reference.rng import hash32_int


def seed_key(seed: int) -> int:
    """``hash32(seed)`` reinterpreted as a signed int32, so the kernel argument is always i32.

    (Triton types a Python int >= 2**31 as uint32 and one below as int32; a fixed type avoids a
    second compilation.  The kernel bitcasts it back to uint32.)
    """
    sk = hash32_int(int(seed))
    return sk - (1 << 32) if sk >= (1 << 31) else sk


@triton.jit
def _hash32(x):
    # x: uint32 tensor of any shape.
    x ^= x >> 16
    x *= tl.cast(0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.cast(0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def _row_keys(offs_m, seed_key):
    """rk(m) = hash32(m ^ sk) for a block of row indices ``offs_m`` (int32); ``seed_key`` is i32."""
    return _hash32(offs_m.to(tl.uint32) ^ seed_key.to(tl.uint32, bitcast=True))


@triton.jit
def _keep_mask(row_keys, offs_k, threshold):
    """Boolean keep mask [len(row_keys), len(offs_k)] for rows with keys ``row_keys`` (uint32)."""
    kk = offs_k.to(tl.uint32) * tl.cast(0x9E3779B1, tl.uint32)
    bits = _hash32(row_keys[:, None] ^ kk[None, :])
    return (bits >> 8) >= threshold.to(tl.uint32)
