"""Trainer callbacks that measure the adapters on probe batches every ``n`` steps:
``ProbeCallback`` (the schedule and the logging), ``SpectralCallback`` (a live
rank-collapse monitor); ``cera_rs.export.LinearityCallback`` is the other."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from cera_rs.spectral.analyze import analyze


def probe_batches(batches: Iterable[Any], what: str, owner: str) -> list[Any]:
    """``batches`` kept as a list (they are run again at every measurement); none at
    all is a ValueError naming the argument."""
    kept = list(batches)
    if not kept:
        raise ValueError(f"{owner} needs at least one probe batch in {what}")
    return kept


class ProbeCallback(TrainerCallback):
    """Every ``every_n_steps`` optimizer steps, ``measure(model)`` gives figures by
    name, which join the record the Trainer logs at that same step: every reporting
    integration ``report_to`` names (TensorBoard, W&B, MLflow, Comet, ...) sees them
    under those names (TensorBoard and W&B prefix ``train/``, as they do the loss), as do
    the progress printer and ``trainer.state.log_history``, in whatever order the
    callbacks were passed.

    How: the Trainer calls its callbacks in list order and hands every ``on_log`` the
    same ``logs`` dict, and it lists the reporting integrations before the user's
    callbacks, so figures added in this callback's ``on_log`` would come after the
    integrations had written the step. At ``on_train_begin`` (each ``train()``, so a
    callback added with ``trainer.add_callback`` counts too) the callback moves itself to
    the head of the Trainer's list: its ``on_log`` then fills ``logs`` in before anyone
    reads them, and each measured step is one record everywhere (running first changes
    nothing else: its ``on_step_end`` only measures and asks for a log). Calling the
    integrations from here instead would write a second record for the step (and print
    it twice), and would only reach the integrations known here. The Trainer passes
    callbacks no reference to itself; the list is found on the call stack, the
    ``CallbackHandler`` that is calling this callback. Where there is none (a training
    loop of one's own that calls the callbacks), the figures reach only the callbacks
    after this one, and a warning says so."""

    def __init__(
        self, batches: Iterable[Any], every_n_steps: int = 100, modules: Iterable[str] | None = None
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be an int, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.batches = probe_batches(batches, "batches", type(self).__name__)
        self.every_n_steps = every_n_steps
        self.modules = modules
        self._pending: dict[str, float] = {}

    def measure(self, model: nn.Module) -> dict[str, float]:
        """The figures of one measurement of ``model``, by name: what a subclass
        defines (``SpectralCallback``, ``LinearityCallback``)."""
        raise NotImplementedError

    def on_train_begin(self, args, state, control, **kwargs):
        handler = calling_handler(self)
        if handler is None:
            warnings.warn(
                f"{type(self).__name__}: no Trainer CallbackHandler is calling it, so its "
                "figures reach only the callbacks after it, not integrations before it",
                stacklevel=2,
            )
        elif handler.callbacks[0] is not self:
            # a new list: the handler may be iterating over the old one right now
            handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps:
            return control
        # plain floats: TensorBoard's writer drops what is not an int or a float
        self._pending.update({k: float(v) for k, v in self.measure(model).items()})
        control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return control
        logs.update(self._pending)
        # Trainer.log records a copy of `logs` before calling back: complete it.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}
        return control


def calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The Trainer's ``CallbackHandler`` whose event is calling ``callback`` now: the
    nearest frame on the stack whose ``self`` is a handler listing ``callback``."""
    frame = inspect.currentframe()
    try:
        for _ in range(_STACK_DEPTH):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


_STACK_DEPTH = 16
"""How far up the stack ``calling_handler`` looks (the handler is two or three frames up)."""


class SpectralCallback(ProbeCallback):
    """Every ``every_n_steps`` optimizer steps, runs ``batches`` (a small probe set,
    kept as a list) through the model and logs each adapted module's effective rank
    and tail energy beyond its rank as ``spectral/<module>/effective_rank`` and
    ``spectral/<module>/tail_energy``: in TensorBoard or W&B beside the loss, at the
    steps they were measured ([ProbeCallback][cera_rs.spectral.ProbeCallback] says how
    they get there)."""

    def measure(self, model: nn.Module) -> dict[str, float]:
        report = analyze(model, self.batches, modules=self.modules, progress=False)
        out = {}
        for m in report.modules:
            out[f"spectral/{m.name}/effective_rank"] = m.spectrum.effective_rank
            out[f"spectral/{m.name}/tail_energy"] = m.spectrum.tail_energy()
        return out
