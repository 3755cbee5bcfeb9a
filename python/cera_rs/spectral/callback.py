"""Trainer callbacks that measure the adapters on probe batches every ``n`` steps:
``ProbeCallback`` (the schedule and the logging), ``SpectralCallback`` (a live
rank-collapse monitor); ``cera_rs.export.LinearityCallback`` is the other."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from transformers import TrainerCallback

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
    name, which join that step's record in ``trainer.state.log_history`` and reach
    the callbacks after this one (the progress printer among them). The Trainer hands
    ``logs`` to callbacks in order, so reporting integrations registered before this
    callback do not see them."""

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
        raise NotImplementedError

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_n_steps:
            return control
        self._pending.update(self.measure(model))
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


class SpectralCallback(ProbeCallback):
    """Every ``every_n_steps`` optimizer steps, runs ``batches`` (a small probe set,
    kept as a list) through the model and logs each adapted module's effective rank
    and tail energy beyond its rank as ``spectral/<module>/effective_rank`` and
    ``spectral/<module>/tail_energy`` (see ``ProbeCallback`` for where they go)."""

    def measure(self, model: nn.Module) -> dict[str, float]:
        report = analyze(model, self.batches, modules=self.modules, progress=False)
        out = {}
        for m in report.modules:
            out[f"spectral/{m.name}/effective_rank"] = m.spectrum.effective_rank
            out[f"spectral/{m.name}/tail_energy"] = m.spectrum.tail_energy()
        return out
