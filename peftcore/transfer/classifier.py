"""A text classifier on a pre-trained encoder: mean pooling over real tokens, dropout, a new linear head.

The model ``peftcore demo`` and ``peftcore finetune`` train.  Its parameter names are
``encoder.*`` (the transformers encoder, adapters included) and ``head.*``, so
``peftcore.transfer.layer_groups`` finds the encoder's blocks and puts the head last.
"""

from __future__ import annotations

import torch
from torch import nn


def pooling_mask(encoder, attention_mask, hidden):
    """The mask to pool ``hidden [B, T', H]`` with: prompt tuning puts virtual tokens in front."""
    if hidden.shape[1] == attention_mask.shape[1]:
        return attention_mask
    import peftcore as pc

    return pc.extend_prompt_mask(encoder, attention_mask)


def mean_pool(hidden, mask):
    """Mean of ``hidden [B, T, H]`` over the positions where ``mask [B, T]`` is 1: ``[B, H]``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def hidden_size(encoder) -> int:
    return getattr(encoder.config, "hidden_size", None) or encoder.get_input_embeddings().embedding_dim


class TextClassifier(nn.Module):
    """encoder -> mean pooling over real tokens -> dropout -> linear head; logits ``[B, C]``.

    ``forward(input_ids [B, T], attention_mask [B, T], inputs_embeds=None)``: with
    ``inputs_embeds [B, T, H]`` (embedding-level augmentation such as cutoff) the encoder reads
    those instead of looking ``input_ids`` up.
    """

    def __init__(self, encoder, num_classes: int, dropout: float = 0.1, hidden: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden or hidden_size(encoder), num_classes)

    def features(self, input_ids, attention_mask, inputs_embeds=None):
        """Mean-pooled last hidden states ``[B, H]``."""
        if inputs_embeds is not None:
            out = self.encoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        else:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state
        return mean_pool(h, pooling_mask(self.encoder, attention_mask, h))

    def forward(self, input_ids, attention_mask, inputs_embeds=None):
        return self.head(self.dropout(self.features(input_ids, attention_mask, inputs_embeds)))


def head_state(clf: TextClassifier) -> dict[str, torch.Tensor]:
    """The head's tensors under their classifier keys (``head.weight``, ``head.bias``)."""
    return {f"head.{k}": v.detach().contiguous() for k, v in clf.head.state_dict().items()}
