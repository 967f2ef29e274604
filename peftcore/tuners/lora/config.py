"""LoRA configuration, with conversion to and from PEFT's adapter_config.json."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ...backends import BACKENDS

INITS = ("default", "gaussian", "pissa")
BIAS = ("none", "all", "lora_only")
# PEFT's task types whose new head trains and is saved with the adapter (PEFT adds these to
# modules_to_save in PeftModelForSequenceClassification / ...TokenClassification / ...QuestionAnswering).
TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


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
        rank_pattern, alpha_pattern: ``{pattern: r}`` / ``{pattern: alpha}`` per module, PEFT's rule: a
            key (a regex) matches a module whose qualified name is it or ends with ``.`` + it; the
            first matching key wins; unmatched modules take ``r`` / ``alpha``.
        layers_to_transform, layers_pattern: only the blocks with these indices (an int or a list)
            get the adapter; the index is the number after ``layers_pattern`` (e.g. ``"layers"``,
            ``"h"``) in the module's name, else the first numbered segment.  PEFT applies them only
            to a list of target_modules, and so does this.
        modules_to_save: modules (names or dotted suffixes) that train in full and are saved with
            the adapter: one trainable copy per adapter (PEFT's ModulesToSaveWrapper), e.g. a new
            classification head.
        task_type: PEFT's task type; ``"SEQ_CLS"``/``"TOKEN_CLS"`` add ``classifier``/``score`` and
            ``"QUESTION_ANS"`` adds ``qa_outputs`` to modules_to_save, as PEFT does.  Left None on
            a transformers ``*ForSequenceClassification`` model, apply uses ``"SEQ_CLS"``: a head
            created for the task must train.
        bias: ``"none"``; ``"lora_only"``: the biases of the adapted layers train and are saved
            with the adapter; ``"all"``: every bias of the model does (PEFT's semantics: these are
            base-model tensors, shared by every adapter).
        lora_bias: lora_B gets a bias (zero-initialized), scaled like the update (PEFT's lora_bias).
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
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    layers_to_transform: Optional[Union[int, list]] = None
    layers_pattern: Optional[Union[str, list]] = None
    modules_to_save: Optional[list] = None
    task_type: Optional[str] = None
    bias: str = "none"
    lora_bias: bool = False
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
        for name in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, name)
            if pat is None:
                setattr(self, name, {})
                continue
            if not isinstance(pat, dict) or not all(isinstance(k, str) for k in pat):
                raise TypeError(f"LoRAConfig.{name} must be a dict of module-name patterns, got {pat!r}")
            for k, v in pat.items():
                if name == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                    raise ValueError(f"LoRAConfig.rank_pattern[{k!r}] must be an int >= 1, got {v!r}")
                if name == "alpha_pattern" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                    raise ValueError(f"LoRAConfig.alpha_pattern[{k!r}] must be a positive number, got {v!r}")
        lt = self.layers_to_transform
        if lt is not None and not (isinstance(lt, int) and not isinstance(lt, bool)):
            if not isinstance(lt, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in lt):
                raise TypeError(f"LoRAConfig.layers_to_transform must be an int or a list of ints, got {lt!r}")
            self.layers_to_transform = list(lt)
        if self.layers_pattern is not None and not isinstance(self.layers_pattern, str):
            self.layers_pattern = list(self.layers_pattern)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"LoRAConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        if self.bias not in BIAS:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS}, got {self.bias!r}")
        if not isinstance(self.lora_bias, bool):
            raise TypeError(f"LoRAConfig.lora_bias must be a bool, got {self.lora_bias!r}")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """``(r, alpha)`` of the module with qualified name ``module_name`` (PEFT's get_pattern_key)."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def heads_to_save(self) -> list[str]:
        """modules_to_save with the task type's heads (PEFT's rule), in order, without repeats."""
        out = list(self.modules_to_save or [])
        for m in TASK_HEADS.get(self.task_type or "", []):
            if m not in out:
                out.append(m)
        return out

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.alpha)

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
                "bias": self.bias,
                "lora_bias": self.lora_bias,
                "use_rslora": self.use_rslora,
                "use_dora": False,
                "init_lora_weights": True if self.init == "default" else self.init,
                "modules_to_save": self.heads_to_save() or None,
                "layers_to_transform": self.layers_to_transform,
                "layers_pattern": self.layers_pattern,
                "rank_pattern": dict(self.rank_pattern),
                "alpha_pattern": dict(self.alpha_pattern),
                "task_type": self.task_type,
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
        # Features that change the math and that peftcore does not implement: refused by name, never
        # loaded as something else.  (Keys PEFT writes at their defaults pass.)
        unsupported = {
            "use_dora": (False, None),
            "target_parameters": (None, [], ()),
            "trainable_token_indices": (None, {}, []),
            "alora_invocation_tokens": (None, []),
            "use_qalora": (False, None),
            "layer_replication": (None, []),
        }
        for key, ok in unsupported.items():
            if key in d and d[key] not in ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported by peftcore yet")
        init = d.get("init_lora_weights", True)
        if init in (True, False, "gaussian") or (isinstance(init, str) and init.startswith("pissa")):
            init = "default" if init in (True, False) else init
        else:
            raise ValueError(f"{source}: init_lora_weights={init!r} is not supported by peftcore "
                             f"(supported: true, 'gaussian', 'pissa', 'pissa_niter_N')")
        known = {
            "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
            "fan_in_fan_out", "init_lora_weights", "base_model_name_or_path", "rank_pattern", "alpha_pattern",
            "layers_to_transform", "layers_pattern", "modules_to_save", "task_type", "bias", "lora_bias",
        }
        task_type = d.get("task_type")
        saved = [m for m in (d.get("modules_to_save") or []) if m not in TASK_HEADS.get(task_type or "", [])]
        try:
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
                rank_pattern=d.get("rank_pattern") or {},
                alpha_pattern=d.get("alpha_pattern") or {},
                layers_to_transform=d.get("layers_to_transform"),
                layers_pattern=d.get("layers_pattern") or None,
                modules_to_save=saved or None,
                task_type=task_type,
                bias=d.get("bias", "none") or "none",
                lora_bias=bool(d.get("lora_bias", False)),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid LoRA config: {e}") from e

    def to_dict(self) -> dict:
        return asdict(self)


def _pattern_value(pattern: dict, name: str, default):
    for key in pattern:  # PEFT's get_pattern_key: the first key that matches a suffix of the name
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default
