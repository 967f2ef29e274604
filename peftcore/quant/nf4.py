"""NF4 storage, bit-compatible with bitsandbytes (``quantize_4bit(quant_type="nf4")``).

Layout, as bitsandbytes has it (checked bit for bit against bitsandbytes 0.50 on the CPU in
``tests/test_quant_nf4.py``):

* the weight is flattened row-major and cut into blocks of ``blocksize`` elements (the last one
  may be shorter); each block's absmax ``a`` is kept in float32;
* every element ``w`` becomes the index of the nearest of the 16 NF4 code values to
  ``w * (1 / a)`` (``w / a`` in a short last block), clamped to [-1, 1]; a value exactly on a
  midpoint between two codes takes the lower one;
* two codes per byte, the first element in the high nibble: ``packed [ceil(n / 2), 1]`` uint8;
* double quantization (``double_quant=True``, bitsandbytes' ``compress_statistics``): the absmax
  values minus their mean (``offset``) are quantized again, blockwise (blocks of 256) to 8 bits
  with bitsandbytes' signed dynamic code (``dynamic_map()``), each block scaled by its own fp32
  absmax.  bitsandbytes' CPU kernel picks the 8-bit code through a 65,536-entry lookup table over
  [-1, 1], not by exact nearest neighbour; :func:`quantize_blockwise` builds the same table.

Dequantization is ``code[i] * a`` in float32 (the absmax first rebuilt as ``code8[j] * a2 +
offset`` when doubly quantized), cast to the weight's dtype.

torchao's ``NF4Tensor`` is *not* bit-compatible with this: it rounds its code book and quantizes
its scales differently (per-block scalers to int8 in groups, no mean offset), so its bytes and
values differ from bitsandbytes' and ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)
"""The 16 NF4 values (QLoRA, Dettmers et al. 2023), as float32, in code order."""

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # double quantization's blocks, as bitsandbytes'
_LUT_SIZE = 65536


class QuantError(ValueError):
    """An argument or stored state that cannot be quantized or dequantized, named in the message."""


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code (Dettmers, "8-bit approximations"), 256 sorted float32 values."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_DYNAMIC = dynamic_map()
_LUTS: dict = {}


def _lut(code: torch.Tensor) -> torch.Tensor:
    """The [65536] code index of each grid point ``-1 + 2i / 65535`` (bitsandbytes' CPU table)."""
    key = tuple(code.tolist())
    lut = _LUTS.get(key)
    if lut is None:
        mids = 0.5 * (code[:-1] + code[1:])
        grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
        # The first code whose upper midpoint is >= the grid value: "advance while midpoint < val".
        lut = torch.searchsorted(mids, grid, right=False).to(torch.uint8)
        _LUTS[key] = lut
    return lut


def quantize_blockwise(a: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, code: torch.Tensor | None = None):
    """8-bit blockwise quantization as bitsandbytes' CPU kernel: ``(codes uint8 [n], absmax fp32 [blocks])``."""
    code = _DYNAMIC if code is None else code
    flat = a.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    pad = blocks * blocksize - n
    padded = torch.cat([flat, flat.new_zeros(pad)]).view(blocks, blocksize)
    absmax = padded.abs().amax(1)
    inv = 1.0 / absmax
    v = (padded * inv[:, None]).clamp(-1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = _lut(code)[idx.clamp(0, _LUT_SIZE - 1)]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
                         code: torch.Tensor | None = None) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32, ``[n]``."""
    code = _DYNAMIC if code is None else code
    vals = code[q.reshape(-1).long()]
    block = torch.arange(vals.numel()) // blocksize
    return vals * absmax[block]


@dataclass
class NF4State:
    """What :func:`dequantize_nf4` needs besides the packed codes.

    ``absmax``: fp32 ``[blocks]``, or with double quantization the 8-bit codes uint8 ``[blocks]``
    with ``absmax2`` fp32 ``[ceil(blocks / 256)]`` and ``offset`` (a float32 scalar tensor).
    """

    shape: tuple
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    def block_absmax(self) -> torch.Tensor:
        """fp32 ``[blocks]``: the per-block absmax, rebuilt from its 8-bit codes when doubly quantized."""
        if not self.double_quant:
            return self.absmax
        return dequantize_blockwise(self.absmax, self.absmax2, self.nested_blocksize) + self.offset

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.absmax, self.absmax2, self.offset) if t is not None)


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise QuantError(f"blocksize: expected one of {list(BLOCKSIZES)}, got {blocksize!r}")
    return blocksize


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """``(packed, state)``: ``weight`` (any shape, float32/bf16/fp16) in NF4.

    ``packed``: uint8 ``[ceil(numel / 2), 1]``, two codes a byte, the first element in the high
    nibble (bitsandbytes' order); ``state``: :class:`NF4State` (absmax and the rest).  Bit-equal
    to bitsandbytes' ``quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` on the CPU.
    """
    if not isinstance(weight, torch.Tensor) or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise QuantError(f"weight: expected a float32, bfloat16 or float16 tensor, got "
                         f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if weight.numel() == 0:
        raise QuantError("weight: empty tensor; nothing to quantize")
    if weight.device.type == "meta":
        raise QuantError("weight: a meta tensor has no values to quantize")
    if not torch.isfinite(weight).all():
        raise QuantError("weight: holds inf or NaN; NF4 scales each block by its absmax and cannot represent them")
    check_blocksize(blocksize)
    dev = weight.device
    flat = weight.detach().reshape(-1).float().cpu()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, flat[full:].abs().max()[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    q = torch.bucketize(scaled, mids).to(torch.uint8)  # a value on a midpoint takes the lower code
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    state = NF4State(tuple(weight.shape), weight.dtype, blocksize, absmax)
    if double_quant:
        offset = absmax.mean()
        q8, absmax2 = quantize_blockwise(absmax - offset, NESTED_BLOCKSIZE)
        state = NF4State(tuple(weight.shape), weight.dtype, blocksize, q8, absmax2, offset)
    return packed.to(dev), _to(state, dev)


def _to(state: NF4State, device) -> NF4State:
    move = (lambda t: None if t is None else t.to(device))
    return NF4State(state.shape, state.dtype, state.blocksize, move(state.absmax), move(state.absmax2),
                    move(state.offset), state.nested_blocksize)


def check_state(packed: torch.Tensor, state: NF4State, what: str = "packed") -> None:
    """Every extent ``packed`` and ``state`` must agree on, checked before anything reads them."""
    if not isinstance(state, NF4State):
        raise QuantError(f"state: expected an NF4State, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise QuantError(f"{what}: expected a uint8 tensor of packed NF4 codes")
    check_blocksize(state.blocksize)
    n = state.numel
    if n < 1 or packed.numel() != (n + 1) // 2:
        raise QuantError(f"{what}: {packed.numel()} bytes for a weight of shape {tuple(state.shape)} "
                         f"(expected {(n + 1) // 2})")
    blocks = -(-n // state.blocksize)
    if state.absmax.dim() != 1 or state.absmax.numel() != blocks:
        raise QuantError(f"state.absmax: {state.absmax.numel()} values for {blocks} blocks of {state.blocksize}")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8:
            raise QuantError("state.absmax: expected uint8 codes with double quantization")
        b2 = -(-blocks // state.nested_blocksize)
        if state.absmax2.dim() != 1 or state.absmax2.numel() != b2 or state.absmax2.dtype != torch.float32:
            raise QuantError(f"state.absmax2: expected float32 [{b2}], got {state.absmax2.dtype} "
                             f"{tuple(state.absmax2.shape)}")
        if state.offset is None or state.offset.numel() != 1:
            raise QuantError("state.offset: expected one float32 value with double quantization")
    elif state.absmax.dtype != torch.float32:
        raise QuantError(f"state.absmax: expected float32, got {state.absmax.dtype}")


_CHUNK = 1 << 16  # elements dequantized per step: bounds the temporaries (about 20 bytes each)


def dequantize_range(packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, lo: int, hi: int,
                     out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat elements ``[lo, hi)`` of the quantized weight, written into ``out`` (``[hi - lo]``,
    allocated in ``dtype`` if None) a chunk at a time; ``absmax``: fp32 per-block absmax."""
    flat = packed.reshape(-1)
    if out is None:
        out = torch.empty(hi - lo, dtype=dtype, device=packed.device)
    if lo % blocksize == 0 and hi % blocksize == 0 and lo % 2 == 0:  # whole blocks (not a short last one)
        return _dequantize_aligned(flat, absmax, blocksize, lo, hi, out)
    code = NF4_CODE.to(packed.device)
    for s in range(lo, hi, _CHUNK):
        e = min(hi, s + _CHUNK)
        b = flat[s // 2:(e + 1) // 2]
        codes = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[s - 2 * (s // 2):][: e - s]
        vals = code[codes.int()]
        first, last = s // blocksize, (e - 1) // blocksize
        scale = absmax[first:last + 1].repeat_interleave(blocksize)[s - first * blocksize:][: e - s]
        torch.mul(vals, scale, out=vals)
        out[s - lo:e - lo].copy_(vals)
    return out


_PAIRS: dict = {}


def _pair_table(device) -> torch.Tensor:
    """``[256, 2]`` fp32: the two NF4 values a byte holds (high nibble first)."""
    t = _PAIRS.get(device)
    if t is None:
        b = torch.arange(256)
        t = torch.stack([NF4_CODE[b >> 4], NF4_CODE[b & 0xF]], dim=1).to(device)
        _PAIRS[device] = t
    return t


def _dequantize_aligned(flat, absmax, blocksize, lo, hi, out):
    """Whole blocks, even start: one byte-pair lookup and one broadcast multiply per chunk."""
    table = _pair_table(flat.device)
    step = max(blocksize, (_CHUNK // blocksize) * blocksize)
    for s in range(lo, hi, step):
        e = min(hi, s + step)
        vals = table[flat[s // 2:e // 2].long()].view(-1, blocksize)
        vals.mul_(absmax[s // blocksize:e // blocksize, None])
        out[s - lo:e - lo].view(-1, blocksize).copy_(vals)
    return out


def dequantize_rows(packed: torch.Tensor, state: NF4State, start: int, stop: int, absmax=None,
                    dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of a 2-D weight ``[out, in]`` dequantized (a panel: never the whole
    weight unless asked for all rows).  ``absmax``: :meth:`NF4State.block_absmax`, if already built;
    ``out``: a ``[stop - start, in]`` buffer to fill."""
    cols = state.shape[-1] if len(state.shape) > 1 else state.numel
    a = state.block_absmax() if absmax is None else absmax
    flat_out = None if out is None else out.view(-1)
    res = dequantize_range(packed, a, state.blocksize, start * cols, stop * cols, flat_out, dtype or state.dtype)
    return res.view(stop - start, cols)


def dequantize_nf4(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """The weight ``packed``/``state`` hold, in ``state.dtype`` and ``state.shape``; bit-equal to
    bitsandbytes' ``dequantize_4bit`` on the CPU."""
    check_state(packed, state)
    flat = torch.empty(state.numel, dtype=torch.float32, device=packed.device)
    dequantize_range(packed, state.block_absmax(), state.blocksize, 0, state.numel, flat)
    return flat.to(state.dtype).view(state.shape)
