"""How linear each adapted layer is: per module the linearity curve (the share of
the adapter's output energy the best rank-``k`` linear map reproduces, for every
``k``), the rank exported, and their presentation: a table (text, dicts, HTML for
Jupyter), JSON and a figure, as the spectral reports have."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cera_rs.atomic import atomic_file
from cera_rs.table import METHOD_COLORS, Columns, ModuleTable, layer_index

COLUMNS = (
    ("module", "module", "s"),
    ("method", "method", "s"),
    ("r", "adapter_rank", "d"),
    ("tokens", "tokens", "d"),
    ("k", "rank", "d"),
    ("lin@k", "linearity_at_rank", ".4f"),
    ("lin@r", "linearity_at_adapter_rank", ".4f"),
    ("lin full", "linearity_full_rank", ".4f"),
)
"""(header, row key, format) of each table column."""
HELD_OUT_COLUMNS = (
    ("held-out tokens", "held_out_tokens", "d"),
    ("held-out lin@k", "held_out_linearity_at_rank", ".4f"),
    ("held-out lin@r", "held_out_linearity_at_adapter_rank", ".4f"),
    ("held-out lin full", "held_out_linearity_full_rank", ".4f"),
)
"""The columns added when the report was measured on held-out tokens too."""


@dataclass(frozen=True)
class ModuleLinearity:
    """One adapted layer: ``linearity[k]`` for ``k = 0 .. min(d_in, d_out)`` over
    ``tokens`` tokens, the adapter's own rank and the rank exported."""

    name: str
    method: str
    adapter_rank: int
    rank: int
    tokens: int
    linearity: np.ndarray
    held_out: np.ndarray | None = None
    """The same maps' linearity on held-out tokens, when measured."""
    held_out_tokens: int = 0

    def at(self, k: int, held_out: bool = False) -> float:
        """Linearity of the best rank-``k`` map (ranks past the last are the last), on
        the calibration tokens or (``held_out``) the held-out ones."""
        curve = self.linearity if not held_out else self.held_out
        if curve is None:
            raise ValueError(f"{self.name}: no held-out tokens were measured")
        return float(curve[min(k, len(curve) - 1)])

    def row(self) -> dict[str, Any]:
        full = len(self.linearity) - 1
        row = {
            "module": self.name,
            "method": self.method,
            "adapter_rank": self.adapter_rank,
            "tokens": self.tokens,
            "rank": self.rank,
            "linearity_at_rank": self.at(self.rank),
            "linearity_at_adapter_rank": self.at(self.adapter_rank),
            "linearity_full_rank": self.at(full),
        }
        if self.held_out is not None:
            row.update(
                {
                    "held_out_tokens": self.held_out_tokens,
                    "held_out_linearity_at_rank": self.at(self.rank, True),
                    "held_out_linearity_at_adapter_rank": self.at(self.adapter_rank, True),
                    "held_out_linearity_full_rank": self.at(full, True),
                }
            )
        return row


@dataclass(repr=False)
class LinearityReport(ModuleTable):
    """Linearity of a model's adapted layers, one ``ModuleLinearity`` each, in model
    order. ``lin@k``: the exported rank's; ``lin@r``: at the adapter's own rank;
    ``lin full``: of the best full-rank linear map (what is left is non-linear);
    ``held-out ...``: the same maps on held-out tokens, when ``to_lora`` had some."""

    modules: list[ModuleLinearity]

    def mean(self, key: str = "linearity_at_rank") -> float:
        """A column's mean over the modules (e.g. ``"linearity_full_rank"``)."""
        return float(np.mean([row[key] for row in self.rows()]))

    def columns(self) -> Columns:
        """The table's (header, row key, format) columns: the held-out ones when every
        module has them."""
        held_out = bool(self.modules) and all(m.held_out is not None for m in self.modules)
        return COLUMNS + HELD_OUT_COLUMNS if held_out else COLUMNS

    def to_dict(self) -> dict[str, Any]:
        """The table with each module's whole linearity curves, JSON-ready."""
        return {
            "modules": [
                {
                    **m.row(),
                    "linearity": m.linearity.tolist(),
                    **({} if m.held_out is None else {"held_out_linearity": m.held_out.tolist()}),
                }
                for m in self.modules
            ]
        }

    def plot(self, path: str | os.PathLike) -> None:
        """Saves a figure (atomically; the format from the suffix): linearity against
        rank ``k`` per module (the adapter's rank marked; dashed on the held-out tokens
        when measured), and full-rank linearity against layer index per kind of
        module."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        if not self.modules:
            raise ValueError("nothing to plot: the report has no modules")
        fig = Figure(figsize=(12, 4.5), layout="constrained")
        FigureCanvasAgg(fig)  # Agg without pyplot: the caller's backend is left alone
        curves, layers = fig.subplots(1, 2)
        few = len(self.modules) <= 10
        labelled: set[str] = set()
        for m in self.modules:
            top = min(len(m.linearity) - 1, 4 * max(m.adapter_rank, 1))
            label = f"{m.name} ({m.method})" if few else m.method
            shown = label if few or label not in labelled else None
            (line,) = curves.plot(
                range(top + 1),
                m.linearity[: top + 1],
                color=None if few else METHOD_COLORS.get(m.method),
                alpha=0.9 if few else 0.4,
                lw=1,
                label=shown,
            )
            if m.held_out is not None:  # the same maps on held-out tokens, dashed
                curves.plot(
                    range(top + 1),
                    m.held_out[: top + 1],
                    color=line.get_color(),
                    alpha=line.get_alpha(),
                    lw=1,
                    ls="--",
                )
            labelled.add(label)
        for r in sorted({m.adapter_rank for m in self.modules}):
            curves.axvline(r, color="grey", ls=":", lw=1)
        lowest = 0.0  # of what is drawn: held-out curves can dip past 4r (fitted noise)
        for m in self.modules:
            top = min(len(m.linearity) - 1, 4 * max(m.adapter_rank, 1))
            for curve in (m.linearity, m.held_out):
                if curve is not None:
                    lowest = min(lowest, float(curve[: top + 1].min()))
        if any(m.held_out is not None for m in self.modules):
            curves.plot([], [], color="grey", ls="--", lw=1, label="held-out tokens")
        curves.set(
            xlabel="rank k of the linear map",
            ylabel="linearity",
            title="share of the output energy a rank-k map reproduces",
            ylim=(lowest, 1.02),
        )
        curves.legend(fontsize="small")
        series: dict[str, list[tuple[int, float]]] = {}
        for position, m in enumerate(self.modules):
            kind = m.name.rsplit(".", 1)[-1]
            layer = layer_index(m.name)
            series.setdefault(f"{kind} ({m.method})", []).append(
                (position if layer is None else layer, m.at(len(m.linearity) - 1))
            )
        for label, points in series.items():
            xs, ys = zip(*sorted(points))
            layers.plot(xs, ys, marker="o", lw=1, label=label)
        layers.set(xlabel="layer", ylabel="full-rank linearity", title="linearity per layer")
        layers.xaxis.set_major_locator(MaxNLocator(integer=True))
        layers.legend(fontsize="small")
        with atomic_file(path, "wb") as f:
            fig.savefig(f, dpi=120, format=Path(path).suffix.lstrip(".").lower() or "png")
