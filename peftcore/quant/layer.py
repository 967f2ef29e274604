"""``NF4Linear``: a frozen linear layer whose weight is stored in NF4 (4 bits a weight)."""

from __future__ import annotations

import torch
from torch import nn

from .nf4 import NF4State, check_state, dequantize_nf4, quantize_nf4


class NF4Linear(nn.Module):
    """``y = x · dequant(Wq)ᵀ + b`` with ``Wq`` the NF4 codes of a ``[out, in]`` weight.

    Buffers (saved in its state dict): ``weight_packed`` uint8 ``[ceil(out·in / 2), 1]``,
    ``absmax`` (fp32 ``[blocks]``, or uint8 codes with double quantization, then also
    ``absmax2`` fp32 and ``offset``).  ``bias`` stays a (frozen) parameter in the compute dtype.
    The forward runs :func:`peftcore.ops.nf4_lora_linear` without an adapter: the weight is
    dequantized a panel of rows at a time, never as a whole.  There is no gradient for the weight.
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        check_state(packed, state)
        if len(state.shape) != 2:
            raise ValueError(f"NF4Linear: the weight must be 2-D [out, in], got shape {tuple(state.shape)}")
        self.out_features, self.in_features = (int(s) for s in state.shape)
        self.blocksize = state.blocksize
        self.nested_blocksize = state.nested_blocksize
        self.orig_dtype = state.dtype
        self.compute_dtype = compute_dtype or state.dtype
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("absmax2", state.absmax2)
        self.register_buffer("offset", state.offset)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.compute_dtype).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        packed, state = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        layer = cls(packed, state, linear.bias, compute_dtype or linear.weight.dtype)
        layer.train(linear.training)
        return layer

    @property
    def state(self) -> NF4State:
        return NF4State((self.out_features, self.in_features), self.orig_dtype, self.blocksize, self.absmax,
                        self.absmax2, self.offset, self.nested_blocksize)

    def block_absmax(self) -> torch.Tensor:
        """fp32 ``[blocks]`` per-block absmax (rebuilt from 8 bits with double quantization), cached
        while the stored scales are unchanged (every forward and backward reads it)."""
        key = (self.absmax.data_ptr(), self.absmax._version, self.absmax.device,
               None if self.absmax2 is None else (self.absmax2.data_ptr(), self.absmax2._version))
        cached = getattr(self, "_absmax_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.state.block_absmax().float())
            self._absmax_cache = cached
        return cached[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight ``[out, in]`` in ``dtype`` (default the compute dtype): for export and
        tests; the forward never builds it."""
        return dequantize_nf4(self.weight_packed, self.state).to(dtype or self.compute_dtype)

    def quantized_nbytes(self) -> int:
        """Bytes of the stored weight: codes and scales (the bias not counted)."""
        return self.weight_packed.numel() + self.state.nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops.nf4_lora import nf4_lora_linear

        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"NF4Linear input must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not torch.is_autocast_enabled(x.device.type) and x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        return nf4_lora_linear(x, self, self.bias)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.absmax2 is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}")
