"""LoRA configuration, with conversion to and from PEFT's adapter_config.json."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ...backends import BACKENDS
from .. import _validate as V
from ..targets import bounded_match

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
        use_dora: DoRA (Liu et al. 2024): a trained magnitude per output row, initialized to the row
            norms of W + s·BA; the output is (m / ‖W + s·BA‖)·(x Wᵀ + s·(dropout(x) Aᵀ) Bᵀ) + b with
            the norm detached, as in the paper and PEFT.
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
    use_dora: bool = False
    extra: dict = field(default_factory=dict)  # PEFT keys we keep but do not interpret

    def __post_init__(self):
        c = "LoRAConfig"
        self.r = V.integer(c, "r", self.r)
        self.alpha = V.number(c, "alpha", self.alpha, lo=0, hi=V.FLOAT_MAX, lo_open=True, expect="a positive number")
        self.dropout = V.number(c, "dropout", self.dropout, lo=0.0, hi=1.0, hi_open=True, expect="in [0, 1)")
        if self.init is True:
            self.init = "default"
        if not isinstance(self.init, str) or not (
            self.init in INITS or re.fullmatch(r"pissa_niter_\d{1,6}", self.init)
        ):
            raise ValueError(
                f"LoRAConfig.init must be one of {INITS} or 'pissa_niter_N', got {self.init!r}"
            )
        self.target_modules = V.names_or_regex(c, "target_modules", self.target_modules)
        self.exclude_modules = V.names_or_regex(c, "exclude_modules", self.exclude_modules)
        V.boolean(c, "use_rslora", self.use_rslora)
        V.boolean(c, "fan_in_fan_out", self.fan_in_fan_out, optional=True)
        V.choice(c, "backend", self.backend, BACKENDS, optional=True)
        V.string(c, "base_model_name_or_path", self.base_model_name_or_path)
        for name in ("rank_pattern", "alpha_pattern"):
            pat = getattr(self, name)
            if pat is None:
                setattr(self, name, {})
                continue
            if not isinstance(pat, dict):
                raise TypeError(f"LoRAConfig.{name} must be a dict of module-name patterns, got {pat!r}")
            for k, v in pat.items():
                V.regex(c, f"{name} key", k)
                if name == "rank_pattern":
                    V.integer(c, f"rank_pattern[{k!r}]", v)
                else:
                    V.number(c, f"alpha_pattern[{k!r}]", v, lo=0, hi=V.FLOAT_MAX, lo_open=True,
                             expect="a positive number")
        self.layers_to_transform = V.int_list(c, "layers_to_transform", self.layers_to_transform,
                                              allow_int=True, optional=True)
        lp = self.layers_pattern
        if lp is not None:
            lp = [lp] if isinstance(lp, str) else lp
            if not isinstance(lp, (list, tuple)):
                raise TypeError(f"LoRAConfig.layers_pattern must be a string or a list of strings, got {lp!r}")
            for i, p in enumerate(lp):
                V.regex(c, f"layers_pattern[{i}]" if not isinstance(self.layers_pattern, str) else "layers_pattern", p)
            if not isinstance(self.layers_pattern, str):
                self.layers_pattern = list(lp)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not isinstance(self.modules_to_save, (list, tuple)) or \
                    not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise TypeError(f"LoRAConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        V.string(c, "task_type", self.task_type, max_len=64)
        V.choice(c, "bias", self.bias, BIAS)
        V.boolean(c, "lora_bias", self.lora_bias)
        V.boolean(c, "use_dora", self.use_dora)
        if self.use_dora and self.lora_bias:
            raise ValueError("LoRAConfig.use_dora with lora_bias: DoRA does not take a lora_B bias (PEFT refuses it too)")
        if not isinstance(self.extra, dict):
            raise TypeError(f"LoRAConfig.extra must be a dict, got {self.extra!r}")

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
                "use_dora": self.use_dora,
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
        if init in (True, False) and isinstance(init, bool):
            init = "default"
        elif not (isinstance(init, str) and (init == "gaussian" or init.startswith("pissa"))):
            raise ValueError(f"{source}: init_lora_weights={init!r} is not supported by peftcore "
                             f"(supported: true, 'gaussian', 'pissa', 'pissa_niter_N')")
        known = {
            "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
            "fan_in_fan_out", "init_lora_weights", "base_model_name_or_path", "rank_pattern", "alpha_pattern",
            "layers_to_transform", "layers_pattern", "modules_to_save", "task_type", "bias", "lora_bias",
            "use_dora",
        }
        task_type = d.get("task_type")
        if task_type is not None and not isinstance(task_type, str):
            raise ValueError(f"{source}: task_type must be a string or null, got {task_type!r}")
        saved = d.get("modules_to_save")
        if saved is not None and (not isinstance(saved, list) or not all(isinstance(m, str) for m in saved)):
            raise ValueError(f"{source}: modules_to_save must be a list of module names or null, got {saved!r}")
        saved = [m for m in (saved or []) if m not in TASK_HEADS.get(task_type or "", [])]

        def default(key, value):  # PEFT writes null for some keys left at their default
            v = d.get(key, value)
            return value if v is None else v

        try:
            return cls(
                r=d["r"],
                alpha=d["lora_alpha"],
                dropout=default("lora_dropout", 0.0),
                target_modules=d.get("target_modules"),
                exclude_modules=d.get("exclude_modules"),
                init=init,
                use_rslora=default("use_rslora", False),
                fan_in_fan_out=d.get("fan_in_fan_out"),
                base_model_name_or_path=d.get("base_model_name_or_path"),
                rank_pattern=default("rank_pattern", {}),
                alpha_pattern=default("alpha_pattern", {}),
                layers_to_transform=d.get("layers_to_transform"),
                layers_pattern=d.get("layers_pattern") or None,
                modules_to_save=saved or None,
                task_type=task_type,
                bias=default("bias", "none"),
                lora_bias=default("lora_bias", False),
                use_dora=default("use_dora", False),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid LoRA config: {_file_names(str(e))}") from e

    def to_dict(self) -> dict:
        return asdict(self)


# LoRAConfig's field -> the key PEFT's adapter_config.json calls it, for errors about a file.
_PEFT_KEYS = {"alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}


def _file_names(message: str) -> str:
    return re.sub(r"LoRAConfig\.(alpha|dropout|init)\b", lambda m: f"{_PEFT_KEYS[m.group(1)]} (LoRAConfig.{m.group(1)})",
                  message)


def _pattern_value(pattern: dict, name: str, default):
    for key in pattern:  # PEFT's get_pattern_key: the first key that matches a suffix of the name
        if bounded_match(rf"(.*\.)?({key})$", name, "rank_pattern/alpha_pattern key"):
            return pattern[key]
    return default
