"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
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
