"""``Distiller``: train a student from a fixed teacher on a weighted sum of distillation losses.

    total = w_hard · CE(student logits, labels)
          + w_soft · distill_kl(student logits, teacher logits, T)        (T²-scaled)
          + w_hidden · mean over layer pairs of HiddenStateLoss(student layer, teacher layer)
          + w_attention · mean over layer pairs of attention_transfer_loss(...)

Models are called through forward callables, so both shapes of model work:

* a transformers model with its own head (``...ForSequenceClassification``): the default
  ``hf_forward`` calls ``model(**inputs, output_hidden_states=..., output_attentions=...)`` and
  takes ``.logits``;
* a bare encoder plus a separate head: ``head`` (and ``teacher_head``) map ``(outputs, inputs)``
  to logits, e.g. ``MeanPoolHead(linear)`` over ``last_hidden_state``.

A batch is a mapping of tensors (``input_ids``, ``attention_mask``, ..., and the labels under
``labels_key``); the labels are taken out before the models see it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import distill_kl
from ..losses.distill import check_temperature
from .features import ATTENTION_LOSSES, HIDDEN_LOSSES, HiddenStateLoss, attention_transfer_loss, uniform_layer_map

TERMS = ("hard", "soft", "hidden", "attention")
DEFAULT_WEIGHTS = {"hard": 0.5, "soft": 0.5, "hidden": 0.0, "attention": 0.0}
SCHEDULES = ("linear", "constant")


@dataclass
class DistillOutput:
    """What a forward callable may return: logits ``[..., C]``, hidden states (a tuple, index 0 the
    embeddings, ``i + 1`` layer ``i``'s output) and attention maps (``[B, H, T, T]`` per layer)."""

    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    last_hidden_state: torch.Tensor | None = None


def hf_forward(model: nn.Module, inputs: Mapping, *, output_hidden_states: bool = False,
               output_attentions: bool = False) -> Any:
    """The default forward callable: ``model(**inputs, output_hidden_states=..., output_attentions=...)``."""
    return model(**inputs, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                 return_dict=True)


def _field(out, name):
    if isinstance(out, torch.Tensor):
        return out if name == "logits" else None
    if isinstance(out, Mapping):
        return out.get(name)
    return getattr(out, name, None)


class MeanPoolHead(nn.Module):
    """Sequence-classification head for a bare encoder: mean of ``last_hidden_state`` over real
    tokens (``inputs["attention_mask"]``), dropout, then ``linear``; logits ``[B, C]``.

    ``linear`` is used as is (not copied), so a head built on an existing classifier's
    ``nn.Linear`` shares its weights.  Call signature: ``head(outputs, inputs)``.
    """

    def __init__(self, linear: nn.Linear, dropout: float | nn.Dropout = 0.0):
        super().__init__()
        if not isinstance(linear, nn.Module):
            raise TypeError(f"linear must be an nn.Module (e.g. nn.Linear(hidden, num_classes)), got {type(linear).__name__}")
        self.linear = linear
        self.dropout = dropout if isinstance(dropout, nn.Module) else nn.Dropout(dropout)

    def forward(self, outputs, inputs: Mapping) -> torch.Tensor:
        h = _field(outputs, "last_hidden_state")
        if h is None:
            hs = _field(outputs, "hidden_states")
            if not hs:
                raise ValueError("MeanPoolHead needs outputs with last_hidden_state (or hidden_states)")
            h = hs[-1]
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if mask is None:
            pooled = h.mean(1)
        else:
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.linear(self.dropout(pooled))


def _width(model, given, who):
    if given is not None:
        return given
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"cannot read the {who}'s hidden width from its config; pass hidden_dims=(student, teacher)")


def _depth(model):
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def _normalize_layer_map(layer_map, student, teacher):
    if layer_map is None:
        ls, lt = _depth(student), _depth(teacher)
        if ls is None or lt is None:
            raise ValueError("cannot read the layer counts from the models' configs; pass layer_map=[(student, teacher), ...]")
        return uniform_layer_map(ls, lt)
    pairs = list(layer_map.items()) if isinstance(layer_map, Mapping) else [tuple(p) for p in layer_map]
    if not pairs:
        raise ValueError("layer_map is empty")
    for p in pairs:
        if len(p) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p):
            raise ValueError(f"layer_map entries must be (student layer, teacher layer) pairs of ints >= 0, got {p!r}")
    for who, model, col in (("student", student, 0), ("teacher", teacher, 1)):
        n = _depth(model)
        bad = [p for p in pairs if n is not None and p[col] >= n]
        if bad:
            raise ValueError(f"layer_map pair {bad[0]} names {who} layer {bad[0][col]}, but the {who} has {n} layers")
    return pairs


class Distiller:
    """Knowledge distillation from a fixed ``teacher`` into ``student``.

    Args:
        student, teacher: ``nn.Module``s (transformers models or anything the forward callables
            handle).  Only the student's parameters with ``requires_grad`` train, so a student
            prepared with ``pc.apply(student, pc.LoRAConfig(...))`` trains its adapters alone
            (plus ``head`` and the hidden-state projections).  The teacher is put in eval mode and
            run under ``torch.no_grad()``; it must share no trainable parameter with the student.
        temperature: T of the soft-label term (``distill_kl`` is T²-scaled, so hard and soft terms
            mix at comparable scale for any T).
        weights: ``{"hard", "soft", "hidden", "attention"}`` → weight; a term left out weighs 0
            (None: ``{hard: 0.5, soft: 0.5, hidden: 0, attention: 0}``).  A zero-weight term is
            not computed at all: no hidden states or attention maps are requested unless their
            term is on, and the teacher is not run when only ``hard`` is.
        layer_map: ``[(student layer, teacher layer), ...]`` (0-based; a dict works too) for the
            hidden and attention terms; default ``uniform_layer_map`` over the configs' layer
            counts.  Both terms average over the pairs.
        match_embeddings: the hidden term also compares the embedding outputs (``hidden_states[0]``),
            as TinyBERT does.
        hidden_loss: ``"mse"`` or ``"cosine"`` (``HiddenStateLoss``); ``project``: its projection
            rule (None: only when widths differ); ``hidden_dims``: ``(student, teacher)`` widths
            when the configs do not tell.  One ``HiddenStateLoss`` per pair, in ``hidden_losses``.
        attention_loss: ``"mse"`` or ``"kl"``; ``attention_heads``: ``"auto" | "match" | "mean"``
            (see ``attention_transfer_loss``).  The models must return attention maps: load them
            with ``attn_implementation="eager"``.
        head, teacher_head: ``(outputs, inputs) -> logits`` for models whose forward gives no
            logits (a bare encoder); ``head``'s trainable parameters are optimized.
        student_forward, teacher_forward: ``(model, inputs, *, output_hidden_states,
            output_attentions) -> outputs`` (a ``ModelOutput``, a dict, a ``DistillOutput`` or a
            logits tensor); default ``hf_forward``.
        labels_key: where a batch keeps its labels (``[B]`` class ids, or ``[B, T]`` with -100 for
            ignored positions when the logits are per token).
        lr, weight_decay, betas: AdamW settings; ``optimizer``: a callable ``params -> optimizer``
            that replaces AdamW.
        schedule: ``"linear"`` (warm-up over ``warmup_ratio`` of the steps, then linear decay to 0)
            or ``"constant"``.
        max_grad_norm: clip the gradient norm (None: no clipping).
        seed: seeds the projections' initialization (without touching the global RNG) and, at the
            start of every ``fit``, torch's global RNG (dropout), so equal inputs give equal runs.
        device: where batches go; default the device of the student's first parameter.
        progress, desc: the tqdm bar (each loss term in its postfix).

    Per-token logits ``[B, T, V]`` work too: the soft term then leaves out positions where
    ``inputs["attention_mask"]`` is 0, and the hard term ignores label -100.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, temperature: float = 2.0,
                 weights: Mapping | None = None, layer_map=None, match_embeddings: bool = False,
                 hidden_loss: str = "mse", project: bool | None = None, hidden_dims=None,
                 attention_loss: str = "mse", attention_heads: str = "auto",
                 head: Callable | None = None, teacher_head: Callable | None = None,
                 student_forward: Callable | None = None, teacher_forward: Callable | None = None,
                 labels_key: str = "labels", lr: float = 5e-5, weight_decay: float = 0.01,
                 betas=(0.9, 0.999), optimizer: Callable | None = None, schedule: str = "linear",
                 warmup_ratio: float = 0.1, max_grad_norm: float | None = 1.0, seed: int = 0,
                 device=None, progress: bool = True, desc: str = "distill"):
        for name, m in (("student", student), ("teacher", teacher)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
        check_temperature(temperature)  # distill_kl's own check, at construction rather than at step 1
        w = dict(DEFAULT_WEIGHTS) if weights is None else dict.fromkeys(TERMS, 0.0)
        for k, v in dict(weights or {}).items():
            if k not in TERMS:
                raise ValueError(f"unknown loss term {k!r} in weights; expected some of {TERMS}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or math.isinf(v):
                raise ValueError(f"weights[{k!r}] must be a finite number >= 0, got {v!r}")
            w[k] = float(v)
        if not any(w.values()):
            raise ValueError("every loss weight is 0: nothing to train on")
        if hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {HIDDEN_LOSSES}, got {hidden_loss!r}")
        if attention_loss not in ATTENTION_LOSSES:
            raise ValueError(f"attention_loss must be one of {ATTENTION_LOSSES}, got {attention_loss!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
        self.student, self.teacher = student, teacher
        self.temperature, self.weights = float(temperature), w
        self.head, self.teacher_head = head, teacher_head
        self.student_forward = student_forward or hf_forward
        self.teacher_forward = teacher_forward or hf_forward
        self.labels_key = labels_key
        self.attention_loss, self.attention_heads = attention_loss, attention_heads
        self.match_embeddings = match_embeddings
        self.schedule, self.warmup_ratio, self.max_grad_norm = schedule, warmup_ratio, max_grad_norm
        self.seed, self.progress, self.desc = seed, progress, desc
        self.device = torch.device(device) if device is not None else next(
            (p.device for p in student.parameters()), torch.device("cpu"))

        need_layers = w["hidden"] > 0 or w["attention"] > 0
        self.layer_map = _normalize_layer_map(layer_map, student, teacher) if need_layers else []
        self.hidden_losses = nn.ModuleList()
        if w["hidden"] > 0:
            ds = _width(student, hidden_dims and hidden_dims[0], "student")
            dt = _width(teacher, hidden_dims and hidden_dims[1], "teacher")
            n_pairs = len(self.layer_map) + bool(match_embeddings)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for _ in range(n_pairs):
                    self.hidden_losses.append(HiddenStateLoss(ds, dt, loss=hidden_loss, project=project))
            self.hidden_losses.to(self.device)

        teacher_params = {id(p) for p in teacher.parameters()}
        if isinstance(teacher_head, nn.Module):
            teacher_params |= {id(p) for p in teacher_head.parameters()}
        params, seen = [], set()
        sources = [student.parameters(), self.hidden_losses.parameters()]
        if isinstance(head, nn.Module):
            sources.append(head.parameters())
        for src in sources:
            for p in src:
                if p.requires_grad and id(p) not in seen:
                    if id(p) in teacher_params:
                        raise ValueError(
                            "the student (or its head) shares a trainable parameter with the teacher "
                            f"(shape {tuple(p.shape)}); the teacher must stay fixed: copy or freeze it"
                        )
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise ValueError("nothing to train: the student (and head) has no parameter with requires_grad")
        self.params = params
        if optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
        else:
            self.optimizer = optimizer(params)
        self.history: list[dict] = []

    # ---------------------------------------------------------------------------------- losses

    def _split(self, batch):
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch must be a mapping of tensors (input_ids, attention_mask, labels, ...), got {type(batch).__name__}")
        inputs = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                  for k, v in batch.items() if k != self.labels_key}
        labels = batch.get(self.labels_key)
        return inputs, labels.to(self.device) if isinstance(labels, torch.Tensor) else labels

    def _run(self, model, fwd, head, inputs, need_h, need_a, who):
        out = fwd(model, inputs, output_hidden_states=need_h, output_attentions=need_a)
        logits = head(out, inputs) if head is not None else _field(out, "logits")
        hs = _field(out, "hidden_states") if need_h else None
        att = _field(out, "attentions") if need_a else None
        if need_h and not hs:
            raise ValueError(f"the {who}'s forward returned no hidden_states; it must honour output_hidden_states=True")
        if need_a and (not att or any(a is None for a in att)):
            raise ValueError(
                f"the {who} returned no attention maps; transformers only returns them with eager attention: "
                f"load it with attn_implementation='eager' or call model.set_attn_implementation('eager')"
            )
        return logits, hs, att

    def losses(self, batch) -> dict[str, torch.Tensor]:
        """The active loss terms on one batch and their weighted ``"total"`` (a differentiable scalar)."""
        w = self.weights
        inputs, labels = self._split(batch)
        need_h, need_a = w["hidden"] > 0, w["attention"] > 0
        need_logits = w["hard"] > 0 or w["soft"] > 0
        s_logits, s_hs, s_att = self._run(self.student, self.student_forward, self.head if need_logits else None,
                                          inputs, need_h, need_a, "student")
        if need_logits and s_logits is None:
            raise ValueError("the student's forward gave no logits: pass head=... (e.g. MeanPoolHead) for a bare encoder")
        terms = {}
        if w["hard"] > 0:
            if labels is None:
                raise ValueError(f"weights['hard'] > 0 needs labels under batch[{self.labels_key!r}]")
            if tuple(labels.shape) != tuple(s_logits.shape[:-1]):
                raise ValueError(f"labels must have shape {tuple(s_logits.shape[:-1])} (the logits' rows), got {tuple(labels.shape)}")
            terms["hard"] = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]).float(), labels.reshape(-1),
                                            ignore_index=-100)
        if w["soft"] > 0 or need_h or need_a:
            self.teacher.eval()
            if isinstance(self.teacher_head, nn.Module):
                self.teacher_head.eval()
            with torch.no_grad():
                t_logits, t_hs, t_att = self._run(self.teacher, self.teacher_forward,
                                                  self.teacher_head if w["soft"] > 0 else None,
                                                  inputs, need_h, need_a, "teacher")
            mask = inputs.get("attention_mask")
            if w["soft"] > 0:
                if t_logits is None:
                    raise ValueError("the teacher's forward gave no logits: pass teacher_head=... for a bare encoder")
                row_mask = None
                if s_logits.dim() == 3 and isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(s_logits.shape[:2]):
                    row_mask = mask != 0
                terms["soft"] = distill_kl(s_logits, t_logits.to(s_logits.dtype), self.temperature, mask=row_mask)
            if need_h:
                pairs = [(0, 0)] if self.match_embeddings else []
                pairs += [(s + 1, t + 1) for s, t in self.layer_map]
                for who, hs, idx in (("student", s_hs, 0), ("teacher", t_hs, 1)):
                    top = max(p[idx] for p in pairs)
                    if top >= len(hs):
                        raise ValueError(f"layer_map needs {who} hidden_states[{top}], but it returned {len(hs)}")
                parts = [fn(s_hs[i], t_hs[j], mask) for fn, (i, j) in zip(self.hidden_losses, pairs)]
                terms["hidden"] = torch.stack(parts).mean()
            if need_a:
                for who, att, idx in (("student", s_att, 0), ("teacher", t_att, 1)):
                    top = max(p[idx] for p in self.layer_map)
                    if top >= len(att):
                        raise ValueError(f"layer_map needs {who} layer {top}'s attention map, but it returned {len(att)}")
                parts = [attention_transfer_loss(s_att[i], t_att[j], mask, loss=self.attention_loss,
                                                 heads=self.attention_heads) for i, j in self.layer_map]
                terms["attention"] = torch.stack(parts).mean()
        total = sum(w[k] * v.float() for k, v in terms.items())
        return {"total": total, **terms}

    # ---------------------------------------------------------------------------------- loop

    def _modules_to_train(self):
        mods = [self.student, self.hidden_losses]
        if isinstance(self.head, nn.Module):
            mods.append(self.head)
        return mods

    def fit(self, data, epochs: int = 1, *, steps_per_epoch: int | None = None, max_steps: int | None = None) -> list[dict]:
        """Train for ``epochs`` passes over ``data``; returns this call's history.

        ``data``: an iterable of batches that can be iterated once per epoch (a list, a
        DataLoader) or a callable ``epoch -> iterable`` (a fresh shuffle per epoch).  The linear
        schedule needs the total step count: from ``len(data)``, else ``steps_per_epoch``, else
        ``max_steps``.  History: one dict per step with ``step``, ``epoch``, ``lr``, ``total`` and
        each active term (floats); also appended to ``self.history``.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        per_epoch = steps_per_epoch
        if per_epoch is None and not callable(data):
            with contextlib.suppress(TypeError):
                per_epoch = len(data)
        total = per_epoch * epochs if per_epoch is not None else None
        if max_steps is not None:
            total = min(total, max_steps) if total is not None else max_steps
        if self.schedule == "linear" and total is None:
            raise ValueError("the linear schedule needs the step count: data with len(), steps_per_epoch or max_steps")
        if self.schedule == "linear":
            warmup = max(1, int(total * self.warmup_ratio)) if self.warmup_ratio > 0 else 0
            decay = max(1, total - warmup)
            factor = lambda s: min((s + 1) / warmup if warmup else 1.0, max(0.0, (total - s) / decay))  # noqa: E731
        else:
            factor = lambda s: 1.0  # noqa: E731
        for g in self.optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

        from tqdm.auto import tqdm

        modes = [(m, m.training) for m in self._modules_to_train()]
        for m, _ in modes:
            m.train()
        torch.manual_seed(self.seed)
        history, step = [], 0
        try:
            with tqdm(total=total, desc=self.desc, unit="step", disable=not self.progress, dynamic_ncols=True) as bar:
                for epoch in range(epochs):
                    for batch in (data(epoch) if callable(data) else data):
                        if max_steps is not None and step >= max_steps:
                            break
                        lr = self.optimizer.param_groups[0]["lr"]
                        terms = self.losses(batch)
                        self.optimizer.zero_grad(set_to_none=True)
                        terms["total"].backward()
                        if self.max_grad_norm is not None:
                            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                        self.optimizer.step()
                        sched.step()
                        step += 1
                        row = {"step": step, "epoch": epoch, "lr": lr, **{k: v.item() for k, v in terms.items()}}
                        history.append(row)
                        bar.update(1)
                        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("total",) + TERMS if k in row}, refresh=False)
        finally:
            for m, was in modes:
                m.train(was)
        self.history.extend(history)
        return history
