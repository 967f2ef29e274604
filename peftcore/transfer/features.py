"""A frozen backbone's features, computed once and reused for every epoch of a new head.

``FeatureCache.features(backbone, texts, tokenizer=...)`` returns the pooled features ``[N, H]``
(float32, CPU) of ``texts``.  The cache key is a sha256 over everything that decides them:

* the backbone: its class, its config, and every parameter's and buffer's name, dtype, shape and
  bytes (``module_fingerprint``);
* the pooling (``"mean"``, ``"cls"``, ``"max"`` or a callable named by ``pooling_key``);
* the tokenizer: class, backend state or vocabulary, special tokens, padding/truncation side, and
  ``max_length`` (``tokenizer_fingerprint``);
* the transform applied to each text before tokenizing (deterministic only: see below);
* the data: the texts in order (``data_fingerprint``).

So a changed input never reads stale features.  With a ``root`` directory the features go to
``root/features-<key16>.safetensors`` (written to a temporary file, fsynced, renamed into place),
and a later run (a new process) loads them without running the backbone.  A file whose recorded
key or shape does not match, or that cannot be parsed, is recomputed with a warning.  Loading
never unpickles (safetensors only).

A random transform (augmentation) is refused: it draws new inputs each epoch, so features from
one epoch are not the features of the next; train end to end instead.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["FeatureCache", "module_fingerprint", "tokenizer_fingerprint", "data_fingerprint"]

_POOLINGS = ("mean", "cls", "max")
_FORMAT = "peftcore.features/1"


# --------------------------------------------------------------------------------------------
# fingerprints


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # Viewing as uint8 works for every dtype (bf16 and fp8 included, which numpy lacks).
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _config_json(module: nn.Module) -> str:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return ""
    to_dict = getattr(cfg, "to_dict", None)
    d = to_dict() if callable(to_dict) else dict(vars(cfg))
    # Fields that name where the weights came from, not what they compute, stay out of the key.
    for k in ("_name_or_path", "transformers_version", "_commit_hash"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=repr)


def module_fingerprint(module: nn.Module) -> str:
    """sha256 hex digest of ``module``: its class, its config (``module.config`` when present) and
    every parameter and buffer (name, dtype, shape, bytes), shared ones under each of their names.

    Two modules with the same digest compute the same function (given the same code).  Hashing
    reads every byte once: about 0.1 s for a 90 MB encoder (see the benchmark's ``hash_s``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    h = hashlib.sha256()
    cls = type(module)
    h.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
    h.update(_config_json(module).encode() + b"\n")
    tensors = [("param", n, t) for n, t in module.named_parameters(remove_duplicate=False)]
    tensors += [("buffer", n, t) for n, t in module.named_buffers(remove_duplicate=False)]
    for kind, name, t in tensors:
        h.update(f"{kind} {name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer, max_length: int) -> str:
    """sha256 hex digest of what decides ``tokenizer``'s output at ``max_length``: its class, its
    backend state (a fast tokenizer's ``tokenizer.json``: vocabulary, normalizer, pre-tokenizer)
    or else its sorted vocabulary, its special tokens, padding and truncation sides."""
    h = hashlib.sha256()
    cls = type(tokenizer)
    h.update(f"{cls.__module__}.{cls.__qualname__}\nmax_length={max_length}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        # The backend state holds the padding/truncation settings of the last call; those are set
        # per call here, so they are cleared before hashing by parsing and dropping them.
        state = json.loads(backend.to_str())
        state.pop("padding", None)
        state.pop("truncation", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    extra = {
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "added": sorted(str(t) for t in (getattr(tokenizer, "get_added_vocab", dict)() or {})),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "do_lower_case": getattr(tokenizer, "do_lower_case", None),
    }
    h.update(json.dumps(extra, sort_keys=True, default=repr).encode())
    return h.hexdigest()


def data_fingerprint(items) -> str:
    """sha256 hex digest of a sequence in order: of each item's own sha256 (a ``str`` as UTF-8,
    ``bytes`` as is, a tensor or numpy array by dtype, shape and bytes), then of the sequence."""
    h = hashlib.sha256()
    n = 0
    for i, item in enumerate(items):
        h.update(_item_digest(item, i))
        n += 1
    h.update(f"n={n}".encode())
    return h.hexdigest()


def _item_digest(item, i) -> bytes:
    if isinstance(item, str):
        return hashlib.sha256(b"s" + item.encode("utf-8")).digest()
    if isinstance(item, (bytes, bytearray)):
        return hashlib.sha256(b"b" + bytes(item)).digest()
    if isinstance(item, torch.Tensor):
        d = hashlib.sha256(f"t{item.dtype}{tuple(item.shape)}".encode())
        d.update(_tensor_bytes(item))
        return d.digest()
    try:
        import numpy as np

        if isinstance(item, np.ndarray) and item.dtype != object:
            d = hashlib.sha256(f"a{item.dtype.str}{item.shape}".encode())
            d.update(np.ascontiguousarray(item).tobytes())
            return d.digest()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(
        f"items[{i}]: expected str, bytes, a torch.Tensor or a numpy array to fingerprint, got {type(item).__name__}"
    )


def _is_random(transform) -> bool:
    if getattr(transform, "is_random", False):
        return True
    if type(transform).__name__.startswith("Random"):
        return True
    # torchvision's Compose / RandomApply hold their parts in .transforms.
    parts = getattr(transform, "transforms", None)
    if isinstance(parts, (list, tuple)):
        return any(_is_random(p) for p in parts)
    return False


def _transform_key(transform) -> str:
    """The transform's part of the key; raises ValueError for a random or unnamed transform."""
    if transform is None:
        return "none"
    if not callable(transform):
        raise TypeError(f"transform: expected a callable or None, got {type(transform).__name__}")
    if _is_random(transform):
        raise ValueError(
            f"transform: {type(transform).__name__} is random (augmentation); it draws new inputs "
            "each epoch, so features computed once cannot be reused. Train end to end (the "
            "backbone in the loop) with augmentation, or cache without the transform."
        )
    key = getattr(transform, "cache_key", None)
    if key is not None:
        if not isinstance(key, str) or not key:
            raise TypeError(f"transform.cache_key: expected a non-empty str, got {key!r}")
        return "key:" + key
    text = repr(transform)
    if " at 0x" in text:
        # The default repr names the object's address, not what it does: it cannot key a cache.
        raise ValueError(
            f"transform: {text} has no cache_key and no descriptive repr; set transform.cache_key "
            "to a string that changes whenever what the transform does changes"
        )
    return "repr:" + text


def _pool(pooling, hidden, mask):
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        fill = torch.finfo(hidden.dtype).min
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), fill).amax(1)
    return pooling(hidden, mask)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    # Per submodule: a caller may hold some parts in train mode and others in eval mode.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def _device_of(module: nn.Module):
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# the cache


class FeatureCache:
    """Pooled features of a frozen backbone, keyed on everything that decides them.

    ``root``: a directory (created on first write) for ``features-<key16>.safetensors`` files, or
    None to keep features in memory for this object's life.  After each call ``last_hit`` (bool:
    served without running the backbone), ``last_key`` (full sha256 hex) and ``last_path`` (the
    file, or None in memory) describe it.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root: expected a directory path or None, got {type(root).__name__}")
        self.root = Path(root) if root is not None else None
        if self.root is not None and self.root.exists() and not self.root.is_dir():
            raise ValueError(f"root: {str(self.root)!r} exists and is not a directory")
        self._memory: dict[str, torch.Tensor] = {}
        self.last_hit: bool | None = None
        self.last_key: str | None = None
        self.last_path: Path | None = None

    def __repr__(self):
        return f"FeatureCache(root={str(self.root) if self.root else None!r})"

    # ---- the text path

    def features(
        self,
        backbone: nn.Module,
        texts,
        *,
        tokenizer,
        pooling="mean",
        pooling_key: str | None = None,
        max_length: int = 64,
        batch_size: int = 64,
        device=None,
        transform=None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Pooled features ``[N, H]`` (float32, CPU) of ``texts`` (a sequence of N str).

        ``backbone`` is a transformers encoder called as
        ``backbone(input_ids=[B, T], attention_mask=[B, T]).last_hidden_state -> [B, T, H]``.
        It runs under ``torch.no_grad`` in eval mode (dropout off: train mode would give random
        features); each submodule's train/eval mode is restored afterwards.  ``pooling``:
        ``"mean"`` (over real tokens, by ``attention_mask``), ``"cls"`` (position 0), ``"max"``
        (over real tokens), or a callable ``(hidden [B, T, H], mask [B, T]) -> [B, H]`` named by
        ``pooling_key`` (a str entering the cache key).  Texts are tokenized in batches of
        ``batch_size`` with truncation to ``max_length`` and padding to each batch's longest.
        ``transform`` (str -> str, applied to each text first) must be deterministic and carry a
        ``cache_key`` or a descriptive repr; a random one raises ValueError.  ``device``: where
        the backbone runs (default: where its parameters are); it must already be there.
        """
        texts = self._check_texts(texts)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone: expected a torch.nn.Module, got {type(backbone).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"tokenizer: expected a callable transformers tokenizer, got {type(tokenizer).__name__}")
        pool_part = self._pooling_key(pooling, pooling_key)
        for name, v in (("max_length", max_length), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        transform_part = _transform_key(transform)
        dev = torch.device(device) if device is not None else _device_of(backbone)
        key = self._key(
            kind="text",
            backbone=module_fingerprint(backbone),
            pooling=pool_part,
            tokenizer=tokenizer_fingerprint(tokenizer, max_length),
            transform=transform_part,
            data=data_fingerprint(texts),
        )

        def compute():
            inputs = [transform(t) for t in texts] if transform is not None else texts
            for i, t in enumerate(inputs[:1] if transform is not None else ()):
                if not isinstance(t, str):
                    raise TypeError(f"transform: expected it to return str, got {type(t).__name__} for texts[{i}]")
            out = []
            with _eval_mode(backbone), torch.no_grad(), _bar(len(inputs), progress) as bar:
                for i in range(0, len(inputs), batch_size):
                    enc = tokenizer(
                        list(inputs[i : i + batch_size]),
                        padding="longest",
                        truncation=True,
                        max_length=max_length,
                        return_tensors="pt",
                    )
                    ids = enc["input_ids"].to(dev)
                    mask = enc["attention_mask"].to(dev)
                    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                    out.append(_pool(pooling, hidden, mask).float().cpu())
                    bar.update(len(ids))
            return _stack(out, len(inputs))

        return self._get(key, compute, len(texts), pool_part)

    # ---- the generic path (images, audio, anything batched)

    def features_from(self, fn, items, *, key_parts, batch_size: int = 64, transform=None) -> torch.Tensor:
        """Features ``[N, H]`` (float32, CPU) of ``items`` by ``fn(batch: list) -> [B, H]``.

        ``fn`` itself is not fingerprinted: ``key_parts`` (a non-empty str, or a JSON-serializable
        dict/list, e.g. ``{"backbone": module_fingerprint(model), "pooling": "avg"}``) must name
        everything that decides its output.  ``items``: str, bytes, tensors or numpy arrays (each
        enters the key by content).  ``transform`` (item -> item, applied first) follows the same
        rules as in ``features``.  ``fn`` runs under ``torch.no_grad``; putting a model in eval
        mode is the caller's (``fn``'s) job here.
        """
        if not callable(fn):
            raise TypeError(f"fn: expected a callable batch -> [B, H], got {type(fn).__name__}")
        items = list(items) if not isinstance(items, (str, bytes)) else None
        if items is None or not items:
            raise ValueError("items: expected a non-empty sequence")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not key_parts:
            raise ValueError("key_parts: expected a non-empty str or JSON-serializable dict/list naming fn's inputs")
        try:
            parts = json.dumps(key_parts, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"key_parts: expected JSON-serializable values ({e})") from None
        key = self._key(kind="generic", parts=parts, transform=_transform_key(transform), data=data_fingerprint(items))

        def compute():
            inputs = [transform(x) for x in items] if transform is not None else items
            out = []
            with torch.no_grad():
                for i in range(0, len(inputs), batch_size):
                    y = fn(inputs[i : i + batch_size])
                    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != len(inputs[i : i + batch_size]):
                        raise ValueError(f"fn: expected a [B, H] tensor for a batch of {len(inputs[i:i + batch_size])}")
                    out.append(y.detach().float().cpu())
            return _stack(out, len(inputs))

        return self._get(key, compute, len(items), "generic")

    # ---- internals

    @staticmethod
    def _check_texts(texts):
        if isinstance(texts, str) or texts is None:
            raise TypeError(f"texts: expected a sequence of str, got {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise ValueError("texts: expected at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        return texts

    @staticmethod
    def _pooling_key(pooling, pooling_key):
        if isinstance(pooling, str):
            if pooling not in _POOLINGS:
                raise ValueError(f"pooling: expected one of {_POOLINGS} or a callable, got {pooling!r}")
            if pooling_key is not None:
                raise ValueError("pooling_key: only for a callable pooling (a named pooling is its own key)")
            return pooling
        if not callable(pooling):
            raise TypeError(f"pooling: expected one of {_POOLINGS} or a callable, got {type(pooling).__name__}")
        if not isinstance(pooling_key, str) or not pooling_key:
            raise ValueError(
                "pooling_key: a callable pooling needs pooling_key, a non-empty str naming it in the cache key"
            )
        return "callable:" + pooling_key

    @staticmethod
    def _key(**parts) -> str:
        return hashlib.sha256(json.dumps({"format": _FORMAT, **parts}, sort_keys=True).encode()).hexdigest()

    def _path(self, key):
        return self.root / f"features-{key[:16]}.safetensors"

    def _get(self, key, compute, n, pooling):
        self.last_key = key
        self.last_path = self._path(key) if self.root is not None else None
        if self.root is None:
            feats = self._memory.get(key)
            if feats is None:
                feats = compute()
                self._memory[key] = feats
                self.last_hit = False
            else:
                self.last_hit = True
            return feats.clone()  # a caller editing its copy must not edit the cache
        feats = self._load(self.last_path, key, n)
        if feats is not None:
            self.last_hit = True
            return feats
        feats = compute()
        self._store(self.last_path, key, feats, pooling)
        self.last_hit = False
        return feats

    @staticmethod
    def _load(path: Path, key: str, n: int):
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    raise ValueError(f"recorded key {meta.get('key')!r} is not {key!r}")
                feats = f.get_tensor("features")
            hidden = int(meta.get("hidden", -1))
            if feats.dtype != torch.float32 or feats.dim() != 2 or tuple(feats.shape) != (n, hidden):
                raise ValueError(f"features {feats.dtype} {tuple(feats.shape)}, expected float32 ({n}, {hidden})")
        except Exception as e:  # a truncated or foreign file: recompute, never trust it
            warnings.warn(f"FeatureCache: ignoring {str(path)!r} ({type(e).__name__}: {e}); recomputing", stacklevel=3)
            return None
        return feats

    @staticmethod
    def _store(path: Path, key: str, feats: torch.Tensor, pooling: str):
        from safetensors.torch import save

        import peftcore

        meta = {
            "format": _FORMAT,
            "key": key,
            "n": str(feats.shape[0]),
            "hidden": str(feats.shape[1]),
            "pooling": pooling,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "peftcore_version": str(getattr(peftcore, "__version__", "unknown")),
        }
        payload = save({"features": feats.contiguous()}, metadata=meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename is durable only once the directory entry is.
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _stack(out, n):
    feats = torch.cat(out) if out else torch.empty(0, 0)
    if feats.shape[0] != n:  # pragma: no cover - a pooling callable returning the wrong rows
        raise ValueError(f"pooling: produced {feats.shape[0]} rows for {n} inputs")
    return feats.contiguous()


def _bar(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="features", unit="text", disable=not enabled, dynamic_ncols=True)
