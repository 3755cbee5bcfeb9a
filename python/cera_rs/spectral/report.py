"""Per-module spectra of a model and their presentation: a table (text, dicts, HTML
for Jupyter), JSON, and a figure."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cera_rs.atomic import atomic_file
from cera_rs.extras import MATPLOTLIB, require
from cera_rs.spectral.core import ENERGY_TAUS, Spectrum
from cera_rs.table import METHOD_COLORS, Columns, ModuleTable, layer_index

COLUMNS = (
    ("module", "module", "s"),
    ("method", "method", "s"),
    ("r", "rank", "d"),
    ("tokens", "tokens", "d"),
    ("eff.rank", "effective_rank", ".2f"),
    ("stable", "stable_rank", ".2f"),
    ("PR", "participation_ratio", ".2f"),
    *((f"k{round(t * 100)}", f"energy_rank_{round(t * 100)}", "d") for t in ENERGY_TAUS),
    ("tail>r", "tail_energy", ".3e"),
)
"""(header, row key, format) of each table column."""


@dataclass(frozen=True)
class ModuleSpectrum:
    """One adapted layer's spectrum: of its output delta over ``tokens`` tokens, or
    of its weight update (``tokens`` is None)."""

    name: str
    method: str
    spectrum: Spectrum
    tokens: int | None = None

    def row(self) -> dict[str, Any]:
        return {
            "module": self.name,
            "method": self.method,
            "tokens": self.tokens,
            **self.spectrum.metrics(),
        }


@dataclass(repr=False)
class ModelSpectrum(ModuleTable):
    """Spectra of a model's adapted layers, one ``ModuleSpectrum`` each; iterating
    gives them in model order, ``report["q_proj"]`` finds one by name or name suffix,
    and the repr is the table. To compare methods, join reports:
    ``ModelSpectrum(cera.modules + lora.modules)``."""

    modules: list[ModuleSpectrum]

    def columns(self) -> Columns:
        return COLUMNS

    def to_dict(self) -> dict[str, Any]:
        """The table with each module's singular values, JSON-ready."""
        return {
            "modules": [
                {**m.row(), "singular_values": m.spectrum.singular_values.tolist()}
                for m in self.modules
            ]
        }

    def plot(self, path: str | os.PathLike) -> None:
        """Saves a figure (atomically; the format from the file's suffix): each
        module's singular values ``s_i / s_1`` on a log scale (coloured by method), and
        effective rank against layer index per kind of module and method. Needs
        matplotlib."""
        require("ModelSpectrum.plot", [MATPLOTLIB])
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        if not self.modules:
            raise ValueError("nothing to plot: the report has no modules")
        fig = Figure(figsize=(12, 4.5), layout="constrained")
        FigureCanvasAgg(fig)  # Agg without pyplot: the caller's backend is left alone
        curves, ranks = fig.subplots(1, 2)
        labelled: set[str] = set()
        few = len(self.modules) <= 10
        for m in self.modules:
            s = m.spectrum.singular_values
            s = s[s > 0] / s[0] if len(s) and s[0] > 0 else s[:0]
            label = f"{m.name} ({m.method})" if few else m.method
            curves.plot(
                range(1, len(s) + 1),
                s,
                color=None if few else METHOD_COLORS.get(m.method),
                alpha=0.9 if few else 0.4,
                lw=1,
                label=label if few or label not in labelled else None,
            )
            labelled.add(label)
        curves.set(
            yscale="log", xlabel="index i", ylabel="s_i / s_1", title="singular values per module"
        )
        curves.legend(fontsize="small")

        series: dict[str, list[tuple[int, float]]] = {}
        for position, m in enumerate(self.modules):
            kind = m.name.rsplit(".", 1)[-1]
            layer = layer_index(m.name)
            series.setdefault(f"{kind} ({m.method})", []).append(
                (position if layer is None else layer, m.spectrum.effective_rank)
            )
        for label, points in series.items():
            xs, ys = zip(*sorted(points))
            ranks.plot(xs, ys, marker="o", lw=1, label=label)
        ranks.set(xlabel="layer", ylabel="effective rank", title="effective rank per layer")
        ranks.xaxis.set_major_locator(MaxNLocator(integer=True))
        ranks.legend(fontsize="small")
        with atomic_file(path, "wb") as f:
            fig.savefig(f, dpi=120, format=Path(path).suffix.lstrip(".").lower() or "png")
