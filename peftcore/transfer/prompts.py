"""Prompt templates and verbalizers: zero- and few-shot classification with a pre-trained model.

No parameter is trained.  A :class:`Verbalizer` gives each label one or more words or
descriptions; a :class:`Template` puts them in a sentence.  Two scorers turn that into class scores:

* :class:`EncoderScorer` (sentence encoders such as all-MiniLM-L6-v2): the cosine similarity
  between the text's embedding and the embedding of each label's description, rendered by a
  template like ``"This request is about {label}."`` (the label's score is the similarity to the
  mean of its descriptions' normalised embeddings).
* :class:`CausalLMScorer` (causal LMs): the log-likelihood of each label word after the templated
  text, ``"{text}\\nIntent: {label}"`` (mean or sum over the label's tokens; a label with several
  words takes the best one), optionally with contextual calibration (Zhao et al., 2021) and
  in-context demonstrations.

:func:`select_template` picks the best of several templates (and verbalizers) on a small labelled
dev split, which is what few-shot prompt engineering is when nothing is trained::

    from peftcore.transfer import EncoderScorer, Template, Verbalizer, select_template
    scorer = EncoderScorer(encoder, tokenizer)
    verb = Verbalizer.from_labels(["complaint", "praise", "question"])
    best = select_template(scorer, ["{label}", "This request is about {label}."], verb, dev_texts, dev_labels)
    best.classifier.predict(test_texts)      # label names
    best.table                               # every candidate's dev accuracy
"""

from __future__ import annotations

import numbers
import string
import warnings
from dataclasses import dataclass, field

import torch

CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. (2021), contextual calibration

DEFAULT_ENCODER_TEMPLATES = ("{label}", "This is {label}.", "This text is about {label}.",
                             "This request is about {label}.")
DEFAULT_CAUSAL_TEMPLATES = ("{text}\nLabel: {label}", "Text: {text}\nCategory: {label}",
                            "Message: {text}\nThis message is a {label}",
                            "{text}\nQuestion: what is this text about?\nAnswer: {label}")


class PromptError(ValueError):
    """A template, verbalizer or argument that cannot be used, named in the message."""


class _NoRepeatableCache(Exception):
    pass


def _repeat_cache(past, w: int):
    """The KV cache with every batch row repeated ``w`` times in place (rows r*w .. r*w+w-1)."""
    if hasattr(past, "batch_repeat_interleave"):  # transformers' Cache classes
        past.batch_repeat_interleave(w)
        return past
    if isinstance(past, (tuple, list)) and past and all(isinstance(layer, (tuple, list)) for layer in past):
        return tuple(tuple(t.repeat_interleave(w, 0) for t in layer) for layer in past)  # the legacy format
    raise _NoRepeatableCache(f"the model returned no repeatable KV cache (got {type(past).__name__})")


# --------------------------------------------------------------------------------------------
# templates and verbalizers


@dataclass(frozen=True)
class Template:
    """A format string with a ``{label}`` field and, for causal LMs, a ``{text}`` field before it.

    Literal braces are written ``{{`` and ``}}``.  Each field occurs at most once; no other field,
    conversion or format spec is allowed.
    """

    text: str

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise PromptError(f"template: expected a str, got {type(self.text).__name__}")
        try:
            parts = list(string.Formatter().parse(self.text))
        except ValueError as e:
            raise PromptError(f"template {self.text!r}: not a valid format string ({e})") from None
        seen = []
        for _, name, spec, conv in parts:
            if name is None:
                continue
            if name not in ("text", "label"):
                raise PromptError(f"template {self.text!r}: unknown field {{{name}}}; "
                                  "the fields are {text} and {label}")
            if spec or conv:
                raise PromptError(f"template {self.text!r}: field {{{name}}} takes no format spec or conversion")
            if name in seen:
                raise PromptError(f"template {self.text!r}: field {{{name}}} occurs twice")
            seen.append(name)
        if "label" not in seen:
            raise PromptError(f"template {self.text!r}: no {{label}} field (where the label word goes)")
        object.__setattr__(self, "_fields", tuple(seen))

    @property
    def fields(self) -> tuple:
        """The fields in the order they occur, e.g. ``("text", "label")``."""
        return self._fields

    def render(self, *, label: str, text: str = "") -> str:
        return self.text.format(text=text, label=label)

    def split(self, text: str) -> tuple[str, str]:
        """``(context, suffix)``: the rendered template before and after ``{label}``."""
        marker = "\x00label\x00"
        whole = self.text.format(text=text, label=marker)
        before, after = whole.split(marker)
        return before, after

    def __str__(self):
        return self.text


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromptError(f"{name}: expected a positive int, got {value!r}")


def as_template(t) -> Template:
    return t if isinstance(t, Template) else Template(t)


@dataclass(frozen=True)
class Verbalizer:
    """Each label's words or descriptions, in label order: ``{"complaint": ("a complaint",), ...}``."""

    words: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.words, dict) or len(self.words) < 2:
            raise PromptError("verbalizer: expected a dict of at least two labels, each with its words")
        clean = {}
        for label, ws in self.words.items():
            if isinstance(ws, str):
                ws = (ws,)
            try:
                ws = tuple(ws)
            except TypeError:
                raise PromptError(f"verbalizer: label {label!r}: expected a word or a list of words, "
                                  f"got {type(ws).__name__}") from None
            if not ws or not all(isinstance(w, str) and w.strip() for w in ws):
                raise PromptError(f"verbalizer: label {label!r}: expected non-empty strings, got {ws!r}")
            clean[str(label)] = ws
        object.__setattr__(self, "words", clean)

    @classmethod
    def from_labels(cls, labels) -> "Verbalizer":
        """The label names themselves as the words (``_`` and ``-`` read as spaces)."""
        return cls({str(n): (str(n).replace("_", " ").replace("-", " "),) for n in labels})

    @property
    def labels(self) -> list:
        return list(self.words)


def _label_ids(labels, verbalizer: Verbalizer, what: str = "labels") -> list[int]:
    names = verbalizer.labels
    index = {n: i for i, n in enumerate(names)}
    out = []
    for j, y in enumerate(labels):
        if isinstance(y, bool) or not isinstance(y, (numbers.Integral, str)):
            raise PromptError(f"{what}[{j}]: expected a label name or class id, got {y!r}")
        if isinstance(y, numbers.Integral):
            y = int(y)
            if not 0 <= y < len(names):
                raise PromptError(f"{what}[{j}]: class id {y} outside 0..{len(names) - 1}")
            out.append(y)
        elif y in index:
            out.append(index[y])
        else:
            raise PromptError(f"{what}[{j}]: unknown label {y!r}; the verbalizer's labels are {names}")
    return out


def _texts(texts, what: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise PromptError(f"{what}: expected a list of strings, got a single string")
    texts = list(texts)
    for j, t in enumerate(texts):
        if not isinstance(t, str):
            raise PromptError(f"{what}[{j}]: expected a string, got {type(t).__name__}")
    return texts


# --------------------------------------------------------------------------------------------
# scorers


def _model_device(model):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class EncoderScorer:
    """Scores by cosine similarity between mean-pooled, normalised sentence embeddings.

    ``model``: a transformers encoder (``last_hidden_state [B, T, H]``); ``tokenizer`` its tokenizer.
    Embeddings are cached per string, so trying many templates on the same texts embeds them once;
    after changing the model (training it, activating another adapter) call :meth:`clear_cache`.
    """

    kind = "encoder"

    def __init__(self, model, tokenizer, *, batch_size: int = 64, max_length: int = 256):
        _positive("batch_size", batch_size)
        _positive("max_length", max_length)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self._cache: dict[str, torch.Tensor] = {}

    def clear_cache(self) -> None:
        """Forget the cached embeddings: call it after changing the model (training, another
        active adapter such as a MAD-X language swap, a new dtype or device)."""
        self._cache.clear()

    @torch.no_grad()
    def embed(self, texts) -> torch.Tensor:
        """``[N, H]`` unit-norm embeddings (float32, CPU) of ``texts``."""
        from .classifier import mean_pool, pooling_mask

        texts = _texts(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        was_training = self.model.training
        self.model.eval()
        try:
            dev = _model_device(self.model)
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i:i + self.batch_size]
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                mask = enc["attention_mask"].to(dev)
                h = self.model(input_ids=enc["input_ids"].to(dev), attention_mask=mask).last_hidden_state
                e = torch.nn.functional.normalize(mean_pool(h.float(), pooling_mask(self.model, mask, h)), dim=-1)
                for t, v in zip(chunk, e.cpu()):
                    self._cache[t] = v
        finally:
            self.model.train(was_training)
        if not texts:
            return torch.zeros(0, 0)
        return torch.stack([self._cache[t] for t in texts])

    def label_embeddings(self, template, verbalizer: Verbalizer) -> torch.Tensor:
        """``[L, H]``: per label, the normalised mean of its rendered descriptions' embeddings."""
        template = as_template(template)
        if "text" in template.fields:
            raise PromptError(f"template {template.text!r}: an encoder template describes the label; "
                              "use {label} only (the text is embedded as it is)")
        rows = []
        for label in verbalizer.labels:
            e = self.embed([template.render(label=w) for w in verbalizer.words[label]])
            rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        return torch.stack(rows)

    def scores(self, texts, template, verbalizer: Verbalizer, demos=None) -> torch.Tensor:
        """``[N, L]`` cosine similarities; ``demos`` (few-shot examples) are not used by encoders."""
        if demos:
            raise PromptError("demos: in-context demonstrations need a causal LM (CausalLMScorer)")
        lab = self.label_embeddings(template, verbalizer)
        texts = _texts(texts)
        if not texts:
            return torch.zeros(0, len(verbalizer.labels))
        return self.embed(texts) @ lab.T


class CausalLMScorer:
    """Scores by the log-likelihood of each label word after the templated text.

    Args:
        model: a transformers causal LM (``logits [B, T, V]``); ``tokenizer`` its tokenizer.
        normalize: ``"mean"`` (per-token average log-probability, fair to long label words) or
            ``"sum"`` (the continuation's log-probability).
        calibrate: contextual calibration: divide each label's probability by its probability on
            content-free inputs (``"N/A"``, ``""``, ``"[MASK]"``) rendered with the same template.
        batch_size: texts (or sequences) per forward pass; right padding, so every real token keeps
            its position.
        share_prefix: run each text's context once and score every label word on its KV cache
            (repeated per word); False, or a model whose cache cannot be repeated: one full
            sequence per (text, word).  Both give the same scores.

    The label word's tokens are scored after the context (the template up to ``{label}``, the
    context's trailing spaces moved into the continuation, as lm-evaluation-harness does); what the
    template has after ``{label}`` is not scored.
    """

    kind = "causal"

    def __init__(self, model, tokenizer, *, normalize: str = "mean", calibrate: bool = False,
                 batch_size: int = 16, max_length: int = 1024, share_prefix: bool = True):
        if normalize not in ("mean", "sum"):
            raise PromptError(f"normalize: expected 'mean' or 'sum', got {normalize!r}")
        _positive("batch_size", batch_size)
        _positive("max_length", max_length)
        self.model, self.tokenizer = model, tokenizer
        self.normalize, self.calibrate = normalize, bool(calibrate)
        self.batch_size, self.max_length = batch_size, max_length
        self.share_prefix = bool(share_prefix)
        self._cache_ok = True  # False once the model has shown that its cache cannot be repeated
        self.last_path = None  # "kv-cache" or "full": how the last scores() ran

    def _lead(self) -> list[int]:
        # The special tokens the tokenizer puts in front of a text (Llama's BOS; none for GPT-2);
        # whatever it appends (an EOS) belongs to neither the context nor the label.
        if not hasattr(self, "_lead_ids"):
            sp = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            no = self.tokenizer("a", add_special_tokens=False)["input_ids"]
            cut = next((i for i in range(len(sp) - len(no) + 1) if sp[i:i + len(no)] == no), 0)
            self._lead_ids = list(sp[:cut])
        return self._lead_ids

    def _encode(self, context: str, word: str) -> tuple[list[int], list[int]]:
        stripped = context.rstrip(" ")
        cont = context[len(stripped):] + word
        tok, lead = self.tokenizer, self._lead()
        ctx_ids = lead + tok(stripped, add_special_tokens=False)["input_ids"]
        whole = lead + tok(stripped + cont, add_special_tokens=False)["input_ids"]
        if whole[:len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids):
            cont_ids = whole[len(ctx_ids):]
        else:  # the tokenizer merged across the boundary: encode the continuation on its own
            cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
        if not ctx_ids:  # nothing to condition the first label token on
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if bos is None:
                raise PromptError("template: the context before {label} is empty and the tokenizer has no BOS token")
            ctx_ids = [bos]
        if not cont_ids:
            raise PromptError(f"verbalizer: the word {word!r} encodes to no tokens")
        if len(ctx_ids) + len(cont_ids) > self.max_length:
            keep = self.max_length - len(cont_ids)
            if keep < 1:
                raise PromptError(f"verbalizer: the word {word!r} is longer than max_length={self.max_length} tokens")
            n_lead = len(lead) if ctx_ids[:len(lead)] == lead else 0
            if keep <= n_lead:
                raise PromptError(f"max_length={self.max_length}: no room for the context before {word!r}")
            # Keep the lead (BOS) and the end: the template's cue sits next to the label.
            ctx_ids = ctx_ids[:n_lead] + ctx_ids[n_lead:][-(keep - n_lead):]
        return ctx_ids, cont_ids

    def _padded(self, seqs, width, dev):
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, q in enumerate(seqs):
            ids[r, :len(q)] = torch.tensor(q, dtype=torch.long)
            mask[r, :len(q)] = 1
        return ids.to(dev), mask.to(dev)

    def _full(self, pairs) -> list[list[float]]:
        """Each ``(context, label)`` pair as one sequence: the label tokens' log-probabilities."""
        dev = _model_device(self.model)
        out: list = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            seqs = [pairs[i][0] + pairs[i][1] for i in idx]
            ids, mask = self._padded(seqs, max(len(q) for q in seqs), dev)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, i in enumerate(idx):
                c, k = len(pairs[i][0]), len(pairs[i][1])
                tgt = torch.tensor(pairs[i][1], device=logp.device)
                out[i] = logp[r, c - 1:c - 1 + k].gather(-1, tgt[:, None]).squeeze(-1).tolist()
        return out

    def _cache_arg(self) -> str:
        import inspect

        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _shared(self, groups) -> list[list[list[float]]]:
        """Each text's context once, its KV cache repeated for the label words: ``groups`` is
        ``[(context ids, [label ids, ...]), ...]`` with the same number of labels in every group."""
        dev = _model_device(self.model)
        out: list = [None] * len(groups)
        order = sorted(range(len(groups)), key=lambda i: -len(groups[i][0]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            ctxs = [groups[i][0] for i in idx]
            lens = [len(c) for c in ctxs]
            width = max(lens)
            ids, mask = self._padded(ctxs, width, dev)
            res = self.model(input_ids=ids, attention_mask=mask, use_cache=True)
            last = torch.log_softmax(res.logits[torch.arange(len(idx)), torch.tensor(lens) - 1].float(), dim=-1)
            conts = [c for i in idx for c in groups[i][1]]
            w = len(groups[idx[0]][1])
            lps = [[last[r // w, c[0]].item()] for r, c in enumerate(conts)]
            tail = max(len(c) for c in conts) - 1
            if tail > 0:
                # transformers renamed past_key_values to cache (5.2x); either name, same object.
                past = getattr(res, "cache", None)
                past = past if past is not None else getattr(res, "past_key_values", None)
                past = _repeat_cache(past, w)  # row r of the batch -> rows r*w .. r*w+w-1
                cids, cmask = self._padded([c[:-1] for c in conts], tail, dev)
                # Right-padded contexts: the label tokens continue at each row's own length, and the
                # padding between the context and them stays masked.
                full_mask = torch.cat([mask.repeat_interleave(w, 0), cmask], dim=1)
                pos = torch.tensor(lens, device=dev).repeat_interleave(w)[:, None] + torch.arange(tail, device=dev)
                logits = self.model(input_ids=cids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                                    **{self._cache_arg(): past}).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                for r, c in enumerate(conts):
                    if len(c) > 1:
                        tgt = torch.tensor(c[1:], device=logp.device)
                        lps[r] += logp[r, :len(c) - 1].gather(-1, tgt[:, None]).squeeze(-1).tolist()
            for n, i in enumerate(idx):
                out[i] = lps[n * w:(n + 1) * w]
        return out

    @torch.no_grad()
    def _raw(self, texts, template: Template, verbalizer: Verbalizer, prefix: str) -> torch.Tensor:
        words = [(j, w) for j, label in enumerate(verbalizer.labels) for w in verbalizer.words[label]]
        encoded = []
        for t in texts:
            context, _ = template.split(t)
            encoded.append([self._encode(prefix + context, w) for _, w in words])
        token_lps: list = [None] * len(texts)
        was_training = self.model.training
        self.model.eval()
        try:
            shared = [n for n, e in enumerate(encoded) if all(p[0] == e[0][0] for p in e)]
            self.last_path = "full"
            if self.share_prefix and self._cache_ok and shared:
                try:
                    for n, lp in zip(shared, self._shared([(encoded[n][0][0], [p[1] for p in encoded[n]])
                                                           for n in shared])):
                        token_lps[n] = lp
                    self.last_path = "kv-cache"
                except _NoRepeatableCache as e:
                    self._cache_ok = False
                    warnings.warn(f"CausalLMScorer: {e}; scoring one full sequence per label word instead",
                                  stacklevel=3)
                    token_lps = [None] * len(texts)
            rest = [n for n in range(len(texts)) if token_lps[n] is None]
            if rest:
                flat = self._full([p for n in rest for p in encoded[n]])
                for k, n in enumerate(rest):
                    token_lps[n] = flat[k * len(words):(k + 1) * len(words)]
        finally:
            self.model.train(was_training)
        scores = torch.full((len(texts), len(verbalizer.labels)), float("-inf"), dtype=torch.float64)
        for n, lps in enumerate(token_lps):
            for (j, _), lp in zip(words, lps):
                v = sum(lp) / len(lp) if self.normalize == "mean" else sum(lp)
                scores[n, j] = max(scores[n, j].item(), v)  # a label with several words: its best word
        return scores

    def scores(self, texts, template, verbalizer: Verbalizer, demos=None) -> torch.Tensor:
        """``[N, L]`` label log-likelihoods (calibrated: log-probabilities over the labels, shifted).

        ``demos``: ``[(text, label), ...]`` in-context examples rendered with the same template
        (the label's first word) and joined by blank lines in front of every text.
        """
        template = as_template(template)
        if template.fields != ("text", "label"):
            raise PromptError(f"template {template.text!r}: a causal-LM template needs {{text}} "
                              "followed by {label} (the label word is scored after the text)")
        texts = _texts(texts)
        prefix = ""
        if demos:
            demos = list(demos)
            for j, d in enumerate(demos):
                if isinstance(d, (str, bytes)) or not isinstance(d, (tuple, list)) or len(d) != 2:
                    raise PromptError(f"demos[{j}]: expected a (text, label) pair, got {d!r}")
            demo_texts = _texts([d[0] for d in demos], "demos")
            demo_ids = _label_ids([d[1] for d in demos], verbalizer, "demos")
            prefix = "".join(template.render(text=t, label=verbalizer.words[verbalizer.labels[y]][0]) + "\n\n"
                             for t, y in zip(demo_texts, demo_ids))
        scores = self._raw(texts, template, verbalizer, prefix)
        if self.calibrate and len(texts):
            free = torch.log_softmax(self._raw(list(CONTENT_FREE), template, verbalizer, prefix), dim=-1)
            p_free = torch.logsumexp(free, dim=0) - torch.log(torch.tensor(float(len(CONTENT_FREE))))
            scores = torch.log_softmax(scores, dim=-1) - p_free
        return scores.float()


# --------------------------------------------------------------------------------------------
# classification and template selection


class PromptClassifier:
    """A scorer with one template and verbalizer: ``predict(texts)`` returns label names."""

    def __init__(self, scorer, template, verbalizer: Verbalizer, demos=None):
        if not isinstance(verbalizer, Verbalizer):
            raise PromptError(f"verbalizer: expected a Verbalizer, got {type(verbalizer).__name__}")
        self.scorer, self.template, self.verbalizer = scorer, as_template(template), verbalizer
        self.demos = list(demos) if demos else None

    def scores(self, texts) -> torch.Tensor:
        """``[N, L]`` class scores, columns in ``verbalizer.labels`` order."""
        return self.scorer.scores(texts, self.template, self.verbalizer, demos=self.demos)

    def predict(self, texts) -> list[str]:
        s = self.scores(texts)
        return [self.verbalizer.labels[i] for i in s.argmax(-1).tolist()]

    def accuracy(self, texts, labels) -> float:
        """Fraction right; ``labels`` are names or class ids in ``verbalizer.labels`` order."""
        texts = _texts(texts)
        y = _label_ids(labels, self.verbalizer)
        if len(y) != len(texts):
            raise PromptError(f"labels: {len(y)} labels for {len(texts)} texts")
        if not texts:
            raise PromptError("texts: empty; nothing to measure")
        pred = self.scores(texts).argmax(-1)
        return float((pred == torch.tensor(y)).double().mean())


@dataclass
class Selection:
    """:func:`select_template`'s result: the best classifier and every candidate's dev accuracy."""

    classifier: PromptClassifier
    accuracy: float
    table: list  # [{"scorer": int, "template": str, "verbalizer": int, "accuracy": float}], candidate order


def select_template(scorer, templates, verbalizers, texts, labels, demos=None) -> Selection:
    """Try every scorer with every template and verbalizer on the labelled dev split
    ``texts``/``labels``; return the most accurate (ties: the earliest candidate).

    ``scorer``: one scorer or a list (say a :class:`CausalLMScorer` with and without calibration);
    ``verbalizers``: one :class:`Verbalizer` or a list of them (all with the same labels, in the
    same order); ``labels``: names or class ids.
    """
    scorers = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer]
    if not scorers or not all(hasattr(s, "scores") for s in scorers):
        raise PromptError("scorer: expected an EncoderScorer/CausalLMScorer or a non-empty list of them")
    templates = [as_template(t) for t in ([templates] if isinstance(templates, (str, Template)) else templates)]
    if not templates:
        raise PromptError("templates: expected at least one template")
    verbs = [verbalizers] if isinstance(verbalizers, Verbalizer) else list(verbalizers)
    if not verbs or not all(isinstance(v, Verbalizer) for v in verbs):
        raise PromptError("verbalizers: expected a Verbalizer or a non-empty list of them")
    if any(v.labels != verbs[0].labels for v in verbs):
        raise PromptError(f"verbalizers: every verbalizer needs the labels {verbs[0].labels} in this order")
    texts = _texts(texts)
    y = _label_ids(labels, verbs[0])
    if not texts or len(y) != len(texts):
        raise PromptError(f"texts, labels: expected a non-empty dev split, got {len(texts)} texts and {len(y)} labels")
    table, best = [], None
    for si, sc in enumerate(scorers):
        for t in templates:
            for vi, v in enumerate(verbs):
                clf = PromptClassifier(sc, t, v, demos)
                acc = clf.accuracy(texts, y)
                table.append({"scorer": si, "template": t.text, "verbalizer": vi, "accuracy": acc})
                if best is None or acc > best[1]:
                    best = (clf, acc)
    return Selection(best[0], best[1], table)
