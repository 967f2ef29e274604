"""``TaskConfig``: one place for a task's settings, shared by ``peftcore finetune`` and the Python API."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

METHODS = ("head", "freeze", "unfreeze", "lora", "bottleneck", "compacter", "prompt", "full")
SCHEDULES = ("linear", "cosine", "constant", "slanted_triangular")
REGULARIZERS = (None, "l2sp", "r_drop", "mixout")
AUGMENTS = (None, "eda", "token_cutoff", "span_cutoff")
# Tuned on the packaged MiniLM and the shipped intent set (the demo's values).
METHOD_DEFAULTS = {
    "head": dict(epochs=60, lr=3e-3, batch_size=32),
    "freeze": dict(epochs=6, lr=3e-4, batch_size=16, freeze_to=-3),
    "unfreeze": dict(epochs=6, lr=3e-4, batch_size=16, schedule="slanted_triangular", layer_decay=0.8),
    "lora": dict(epochs=8, lr=2e-3, batch_size=16),
    "bottleneck": dict(epochs=8, lr=1e-3, batch_size=16),
    "compacter": dict(epochs=8, lr=3e-3, batch_size=16),
    "prompt": dict(epochs=8, lr=3e-2, batch_size=16),
    "full": dict(epochs=4, lr=1e-4, batch_size=16),
}
_REG_WEIGHT = {"l2sp": 0.01, "r_drop": 1.0, "mixout": 0.1}  # R-Drop's alpha; Mixout's p


def default_regularizer_weight(name: str) -> float:
    """The weight a regularizer gets when ``regularizer_weight`` is None."""
    return _REG_WEIGHT[name]


@dataclass
class TaskConfig:
    """A fine-tuning task's settings (see ``peftcore finetune --help``; each field is a flag)."""

    method: str = "lora"
    epochs: int = 8
    lr: float = 2e-3
    batch_size: int = 16
    max_length: int = 64
    schedule: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    layer_decay: float = 1.0
    dropout: float = 0.1
    regularizer: str | None = None
    regularizer_weight: float | None = None
    augment: str | None = None
    augment_rate: float = 0.1
    freeze_to: int = -3
    unfreeze_every: int = 1
    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    adapter_reduction: int = 16
    prompt_tokens: int = 20

    def __post_init__(self):
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TaskConfig.{name}: {getattr(self, name)!r} is not one of {list(allowed)}")

        def integer(name, lo, hi=2**31 - 1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"TaskConfig.{name}: expected an int in [{lo}, {hi}], got {v!r}")

        def real(name, lo, hi, lo_open=False, hi_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
                raise ValueError(f"TaskConfig.{name}: expected a number in {'(' if lo_open else '['}{lo}, {hi}"
                                 f"{')' if hi_open else ']'}, got {v!r}")
            setattr(self, name, float(v))

        choice("method", METHODS)
        choice("schedule", SCHEDULES)
        choice("regularizer", REGULARIZERS)
        choice("augment", AUGMENTS)
        for name, lo in (("epochs", 1), ("batch_size", 1), ("max_length", 2), ("unfreeze_every", 1), ("seed", 0),
                         ("lora_r", 1), ("adapter_reduction", 1), ("prompt_tokens", 1)):
            integer(name, lo)
        integer("freeze_to", -(2**31 - 1))
        real("lr", 0.0, 10.0, lo_open=True)
        real("warmup_ratio", 0.0, 1.0, hi_open=True)
        real("weight_decay", 0.0, 10.0)
        real("layer_decay", 0.0, 1.0, lo_open=True)
        real("dropout", 0.0, 1.0, hi_open=True)
        real("augment_rate", 0.0, 1.0, hi_open=True)
        real("lora_alpha", 0.0, 1e6, lo_open=True)
        real("lora_dropout", 0.0, 1.0, hi_open=True)
        if self.regularizer_weight is not None:
            hi_open = self.regularizer == "mixout"
            real("regularizer_weight", 0.0, 1.0 if hi_open else 1e6, hi_open=hi_open)

    @classmethod
    def for_method(cls, method: str, **overrides) -> "TaskConfig":
        """The method's defaults (``METHOD_DEFAULTS``), then ``overrides``."""
        if method not in METHOD_DEFAULTS:
            raise ValueError(f"TaskConfig.method: {method!r} is not one of {list(METHODS)}")
        return cls(**{"method": method, **METHOD_DEFAULTS[method], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "TaskConfig":
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise ValueError(f"{where}a task config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}unknown TaskConfig field(s) {unknown}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        from ..io import _atomic_write

        data = (json.dumps(self.to_dict(), indent=2) + "\n").encode()
        _atomic_write(Path(path), lambda f: f.write(data))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "TaskConfig":
        path = Path(path)
        data = path.read_bytes()
        if len(data) > 2**20:
            raise ValueError(f"{path}: {len(data)} bytes; a task config is at most 1 MiB")
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))
