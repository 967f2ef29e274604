"""Ready-made distillation runs built on ``Distiller``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

from .trainer import Distiller, MeanPoolHead


def distill_classifier(teacher, student, batches: Callable, *, epochs: int, steps_per_epoch: int | None = None,
                       temperature: float = 2.0, weights: Mapping | None = None, lr: float = 2e-4,
                       seed: int = 0, progress: bool = True, desc: str = "distill", **distiller_kwargs) -> Distiller:
    """Distill one pooled text classifier into another; returns the ``Distiller`` (see its ``history``).

    ``teacher``, ``student``: modules with an ``encoder`` (a transformers encoder), a ``head``
    (``nn.Linear(hidden, num_classes)``) and optionally a ``dropout``, whose logits are
    ``head(dropout(mean of last_hidden_state over real tokens))``: the classifier of
    ``peftcore demo``.  Both heads are wrapped in ``MeanPoolHead`` (sharing their weights), so
    ``student`` itself holds the trained result.  The student's encoder parameters with
    ``requires_grad`` and its head train; the teacher stays fixed.

    ``batches``: ``epoch -> iterable`` of ``(input_ids, attention_mask, labels)`` tuples or of
    dicts with those keys (``labels`` ``[B]``).  ``weights`` default to 0.5 hard + 0.5 soft;
    other keyword arguments go to ``Distiller`` (``layer_map``, ``max_grad_norm``, ...).
    """
    distiller = Distiller(
        student.encoder,
        teacher.encoder,
        temperature=temperature,
        weights=weights,
        head=MeanPoolHead(student.head, getattr(student, "dropout", 0.0)),
        teacher_head=MeanPoolHead(teacher.head),
        lr=lr,
        seed=seed,
        progress=progress,
        desc=desc,
        **distiller_kwargs,
    )

    def data(epoch):
        for batch in batches(epoch):
            if not isinstance(batch, Mapping):
                ids, mask, labels = batch
                batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            yield batch

    distiller.fit(data, epochs, steps_per_epoch=steps_per_epoch)
    return distiller
