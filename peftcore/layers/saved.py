"""``ModulesToSave``: a module that trains in full, one copy per adapter (PEFT's ``modules_to_save``).

A new classification head (``score``, ``classifier``) has no pre-trained weights to adapt, so it
must train whole and travel with the adapter.  The wrapper keeps the original module (frozen,
what the base model and a disabled adapter use) and a trainable copy per adapter; the active
adapter's copy runs.  Layout and keys follow PEFT's ``ModulesToSaveWrapper``: in the model,
``<path>.original_module.*`` and ``<path>.modules_to_save.<adapter>.*``; in an adapter file,
``base_model.model.<path>.<key>`` (the copy's own keys, without the adapter's name), so PEFT loads
what peftcore saves and the reverse.
"""

from __future__ import annotations

import copy

from torch import nn

from .base import AdapterHost, accept_plain_keys, check_active


class ModulesToSave(nn.Module, AdapterHost):
    """Wraps ``original_module``; ``modules_to_save[name]`` is adapter ``name``'s trainable copy."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        accept_plain_keys(self, "original_module")

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        twin = copy.deepcopy(self.original_module)
        twin.train(self.original_module.training)
        self.modules_to_save[name] = twin

    # --- AdapterHost -----------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_tensors(self, name: str) -> dict:
        """The copy's parameters and persistent buffers by their own keys (``weight``, ``bias``)."""
        twin = self.modules_to_save[name]
        return {k: v for k, v in twin.state_dict(keep_vars=True).items()}

    def trainable_tensors(self, name: str) -> dict:
        return dict(self.modules_to_save[name].named_parameters())

    def set_active(self, spec) -> None:
        """At most one copy runs: the first adapter of ``spec`` held here (PEFT's rule)."""
        self.active = check_active(self, spec)[:1]

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = [n for n in self.active if n != name]

    def detach_from(self, model: nn.Module, path: str) -> None:
        """The last adapter is gone: the original module takes its place again."""
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, self.original_module)

    # --- forward ---------------------------------------------------------------------------
    def running(self) -> nn.Module:
        """The module a forward runs now: the active copy, or the original."""
        if self.disabled or not self.active:
            return self.original_module
        return self.modules_to_save[self.active[0]]

    def forward(self, *args, **kwargs):
        return self.running()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Code that reads the wrapped module's attributes (a head's ``weight``, ``out_features``)
            # sees the module that runs, as with PEFT's wrapper.
            modules = self.__dict__.get("_modules", {})
            if "original_module" not in modules:
                raise
            return getattr(self.running(), name)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active}"
