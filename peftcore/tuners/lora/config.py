"""LoRA configuration, with conversion to and from PEFT's adapter_config.json."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ...backends import BACKENDS

INITS = ("default", "gaussian", "pissa")


@dataclass
class LoRAConfig:
    """Low-rank adaptation: ``W x + b + scaling · B A dropout(x)``.

    Args:
        r: rank (>= 1).
        alpha: scaling numerator; scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``.
        dropout: dropout probability on the LoRA branch's input, in [0, 1).
        target_modules: regex string (full match), list of names or dotted suffixes, or
            ``"all-linear"``; None uses the model type's default (as PEFT does).
        exclude_modules: same forms as target_modules; matching modules are skipped.
        init: ``"default"`` (Kaiming-uniform A, zero B), ``"gaussian"`` (A ~ N(0, 1/r), zero B),
            ``"pissa"`` (A, B from the top-r SVD of W, the residual kept in W) or
            ``"pissa_niter_N"`` (randomized SVD with N iterations).
        use_rslora: rank-stabilized scaling alpha / sqrt(r).
        fan_in_fan_out: the base weight is stored ``[in, out]`` (GPT-2's Conv1D); None detects it.
        backend: force an ops backend for these layers (None lets the registry choose).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: Optional[Union[str, list]] = None
    exclude_modules: Optional[Union[str, list]] = None
    init: Union[str, bool] = "default"
    use_rslora: bool = False
    fan_in_fan_out: Optional[bool] = None
    backend: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    extra: dict = field(default_factory=dict)  # PEFT keys we keep but do not interpret

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r must be an int >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init is True:
            self.init = "default"
        if not isinstance(self.init, str) or not (
            self.init in INITS or re.fullmatch(r"pissa_niter_\d+", self.init)
        ):
            raise ValueError(
                f"LoRAConfig.init must be one of {INITS} or 'pissa_niter_N', got {self.init!r}"
            )
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not all(isinstance(t, str) for t in self.target_modules):
                raise TypeError("LoRAConfig.target_modules must be a string or a list of strings")
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = list(self.exclude_modules)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"LoRAConfig.backend must be one of {BACKENDS} or None, got {self.backend!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    # --- PEFT's adapter_config.json -------------------------------------------------------
    def to_peft_dict(self, target_modules=None) -> dict:
        """The adapter_config.json PEFT writes for this config (keys PEFT's LoraConfig reads)."""
        targets = self.target_modules if target_modules is None else target_modules
        d = dict(self.extra)
        d.update(
            {
                "peft_type": "LORA",
                "task_type": d.get("task_type"),
                "base_model_name_or_path": self.base_model_name_or_path,
                "inference_mode": True,
                "r": self.r,
                "lora_alpha": self.alpha,
                "lora_dropout": self.dropout,
                "target_modules": targets,
                "exclude_modules": self.exclude_modules,
                "fan_in_fan_out": bool(self.fan_in_fan_out),
                "bias": "none",
                "use_rslora": self.use_rslora,
                "use_dora": False,
                "init_lora_weights": True if self.init == "default" else self.init,
                "modules_to_save": None,
                "layers_to_transform": None,
                "layers_pattern": None,
                "rank_pattern": {},
                "alpha_pattern": {},
                "revision": None,
            }
        )
        return d

    @classmethod
    def from_peft_dict(cls, d: dict, source: str = "adapter_config.json") -> "LoRAConfig":
        """Read PEFT's adapter_config.json; refuses features peftcore would silently get wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type is {d.get('peft_type')!r}; only LORA adapters load here")
        for key in ("r", "lora_alpha"):
            if key not in d:
                raise ValueError(f"{source}: missing required key {key!r}")
        unsupported = {
            "use_dora": False,
            "bias": "none",
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
            "layers_to_transform": None,
        }
        for key, ok in unsupported.items():
            if d.get(key, ok) not in (ok, None, {}, []) and d.get(key) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by peftcore yet")
        init = d.get("init_lora_weights", True)
        init = "default" if init in (True, False) else init
        known = {
            "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
            "fan_in_fan_out", "init_lora_weights", "base_model_name_or_path",
        }
        return cls(
            r=int(d["r"]),
            alpha=d["lora_alpha"],
            dropout=float(d.get("lora_dropout", 0.0) or 0.0),
            target_modules=d.get("target_modules"),
            exclude_modules=d.get("exclude_modules"),
            init=init,
            use_rslora=bool(d.get("use_rslora", False)),
            fan_in_fan_out=d.get("fan_in_fan_out"),
            base_model_name_or_path=d.get("base_model_name_or_path"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict:
        return asdict(self)
