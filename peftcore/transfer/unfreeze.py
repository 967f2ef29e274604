"""ULMFiT's gradual unfreezing, from a plain loop (``.step()`` per epoch) or a transformers Trainer.

Build the optimizer over every parameter, frozen ones included (``param_groups(model, lr)``):
torch's optimizers skip a parameter whose ``.grad`` is None, so a frozen parameter never moves
(zero gradients with ``zero_grad(set_to_none=True)``, the default), and the optimizer's param
groups never change when a group is unfrozen.  That is what keeps a resumed run identical: no
param group is added on the way (Lightning's BackboneFinetuning adds them, lightning#8502), and the
state (``state_dict``, or the epoch the Trainer restores) says exactly which groups train
(Lightning re-freezes on resume, lightning#21901).
"""

from __future__ import annotations

from .groups import freeze_to, layer_groups


class GradualUnfreezing:
    """Train the top ``-start`` groups first, then one more group from the top every ``every`` epochs.

    ``schedule``: instead of ``every``, a callable ``epoch -> n`` (as ``freeze_to``'s n) or a dict
    ``{epoch: n}`` (the last entry at or before the epoch applies).  ``params`` as ``freeze_to``.
    """

    def __init__(self, model, *, groups=None, every: int = 1, start: int = -1, schedule=None, params: str = "all",
                 train_norm: bool = False):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.model, self.every, self.start, self.schedule = model, every, start, schedule
        self.groups = layer_groups(model) if groups is None else groups
        if not -len(self.groups) <= start < 0:
            raise ValueError(f"start must be in [-{len(self.groups)}, -1] (groups trained at first), got {start}")
        self.params, self.train_norm, self.epoch = params, train_norm, 0
        self._apply()

    def frozen(self, epoch: int) -> int:
        """``freeze_to``'s n at ``epoch``: how many groups from the input stay frozen."""
        if callable(self.schedule):
            n = int(self.schedule(epoch))
        elif isinstance(self.schedule, dict):
            keys = [k for k in sorted(self.schedule) if k <= epoch]
            n = self.schedule[keys[-1]] if keys else self.start
        else:
            n = self.start - epoch // self.every
        L = len(self.groups)
        return max(0, n + L if n < 0 else n)

    def _apply(self):
        freeze_to(self.model, self.frozen(self.epoch), groups=self.groups, params=self.params,
                  train_norm=self.train_norm)

    def step(self):
        """Call at the end of each epoch."""
        self.epoch += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "frozen": self.frozen(self.epoch)}

    def load_state_dict(self, state: dict) -> None:
        epoch = state.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"state['epoch'] must be an int >= 0, got {epoch!r}")
        self.epoch = epoch
        self._apply()


def GradualUnfreezingCallback(unfreezer: GradualUnfreezing):
    """A transformers ``TrainerCallback`` driving ``unfreezer``: steps at each epoch's end and, on
    train begin (a resumed run included), sets the groups for the epoch the Trainer starts in."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            unfreezer.load_state_dict({"epoch": int(state.epoch or 0)})

        def on_epoch_end(self, args, state, control, **kw):
            unfreezer.load_state_dict({"epoch": int(round(state.epoch or 0))})

    return _Callback()
