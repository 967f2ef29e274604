"""Regularizers that keep a fine-tuned model near its pre-trained starting point.

* :class:`L2SP` (Li et al., ICML 2018, "Explicit inductive bias for transfer learning with
  convolutional networks"): ``0.5·α·Σ‖w − w₀‖² + 0.5·β·Σ‖w_new‖²``, added to the task loss.
* :func:`r_drop_loss` (Liang et al., NeurIPS 2021, "R-Drop"): the symmetric KL between the
  predictions of two dropout passes over the same batch, used as ``ce + α · r_drop_loss(a, b)``.
* :class:`Mixout` / :func:`apply_mixout` / :func:`remove_mixout` (Lee et al., ICLR 2020, "Mixout:
  effective regularization to finetune large-scale pretrained language models"): dropout that
  falls back to the pre-trained weight instead of to zero, for full fine-tuning.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["L2SP", "r_drop_loss", "Mixout", "apply_mixout", "remove_mixout"]


def _check_weight(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# --- L2-SP ------------------------------------------------------------------------------------------
class L2SP:
    """L2-SP penalty toward the pre-trained weights (Li et al. 2018).

    ``penalty() = 0.5·alpha·Σ_pre ‖w − w₀‖² + 0.5·beta·Σ_new ‖w‖²``

    Args:
        model: the model about to be fine-tuned, holding its pre-trained weights now.
        alpha: weight (>= 0) of the pull toward w₀ on the pre-trained parameters.
        beta: weight (>= 0) of the plain weight decay on the new parameters (those that have no
            pre-trained value, e.g. a freshly initialised head).
        new_params: which parameters are new: an iterable of the model's parameters, a predicate
            ``f(name) -> bool`` on qualified parameter names, or a regex searched in those names
            (``r"^classifier\\."``).  None: every parameter is pre-trained.

    w₀ is a detached copy of **every** pre-trained parameter, frozen or not, taken at construction:
    a parameter unfrozen later (gradual unfreezing, ``freeze_to``) is then pulled toward its own
    pre-trained value, which a snapshot of the trainable-at-construction ones would miss.  The cost
    is one extra copy of the pre-trained parameters, in their own dtype and device (about 91 MB for
    the fp32 all-MiniLM-L6-v2); to save it, freeze nothing you will not unfreeze... or pass a model
    whose untouched parts are left out.  Parameters created after construction are not covered.

    ``penalty()`` sums over the covered parameters that require a gradient at the time of the call:
    a frozen one gets no gradient from the penalty and, not being trained, still equals its w₀, so
    leaving it out changes no training step and saves its arithmetic.  ``penalty(trainable_only=
    False)`` sums over all of them.  The squares are accumulated in fp32 whatever the parameters'
    dtype; the result is a 0-dim fp32 tensor, differentiable w.r.t. the parameters.

    Usage::

        reg = L2SP(model, alpha=0.01, beta=0.01, new_params=model.classifier.parameters())
        loss = F.cross_entropy(model(x), y) + reg.penalty()
    """

    def __init__(self, model: nn.Module, alpha: float = 0.01, beta: float = 0.01,
                 new_params: Iterable[nn.Parameter] | Callable[[str], bool] | str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.alpha = _check_weight(alpha, "alpha")
        self.beta = _check_weight(beta, "beta")
        named = list(model.named_parameters())  # deduplicated: a tied weight is counted once
        is_new = self._new_selector(named, new_params)
        pre, new = [], []
        with torch.no_grad():
            for name, p in named:
                if is_new(name, p):
                    new.append((name, p))
                else:
                    pre.append((name, p, p.detach().clone()))
        self._pre = pre
        self._new = new

    @staticmethod
    def _new_selector(named, new_params):
        if new_params is None:
            return lambda name, p: False
        if isinstance(new_params, str):
            try:
                pattern = re.compile(new_params)
            except re.error as e:
                raise ValueError(f"new_params: {new_params!r} is not a valid regex ({e})") from None
            return lambda name, p: pattern.search(name) is not None
        if callable(new_params) and not isinstance(new_params, nn.Parameter):
            return lambda name, p: bool(new_params(name))
        try:
            chosen = list(new_params)
        except TypeError:
            raise TypeError("new_params must be None, an iterable of the model's parameters, a predicate "
                            f"on parameter names or a regex string, got {type(new_params).__name__}") from None
        ids = {id(p) for _, p in named}
        for p in chosen:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"new_params must hold parameters (tensors), got a {type(p).__name__}")
            if id(p) not in ids:
                raise ValueError(f"new_params holds a tensor of shape {tuple(p.shape)} that is not a "
                                 "parameter of model")
        wanted = {id(p) for p in chosen}
        return lambda name, p: id(p) in wanted

    @property
    def pretrained_names(self) -> list[str]:
        """Qualified names of the parameters pulled toward w₀."""
        return [n for n, _, _ in self._pre]

    @property
    def new_names(self) -> list[str]:
        """Qualified names of the parameters pulled toward 0."""
        return [n for n, _ in self._new]

    def penalty(self, trainable_only: bool = True) -> torch.Tensor:
        """The penalty, a 0-dim fp32 tensor (see the class docstring)."""
        device = None
        pre_sq, new_sq = [], []
        if self.alpha:
            for i, (name, p, w0) in enumerate(self._pre):
                if trainable_only and not p.requires_grad:
                    continue
                if w0.device != p.device:  # the model moved: move the snapshot once, not every step
                    w0 = w0.to(p.device)
                    self._pre[i] = (name, p, w0)
                pre_sq.append((p.float() - w0.float()).pow(2).sum())
                device = p.device
        if self.beta:
            for _, p in self._new:
                if trainable_only and not p.requires_grad:
                    continue
                new_sq.append(p.float().pow(2).sum())
                device = p.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        if pre_sq:
            total = total + 0.5 * self.alpha * torch.stack([t.to(total.device) for t in pre_sq]).sum()
        if new_sq:
            total = total + 0.5 * self.beta * torch.stack([t.to(total.device) for t in new_sq]).sum()
        return total

    __call__ = penalty

    def __repr__(self):
        return (f"L2SP(alpha={self.alpha:g}, beta={self.beta:g}, pretrained={len(self._pre)} tensors, "
                f"new={len(self._new)} tensors)")


# --- R-Drop -----------------------------------------------------------------------------------------
def r_drop_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, *, mask: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
    """R-Drop's consistency loss: ``(KL(p‖q) + KL(q‖p)) / 2`` with ``p = softmax(logits_a)``,
    ``q = softmax(logits_b)``, summed over the classes.

    Args:
        logits_a, logits_b: ``[..., C]``, the same shape, floating point: the logits of two forward
            passes over the same batch with dropout on.  Both get gradients.
        mask: optional bool ``[...]`` (the leading dims); False rows (padding) are left out.
        reduction: ``"mean"`` over the (unmasked) rows, ``"sum"`` over them, or ``"none"`` for the
            per-row losses ``[...]`` (0 where masked).

    Computed from ``log_softmax`` in fp32 as ``0.5·Σ_c (p − q)(log p − log q)`` (the same sum,
    every term >= 0, so the result is never negative).  Symmetric in its inputs and 0 for equal
    ones.  Returns an fp32 tensor; a mean over zero unmasked rows is 0.

    Usage (the model in train mode, so the two passes draw different dropout masks)::

        a, b = model(x), model(x)
        loss = 0.5 * (F.cross_entropy(a, y) + F.cross_entropy(b, y)) + alpha * r_drop_loss(a, b)
    """
    for name, t in (("logits_a", logits_a), ("logits_b", logits_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.dim() < 1 or t.shape[-1] < 1:
            raise ValueError(f"{name} must be [..., C] with C >= 1, got shape {tuple(t.shape)}")
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits_a and logits_b must have the same shape, got {tuple(logits_a.shape)} "
                         f"and {tuple(logits_b.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    lead = logits_a.shape[:-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != lead:
            raise ValueError(f"mask must have the logits' leading shape {tuple(lead)}, got {tuple(mask.shape)}")
    la = F.log_softmax(logits_a.float(), dim=-1)
    lb = F.log_softmax(logits_b.float(), dim=-1)
    diff = la - lb
    # (p - q)(log p - log q) is >= 0 term by term; where both p and q are 0 (a -inf logit in both)
    # the log difference is NaN, and the term is 0
    terms = (la.exp() - lb.exp()) * diff
    terms = torch.where(torch.isneginf(la) & torch.isneginf(lb), torch.zeros_like(terms), terms)
    rows = 0.5 * terms.sum(dim=-1)
    if mask is not None:
        rows = torch.where(mask.to(rows.device), rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.numel() if mask is None else int(mask.sum())
    return total / max(count, 1)


# --- Mixout -----------------------------------------------------------------------------------------
def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    return float(p)


class Mixout(nn.Linear):
    """An ``nn.Linear`` whose weight, in training, is mixed out toward a target ``u`` (Lee et al. 2020):

    ``mixout(w; u, p) = (M⊙w + (1 − M)⊙u − p·u) / (1 − p) = u + M⊙(w − u) / (1 − p)``,
    ``M ~ Bernoulli(1 − p)`` elementwise, a fresh mask every forward, so ``E[mixout(w)] = w``; the
    gradient reaches ``w`` only through ``M / (1 − p)``.  The bias is not mixed (as in the paper's
    code).  In eval mode, with ``p == 0`` or while the weight is frozen, it is exactly the plain linear.

    Args:
        linear: the plain ``nn.Linear`` to wrap; its ``weight`` and ``bias`` Parameter objects are
            reused (an optimizer holding them keeps working, and the state dict keys stay
            ``weight``/``bias``, loadable into the plain model).
        p: the mixing probability, in [0, 1).
        target: ``u``, ``[out, in]``; default a detached copy of the weight now (the pre-trained
            value).  Kept as a non-persistent buffer: it moves with ``.to()`` and is not saved.
        generator: a ``torch.Generator`` on the weight's device for the masks; None draws from
            torch's global RNG (seed it with ``torch.manual_seed``).

    Shapes: input ``[..., in]`` -> ``[..., out]``.  Prefer :func:`apply_mixout` /
    :func:`remove_mixout`, which swap the layers of a model in place.
    """

    def __init__(self, linear: nn.Linear, p: float = 0.1, *, target: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        if type(linear) is not nn.Linear:
            raise TypeError(f"linear must be a plain torch.nn.Linear, got {type(linear).__name__}")
        p = _check_p(p)
        if target is None:
            target = linear.weight.detach().clone()
        elif not isinstance(target, torch.Tensor) or target.shape != linear.weight.shape:
            raise ValueError(f"target must be a tensor of the weight's shape {tuple(linear.weight.shape)}, "
                             f"got {getattr(target, 'shape', type(target).__name__)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate new parameters
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("target", target.detach().to(linear.weight), persistent=False)
        self.p = p
        self.generator = generator
        self.train(linear.training)

    def mixed_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The weight this forward uses, ``[out, in]``; ``mask`` (bool or 0/1, ``[out, in]``) fixes M
        (for tests and for reproducing a step), otherwise one is drawn."""
        w = self.weight
        if mask is None:
            if not self.training or self.p == 0.0 or not w.requires_grad:
                return w
            keep = torch.full_like(w, 1.0 - self.p)
            mask = torch.bernoulli(keep, generator=self.generator)
        mask = mask.to(w.dtype)
        u = self.target
        return u + mask * (w - u) / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.mixed_weight(), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's (trained) weight and bias Parameters."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta")  # meta: the fresh parameters are replaced at once, never filled
        plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p:g}"


def apply_mixout(model: nn.Module, p: float = 0.1, target_modules=None, *, include_frozen: bool = False,
                 generator: torch.Generator | None = None) -> nn.Module:
    """Swap the model's ``nn.Linear`` layers for :class:`Mixout` ones, in place; returns ``model``.

    Args:
        model: the model to fine-tune (its current weights become the targets ``u``).
        p: mixing probability in [0, 1) (0.1 is a good start for full fine-tuning; the paper
            used 0.7-0.9 on BERT-large for small GLUE tasks with dropout off).
        target_modules: PEFT's rules (a regex full-matched against the module name, or a list of
            names / dotted suffixes); None means every plain ``nn.Linear``.  Only plain ``nn.Linear``
            layers can be selected (TypeError otherwise).
        include_frozen: also wrap linears whose weight is frozen now (they stay plain linears in
            effect until unfrozen, but each keeps a copy of its weight); the default skips them,
            which is right unless you will unfreeze them later (gradual unfreezing).
        generator: one ``torch.Generator`` shared by all the layers' masks, or None for the global RNG.

    Mixout replaces dropout on the weights: the paper also sets the model's dropout to 0; this
    function leaves ``nn.Dropout`` modules alone.  The state dict keys are unchanged; call
    :func:`remove_mixout` to get plain linears back.  Raises ValueError if a selected layer already
    has mixout or if ``target_modules`` selects nothing; the model is unchanged on any error.
    """
    from peftcore.tuners.targets import match_budget, matches

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    p = _check_p(p)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    chosen = []
    with match_budget():
        for name, module in model.named_modules():
            if target_modules is None:
                if type(module) is not nn.Linear:
                    continue
            elif not name or not matches(name, target_modules):
                continue
            if isinstance(module, Mixout):
                raise ValueError(f"apply_mixout: {name!r} already has mixout (call remove_mixout first)")
            if type(module) is not nn.Linear:
                if target_modules is None:
                    continue
                raise TypeError(f"target_modules selects {name!r}, a {type(module).__name__}; mixout "
                                "applies to plain torch.nn.Linear layers only")
            if not include_frozen and not module.weight.requires_grad:
                continue
            chosen.append(name)
    if target_modules is not None and not chosen:
        raise ValueError(f"target_modules={target_modules!r} selects no trainable nn.Linear in the model")
    replacements = [(name, Mixout(model.get_submodule(name), p, generator=generator)) for name in chosen]
    for name, layer in replacements:  # all built first: a failure above leaves the model untouched
        _set_submodule(model, name, layer)
    return model


def remove_mixout(model: nn.Module) -> nn.Module:
    """Replace every :class:`Mixout` layer of ``model`` by a plain ``nn.Linear`` holding the same
    (trained) weight and bias Parameters, in place; returns ``model`` (its state dict keys are the
    original ones)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, Mixout):
        raise ValueError("remove_mixout: model is itself a Mixout layer; use model.to_linear()")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, Mixout)]
    for name, layer in found:
        _set_submodule(model, name, layer.to_linear())
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
