"""Cross-lingual transfer with stacked adapters (MAD-X, Pfeiffer et al., 2020) on real text.

MAD-X trains one *language adapter* per language on unlabelled text with a self-supervised
objective, then a *task adapter* on top of the source language's adapter
(``pc.Stack("lang_en", "task")``); at test time the target language's adapter replaces the
source's (``pc.Stack("lang_de", "task")``) and the task adapter transfers unchanged.

MAD-X's objective is masked language modelling.  A sentence encoder such as all-MiniLM-L6-v2
ships without an MLM head, so :class:`TiedMLMHead` builds BERT's prediction head anew: a dense
layer, GELU and LayerNorm (trained with the adapter, discarded after it) and a decoder *tied to
the encoder's frozen input embeddings* (plus a trained bias), so no vocabulary-sized matrix is
learnt from a few hundred sentences.  :func:`train_language_adapter` masks 15% of the real tokens
(BERT's 80/10/10 replacement) and trains only the language adapter and that head::

    pc.apply(encoder, pc.BottleneckConfig(placement="pfeiffer", reduction_factor=2), name="lang_de")
    train_language_adapter(encoder, tokenizer, german_texts, "lang_de")
    pc.set_active(encoder, pc.Stack("lang_de", "task"))
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TiedMLMHead(nn.Module):
    """BERT's MLM head on an encoder without one: ``dense -> GELU -> LayerNorm -> E^T + bias``.

    ``E`` is the encoder's input embedding matrix ``[V, H]``, used as it is (tied, frozen):
    ``forward(hidden [N, H]) -> logits [N, V]``.
    """

    def __init__(self, encoder, eps: float = 1e-12):
        super().__init__()
        emb = encoder.get_input_embeddings()
        vocab, width = emb.weight.shape
        # ALBERT/ELECTRA-style factorized embeddings are narrower than the hidden states.
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None) or width
        self.embeddings = [emb]  # a list: not a submodule, so its weight is neither trained nor saved here
        p = emb.weight
        self.dense = nn.Linear(hidden, width, device=p.device, dtype=p.dtype)
        self.norm = nn.LayerNorm(width, eps=eps, device=p.device, dtype=p.dtype)
        self.bias = nn.Parameter(torch.zeros(vocab, device=p.device, dtype=p.dtype))

    def forward(self, hidden):
        h = self.norm(torch.nn.functional.gelu(self.dense(hidden)))
        return h @ self.embeddings[0].weight.detach().T + self.bias


def special_ids(tokenizer) -> list[int]:
    """The ids masking must never pick: CLS, SEP, PAD, BOS, EOS, UNK, MASK."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    return sorted(ids)


def mask_tokens(input_ids, attention_mask, *, mask_id: int, vocab_size: int, special=(), prob: float = 0.15,
                generator=None):
    """BERT's masking: ``(inputs, labels)`` from ``input_ids [B, T]``.

    Of the real, non-special tokens ``prob`` are chosen (at least one per row that has one); of
    those 80% become ``mask_id``, 10% a random token, 10% stay.  ``labels`` holds the original id
    at chosen positions and -100 elsewhere.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob: expected a masking rate in (0, 1), got {prob}")
    device = input_ids.device  # drawn on the CPU (the generator's device), returned on the input's
    input_ids = input_ids.cpu()
    ids = input_ids.clone()
    eligible = attention_mask.cpu().bool().clone()  # never the caller's tensor
    for s in special:
        eligible &= input_ids != s
    u = torch.rand(ids.shape, generator=generator)
    chosen = (u < prob) & eligible
    # A short sentence may draw nothing: then its most likely token (lowest u) is taken.
    empty = ~chosen.any(1) & eligible.any(1)
    if empty.any():
        pick = torch.where(eligible, u, torch.full_like(u, 2.0)).argmin(1)
        chosen[empty, pick[empty]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    ids[chosen & (r < 0.8)] = mask_id
    rand = chosen & (r >= 0.8) & (r < 0.9)
    ids[rand] = torch.randint(vocab_size, (int(rand.sum()),), generator=generator)
    return ids.to(device), labels.to(device)


def train_language_adapter(encoder, tokenizer, texts, name: str, *, epochs: int = 5, lr: float = 1e-3,
                           batch_size: int = 16, max_length: int = 64, prob: float = 0.15, seed: int = 0,
                           progress: bool = True) -> dict:
    """Train the adapter ``name`` (already applied to ``encoder``) by masked language modelling on
    the unlabelled ``texts``, through a :class:`TiedMLMHead` made for it and then discarded.

    Only the adapter and the head train: every other parameter keeps its value, and every
    parameter's ``requires_grad`` is as it was before the call.  Afterwards ``name`` is the active adapter.  Returns
    ``{"loss": [mean MLM loss per epoch], "steps": int}``.
    """
    import peftcore as pc

    from ..training import batches, encode, progress_bar

    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("texts: expected a non-empty list of non-empty strings")
    for field, v in (("epochs", epochs), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{field}: expected a positive int, got {v!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive finite learning rate, got {lr!r}")
    if not (isinstance(prob, (int, float)) and 0.0 < prob < 1.0):
        raise ValueError(f"prob: expected a masking rate in (0, 1), got {prob!r}")
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("tokenizer: has no mask token; masked language modelling needs one")
    if name not in pc.adapter_configs(encoder):
        raise ValueError(f"name: no adapter {name!r} on the encoder (pc.apply it first)")
    before = {n: p.requires_grad for n, p in encoder.named_parameters()}
    was_training = encoder.training
    history = []
    try:
        pc.set_active(encoder, name)
        pc.train_adapter(encoder, name)
        params = [p for p in encoder.parameters() if p.requires_grad]
        dev = params[0].device if params else torch.device("cpu")
        head = TiedMLMHead(encoder).to(dev)
        opt = torch.optim.AdamW(params + list(head.parameters()), lr=lr, weight_decay=0.01)
        data = encode(tokenizer, texts, [0] * len(texts), max_length)
        steps = math.ceil(len(texts) / batch_size) * epochs
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
        gen = torch.Generator().manual_seed(seed)
        special = special_ids(tokenizer)
        vocab = encoder.get_input_embeddings().weight.shape[0]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        encoder.train()
        with progress_bar(steps, f"MLM {name}", progress) as bar:
            for _ in range(epochs):
                total, n = 0.0, 0
                for ids, mask, _ in batches(data, batch_size, pad, "cpu", gen):
                    inp, lab = mask_tokens(ids, mask, mask_id=mask_id, vocab_size=vocab, special=special, prob=prob,
                                           generator=gen)
                    inp, lab, mask = inp.to(dev), lab.to(dev), mask.to(dev)
                    h = encoder(input_ids=inp, attention_mask=mask).last_hidden_state
                    h = h[:, h.shape[1] - inp.shape[1]:]  # a prompt-tuning adapter puts virtual tokens in front
                    sel = lab != -100
                    loss = nn.functional.cross_entropy(head(h[sel]).float(), lab[sel])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total, n = total + loss.item(), n + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                history.append(total / max(1, n))
    finally:
        for n_, p in encoder.named_parameters():
            p.requires_grad_(before.get(n_, p.requires_grad))
        encoder.train(was_training)
    return {"loss": history, "steps": steps}
