"""Knowledge distillation workflows: feature losses and the Distiller training loop.

    from peftcore.distill import Distiller, MeanPoolHead, shrink_encoder, uniform_layer_map
    keep = [t for _, t in uniform_layer_map(2, teacher.config.num_hidden_layers)]
    student = shrink_encoder(teacher, keep)                  # teacher's embeddings + 2 of its layers
    d = Distiller(student, teacher, temperature=2.0, weights={"hard": 0.5, "soft": 0.5, "hidden": 1.0})
    history = d.fit(batches, epochs=3)                       # one dict of loss terms per step

* ``features``: ``HiddenStateLoss`` (MSE / cosine, learned projection when widths differ),
  ``attention_transfer_loss`` (MSE / KL between attention maps), ``uniform_layer_map``.
* ``trainer``: ``Distiller`` (hard CE + T²-scaled ``distill_kl`` + hidden + attention terms),
  ``MeanPoolHead`` (a head for bare encoders), ``hf_forward``, ``DistillOutput``.
* ``student``: ``shrink_encoder`` (a copy of a model keeping some of its layers).
"""

from .features import HiddenStateLoss, attention_transfer_loss, uniform_layer_map
from .student import shrink_encoder
from .trainer import DistillOutput, Distiller, MeanPoolHead, hf_forward

__all__ = [
    "DistillOutput",
    "Distiller",
    "HiddenStateLoss",
    "MeanPoolHead",
    "attention_transfer_loss",
    "hf_forward",
    "shrink_encoder",
    "uniform_layer_map",
]
