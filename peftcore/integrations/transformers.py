"""transformers glue: ``save_pretrained`` that writes PEFT's adapter layout, a Trainer callback, and
the adapter-free reference model TRL's DPO needs.

The problem this solves: after :func:`peftcore.apply` the model is still the user's transformers
model, so ``model.save_pretrained`` (and Trainer's and TRL's ``save_model``, which call it) wrote
the wrapped modules' keys (``q_proj.base_layer.weight``, ``lora_A.default.weight``).  A plain
``from_pretrained`` of that folder found none of the base keys it expected for those layers and
silently re-initialized them (logits off by 0.84).

:func:`install_save_pretrained` (done by :func:`peftcore.apply` on every transformers model) gives
the model a ``save_pretrained`` that writes

* the checkpoint transformers expects, with the base model's own keys (``q_proj.weight``; a
  merged adapter is unmerged for the write) plus the adapters' tensors under the model's keys, so
  Trainer's resume restores the adapters exactly (``load_state_dict`` maps the plain keys back:
  :func:`peftcore.layers.base.accept_plain_keys`);
* each adapter in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``; the
  first in the folder, any other in a sub-folder of its name, as PEFT writes several).

``AutoModel*.from_pretrained(folder)`` then loads the base from the folder and, when peft is
installed, applies the adapter (transformers' PEFT integration), giving the trained model's
logits; ``peft.PeftModel.from_pretrained(base, folder)`` and ``peftcore.load_adapter`` read it too.
For a plain model with the adapters folded in, use :func:`peftcore.merge_and_unload`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import types
from pathlib import Path

from torch import nn

_MARK = "_peftcore_save_pretrained"


def is_transformers_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (has the save_pretrained / config pair it defines)."""
    return callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config")


def install_save_pretrained(model: nn.Module) -> None:
    """Give ``model`` (an instance) the adapter-aware ``save_pretrained`` described above."""
    if is_transformers_model(model) and not getattr(model, _MARK, False):
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        object.__setattr__(model, _MARK, True)


def uninstall_save_pretrained(model: nn.Module) -> None:
    """Undo :func:`install_save_pretrained` (the class's own method is back)."""
    if model.__dict__.pop(_MARK, False):
        model.__dict__.pop("save_pretrained", None)


def plain_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` with each wrapper's original module under its own keys again:
    ``<path>.base_layer.*`` (LoRA) and ``<path>.original_module.*`` (modules_to_save) -> ``<path>.*``."""
    from ..layers.lora import LoRALinear
    from ..layers.saved import ModulesToSave

    inner = {}
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            inner[f"{path}.base_layer." if path else "base_layer."] = f"{path}." if path else ""
        elif isinstance(m, ModulesToSave):
            inner[f"{path}.original_module." if path else "original_module."] = f"{path}." if path else ""
    out = {}
    for k, v in state_dict.items():
        for wrapped, plain in inner.items():
            if k.startswith(wrapped):
                k = plain + k[len(wrapped):]
                break
        out[k] = v
    return out


@contextlib.contextmanager
def _unmerged(model: nn.Module):
    from ..model import lora_layers

    merged = {id(layer): list(layer.merged) for _, layer in lora_layers(model)}
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.unmerge()
    try:
        yield
    finally:
        for layer in layers:
            layer.merge(merged[id(layer)])


def save_adapters(model: nn.Module, directory) -> list[Path]:
    """Every adapter of ``model`` in PEFT's layout: the first (the active one if any) in
    ``directory``, each other in ``directory/<name>`` (PEFT's multi-adapter layout)."""
    from ..io import save_adapter
    from ..model import active_adapters, adapter_configs

    names = list(adapter_configs(model))
    active = [n for n in active_adapters(model) if n in names]
    first = active[0] if active else names[0]
    out = [save_adapter(model, directory, name=first)]
    out += [save_adapter(model, Path(directory) / n, name=n) for n in names if n != first]
    return out


def _save_pretrained(self, save_directory, *args, state_dict=None, is_main_process=True, **kwargs):
    from ..model import adapter_configs

    cls_save = type(self).save_pretrained
    if not adapter_configs(self):  # every adapter deleted: an ordinary model again
        return cls_save(self, save_directory, *args, state_dict=state_dict, is_main_process=is_main_process,
                        **kwargs)
    with _unmerged(self):
        full = plain_state_dict(self, self.state_dict() if state_dict is None else state_dict)
        result = cls_save(self, save_directory, *args, state_dict=full, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            save_adapters(self, save_directory)
    return result


def reference_model(model: nn.Module) -> nn.Module:
    """The model without its adapters, sharing every weight with ``model``: a reference policy for
    DPO (TRL's ``DPOTrainer(model, ref_model=peftcore.reference_model(model), ...)``) that costs no
    second copy of the weights.

    TRL disables a PEFT adapter for the reference forward only when the model is a ``PeftModel``;
    for any other model and ``ref_model=None`` it reloads the model from its name (which fails for
    a model built in memory, and doubles the memory when it works).  This is a structural copy of
    ``model`` (its module objects, so their train/eval flags and hooks are its own) whose
    parameters and buffers *are* ``model``'s tensors, with every adapter removed: the frozen base
    the adapters started from.  Merged LoRA adapters are refused (they are inside the weights).
    """
    from ..model import _BASE_GRAD, adapter_configs, delete_adapter, lora_layers

    if any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError("reference_model needs unmerged adapters (merged ones are inside the base weights): "
                         "call peftcore.unmerge(model) first")
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    ref = copy.deepcopy(model, memo=dict(shared))
    # The parameters are model's own: deleting ref's last adapter must not hand them back the
    # requires_grad they had before apply (that would unfreeze model's base).
    ref.__dict__.pop(_BASE_GRAD, None)
    for name in list(adapter_configs(ref)):
        delete_adapter(ref, name)
    uninstall_save_pretrained(ref)
    for attr in ("_peftcore_configs", "_peftcore_targets", "_peftcore_active"):
        ref.__dict__.pop(attr, None)
    return ref.eval()


class _SaveAdapterCallback:
    """A ``transformers.TrainerCallback`` that writes every adapter in PEFT's layout into each
    checkpoint folder (``checkpoint-<step>``) and, at the end of training, into ``output_dir``.

    A transformers model adapted by :func:`peftcore.apply` does not need it (its
    ``save_pretrained`` writes the adapters already); it is for models Trainer saves as a bare
    state dict (a plain ``nn.Module``), so that every checkpoint holds a loadable adapter.
    """

    def _write(self, model, directory, args) -> None:
        from ..distributed import unwrap
        from ..model import adapter_configs

        model = unwrap(model)
        if model is not None and adapter_configs(model) and getattr(args, "should_save", True):
            save_adapters(model, directory)

    def on_save(self, args, state, control, model=None, **kwargs):
        self._write(model, Path(args.output_dir) / f"checkpoint-{state.global_step}", args)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(model, Path(args.output_dir), args)
        return control


_CALLBACK = None


def __getattr__(name: str):
    # Built on first use: importing transformers (and what it imports) is not part of importing peftcore.
    global _CALLBACK
    if name == "SaveAdapterCallback":
        if _CALLBACK is None:
            from transformers import TrainerCallback

            _CALLBACK = type("SaveAdapterCallback", (_SaveAdapterCallback, TrainerCallback),
                             {"__doc__": _SaveAdapterCallback.__doc__, "__module__": __name__})
        return _CALLBACK
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
