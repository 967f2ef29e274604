"""4-bit NormalFloat (NF4) storage for frozen weights: QLoRA's base model.

    packed, state = pc.quant.quantize_nf4(weight, blocksize=64, double_quant=True)
    w = pc.quant.dequantize_nf4(packed, state)                 # bit-equal to bitsandbytes
    pc.quantize(model, pc.NF4Config(blocksize=64, double_quant=True))   # nn.Linear -> NF4Linear
    pc.apply(model, pc.LoRAConfig(r=16, target_modules="all-linear"))   # QLoRA

See :mod:`peftcore.quant.nf4` for the format (bitsandbytes' ``nf4``, byte for byte).
"""

from .config import NF4Config
from .layer import NF4Linear
from .model import quantize, quantized_bytes
from .nf4 import NF4_CODE, NF4State, QuantError, dequantize_nf4, dynamic_map, quantize_nf4

__all__ = ["NF4Config", "NF4Linear", "NF4State", "NF4_CODE", "QuantError", "dequantize_nf4", "dynamic_map",
           "quantize", "quantize_nf4", "quantized_bytes"]
