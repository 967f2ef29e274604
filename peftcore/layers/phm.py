"""PHM layers (Compacter's projections) and the host of the rules shared across layers.

A PHM layer computes ``y = x H + b`` with ``H = Σᵢ kron(rule[i], W_left[i] @ W_right[i])`` through
:func:`peftcore.ops.phm_linear`, which never forms H.  Compacter shares one rule ``[n, n, n]``
per adapter across all its layers and between down and up (AdapterHub's ``shared_phm_rule``);
that rule lives once in a :class:`PHMRuleBank` attached to the model root, so it is one parameter,
trained, counted and saved once, and the layers only keep a reference to the bank.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.phm import check_phm_shapes, phm_linear
from .base import AdapterHost, check_active

W_INITS = ("glorot-uniform", "glorot-normal", "normal")
C_INITS = ("normal", "uniform")


@torch.no_grad()
def init_rule(rule: torch.Tensor, c_init: str = "normal", init_range: float = 1e-4) -> None:
    """AdapterHub's shared-rule init: normal(0, init_range) or uniform(-1, 1)."""
    if c_init == "normal":
        rule.normal_(0.0, init_range)
    elif c_init == "uniform":
        rule.uniform_(-1.0, 1.0)
    else:
        raise ValueError(f"phm_c_init must be one of {C_INITS}, got {c_init!r}")


class PHMLinear(nn.Module):
    """``x [..., in] → [..., out]``: a PHM (parameterized hypercomplex) linear layer.

    Args:
        in_features, out_features: widths; ``phm_dim`` must divide both.
        phm_dim: n.
        rank: rank k of the factorized weights W_left ``[n, in/n, k]``, W_right ``[n, k, out/n]``.
        factorized: False stores W ``[n, in/n, out/n]`` instead of the two factors.
        bias: add a bias ``[out]``.
        rule: ``"own"`` gives the layer its rule ``[n, n, n]`` (a parameter, or a buffer when
            ``learn_rule`` is False); ``"shared"`` reads it from a :class:`PHMRuleBank` set
            with :meth:`share_rule`.
        backend: ops backend for :func:`peftcore.ops.phm_linear` (None: the registry's choice).
    """

    def __init__(self, in_features: int, out_features: int, phm_dim: int, rank: int = 1,
                 factorized: bool = True, bias: bool = True, rule: str = "own", learn_rule: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        check_phm_shapes(in_features, out_features, phm_dim)
        if rule not in ("own", "shared"):
            raise ValueError(f"rule must be 'own' or 'shared', got {rule!r}")
        n, p, q = phm_dim, in_features // phm_dim, out_features // phm_dim
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.phm_dim, self.rank = in_features, out_features, n, rank
        self.factorized, self.backend = factorized, backend
        if factorized:
            self.w_left = nn.Parameter(torch.empty(n, p, rank, **kw))
            self.w_right = nn.Parameter(torch.empty(n, rank, q, **kw))
        else:
            self.weight = nn.Parameter(torch.empty(n, p, q, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if rule == "own":
            t = torch.empty(n, n, n, **kw)
            if learn_rule:
                self.rule = nn.Parameter(t)
            else:
                self.register_buffer("rule", t)
        # (bank, adapter name); a plain tuple, so the bank is not registered a second time here.
        self._rule_ref = None

    def share_rule(self, bank: PHMRuleBank, name: str) -> None:
        """Read the rule of adapter ``name`` from ``bank`` (instead of holding one)."""
        if "rule" in self._parameters or "rule" in self._buffers:
            raise ValueError("this PHMLinear holds its own rule (built with rule='own')")
        self._rule_ref = (bank, name)

    def current_rule(self) -> torch.Tensor:
        """The rule ``[n, n, n]`` in use (own or shared)."""
        if self._rule_ref is not None:
            bank, name = self._rule_ref
            return bank.rule(name)
        if "rule" in self._parameters:
            return self._parameters["rule"]
        if "rule" in self._buffers:  # a fixed rule: never a path for gradients
            return self._buffers["rule"].detach()
        raise RuntimeError("PHMLinear built with rule='shared' has no rule yet: call share_rule(bank, name)")

    @torch.no_grad()
    def reset_parameters(self, w_init: str = "glorot-uniform", init_range: float = 1e-4,
                         c_init: str = "normal", zero_out: bool = False) -> None:
        """AdapterHub's init: each W_left[i], W_right[i] (or W[i]) glorot or normal(0, init_range),
        bias zero, an own rule by ``c_init``; ``zero_out`` zeroes W_right (or W) so H = 0."""
        if w_init not in W_INITS:
            raise ValueError(f"hypercomplex_nonlinearity must be one of {W_INITS}, got {w_init!r}")
        mats = [self.w_left, self.w_right] if self.factorized else [self.weight]
        for w in mats:
            for i in range(self.phm_dim):
                if w_init == "glorot-uniform":
                    nn.init.xavier_uniform_(w[i])
                elif w_init == "glorot-normal":
                    nn.init.xavier_normal_(w[i])
                else:
                    w[i].normal_(0.0, init_range)
        if zero_out:
            mats[-1].zero_()
        if self.bias is not None:
            self.bias.zero_()
        if "rule" in self._parameters or "rule" in self._buffers:
            init_rule(self.rule, c_init, init_range)

    def _factors(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.factorized:
            return self.w_left.to(dtype), self.w_right.to(dtype)
        # Unfactorized W: pair it with an identity on its narrower side, so the same op runs with
        # rank min(in/n, out/n) instead of building H.
        w = self.weight.to(dtype)
        n, p, q = w.shape
        if p <= q:
            return torch.eye(p, dtype=dtype, device=w.device).expand(n, p, p), w
        return w, torch.eye(q, dtype=dtype, device=w.device).expand(n, q, q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rule = self.current_rule()
        w_left, w_right = self._factors(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return phm_linear(x, rule.to(x.dtype), w_left, w_right, bias, backend=self.backend)

    def extra_repr(self) -> str:
        shared = "shared" if self._rule_ref is not None else "own"
        return (f"in={self.in_features}, out={self.out_features}, phm_dim={self.phm_dim}, rank={self.rank}, "
                f"factorized={self.factorized}, bias={self.bias is not None}, rule={shared}")


class PHMRuleBank(AdapterHost, nn.Module):
    """The shared PHM rules ``[n, n, n]`` of Compacter adapters, one per adapter name.

    Attached to the model root (attribute :attr:`ATTR`); ``adapter_tensors(name)`` is
    ``{"rule": rule}``, so a saved adapter writes its rule once.  A rule that is not learned
    (``learn_phm=False``) is a buffer: saved and loaded with the adapter, never trained.
    """

    ATTR = "phm_rules"

    def __init__(self):
        super().__init__()
        self.active: list[str] = []
        self.disabled = False
        self._names: list[str] = []

    @staticmethod
    def _key(name: str) -> str:
        return f"rule_{name}"

    @classmethod
    def of(cls, root: nn.Module, create: bool = False) -> PHMRuleBank | None:
        """The bank attached to ``root`` (created and attached when ``create``)."""
        bank = root._modules.get(cls.ATTR)
        if bank is None and hasattr(root, cls.ATTR):
            raise ValueError(f"{type(root).__name__} already has an attribute {cls.ATTR!r} that is not a PHMRuleBank")
        if bank is not None and not isinstance(bank, cls):
            raise ValueError(f"{type(root).__name__}.{cls.ATTR} is a {type(bank).__name__}, not a PHMRuleBank")
        if bank is None and create:
            bank = cls()
            root.add_module(cls.ATTR, bank)
            # A plain attribute (not a submodule: that would be a cycle): where to detach from.
            object.__setattr__(bank, "_root", root)
        return bank

    def add_rule(self, name: str, phm_dim: int, learn: bool = True, c_init: str = "normal",
                 init_range: float = 1e-4, device=None, dtype=None) -> torch.Tensor:
        """Create and initialize the rule ``[phm_dim]*3`` of adapter ``name``."""
        if name in self._names:
            raise ValueError(f"a PHM rule for adapter {name!r} already exists")
        t = torch.empty(phm_dim, phm_dim, phm_dim, device=device, dtype=dtype)
        init_rule(t, c_init, init_range)
        if learn:
            self.register_parameter(self._key(name), nn.Parameter(t))
        else:
            self.register_buffer(self._key(name), t)
        self._names.append(name)
        return self.rule(name)

    def rule(self, name: str) -> torch.Tensor:
        """The rule ``[n, n, n]`` of adapter ``name`` (detached when it is not learned)."""
        key = self._key(name)
        if key in self._parameters:
            return self._parameters[key]
        if key in self._buffers:
            return self._buffers[key].detach()
        raise KeyError(f"no PHM rule for adapter {name!r} (has {sorted(self._names)})")

    # --- AdapterHost -----------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self._names)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        key = self._key(name)
        t = self._parameters.get(key)
        if t is None:
            t = self._buffers.get(key)
        if t is None:
            raise KeyError(f"no PHM rule for adapter {name!r} (has {sorted(self._names)})")
        return {"rule": t}

    def set_active(self, spec) -> None:
        self.active = check_active(self, spec)

    def delete_adapter(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(f"no PHM rule for adapter {name!r} (has {sorted(self._names)})")
        key = self._key(name)
        self._parameters.pop(key, None)
        self._buffers.pop(key, None)
        self._names.remove(name)
        self.active = [n for n in self.active if n != name]

    def detach_from(self, model: nn.Module | None = None, path: str | None = None) -> None:
        """Once empty: leave the model root."""
        if self._names:
            raise RuntimeError(f"bank still holds rules for {self._names}: delete them first")
        root = self.__dict__.get("_root")
        if root is not None and root._modules.get(self.ATTR) is self:
            del root._modules[self.ATTR]
        object.__setattr__(self, "_root", None)

    def extra_repr(self) -> str:
        return f"rules={self._names}"
