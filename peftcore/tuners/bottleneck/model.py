"""Putting bottleneck adapters and Compacter into transformers models by forward hooks.

Where adapters go, per ``config.model_type``: the module whose output is the attention block's
result, the one whose output is the feed-forward block's result (both before the residual add
and, for post-LN models, the LayerNorm), and the one whose input is the feed-forward block's
input (the parallel branch reads it).  The points are whole blocks (``self_attn``, ``mlp``) or the
dropout right after the output projection rather than the projection itself: LoRA replaces the
linear layers it targets by wrappers, which would drop or bypass a hook on the original layer and
move an adapter's state-dict keys under ``base_layer``; the blocks are never replaced, so both
methods combine in either order with the same keys.  For BERT and GPT-2 this is also AdapterHub's
exact placement (after the sub-block's dropout, before residual and LayerNorm).
"""

from __future__ import annotations

from torch import nn

from ...layers.bottleneck import BottleneckAdapter, BottleneckSlot
from ...layers.phm import PHMRuleBank
from .._validate import check_fits
from ...ops.phm import check_phm_shapes
from ..targets import matches
from .config import BottleneckConfig

# model_type -> (attention output, feed-forward output, feed-forward input), relative to a layer.
_BERT = ("attention.output.dropout", "output.dropout", "intermediate")
_DECODER = ("self_attn", "mlp", "mlp")
PLACEMENT_POINTS = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gpt2": ("attn", "mlp", "mlp"),
    "distilbert": ("attention", "ffn", "ffn"),
}
OVERRIDES = ("attn_output_modules", "ffn_output_modules", "ffn_input_modules")
_NEEDS = {  # placement -> the points it uses (indices into PLACEMENT_POINTS' triples)
    "houlsby": (0, 1),
    "pfeiffer": (1,),
    "parallel": (1, 2),
}


def _own_module(name: str) -> bool:
    parts = name.split(".")
    return BottleneckSlot.ATTR in parts or PHMRuleBank.ATTR in parts


def _layer_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _layer_lists(model: nn.Module, rel_paths) -> list[tuple[str, nn.ModuleList]]:
    """The ModuleLists of transformer layers: every element has every path in ``rel_paths``."""
    found = []
    for n, m in model.named_modules():
        if (isinstance(m, nn.ModuleList) and len(m) and not _own_module(n)
                and all(_has(layer, p) for layer in m for p in rel_paths)):
            found.append((n, m))
    return found


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _builtin_points(model: nn.Module, model_type: str, point: int, needed) -> list[tuple[str, int | None]]:
    rel = PLACEMENT_POINTS[model_type]
    lists = _layer_lists(model, [rel[i] for i in needed])
    if not lists:
        raise ValueError(
            f"model_type {model_type!r}: found no list of layers with {sorted({rel[i] for i in needed})}; "
            f"name the modules with {', '.join(OVERRIDES)}"
        )
    out = []
    for list_name, layers in lists:
        prefix = f"{list_name}." if list_name else ""
        out += [(f"{prefix}{i}.{rel[point]}", i) for i in range(len(layers))]
    return out


def _override_points(model: nn.Module, field: str, patterns) -> list[tuple[str, int | None]]:
    names = [n for n, _ in model.named_modules()
             if n and not _own_module(n) and matches(n, patterns, f"BottleneckConfig.{field}")]
    if not names:
        raise ValueError(f"BottleneckConfig.{field}={patterns!r} matched no module of {type(model).__name__}")
    return [(n, _layer_index(n)) for n in names]


def resolve_points(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str | None, int | None]]:
    """``[(output module, input module or None, layer index)]`` where ``config`` puts adapters.

    The input module is set for the parallel placement only; ``leave_out`` is applied.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    needed = _NEEDS[config.placement]
    fields = [OVERRIDES[i] for i in needed]
    missing = [f for f in fields if getattr(config, f) is None]
    if missing and model_type not in PLACEMENT_POINTS:
        raise ValueError(
            f"{type(config).__name__}: no built-in adapter placement for model_type {model_type!r} "
            f"(built in: {', '.join(sorted(PLACEMENT_POINTS))}); name the modules with {', '.join(fields)} "
            f"(the {config.placement!r} placement needs {', '.join(missing)})"
        )

    def points(i):
        patterns = getattr(config, OVERRIDES[i])
        if patterns is not None:
            return _override_points(model, OVERRIDES[i], patterns)
        return _builtin_points(model, model_type, i, needed)

    def keep(idx):
        return idx is None or idx not in config.leave_out

    def check_leave_out(found):
        seen = {idx for _, idx in found if idx is not None}
        unknown = sorted(set(config.leave_out) - seen)
        if unknown:  # most likely an off-by-one or another model's indices: say so
            raise ValueError(
                f"{type(config).__name__}.leave_out={config.leave_out} names layers {unknown} this model "
                f"does not have (its layers with adapter points: {sorted(seen)})"
            )

    if config.placement != "parallel":
        outs = [p for i in needed for p in points(i)]
        check_leave_out(outs)
        order = {n: k for k, (n, _) in enumerate(model.named_modules())}
        outs.sort(key=lambda p: order[p[0]])
        return [(n, None, idx) for n, idx in outs if keep(idx)]
    outs, ins = points(1), points(2)
    check_leave_out(outs)
    if len(outs) != len(ins):
        raise ValueError(
            f"parallel placement: {len(ins)} feed-forward input modules but {len(outs)} output modules "
            f"(ffn_input_modules and ffn_output_modules must pair up, one per layer)"
        )
    return [(o, i, idx) for (o, idx), (i, _) in zip(outs, ins) if keep(idx)]


def _hidden_size(model: nn.Module, module: nn.Module, name: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[1]
    h = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(h, int) and h > 0:
        return h
    raise ValueError(f"cannot tell the hidden size at {name}: the model has no config.hidden_size")


def _factory_kwargs(model: nn.Module) -> dict:
    for p in model.parameters():
        if p.is_floating_point():
            return {"device": p.device, "dtype": p.dtype}
    return {}


def _check_widths(config: BottleneckConfig, hidden: int) -> None:
    width = config.bottleneck_width(hidden)
    if config.phm:
        try:
            check_phm_shapes(hidden, width, config.phm_dim, what=f"{type(config).__name__}.phm_dim")
        except ValueError as e:
            raise ValueError(
                f"{e}; here in = hidden size {hidden}, out = bottleneck width {hidden} // "
                f"reduction_factor {config.reduction_factor} = {width}"
            ) from None


def _check_size(config: BottleneckConfig, hiddens: list[int], kw: dict) -> None:
    """Refuse, before anything is allocated, an adapter whose parameters cannot fit in memory."""
    numel = 0
    for hidden in hiddens:
        width = config.bottleneck_width(hidden)
        if not config.phm:
            numel += 2 * hidden * width + hidden + width
        elif config.factorized_phm_W:
            numel += 2 * config.phm_rank * (hidden + width) + hidden + width
        else:
            numel += 2 * hidden * width // config.phm_dim + hidden + width
        if config.phm and not config.shared_phm_rule:
            numel += 2 * config.phm_dim**3
    if config.phm and config.shared_phm_rule:
        numel += config.phm_dim**3
    fields = "reduction_factor" + (", phm_dim, phm_rank" if config.phm else "")
    dtype = kw.get("dtype")
    check_fits(f"{type(config).__name__}.{{{fields}}}", numel, dtype.itemsize if dtype is not None else 4,
               kw.get("device"))


def inject_bottleneck(model: nn.Module, config: BottleneckConfig, name: str) -> list[str]:
    """Add adapter ``name`` at every point ``config`` selects; returns the hooked modules' names.

    Every point gets a :class:`BottleneckSlot` (created on first use) holding a
    :class:`BottleneckAdapter`; a Compacter adapter with a shared rule creates its rule once in the
    :class:`PHMRuleBank` at the model root.  Nothing changes unless every point is valid.
    """
    if not isinstance(config, BottleneckConfig):
        raise TypeError(f"config must be a BottleneckConfig, got {type(config).__name__}")
    points = resolve_points(model, config)
    if not points:
        raise ValueError(f"{type(config).__name__}.leave_out={config.leave_out} leaves no layer with an adapter")
    plan = []
    for out_name, in_name, _ in points:
        owner = model.get_submodule(out_name)
        hidden = _hidden_size(model, owner, out_name)
        _check_widths(config, hidden)
        BottleneckSlot.check_owner(owner, out_name)
        slot = BottleneckSlot.of(owner)
        if slot is not None and name in slot.adapters:
            raise ValueError(f"adapter {name!r} already exists at {out_name}")
        inp = model.get_submodule(in_name) if in_name is not None else None
        if slot is not None and inp is not None and slot._input_module not in (None, inp):
            raise ValueError(f"{out_name}: its parallel adapters read another input module than {in_name}")
        plan.append((out_name, owner, inp, hidden))
    shared = config.phm and config.shared_phm_rule
    bank = PHMRuleBank.of(model) if shared else None  # raises if the attribute is taken
    if bank is not None and name in bank.adapter_names():
        raise ValueError(f"a PHM rule for adapter {name!r} already exists")

    kw = _factory_kwargs(model)
    _check_size(config, [p[3] for p in plan], kw)
    if shared:
        bank = PHMRuleBank.of(model, create=True)
        bank.add_rule(name, config.phm_dim, learn=config.learn_phm, c_init=config.phm_c_init,
                      init_range=config.phm_init_range, **kw)
    for _, owner, inp, hidden in plan:
        adapter = BottleneckAdapter(hidden, config, rule_bank=bank, name=name, **kw)
        adapter.train(owner.training)
        BottleneckSlot.attach(owner).add_adapter(name, adapter, input_module=inp)
    return [p[0] for p in plan]


def bottleneck_slots(model: nn.Module):
    """``(name, slot)`` of every :class:`BottleneckSlot` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckSlot)]
