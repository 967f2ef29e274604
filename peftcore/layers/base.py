"""What every adapter-holding module shares, so that model-level code treats all methods alike.

A *host* is an ``nn.Module`` that holds adapters by name: a :class:`~peftcore.layers.LoRALinear`,
a bottleneck-adapter slot, a prompt encoder.  :mod:`peftcore.model` and :mod:`peftcore.io` find the
hosts of a model (``isinstance(m, AdapterHost)``) and drive them only through this interface:
activating, freezing, saving, loading and deleting work for every method without knowing it.

Activation is a list of names or a :class:`Stack`.  Each host receives the full specification
filtered to the names it holds (keeping its type), and decides what it means for its method:

* LoRA: every listed adapter adds its low-rank term (order is irrelevant).
* Bottleneck / Compacter: adapters run one after another, each on the previous one's output
  (a plain list means the same as a Stack).
* Prompt / prefix tuning: at most one such adapter can be active.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn


class Stack(tuple):
    """Adapters run in sequence: ``Stack("lang_en", "task")`` is the task adapter on top of the
    language adapter (MAD-X).  Pass it to :func:`peftcore.set_active`."""

    def __new__(cls, *names: str):
        if len(names) == 1 and not isinstance(names[0], str):
            names = tuple(names[0])
        if not names:
            raise ValueError("Stack needs at least one adapter name")
        for n in names:
            if not isinstance(n, str) or not n:
                raise TypeError(f"Stack takes adapter names (non-empty strings), got {n!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"Stack names an adapter twice: {names}")
        return super().__new__(cls, names)

    def __repr__(self) -> str:
        return f"Stack({', '.join(map(repr, self))})"


def filter_spec(spec, held: Iterable[str]):
    """The activation ``spec`` (list or Stack) restricted to the names in ``held``, same type."""
    held = set(held)
    kept = [n for n in spec if n in held]
    if isinstance(spec, Stack):
        return Stack(*kept) if kept else []
    return kept


class AdapterHost:
    """Mixin for modules that hold named adapters (see the module docstring).

    Subclasses implement :meth:`adapter_names`, :meth:`adapter_tensors`, :meth:`set_active` and
    :meth:`delete_adapter`; they keep ``self.active`` (the names in effect, in order) and honour
    ``self.disabled`` (run as if no adapter were present).
    """

    active: list[str]
    disabled: bool = False

    def adapter_names(self) -> list[str]:
        """Names of the adapters this host holds."""
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """The tensors (parameters, or buffers for fixed ones) of adapter ``name`` held here, by
        key relative to this module.

        Keys are what :func:`peftcore.save_adapter` writes after the module's path (for LoRA:
        ``lora_A.weight``, PEFT's layout) and must not contain the adapter's name, so an adapter
        saved as one name loads as another.
        """
        raise NotImplementedError

    def set_active(self, spec) -> None:
        """Activate ``spec`` (a list or :class:`Stack` of names this host holds; may be empty)."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` from this host."""
        raise NotImplementedError

    def trainable_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """What :func:`peftcore.train_adapter` unfreezes: the adapter's tensors that are parameters
        (a fixed tensor, e.g. a PHM rule with ``learn_phm=False``, is a buffer and stays frozen)."""
        return {k: t for k, t in self.adapter_tensors(name).items() if isinstance(t, nn.Parameter)}

    def has_adapters(self) -> bool:
        return bool(self.adapter_names())

    def detach_from(self, model: nn.Module, path: str) -> None:
        """Called once this host holds no adapter: take it (and any hook it set) out of ``model``.

        ``path`` is this module's qualified name in ``model``.  The default removes the module
        from its parent; hosts that replaced a module or registered hooks undo that instead.
        """
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        delattr(parent, child)


def check_active(host: AdapterHost, spec) -> list[str]:
    """Names of ``spec`` after checking this host holds each of them."""
    names = list(spec)
    missing = [n for n in names if n not in host.adapter_names()]
    if missing:
        raise KeyError(f"no adapter named {missing[0]!r} here (has {sorted(host.adapter_names())})")
    return names



def accept_plain_keys(module: nn.Module, inner: str) -> None:
    """Let ``module`` (a wrapper that holds the original module as ``module.<inner>``) load a state
    dict written with the original module's keys (``<path>.weight`` for ``<path>.<inner>.weight``).

    A checkpoint of the base model, or one written by :func:`peftcore.integrations.transformers`'s
    ``save_pretrained`` (which writes plain keys so that a plain ``from_pretrained`` reads the base
    correctly), then loads into the adapted model: Trainer's resume and ``load_state_dict`` work on
    either form.  A key already in the wrapped form wins.
    """

    def hook(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        inner_prefix = f"{prefix}{inner}."
        for name in list(getattr(mod, inner).state_dict(keep_vars=True)):
            plain, wrapped = prefix + name, inner_prefix + name
            if plain in state_dict and wrapped not in state_dict:
                state_dict[wrapped] = state_dict.pop(plain)

    module.register_load_state_dict_pre_hook(hook)
