"""The main job (``cera-rs demo``): real training runs that show what CeRA is for.

Part 1 (``ceiling``) measures the linear ceiling on a controlled task; part 2
(``arithmetic``) fine-tunes a real pretrained model on two tiers of arithmetic.
``report`` writes the table, the pictures and the summary.
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path

from cera_rs.bench.suite import describe_machine
from cera_rs.demo import arithmetic, ceiling, report


def run(parts: tuple[int, ...] = (1, 2), quick: bool = False,
        out_dir: Path = Path("results/demo"), progress: bool = True) -> dict:  # fmt: skip
    start = time.time()
    summary: dict = {"machine": describe_machine(), "date": date.today().isoformat(),
                     "mode": "quick" if quick else "full"}  # fmt: skip
    if 1 in parts:
        settings = ceiling.Settings.quick() if quick else ceiling.Settings()
        summary["part1"] = ceiling.run(settings, progress=progress)
    if 2 in parts:
        settings = arithmetic.Settings.quick() if quick else arithmetic.Settings()
        summary["part2"] = arithmetic.run(settings, progress=progress)
    summary["seconds"] = time.time() - start
    written = report.write_all(summary, out_dir)
    print()
    if "part1" in summary:
        print(report.ceiling_table(summary["part1"]), end="\n\n")
    if "part2" in summary:
        print(report.arithmetic_table(summary["part2"]), end="\n\n")
    for line in report.findings(summary):
        print(line)
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return summary
