"""``peftcore.quantize``: a model's frozen linear layers replaced by NF4 ones, in place."""

from __future__ import annotations

from torch import nn

from .config import NF4Config
from .layer import NF4Linear
from .nf4 import QuantError


def _base_weight_out_in(module: nn.Module):
    w = module.weight.detach()
    return w.t() if type(module).__name__ == "Conv1D" else w  # transformers' Conv1D stores [in, out]


def quantize(model: nn.Module, config: NF4Config | None = None, target_modules="all-linear",
             exclude_modules=None) -> nn.Module:
    """Replace the linear layers ``target_modules`` names (PEFT's rules; default every linear layer
    but the output head) with :class:`NF4Linear` layers holding their weights in NF4.  Returns the
    model.

    Quantize first, then add adapters (``pc.apply(model, pc.LoRAConfig(...))``: QLoRA).  Every
    weight is quantized before any module is swapped, so a failure (a weight with inf/NaN, a model
    that already holds adapters) leaves the model as it was.
    """
    from ..model import hosts
    from ..tuners.targets import is_linear, resolve_targets

    config = NF4Config() if config is None else config
    if not isinstance(config, NF4Config):
        raise QuantError(f"config: expected an NF4Config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise QuantError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if any(True for _ in hosts(model)):
        raise QuantError("model: already holds peftcore adapters; quantize the base model first, then apply adapters")
    names = [n for n in resolve_targets(model, target_modules, exclude_modules)
             if is_linear(model.get_submodule(n))]
    if not names:
        raise QuantError(f"target_modules={target_modules!r}: matches no linear layer of the model")
    new = {}
    for name in names:
        old = model.get_submodule(name)
        w = _base_weight_out_in(old)
        if w.dim() != 2:
            raise QuantError(f"{name}: weight of shape {tuple(w.shape)} is not 2-D")
        try:
            from .nf4 import quantize_nf4

            packed, state = quantize_nf4(w, config.blocksize, config.double_quant)
        except QuantError as e:
            raise QuantError(f"{name}: {e}") from None
        layer = NF4Linear(packed, state, old.bias, config.compute_dtype or w.dtype)
        layer.train(old.training)
        new[name] = layer
    for name, layer in new.items():  # nothing below can fail: the swap is all or nothing
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        try:
            cfg.peftcore_quantization = {"method": "nf4", "blocksize": config.blocksize,
                                         "double_quant": config.double_quant}
        except Exception:  # a read-only config: the layers carry everything needed
            pass
    return model


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """``(stored bytes of the NF4 weights, fp32 bytes of the same weights)`` over the model."""
    q = f = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):
            q += m.quantized_nbytes()
            f += 4 * m.in_features * m.out_features
    return q, f
