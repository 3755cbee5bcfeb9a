"""Runs the code blocks of a Markdown page (README.md, the pages under docs/) that claim
to run; tests/test_readme.py and tests/test_docs.py hold the pages to them.

The convention: a fenced block whose info string is exactly ``python`` runs; every
other block (``sh``, ``text``, ``toml``, ...) is shown, not run. A page's blocks continue
one another, as the cells of a notebook do, and run in one process, in order. A docs
page whose blocks continue another page's says so on its first line,
``<!-- continues: guides/peft.md -->`` (a path under docs/): that page's blocks run first.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.S | re.M)
_CONTINUES = re.compile(r"\A<!-- continues: (\S+) -->")


def python_blocks(page: Path) -> list[str]:
    """The blocks of ``page`` that run, in order."""
    return _BLOCK.findall(page.read_text())


def continued(page: Path) -> Path | None:
    """The docs page whose blocks ``page``'s continue, if it names one."""
    found = _CONTINUES.match(page.read_text())
    return DOCS / found.group(1) if found else None


def run(blocks: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``blocks`` as one script in a fresh interpreter, in ``cwd`` (where they write)."""
    return subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_shown_output(page: Path, stdout: str) -> int:
    """The table a page shows a block printing (the ``text`` block after "It prints"),
    against ``stdout``: every row's names and counts equal, every figure within 0.001
    (the last digit may round the other way on another machine's BLAS). Returns the
    number of rows checked."""
    shown = re.search(r"It prints[^\n]*\n\n```text\n(.*?)```", page.read_text(), flags=re.S)
    assert shown, f"{page.name}: the output block after 'It prints'"
    rows = [line.split() for line in shown.group(1).splitlines()[2:]]
    printed = [line.split() for line in stdout.splitlines()]
    assert rows, f"{page.name}: no rows under the header"
    for row in rows:
        same = [p for p in printed if p[:1] == row[:1] and len(p) == len(row)]
        assert len(same) == 1, row[0]
        for want, got in zip(row, same[0]):
            if re.fullmatch(r"-?\d+\.\d+", want):
                assert abs(float(got) - float(want)) <= 1e-3, (row[0], want, got)
            else:
                assert got == want, (row[0], want, got)
    return len(rows)
