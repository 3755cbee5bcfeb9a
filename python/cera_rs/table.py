"""What the spectral and the linearity reports share: a report is a list of
per-module results in model order, looked up by name, shown as a table (text, and
HTML for Jupyter; the repr is the table) and written to JSON atomically."""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cera_rs.atomic import atomic_file

Columns = Sequence[tuple[str, str, str]]
"""``(header, row key, format)`` of each table column. A text column (format ``s``) is
aligned left, any other right; ``>s`` is text aligned right (figures already written)."""

METHOD_COLORS = {"cera": "tab:red", "lora": "tab:blue", "dora": "tab:green"}
"""One colour per adapter kind in every figure."""


def pct(share: float) -> str:
    """A share (0.123) as every report's tables write it, in percent with one decimal
    (12.3)."""
    return f"{100 * share:.1f}"


def _cells(columns: Columns, rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        ["-" if row[key] is None else format(row[key], fmt) for _, key, fmt in columns]
        for row in rows
    ]


def _left(fmt: str) -> bool:
    return fmt == "s"


def markdown_table(columns: Columns, rows: list[dict[str, Any]]) -> list[str]:
    """``rows`` as a Markdown table (GitHub's pipes), one string per line, for the
    reports' ``.md`` files."""

    def line(values: list[str]) -> str:
        return "| " + " | ".join(values) + " |"

    rule = "|" + "|".join("---" if _left(fmt) else "---:" for _, _, fmt in columns) + "|"
    return [line([h for h, _, _ in columns]), rule, *map(line, _cells(columns, rows))]


def text_table(columns: Columns, rows: list[dict[str, Any]]) -> str:
    """``rows`` as an aligned text table."""
    headers = [h for h, _, _ in columns]
    cells = _cells(columns, rows)
    widths = [max(len(c) for c in col) for col in zip(headers, *cells)]
    align = ["<" if _left(fmt) else ">" for _, _, fmt in columns]

    def line(values: list[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

    rule = line(["-" * w for w in widths])
    return "\n".join([line(headers), rule] + [line(c) for c in cells])


def html_table(columns: Columns, rows: list[dict[str, Any]]) -> str:
    """``rows`` as an HTML table, for Jupyter's ``_repr_html_``."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for cells in _cells(columns, rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def name_matches(name: str, entry: str) -> bool:
    """Whether a module name is ``entry`` or ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def natural_key(name: str) -> list[Any]:
    """Sorts module names as a model numbers them: ``layers.2`` before ``layers.10``."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)
    ]


def layer_index(name: str) -> int | None:
    """The first number between dots in a module name: its layer."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


@dataclass(repr=False)
class ModuleTable:
    """The shared part of a report: ``modules`` (each with ``name``, ``method`` and
    ``row()``); subclasses give ``columns()`` and ``to_dict()``."""

    modules: list[Any]

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> Any:
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

    def columns(self) -> Columns:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self) -> list[dict[str, Any]]:
        """The table as dicts, one per module."""
        return [m.row() for m in self.modules]

    def to_json(self, path: str | os.PathLike) -> None:
        """Writes ``to_dict()`` atomically: a reader never sees half a report."""
        with atomic_file(path) as f:
            json.dump(self.to_dict(), f, indent=2)

    def __str__(self) -> str:
        return text_table(self.columns(), self.rows())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return html_table(self.columns(), self.rows())
