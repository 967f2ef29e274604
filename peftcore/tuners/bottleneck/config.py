"""Configurations of residual bottleneck adapters and of Compacter / Compacter++.

Values that depend on the model (the hidden size, hence the bottleneck width and whether
``phm_dim`` divides it) are checked when the config is applied; everything else here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...backends import BACKENDS
from .. import _validate as V

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
# Accepted spellings -> canonical name (AdapterHub says "swish" and "leakyrelu").
NON_LINEARITIES = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "silu": "silu",
    "swish": "silu",
    "tanh": "tanh",
    "leaky_relu": "leaky_relu",
    "leakyrelu": "leaky_relu",
    "identity": "identity",
}
W_INITS = ("glorot-uniform", "glorot-normal", "normal")
C_INITS = ("normal", "uniform")


@dataclass
class BottleneckConfig:
    """Residual bottleneck adapters: ``h ← h + scaling · dropout(up(act(down(h))))``.

    ``down`` is ``[hidden → b]``, ``up`` ``[b → hidden]`` with ``b = hidden // reduction_factor``;
    ``up`` starts at zero so an untrained adapter is the identity.

    Args:
        placement: ``"houlsby"`` (after the attention block and after the feed-forward block of
            every layer), ``"pfeiffer"`` (after the feed-forward block only) or ``"parallel"``
            (a branch on the feed-forward block's input, added to its output; He et al. 2021).
        reduction_factor: hidden size / bottleneck width (> 0; a factor below 1 widens).
        non_linearity: one of relu, gelu, gelu_new, silu (or swish), tanh, leaky_relu, identity.
        scaling: factor on the adapter's output before it is added.
        dropout: dropout probability on the adapter's output (AdapterHub's placement), in [0, 1).
        leave_out: indices of the transformer layers (from 0) that get no adapter.
        attn_output_modules / ffn_output_modules / ffn_input_modules: where the adapters go, in
            ``target_modules`` form (regex string or list of names / dotted suffixes), overriding
            the built-in map of the model type; needed for model types without one.  The adapter
            transforms the output of the ``*_output`` modules (a tensor or a tuple whose first
            element is the hidden states); the parallel branch reads the input of
            ``ffn_input_modules``.
        init_range: std of the normal init of ``down.weight`` (AdapterHub's "bert" init, 0.02);
            ``up`` and both biases start at zero.
    """

    placement: str = "houlsby"
    reduction_factor: int | float = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    leave_out: list = field(default_factory=list)
    attn_output_modules: str | list | None = None
    ffn_output_modules: str | list | None = None
    ffn_input_modules: str | list | None = None
    init_range: float = 0.02

    def __post_init__(self):
        cls = type(self).__name__
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise ValueError(f"{cls}.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        # A factor below 1 widens; one below 1/1024 (or above 2**31) is no adapter anybody means.
        V.number(cls, "reduction_factor", self.reduction_factor, lo=2**-10, hi=V.INT_MAX,
                 expect="a positive number >= 1/1024")
        nl = self.non_linearity.lower() if isinstance(self.non_linearity, str) else None
        if nl not in NON_LINEARITIES:
            raise ValueError(
                f"{cls}.non_linearity must be one of {sorted(NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        self.non_linearity = NON_LINEARITIES[nl]
        V.number(cls, "scaling", self.scaling, lo=-V.FLOAT_MAX, hi=V.FLOAT_MAX,
                 expect=f"a number of magnitude at most {V.FLOAT_MAX:g}")
        V.number(cls, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True, expect="in [0, 1)")
        leave = self.leave_out
        if not isinstance(leave, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= V.INT_MAX for i in leave
        ):
            raise ValueError(f"{cls}.leave_out must be a list of layer indices (ints >= 0), got {self.leave_out!r}")
        self.leave_out = list(leave)
        for name in ("attn_output_modules", "ffn_output_modules", "ffn_input_modules"):
            setattr(self, name, V.names_or_regex(cls, name, getattr(self, name), allow_empty=False))
        V.number(cls, "init_range", self.init_range, lo=0, hi=V.FLOAT_MAX, expect="a number >= 0")

    @property
    def phm(self) -> bool:
        """Whether down and up are PHM layers (Compacter)."""
        return False

    def bottleneck_width(self, hidden: int) -> int:
        """``hidden // reduction_factor``, with a clear error when it is below 1."""
        b = int(hidden // self.reduction_factor)
        if b < 1:
            raise ValueError(
                f"{type(self).__name__}.reduction_factor={self.reduction_factor} is too large for hidden size "
                f"{hidden}: the bottleneck width {hidden} // {self.reduction_factor} = {b} must be >= 1"
            )
        return b


@dataclass
class CompacterConfig(BottleneckConfig):
    """Compacter (Mahabadi et al. 2021): bottleneck adapters whose down and up projections are PHM
    layers, ``y = x H + b`` with ``H = Σᵢ kron(rule[i], W_left[i] @ W_right[i])``.

    Defaults are AdapterHub's ``CompacterConfig`` (Houlsby placement, reduction factor 32, gelu,
    phm_dim 4, one rule per adapter shared by all its layers and by down and up, W factorized with
    rank 1, rule ~ N(0, 1e-4)).  The rule is ``[n, n, n]``, W_left ``[n, in/n, rank]`` and W_right
    ``[n, rank, out/n]``; ``phm_dim`` must divide the hidden size and the bottleneck width.

    Args (beyond :class:`BottleneckConfig`):
        phm_dim: n, the number of Kronecker summands and of blocks per width.
        shared_phm_rule: one rule per adapter for all layers (else one per PHM layer).
        factorized_phm_W: W_i = W_left[i] @ W_right[i] of rank ``phm_rank`` (else W ``[n, in/n, out/n]``).
        phm_rank: rank of the factorized W.
        phm_init_range: std of the rule's normal init.
        phm_c_init: rule init, ``"normal"`` (std phm_init_range) or ``"uniform"`` (on [-1, 1]).
        hypercomplex_nonlinearity: W init, ``"glorot-uniform"``, ``"glorot-normal"`` or ``"normal"``
            (std phm_init_range).
        phm_bias: down and up have a bias.
        learn_phm: the rule is trained (else kept fixed, still saved with the adapter).
        backend: ops backend of :func:`peftcore.ops.phm_linear` (None: the registry's choice).
    """

    reduction_factor: int | float = 32
    non_linearity: str = "gelu"
    phm_dim: int = 4
    shared_phm_rule: bool = True
    factorized_phm_W: bool = True
    phm_rank: int = 1
    phm_init_range: float = 1e-4
    phm_c_init: str = "normal"
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_bias: bool = True
    learn_phm: bool = True
    backend: str | None = None

    def __post_init__(self):
        super().__post_init__()
        cls = type(self).__name__
        for name in ("phm_dim", "phm_rank"):
            V.integer(cls, name, getattr(self, name))
        for name in ("shared_phm_rule", "factorized_phm_W", "phm_bias", "learn_phm"):
            V.boolean(cls, name, getattr(self, name))
        V.number(cls, "phm_init_range", self.phm_init_range, lo=0, hi=V.FLOAT_MAX, expect="a number >= 0")
        V.choice(cls, "phm_c_init", self.phm_c_init, C_INITS)
        V.choice(cls, "hypercomplex_nonlinearity", self.hypercomplex_nonlinearity, W_INITS)
        V.choice(cls, "backend", self.backend, BACKENDS, optional=True)

    @property
    def phm(self) -> bool:
        return True


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: :class:`CompacterConfig` in the Pfeiffer placement (after the feed-forward
    block only), as AdapterHub's ``CompacterPlusPlusConfig``."""

    placement: str = "pfeiffer"
