"""Per-module spectra of a model and their presentation: a table (text, dicts, HTML
for Jupyter), JSON, and a figure."""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cera_rs.atomic import atomic_file
from cera_rs.extras import MATPLOTLIB, require
from cera_rs.spectral.adapters import name_matches
from cera_rs.spectral.core import ENERGY_TAUS, Spectrum

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

METHOD_COLORS = {"cera": "tab:red", "lora": "tab:blue", "dora": "tab:green"}


@dataclass(frozen=True)
class ModuleSpectrum:
    """One adapted layer's spectrum: of its output delta over ``tokens`` tokens, or
    of its weight update (``tokens`` is None)."""

    name: str
    method: str
    spectrum: Spectrum
    tokens: int | None = None

    def row(self) -> dict[str, Any]:
        return {"module": self.name, "method": self.method, "tokens": self.tokens,
                **self.spectrum.metrics()}  # fmt: skip


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cells(columns: Sequence[tuple[str, str, str]], rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[_cell(row[key], fmt) for _, key, fmt in columns] for row in rows]


def text_table(columns: Sequence[tuple[str, str, str]], rows: list[dict[str, Any]]) -> str:
    """``rows`` as an aligned text table; ``columns`` are ``(header, row key, format)``."""
    headers = [h for h, _, _ in columns]
    cells = _cells(columns, rows)
    widths = [max(len(c) for c in col) for col in zip(headers, *cells)]
    align = ["<" if fmt == "s" else ">" for _, _, fmt in columns]

    def line(values: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

    rule = line(["-" * w for w in widths])
    return "\n".join([line(headers), rule] + [line(c) for c in cells])


def html_table(columns: Sequence[tuple[str, str, str]], rows: list[dict[str, Any]]) -> str:
    """``rows`` as an HTML table, for Jupyter's ``_repr_html_``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells in _cells(columns, rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def layer_index(name: str) -> int | None:
    """The first number between dots in a module name: its layer."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


@dataclass(repr=False)
class ModelSpectrum:
    """Spectra of a model's adapted layers, one ``ModuleSpectrum`` each; iterating
    gives them in model order, ``report["q_proj"]`` finds one by name or name suffix,
    and the repr is the table. To compare methods, join reports:
    ``ModelSpectrum(cera.modules + lora.modules)``."""

    modules: list[ModuleSpectrum]

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[ModuleSpectrum]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> ModuleSpectrum:
        """The module named ``name``, or else the one whose name ends with
        ``"." + name``, as ``analyze(modules=...)`` selects; more than one is an error
        that names them."""
        if not isinstance(name, str):
            raise TypeError(
                f"modules are looked up by name (a str), not {type(name).__name__}; "
                "iterate the report or use .modules for positions"
            )
        hits = [m for m in self.modules if m.name == name] or [
            m for m in self.modules if name_matches(m.name, name)
        ]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            names = ", ".join(m.name for m in self.modules[:8])
            more = ", ..." if len(self.modules) > 8 else ""
            raise KeyError(f"no module is named or ends with {name!r}; modules: {names}{more}")
        candidates = ", ".join(f"{m.name} ({m.method})" for m in hits)
        raise KeyError(f"{name!r} matches {len(hits)} modules: {candidates}")

    def rows(self) -> list[dict[str, Any]]:
        """The table as dicts: names, rank ``r``, tokens and every metric."""
        return [m.row() for m in self.modules]

    def to_dict(self) -> dict[str, Any]:
        """The table with each module's singular values, JSON-ready."""
        return {"modules": [{**m.row(), "singular_values": m.spectrum.singular_values.tolist()}
                            for m in self.modules]}  # fmt: skip

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes ``to_dict()`` atomically: a reader never sees half a report."""
        with atomic_file(path) as f:
            json.dump(self.to_dict(), f, indent=2)

    def __str__(self) -> str:
        return text_table(COLUMNS, self.rows())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return html_table(COLUMNS, self.rows())

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
                range(1, len(s) + 1), s, color=None if few else METHOD_COLORS.get(m.method),
                alpha=0.9 if few else 0.4, lw=1,
                label=label if few or label not in labelled else None,
            )  # fmt: skip
            labelled.add(label)
        curves.set(yscale="log", xlabel="index i", ylabel="s_i / s_1",
                   title="singular values per module")  # fmt: skip
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
