"""Feature distillation: hidden-state and attention-map losses, and student-to-teacher layer maps.

Shapes follow transformers' outputs: a hidden state is ``[B, T, D]`` (any leading dims work), an
attention map is ``[B, H, T, T]`` of probabilities (rows sum to 1 over the keys), a padding mask
is ``[B, T]`` with 1/True on real tokens (``attention_mask`` as the tokenizer returns it).

* ``HiddenStateLoss``: MSE or cosine distance between a student layer's output and a teacher
  layer's, through a learned ``Linear(student_dim, teacher_dim)`` when the widths differ
  (TinyBERT's ``W_h``; FitNets' regressor).
* ``attention_transfer_loss``: MSE (TinyBERT) or KL (MiniLM) between attention maps.
* ``uniform_layer_map``: which teacher layer each student layer learns from (TinyBERT's uniform
  "skip" mapping, or the first / last teacher layers).

Teacher tensors are targets: like ``distill_kl``, these losses refuse a teacher tensor that
requires grad (compute the teacher under ``torch.no_grad()`` or pass ``.detach()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_LOSSES = ("mse", "cosine")
ATTENTION_LOSSES = ("mse", "kl")
HEAD_MODES = ("auto", "match", "mean")
LAYER_STRATEGIES = ("skip", "first", "last")

# Probabilities below this are treated as this in the attention KL's logarithms, so that a zero
# (a masked key) gives 0 · log(eps) = 0 and not NaN.
_KL_EPS = 1e-12


def _check_tensor(name, x, min_dim=1):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")


def _check_teacher(name, x):
    if x.requires_grad:
        raise ValueError(f"{name} requires grad; the teacher is fixed here: compute it under torch.no_grad() or pass .detach()")


def _bool_mask(mask, shape, what):
    """``mask`` (bool or integer, 1/True = keep) as a bool tensor of ``shape``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool or integer tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be a bool or integer tensor (1/True = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)} ({what}), got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _float(x):
    """Half-precision inputs are reduced in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class HiddenStateLoss(nn.Module):
    """Distance between a student hidden state and a teacher hidden state, averaged over tokens.

    Args:
        student_dim, teacher_dim: widths ``Ds`` and ``Dt`` of the two hidden states.
        loss: ``"mse"``: mean over kept tokens and the ``Dt`` features of ``(W s - t)²`` (equal to
            ``F.mse_loss`` without a mask); ``"cosine"``: mean over kept tokens of
            ``1 - cos(W s, t)``.
        project: None (the default) adds a learned ``Linear(Ds, Dt)`` only when the widths differ;
            True always adds one; False never does (then the widths must be equal).

    ``forward(student, teacher, mask=None)``: ``student`` ``[..., Ds]``, ``teacher`` ``[..., Dt]``
    with the same leading dims, ``mask`` ``[...]`` (bool or 0/1 integers, 1 = keep) leaves out
    padding.  Returns a scalar (float32 for half-precision inputs); 0 when every token is masked.
    The projection's parameters belong to the loss module: optimize them with the student.
    """

    def __init__(self, student_dim: int, teacher_dim: int, loss: str = "mse", project: bool | None = None):
        super().__init__()
        for name, d in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"{name} must be a positive int, got {d!r}")
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"loss must be one of {HIDDEN_LOSSES}, got {loss!r}")
        if project not in (None, True, False):
            raise ValueError(f"project must be None, True or False, got {project!r}")
        if project is False and student_dim != teacher_dim:
            raise ValueError(
                f"student_dim {student_dim} != teacher_dim {teacher_dim} needs a projection; "
                "use project=None or project=True"
            )
        self.student_dim, self.teacher_dim, self.loss = student_dim, teacher_dim, loss
        want = student_dim != teacher_dim if project is None else project
        self.proj = nn.Linear(student_dim, teacher_dim) if want else None

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, loss={self.loss!r}"

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_tensor("student hidden state", student)
        _check_tensor("teacher hidden state", teacher)
        _check_teacher("teacher hidden state", teacher)
        if student.shape[-1] != self.student_dim:
            raise ValueError(f"student hidden state must be [..., {self.student_dim}], got shape {tuple(student.shape)}")
        if teacher.shape[-1] != self.teacher_dim:
            raise ValueError(f"teacher hidden state must be [..., {self.teacher_dim}], got shape {tuple(teacher.shape)}")
        if student.shape[:-1] != teacher.shape[:-1]:
            raise ValueError(
                f"student and teacher hidden states must agree on all but the last dim, got "
                f"{tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        s = self.proj(student) if self.proj is not None else student
        s, t = _float(s), _float(teacher).to(_float(s).dtype)
        if self.loss == "mse":
            per_token = (s - t).pow(2).mean(-1)
        else:
            per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
        if mask is None:
            return per_token.mean()
        keep = _bool_mask(mask, per_token.shape, "the hidden states' leading dims").to(per_token.device)
        return (per_token * keep).sum() / keep.sum().clamp_min(1)


def attention_transfer_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None,
                            loss: str = "mse", heads: str = "auto") -> torch.Tensor:
    """Attention-map transfer between one student layer and one teacher layer.

    Args:
        student_attn: ``[B, Hs, T, T]`` attention probabilities (what transformers returns with
            ``output_attentions=True``; needs ``attn_implementation="eager"``).
        teacher_attn: ``[B, Ht, T, T]``, no grad.
        mask: ``[B, T]`` padding mask (bool or 0/1, 1 = real token): only real queries and real
            keys count.
        loss: ``"mse"``: mean over kept (head, query, key) entries of ``(s - t)²`` (TinyBERT, which
            uses the maps of the same layer pair); ``"kl"``: ``KL(t ‖ s)`` summed over kept keys,
            mean over kept (head, query) rows (MiniLM's self-attention distribution transfer).
        heads: ``"match"`` compares head h with head h (needs ``Hs == Ht``); ``"mean"`` averages
            the maps over heads on each side first (an average of attention distributions is still
            one, so the KL stays well defined); ``"auto"`` (default) matches when the counts are
            equal and averages otherwise.  Heads have no order across models, so matching only
            makes sense for a student initialized from the teacher's layers.

    Returns a scalar (float32 for half-precision inputs): 0 for identical maps, positive otherwise;
    0 when every token is masked.
    """
    _check_tensor("student_attn", student_attn, 4)
    _check_tensor("teacher_attn", teacher_attn, 4)
    _check_teacher("teacher_attn", teacher_attn)
    if loss not in ATTENTION_LOSSES:
        raise ValueError(f"loss must be one of {ATTENTION_LOSSES}, got {loss!r}")
    if heads not in HEAD_MODES:
        raise ValueError(f"heads must be one of {HEAD_MODES}, got {heads!r}")
    for name, a in (("student_attn", student_attn), ("teacher_attn", teacher_attn)):
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"{name} must be [B, H, T, T], got shape {tuple(a.shape)}")
    (b, hs, t, _), ht = student_attn.shape, teacher_attn.shape[1]
    if teacher_attn.shape[0] != b or teacher_attn.shape[-1] != t:
        raise ValueError(
            f"student_attn {tuple(student_attn.shape)} and teacher_attn {tuple(teacher_attn.shape)} must agree "
            "on batch and sequence length ([B, H, T, T])"
        )
    mode = ("match" if hs == ht else "mean") if heads == "auto" else heads
    if mode == "match" and hs != ht:
        raise ValueError(f"heads='match' needs equal head counts, got student {hs} and teacher {ht}; use heads='mean'")
    s, tt = _float(student_attn), _float(teacher_attn).to(_float(student_attn).dtype)
    if mode == "mean":
        s, tt = s.mean(1, keepdim=True), tt.mean(1, keepdim=True)
    h = s.shape[1]
    if mask is None:
        keep_q = keep_k = None
    else:
        m = _bool_mask(mask, (b, t), "[B, T], 1 = real token").to(s.device)
        keep_q, keep_k = m[:, None, :, None], m[:, None, None, :]
    if loss == "mse":
        sq = (s - tt).pow(2)
        if keep_q is None:
            return sq.mean()
        entries = keep_q & keep_k  # [B, 1, T, T]
        return (sq * entries).sum() / (entries.sum() * h).clamp_min(1)
    # KL(t || s) per query row; clamping both logs at the same eps keeps identical maps at exactly 0.
    kl = tt * (tt.clamp_min(_KL_EPS).log() - s.clamp_min(_KL_EPS).log())
    if keep_k is not None:
        kl = kl * keep_k
    rows = kl.sum(-1)  # [B, h, T]
    if keep_q is None:
        return rows.mean()
    q = keep_q[..., 0]  # [B, 1, T]
    return (rows * q).sum() / (q.sum() * h).clamp_min(1)


def uniform_layer_map(student_layers: int, teacher_layers: int, strategy: str = "skip") -> list[tuple[int, int]]:
    """``[(student layer, teacher layer), ...]``, 0-based, one pair per student layer.

    * ``"skip"`` (default): student layer ``i`` learns from teacher layer
      ``round((i + 1) · Lt / Ls) - 1`` (halves round up): TinyBERT's uniform mapping ``g(m) = m·N/M``,
      spread over the whole teacher and always ending at its last layer.  6 → 2 gives
      ``[(0, 2), (1, 5)]``; 12 → 4 gives ``[(0, 2), (1, 5), (2, 8), (3, 11)]``.
    * ``"first"``: teacher layer ``i``; ``"last"``: teacher layer ``Lt - Ls + i``.

    The same indices pick the layers to copy when a student is initialized from its teacher
    (``shrink_encoder``).  A layer's output is ``hidden_states[i + 1]`` in transformers' outputs
    (``hidden_states[0]`` is the embeddings) and its attention map ``attentions[i]``.
    """
    for name, n in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if student_layers > teacher_layers:
        raise ValueError(f"student_layers ({student_layers}) must not exceed teacher_layers ({teacher_layers})")
    if strategy not in LAYER_STRATEGIES:
        raise ValueError(f"strategy must be one of {LAYER_STRATEGIES}, got {strategy!r}")
    ls, lt = student_layers, teacher_layers
    if strategy == "first":
        return [(i, i) for i in range(ls)]
    if strategy == "last":
        return [(i, lt - ls + i) for i in range(ls)]
    # round-half-up of (i+1)·lt/ls in integers (Python's round() would round halves to even)
    return [(i, (2 * (i + 1) * lt + ls) // (2 * ls) - 1) for i in range(ls)]
