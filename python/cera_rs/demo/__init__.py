"""The main job (``cera-rs demo``): real training runs that show what CeRA is for.

Part 1 (``ceiling``) measures the linear ceiling on a controlled task; part 2
(``phonebook``) draws the rank curve on a real pretrained decoder (SmolLM2-135M,
4-bit-quantised weights, offline) memorising made-up facts, through
``cera_rs.compare``. ``report`` writes the tables, the pictures and the summary.

A part is a module of this package with ``Settings`` (``Settings.quick()`` for the
short run) and ``run(settings, progress) -> dict`` (with ``out_dir``, the part's own
folder under the demo's, for a part that names one); its results go into the summary
under ``"part<N>"``. What every chosen part needs is checked before any of them
starts, and ``summary.json`` and ``report.md`` are rewritten after each part, so a
part that fails leaves the finished ones on disk.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from cera_rs.atomic import check_folder_writable
from cera_rs.extras import DEMO_EXTRA, SMOLLM2, Needs, require
from cera_rs.measure import describe_machine

REPORT_NEEDS = Needs(("matplotlib",), DEMO_EXTRA)
"""The report's figures."""


@dataclass(frozen=True)
class Part:
    title: str
    module: str
    needs: tuple[Needs, ...] = ()
    folder: str | None = None  # its own outputs' folder under the demo's (part 2: compare's)


PARTS = {
    1: Part("the linear ceiling", "ceiling"),
    2: Part(
        "SmolLM2-135M, the phonebook rank curve",
        "phonebook",
        (Needs(("gguf",), DEMO_EXTRA), SMOLLM2),
        folder="phonebook",
    ),
}


class PartFailed(RuntimeError):
    """A part raised; the parts finished before it are written in ``out_dir``."""

    def __init__(self, number: int, out_dir: Path, cause: BaseException) -> None:
        first = (str(cause).strip().splitlines() or [""])[0]
        super().__init__(
            f"demo part {number} ({PARTS[number].title}) failed: {type(cause).__name__}: "
            f"{first}; the parts finished before it are in {out_dir}"
        )
        self.number = number


def run(
    parts: tuple[int, ...] = (1, 2),
    quick: bool = False,
    out_dir: Path = Path("results/demo"),
    progress: bool = True,
) -> dict:
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"no demo part {unknown[0]}; the parts are {sorted(PARTS)}")
    chosen = {n: PARTS[n] for n in sorted(set(parts))}
    check_folder_writable(out_dir)
    require("cera-rs demo", [REPORT_NEEDS, *(need for p in chosen.values() for need in p.needs)])
    from cera_rs.demo import report

    modules = {n: importlib.import_module(f"cera_rs.demo.{p.module}") for n, p in chosen.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    summary: dict = {
        "machine": describe_machine(),
        "date": date.today().isoformat(),
        "mode": "quick" if quick else "full",
    }
    written: list[Path] = []
    for number, module in modules.items():
        key = f"part{number}"
        settings = module.Settings.quick() if quick else module.Settings()
        folder = chosen[number].folder
        where = {"out_dir": out_dir / folder} if folder else {}
        try:
            summary[key] = module.run(settings, progress=progress, **where)
        except Exception as err:
            failure = PartFailed(number, out_dir, err)
            summary.update(seconds=time.time() - start, failed=str(failure))
            report.write(summary, out_dir)
            raise failure from err
        summary["seconds"] = time.time() - start
        written = report.write(summary, out_dir, figures_of=key)
        print("\n" + report.table(key, summary[key]), end="\n\n")
    for line in report.findings(summary):
        print(line)
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return summary
