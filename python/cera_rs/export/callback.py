"""``LinearityCallback``: how linear each adapter is, during Trainer training."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import nn

from cera_rs.export.lora import measure_linearity
from cera_rs.spectral.callback import ProbeCallback, probe_batches


class LinearityCallback(ProbeCallback):
    """Every ``every_n_steps`` optimizer steps, fits each adapted module's best linear
    map of the adapter's own rank on ``batches`` and logs the share of the adapter's
    output it keeps: ``linearity/<module>/at_r`` on ``batches`` and, with
    ``held_out`` (other batches; recommended, since on the fitted tokens alone the
    share flatters), ``linearity/<module>/held_out_at_r`` on their tokens, plus the
    means over modules (``linearity/mean_at_r``, ``linearity/mean_held_out_at_r``).

    Near 1: the adapter is as good as a LoRA of its rank and ``to_lora`` exports it
    for serving at no cost; lower: it uses its non-linearity. The figures are
    ``to_lora``'s ``lin@r`` and ``held-out lin@r`` for the model at that step; they go
    where ``SpectralCallback``'s go: to every integration the Trainer reports to
    (TensorBoard, W&B, ...) at the step they were measured, and into
    ``trainer.state.log_history`` ([ProbeCallback][cera_rs.spectral.ProbeCallback])."""

    def __init__(
        self,
        batches: Iterable[Any],
        held_out: Iterable[Any] | None = None,
        every_n_steps: int = 100,
        modules: Iterable[str] | None = None,
    ) -> None:
        super().__init__(batches, every_n_steps, modules)
        self.held_out = (
            None if held_out is None else probe_batches(held_out, "held_out", type(self).__name__)
        )

    def measure(self, model: nn.Module) -> dict[str, float]:
        report = measure_linearity(
            model, self.batches, held_out=self.held_out, modules=self.modules, progress=False
        )
        out: dict[str, float] = {}
        for m in report.modules:
            out[f"linearity/{m.name}/at_r"] = m.at(m.adapter_rank)
            if m.held_out is not None:
                out[f"linearity/{m.name}/held_out_at_r"] = m.at(m.adapter_rank, held_out=True)
        for kind in ("at_r", "held_out_at_r"):
            values = [v for k, v in out.items() if k.endswith(f"/{kind}")]
            if values:
                out[f"linearity/mean_{kind}"] = float(np.mean(values))
        return out
