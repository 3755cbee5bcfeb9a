"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # the diffusers example runs on its own in tests/test_diffusers.py
    blocks = [b for b in blocks if "cera_rs.diffusion" not in b]
    assert len(blocks) == 3, "README: the quick start, the spectral and the export examples"
    # The blocks continue one another, as cells of a notebook would.
    run = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trainable params" in run.stdout and "step 2: loss" in run.stdout
    assert "eff.rank" in run.stdout and "lin@k" in run.stdout
    for name in ("cera-adapter/adapter_model.safetensors", "spectra.png", "spectra.json",
                 "lora-adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    check_shown_output(run.stdout)


def check_shown_output(stdout: str) -> None:
    """The export example's report, as the README shows it ("It prints"): every row's
    names and counts equal, every figure within 0.001 (the last digit may round the
    other way on another machine's BLAS)."""
    shown = re.search(r"It prints[^\n]*\n\n```text\n(.*?)```", README.read_text(), flags=re.S)
    assert shown, "README: the export example's output block"
    rows = [line.split() for line in shown.group(1).splitlines()[2:]]
    printed = [line.split() for line in stdout.splitlines()]
    assert len(rows) == 4
    for row in rows:
        same = [p for p in printed if p[:1] == row[:1] and len(p) == len(row)]
        assert len(same) == 1, row[0]
        for want, got in zip(row, same[0]):
            if re.fullmatch(r"-?\d+\.\d+", want):
                assert abs(float(got) - float(want)) <= 1e-3, (row[0], want, got)
            else:
                assert got == want, (row[0], want, got)
