"""How linear each adapted layer is: per module the linearity curve (the share of
the adapter's output energy the best rank-``k`` linear map reproduces, for every
``k``), the rank exported, and their presentation: a table (text, dicts, HTML for
Jupyter), JSON and a figure, as the spectral reports have."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cera_rs.atomic import atomic_file
from cera_rs.spectral.report import METHOD_COLORS, html_table, layer_index, text_table

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

    def at(self, k: int) -> float:
        """Linearity of the best rank-``k`` map (ranks past the last are the last)."""
        return float(self.linearity[min(k, len(self.linearity) - 1)])

    def row(self) -> dict[str, Any]:
        return {"module": self.name, "method": self.method, "adapter_rank": self.adapter_rank,
                "tokens": self.tokens, "rank": self.rank,
                "linearity_at_rank": self.at(self.rank),
                "linearity_at_adapter_rank": self.at(self.adapter_rank),
                "linearity_full_rank": self.at(len(self.linearity) - 1)}  # fmt: skip


@dataclass(repr=False)
class LinearityReport:
    """Linearity of a model's adapted layers, one ``ModuleLinearity`` each, in model
    order. ``lin@k``: the exported rank's; ``lin@r``: at the adapter's own rank;
    ``lin full``: of the best full-rank linear map (what is left is non-linear)."""

    modules: list[ModuleLinearity]

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[ModuleLinearity]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> ModuleLinearity:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"no module named {name!r}")

    def rows(self) -> list[dict[str, Any]]:
        return [m.row() for m in self.modules]

    def mean(self, key: str = "linearity_at_rank") -> float:
        """A column's mean over the modules (e.g. ``"linearity_full_rank"``)."""
        return float(np.mean([row[key] for row in self.rows()]))

    def to_dict(self) -> dict[str, Any]:
        """The table with each module's whole linearity curve, JSON-ready."""
        return {"modules": [{**m.row(), "linearity": m.linearity.tolist()}
                            for m in self.modules]}  # fmt: skip

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes ``to_dict()`` atomically."""
        with atomic_file(path) as f:
            json.dump(self.to_dict(), f, indent=2)

    def __str__(self) -> str:
        return text_table(COLUMNS, self.rows())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return html_table(COLUMNS, self.rows())

    def plot(self, path: str | os.PathLike) -> None:
        """Saves a figure (atomically; the format from the suffix): linearity against
        rank ``k`` per module (the adapter's rank marked), and full-rank linearity
        against layer index per kind of module."""
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
            curves.plot(range(top + 1), m.linearity[: top + 1],
                        color=None if few else METHOD_COLORS.get(m.method),
                        alpha=0.9 if few else 0.4, lw=1,
                        label=label if few or label not in labelled else None)  # fmt: skip
            labelled.add(label)
        for r in sorted({m.adapter_rank for m in self.modules}):
            curves.axvline(r, color="grey", ls=":", lw=1)
        curves.set(xlabel="rank k of the linear map", ylabel="linearity",
                   title="share of the adapter's output energy a rank-k map reproduces",
                   ylim=(min(0.0, min(m.linearity.min() for m in self.modules)), 1.02))  # fmt: skip
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
