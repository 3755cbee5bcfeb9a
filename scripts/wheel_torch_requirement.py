"""The torch requirement of a wheel: exactly the minors it carries builds for.

maturin writes pyproject's `torch>=2.11,<2.16` into the wheel's METADATA; a wheel with
builds for fewer minors (`make wheel TORCHES="2.11.0 2.15.0"`, or the dev torch's alone
as tests/test_wheel.py builds it) must not let pip install it beside a torch it cannot
load. scripts/build-wheel.sh runs this on the unpacked wheel before packing it:

    python scripts/wheel_torch_requirement.py METADATA 2.11 2.15

rewrites the `Requires-Dist: torch...` line to `torch>=2.11,<2.16,!=2.12.*,!=2.13.*,!=2.14.*`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _key(minor: str) -> tuple[int, int]:
    major, number = minor.split(".")[:2]
    return int(major), int(number)


def requirement(minors: list[str]) -> str:
    """``torch>=FIRST,<LAST+1`` minus the minors in between that have no build."""
    keys = sorted({_key(m) for m in minors})
    if not keys:
        raise ValueError("a wheel needs at least one torch build")
    (major, first), (last_major, last) = keys[0], keys[-1]
    if major != last_major:
        raise ValueError(f"torch builds across major versions: {minors}")
    gaps = [f"!={major}.{n}.*" for n in range(first, last) if (major, n) not in keys]
    return ",".join([f"torch>={major}.{first}", f"<{major}.{last + 1}", *gaps])


def rewrite(metadata: Path, minors: list[str]) -> str:
    """Replaces the one unconditional ``Requires-Dist: torch`` line of ``metadata`` (an
    extra's pin, ``; extra == 'dev'``, stays); returns the new one."""
    lines = metadata.read_text().split("\n")
    found = [
        i
        for i, line in enumerate(lines)
        if ";" not in line and re.fullmatch(r"Requires-Dist:\s*torch\s*[<>=!~].*", line)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{metadata}: expected one Requires-Dist line for torch, found {len(found)}"
        )
    lines[found[0]] = f"Requires-Dist: {requirement(minors)}"
    metadata.write_text("\n".join(lines))
    return lines[found[0]]


if __name__ == "__main__":
    print(rewrite(Path(sys.argv[1]), sys.argv[2:]))
