"""Optional dependencies: what the demo and the plots need beyond the core package.
They are checked before any work starts, and a missing one is reported with the exact
line that installs it."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass

DEMO_EXTRA = 'pip install "cera_rs[demo]"'


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Needs:
    """Modules (import names) that one install line brings."""

    modules: tuple[str, ...]
    install: str


MATPLOTLIB = Needs(("matplotlib",), "pip install matplotlib")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(what: str, needs: Iterable[Needs]) -> None:
    """Raises ``MissingDependency`` naming every missing module of ``needs`` and the
    lines that install them, as one line of text."""
    missing = [(m, n.install) for n in needs for m in n.modules if not _importable(m)]
    if missing:
        names = ", ".join(m for m, _ in missing)
        lines = "; ".join(dict.fromkeys(install for _, install in missing))
        raise MissingDependency(f"{what} needs {names} (not installed); install with: {lines}")
