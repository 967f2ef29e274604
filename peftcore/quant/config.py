"""``NF4Config``: how ``peftcore.quantize`` stores a model's frozen linear weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nf4 import BLOCKSIZES, QuantError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class NF4Config:
    """4-bit NormalFloat storage (QLoRA), bit-compatible with bitsandbytes' ``nf4``.

    Args:
        blocksize: elements per absmax block, one of 32, 64, ..., 4096 (bitsandbytes' default 64).
        double_quant: quantize the absmax values again to 8 bits (blocks of 256, mean subtracted),
            bitsandbytes' ``bnb_4bit_use_double_quant``: 0.127 bytes a weight instead of 0.5625/4.
        compute_dtype: the dtype the layer dequantizes into and computes in (None: the weight's
            original dtype); ``torch.float32``/``bfloat16``/``float16`` or their names.
    """

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: object = None

    def __post_init__(self):
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize not in BLOCKSIZES:
            raise QuantError(f"NF4Config.blocksize: expected one of {list(BLOCKSIZES)}, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise QuantError(f"NF4Config.double_quant: expected a bool, got {self.double_quant!r}")
        cd = self.compute_dtype
        if isinstance(cd, str):
            if cd not in COMPUTE_DTYPES:
                raise QuantError(f"NF4Config.compute_dtype: expected one of {list(COMPUTE_DTYPES)}, got {cd!r}")
            object.__setattr__(self, "compute_dtype", COMPUTE_DTYPES[cd])
        elif cd is not None and cd not in COMPUTE_DTYPES.values():
            raise QuantError(f"NF4Config.compute_dtype: expected float32, bfloat16, float16 or None, got {cd!r}")
