"""Residual bottleneck adapters (Houlsby, Pfeiffer, parallel) and Compacter, held at hook points.

The base model is never edited: a :class:`BottleneckSlot` is registered as a child of the module
whose output the adapters transform (so ``parameters()``, ``.to()`` and ``state_dict`` see it) and
a forward hook on that module runs the slot.  Base modules stay where they are, so their
state-dict keys do not change and LoRA can still wrap the linear layers inside.

Composition of the active adapters at one slot (a list means the same as a :class:`Stack`):

* sequential adapters (Houlsby / Pfeiffer) run in order, each on the previous one's output:
  ``h ← h + f_a(h)``, then ``h ← h + f_b(h)``, with ``f(h) = scaling · dropout(up(act(down(h))))``;
* parallel adapters see the block's input x instead: their residual maps are chained on the
  branch, ``z ← z + f_a(z)``, ``z ← z + f_b(z)`` starting from ``z = x``, and ``z - x`` (the sum
  of the branch terms) is added to the block's output; a single parallel adapter adds ``f_a(x)``.
  When both kinds are active at one slot the parallel sum is added first, then the sequential
  adapters run on the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterHost, check_active
from .phm import PHMLinear, PHMRuleBank

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "identity": lambda x: x,
}


class BottleneckAdapter(nn.Module):
    """One adapter: ``f(h) = scaling · dropout(up(act(down(h))))``, h ``[..., hidden]``.

    ``down`` is ``[hidden → width]`` and ``up`` ``[width → hidden]``: ``nn.Linear`` for a
    :class:`~peftcore.BottleneckConfig`, :class:`~peftcore.layers.PHMLinear` for a
    :class:`~peftcore.CompacterConfig`.  ``up`` starts at zero, so ``f = 0`` until trained.

    Args:
        hidden: the width of the hidden states at the hook point.
        config: a BottleneckConfig (or CompacterConfig).
        rule_bank, name: where a Compacter adapter with ``shared_phm_rule`` reads its rule.
    """

    def __init__(self, hidden: int, config, rule_bank: PHMRuleBank | None = None, name: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        width = config.bottleneck_width(hidden)
        kw = {"device": device, "dtype": dtype}
        self.hidden, self.width = hidden, width
        self.parallel = config.placement == "parallel"
        self.act_name = config.non_linearity
        self.act = ACTIVATIONS[config.non_linearity]
        self.scaling = float(config.scaling)
        self.dropout = nn.Dropout(config.dropout)
        if config.phm:
            shared = config.shared_phm_rule
            if shared and (rule_bank is None or name is None):
                raise ValueError("a Compacter adapter with shared_phm_rule needs rule_bank and name")
            layers = []
            for i, o in ((hidden, width), (width, hidden)):
                layer = PHMLinear(i, o, config.phm_dim, rank=config.phm_rank, factorized=config.factorized_phm_W,
                                  bias=config.phm_bias, rule="shared" if shared else "own",
                                  learn_rule=config.learn_phm, backend=config.backend, **kw)
                if shared:
                    layer.share_rule(rule_bank, name)
                layers.append(layer)
            self.down, self.up = layers
            self.down.reset_parameters(config.hypercomplex_nonlinearity, config.phm_init_range, config.phm_c_init)
            # AdapterHub leaves up at its glorot init, so its Compacter is the identity only up to the
            # ~1e-4 rule; zeroing up's W_right makes an untrained adapter exactly the identity.
            self.up.reset_parameters(config.hypercomplex_nonlinearity, config.phm_init_range, config.phm_c_init,
                                     zero_out=True)
        else:
            self.down = nn.Linear(hidden, width, **kw)
            self.up = nn.Linear(width, hidden, **kw)
            with torch.no_grad():
                self.down.weight.normal_(0.0, config.init_range)
                self.down.bias.zero_()
                self.up.weight.zero_()
                self.up.bias.zero_()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters (and fixed rules) by key, e.g. ``down.weight``, ``up.w_right``."""
        out = dict(self.named_parameters())
        out.update((k, b) for k, b in self.named_buffers())
        return out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The branch term ``f(h)`` ``[..., hidden]`` (without the residual)."""
        return self.dropout(self.up(self.act(self.down(h))) * self.scaling)

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"{self.hidden} -> {self.width} -> {self.hidden}, act={self.act_name}, scaling={self.scaling}, {kind}"


def _first_tensor(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("the parallel adapter's input module was called without a tensor argument")


class BottleneckSlot(AdapterHost, nn.Module):
    """The adapters at one hook point: a child of the hooked module ``owner``, under :attr:`ATTR`.

    Use :meth:`attach` to create one (it registers the forward hook) and :meth:`add_adapter` to
    add adapters; :meth:`detach_from` (called by :func:`peftcore.delete_adapter` once the slot is
    empty) removes the hooks and the slot.  ``forward`` maps the owner's output hidden states
    ``h [..., hidden]`` (and, for parallel adapters, the block's input ``x [..., hidden]``) to the
    new hidden states (see the module docstring).
    """

    ATTR = "bottleneck"

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        # Plain attributes (the owner is our parent; registering it would make a cycle).
        object.__setattr__(self, "_owner", None)
        object.__setattr__(self, "_input_module", None)
        self._handles: list = []
        self._input_handle = None
        self._branch_input: torch.Tensor | None = None

    @classmethod
    def of(cls, owner: nn.Module) -> BottleneckSlot | None:
        slot = owner._modules.get(cls.ATTR)
        return slot if isinstance(slot, cls) else None

    @classmethod
    def check_owner(cls, owner: nn.Module, where: str = "") -> None:
        """Clear error when ``owner`` cannot get a slot as its child."""
        where = where or type(owner).__name__
        if isinstance(owner, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # A container runs or lists every child: the slot would become one of its layers.
            raise TypeError(
                f"{where} is a container ({type(owner).__name__}): adapters cannot hook it; "
                f"point at the module that calls it"
            )
        if cls.of(owner) is None and hasattr(owner, cls.ATTR):
            raise ValueError(f"{where} already has an attribute {cls.ATTR!r}: cannot hold adapters")

    @classmethod
    def attach(cls, owner: nn.Module) -> BottleneckSlot:
        """The slot of ``owner``, created, registered as its child and hooked if it has none."""
        slot = cls.of(owner)
        if slot is not None:
            return slot
        cls.check_owner(owner)
        slot = cls()
        owner.add_module(cls.ATTR, slot)
        object.__setattr__(slot, "_owner", owner)
        slot._handles.append(owner.register_forward_hook(slot._on_output, with_kwargs=True))
        return slot

    def add_adapter(self, name: str, adapter: BottleneckAdapter, input_module: nn.Module | None = None) -> None:
        """Hold ``adapter`` as ``name``; a parallel one reads the input of ``input_module``."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists at this slot")
        if adapter.parallel:
            if input_module is None:
                raise ValueError("a parallel adapter needs the module whose input it reads")
            if self._input_module is not None and self._input_module is not input_module:
                raise ValueError("parallel adapters at one slot must read the same input module")
        self.adapters[name] = adapter
        if adapter.parallel and self._input_module is None:
            object.__setattr__(self, "_input_module", input_module)
            if input_module is not self._owner:  # the owner's own input arrives with its output hook
                self._input_handle = input_module.register_forward_pre_hook(self._on_input, with_kwargs=True)

    # --- AdapterHost -----------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} here (has {sorted(self.adapters)})")
        return self.adapters[name].tensors()

    def set_active(self, spec) -> None:
        """A list or Stack of names held here; both mean the order of :meth:`forward`."""
        self.active = check_active(self, spec)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the input hook goes with the last parallel adapter)."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} here (has {sorted(self.adapters)})")
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]
        if not any(a.parallel for a in self.adapters.values()):
            if self._input_handle is not None:
                self._input_handle.remove()
            self._input_handle = None
            object.__setattr__(self, "_input_module", None)
            self._branch_input = None

    def detach_from(self, model: nn.Module | None = None, path: str | None = None) -> None:
        """Once empty: remove the hooks and leave the owner (the model is then as before)."""
        if self.adapters:
            raise RuntimeError(f"slot still holds adapters {sorted(self.adapters)}: delete them first")
        for handle in self._handles:
            handle.remove()
        self._handles = []
        owner = self._owner
        if owner is not None and owner._modules.get(self.ATTR) is self:
            del owner._modules[self.ATTR]
        object.__setattr__(self, "_owner", None)

    # --- forward ---------------------------------------------------------------------------
    def _running(self) -> list[BottleneckAdapter]:
        return [] if self.disabled else [self.adapters[n] for n in self.active]

    def _on_input(self, module, args, kwargs):
        if any(a.parallel for a in self._running()):
            self._branch_input = _first_tensor(args, kwargs)

    def _on_output(self, module, args, kwargs, output):
        running = self._running()
        if not running:
            return None
        x = None
        if any(a.parallel for a in running):
            if self._input_module is module:
                x = _first_tensor(args, kwargs)
            else:
                x, self._branch_input = self._branch_input, None  # do not keep activations alive
                if x is None:
                    raise RuntimeError("parallel adapter: the block's input module did not run before its output")
        if isinstance(output, torch.Tensor):
            return self(output, x)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self(output[0], x),) + tuple(output[1:])
        raise TypeError(
            f"bottleneck adapters transform a tensor or a tuple starting with one; "
            f"{type(module).__name__} returned {type(output).__name__}"
        )

    def forward(self, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """New hidden states ``[..., hidden]`` from the owner's output ``h`` and block input ``x``."""
        running = self._running()
        par = [a for a in running if a.parallel]
        if par:
            if x is None:
                raise ValueError("parallel adapters are active: pass the block input x")
            z, total = x, None
            for a in par:
                d = a(z)
                z = z + d
                total = d if total is None else total + d  # = z - x, exact for one adapter
            h = h + total
        for a in running:
            if not a.parallel:
                h = h + a(h)
        return h

    def extra_repr(self) -> str:
        return f"active={self.active}, disabled={self.disabled}"
