"""``LoRALinear``: a frozen linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) with named LoRA adapters.

The first active, unmerged adapter runs through the fused op :func:`peftcore.ops.lora_linear`
(base GEMM and low-rank update in one call, dropout mask regenerated rather than stored); further
active adapters add their low-rank terms on top.  State-dict keys follow PEFT
(``<module>.base_layer.weight``, ``<module>.lora_A.<name>.weight``, ``<module>.lora_B.<name>.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lora import lora_linear
from ..ops.nf4_lora import nf4_lora_linear
from ..quant.layer import NF4Linear
from . import dora
from ..ops.lora_mixed import lora_mixed_linear
from ..transaction import before_inplace
from .base import AdapterHost, accept_plain_keys, check_active


class LoRALinear(nn.Module, AdapterHost):
    """Wraps ``base_layer`` (kept frozen) and holds adapters by name.

    Args:
        base_layer: ``nn.Linear`` (weight ``[out, in]``), ``Conv1D`` (weight ``[in, out]``) or
            :class:`peftcore.quant.NF4Linear` (a 4-bit base: QLoRA through ``nf4_lora_linear``).
        fan_in_fan_out: whether the base weight is stored ``[in, out]``; None detects Conv1D.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool | None = None):
        super().__init__()
        self.quantized = isinstance(base_layer, NF4Linear)
        if self.quantized:
            if fan_in_fan_out:
                raise ValueError("fan_in_fan_out: an NF4Linear base is always [out, in]")
            self.base_layer = base_layer
            self.fan_in_fan_out = False
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            if fan_in_fan_out is None:
                fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
            w = base_layer.weight
            if w.dim() != 2:
                raise ValueError(f"base_layer.weight must be 2-D, got shape {tuple(w.shape)}")
            self.base_layer = base_layer
            self.fan_in_fan_out = bool(fan_in_fan_out)
            self.in_features, self.out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        # One nn.Dropout per adapter (nn.Identity at p = 0), as PEFT keeps them: tools that reach
        # every nn.Dropout (model.eval(), TRL's disable_dropout_in_model setting p = 0) reach these.
        # The fused op reads p and the module's training flag; it never calls the module.
        self.lora_dropout = nn.ModuleDict()
        # DoRA adapters' magnitudes m [out] (PEFT's name); the scale m/||W + sBA|| a merge used.
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_merged: dict[str, torch.Tensor] = {}
        self.backend: dict[str, str | None] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        # Set by peftcore.adapter_batch: (lora_a [J,R,in], lora_b [J,out,R], scaling [J], index [B]),
        # or () when no adapter of the batch is on this layer.
        self.mixed: tuple | None = None
        accept_plain_keys(self, "base_layer")

    # --- adapters --------------------------------------------------------------------------
    def add_adapter(self, name: str, config, r: int | None = None, alpha: float | None = None) -> None:
        """Create adapter ``name`` from a :class:`peftcore.LoRAConfig` and initialize it.

        ``r`` / ``alpha``: this layer's rank and alpha (the config's rank_pattern / alpha_pattern
        resolved for it); default the config's.
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        r = config.r if r is None else r
        alpha = config.alpha if alpha is None else alpha
        device, dtype = self.base_device_dtype()
        if self.quantized and config.init not in ("default", "gaussian"):
            raise ValueError(f"init={config.init!r}: PiSSA needs the full-precision base weight; an NF4 base takes "
                             "init 'default' or 'gaussian'")
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=config.lora_bias, device=device, dtype=dtype)
        self.lora_A[name], self.lora_B[name] = a, b
        self.r[name] = r
        self.scaling[name] = config.scaling_for(r, alpha)
        p = float(config.dropout)
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_dropout[name].train(self.training)
        self.backend[name] = config.backend
        self._init(name, config.init)
        if config.lora_bias:
            with torch.no_grad():
                b.bias.zero_()
        if getattr(config, "use_dora", False):
            # m starts at ||W + s·BA|| per row: the adapter's first output is the LoRA one.
            self.lora_magnitude_vector[name] = nn.Parameter(dora.weight_norm(self, name).to(dtype))

    def _init(self, name: str, init: str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r[name])
                nn.init.zeros_(b)
            else:  # pissa / pissa_niter_N: top-r singular directions move into the adapter
                self._pissa(name, init)

    def _pissa(self, name: str, init: str) -> None:
        r, s = self.r[name], self.scaling[name]
        w32 = self.weight_out_in().float()
        if init == "pissa":
            u, sv, vh = torch.linalg.svd(w32, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            niter = int(init.split("_niter_")[-1])
            u, sv, v = torch.svd_lowrank(w32, q=r, niter=niter)
            vh = v.t()
        sv = sv / s
        a = torch.diag(sv.sqrt()) @ vh  # [r, in]
        b = u @ torch.diag(sv.sqrt())  # [out, r]
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        self._add_to_base(-s * (b @ a))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged: unmerge it before deleting")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.scaling, self.backend):
            d.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def set_active(self, spec) -> None:
        """Activate the adapters in ``spec`` (a list or Stack; LoRA terms add, so order is moot)."""
        self.active = check_active(self, spec)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """PEFT's keys: ``lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]`` (and
        ``lora_B.bias`` ``[out]`` with lora_bias)."""
        out = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if self.lora_B[name].bias is not None:
            out["lora_B.bias"] = self.lora_B[name].bias
        if name in self.lora_magnitude_vector:  # PEFT's key for DoRA's magnitude [out]
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return out

    def lora_bias(self, name: str) -> torch.Tensor | None:
        """``scaling · lora_B.bias`` ``[out]`` (None without lora_bias): added to the output."""
        b = self.lora_B[name].bias
        return None if b is None else b * self.scaling[name]

    def detach_from(self, model: nn.Module, path: str) -> None:
        """The last adapter is gone: put the original module back in place of this wrapper."""
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, self.base_layer)

    # --- weights ---------------------------------------------------------------------------
    def base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where the base weight lives and the dtype the layer computes in."""
        if self.quantized:
            return self.base_layer.weight_packed.device, self.base_layer.compute_dtype
        w = self.base_layer.weight
        return w.device, w.dtype

    def _full_precision(self, what: str) -> None:
        if self.quantized:
            raise ValueError(f"{what} needs the full-precision base weight, and this layer's base is NF4 "
                             "(4-bit): keep the adapter separate, or dequantize the model first")

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as ``[out, in]`` (a view for Conv1D)."""
        self._full_precision("the base weight")
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling · B A`` as ``[out, in]``, in fp32."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return self.scaling[name] * (b @ a)

    @torch.no_grad()
    def _add_to_base(self, delta_out_in: torch.Tensor) -> None:
        self._full_precision("merging")
        w = self.base_layer.weight
        d = delta_out_in.t() if self.fan_in_fan_out else delta_out_in
        before_inplace(w)  # inside apply/load/delete: kept for the undo
        w.copy_((w.float() + d).to(w.dtype))

    def stack_adapters(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(lora_a [J, R, in], lora_b [J, out, R], scaling [J])`` for ``names``, ranks zero-padded
        to the largest; the layout :func:`peftcore.ops.lora_mixed_linear` takes."""
        self._full_precision("adapter_batch")
        dora_names = [n for n in names if n in self.lora_magnitude_vector]
        if dora_names:
            raise ValueError(f"adapter_batch does not take DoRA adapters ({dora_names[0]!r} is one)")
        w = self.base_layer.weight
        r = max(self.r[n] for n in names)
        a = w.new_zeros(len(names), r, self.in_features)
        b = w.new_zeros(len(names), self.out_features, r)
        for j, n in enumerate(names):
            if self.lora_B[n].bias is not None:
                raise ValueError(f"adapter_batch does not take adapters with lora_bias ({n!r} has one)")
            a[j, : self.r[n]] = self.lora_A[n].weight.detach()
            b[j, :, : self.r[n]] = self.lora_B[n].weight.detach()
        return a, b, torch.tensor([self.scaling[n] for n in names], dtype=torch.float32, device=w.device)

    @torch.no_grad()
    def _add_bias(self, name: str, sign: float) -> None:
        lb = self.lora_B[name].bias
        if lb is None:
            return
        bias = self.base_layer.bias
        before_inplace(bias)
        bias.copy_((bias.float() + sign * self.scaling[name] * lb.float()).to(bias.dtype))

    def to_merge(self, names: list[str] | None = None) -> list[str]:
        """The adapters :meth:`merge` would fold in (default: the active ones not yet merged),
        after checking each can be: what :func:`peftcore.merge` checks on every layer first."""
        names = [n for n in (names if names is not None else self.active) if n not in self.merged]
        if names:
            self._full_precision("merging")
        for name in names:
            if self.lora_B[name].bias is not None and self.base_layer.bias is None:
                raise ValueError(f"adapter {name!r} has a lora_bias but the base layer has no bias to merge it into")
        return names

    def merge(self, names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight (default: the active ones not yet merged).

        DoRA: W becomes (m / ‖W + s·BA‖)·(W + s·BA); the scale is kept for :meth:`unmerge`."""
        for name in self.to_merge(names):
            if name in self.lora_magnitude_vector:
                with torch.no_grad():
                    sc = (self.lora_magnitude_vector[name].float() / dora.weight_norm(self, name).float())
                w = self.weight_out_in().float()
                self._add_to_base((sc[:, None] - 1.0) * w + sc[:, None] * self.delta_weight(name))
                self._dora_merged[name] = sc
            else:
                self._add_to_base(self.delta_weight(name))
            self._add_bias(name, 1.0)
            self.merged.append(name)

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract the merged adapters ``names`` (default: every merged one) from the base weight again."""
        for name in reversed(list(self.merged)):
            if names is None or name in names:
                if name in self._dora_merged:
                    sc = self._dora_merged.pop(name)
                    w = self.weight_out_in().float()
                    self._add_to_base((1.0 / sc[:, None] - 1.0) * w - self.delta_weight(name))
                else:
                    self._add_to_base(-self.delta_weight(name))
                self._add_bias(name, -1.0)
                self.merged.remove(name)

    def dropout_p(self, name: str) -> float:
        """The dropout probability adapter ``name`` applies now: its ``nn.Dropout``'s ``p`` in
        training mode, 0 in eval mode (or once a tool set ``p = 0``), as ``nn.Dropout`` itself."""
        d = self.lora_dropout[name]
        return float(d.p) if isinstance(d, nn.Dropout) and d.training else 0.0

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            # nn.Linear refuses integer input too; the adapter must not cast it to the weight's dtype
            raise TypeError(
                f"LoRALinear input must be a floating-point tensor, got "
                f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        names = [] if self.disabled else [n for n in self.active if n not in self.merged]
        if self.disabled and self.merged:
            raise RuntimeError("adapters are merged into the base weight: unmerge before disabling them")
        if self.mixed is not None and not self.disabled:
            if not self.mixed:
                return self.base_layer(x)
            w = self.weight_out_in()
            return lora_mixed_linear(x.to(w.dtype), w, self.base_layer.bias, *self.mixed)
        if not names:
            return self.base_layer(x)
        _, dtype = self.base_device_dtype()
        # Under autocast the op casts every input itself, as F.linear does; otherwise the adapter
        # runs in the base weight's dtype (fp32 adapter weights get their gradient through .to).
        cast = not torch.is_autocast_enabled(x.device.type)
        if cast and x.dtype != dtype:
            x = x.to(dtype)
        first, rest = names[0], names[1:]
        a, b = self.lora_A[first].weight, self.lora_B[first].weight
        bias = self.base_layer.bias
        extra = self.lora_bias(first)  # lora_bias folds into the op's bias: one add, its gradient flows
        if extra is not None:
            bias = extra if bias is None else bias + extra
            bias = bias.to(dtype) if cast else bias
        a, b = (a.to(dtype), b.to(dtype)) if cast else (a, b)
        dora_first = first in self.lora_magnitude_vector  # DoRA: the op without bias, then the row scale
        op_bias = None if dora_first else bias
        kw = dict(dropout_p=self.dropout_p(first), backend=self.backend[first])
        if self.quantized:  # QLoRA: the adapter fused with the 4-bit base
            y = nf4_lora_linear(x, self.base_layer, op_bias, a, b, self.scaling[first], **kw)
            base_out = lambda: nf4_lora_linear(x.to(y.dtype), self.base_layer)  # noqa: E731
        else:
            w = self.weight_out_in()
            y = lora_linear(x, w, op_bias, a, b, self.scaling[first], **kw)
            base_out = lambda: F.linear(x.to(y.dtype), w.to(y.dtype))  # noqa: E731
        if dora_first:
            y = self._dora_out(first, y, bias)
        return self._add_rest(x, y, rest, base_out)

    def _dora_out(self, name: str, z: torch.Tensor, bias) -> torch.Tensor:
        y = z * dora.scale(self, name, z.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def _add_rest(self, x, y, rest, base_out):
        """Several active adapters: the rest add their low-rank terms (PEFT's way); a DoRA one adds
        (scale - 1)·x Wᵀ + scale·s·lora(x), ``base_out()`` giving x Wᵀ (computed once, if needed)."""
        xw = None
        for name in rest:
            xd = self.lora_dropout[name](x)
            lb = self.lora_B[name].bias
            lo = F.linear(F.linear(xd.to(y.dtype), self.lora_A[name].weight.to(y.dtype)),
                          self.lora_B[name].weight.to(y.dtype), None if lb is None else lb.to(y.dtype))
            if name in self.lora_magnitude_vector:
                xw = base_out() if xw is None else xw
                sc = dora.scale(self, name, y.dtype)
                y = y + (sc - 1) * xw + sc * (self.scaling[name] * lo)
            else:
                y = y + self.scaling[name] * lo
        return y

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={self.r[n]})" for n in self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ads}], active={self.active}"
