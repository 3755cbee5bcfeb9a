"""scripts/gpu-check.sh in its dry-run mode: everything the device call does but CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import cera_rs

ROOT = Path(__file__).resolve().parents[1]


def zip_wheel(dist: Path) -> Path:
    """The built tree (Python files and the extension) as the wheel maturin makes."""
    package = Path(cera_rs.__file__).parent
    wheel = dist / "cera_rs-0.1.0-cp39-abi3-linux_x86_64.whl"
    info = "cera_rs-0.1.0.dist-info"
    dist.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        files = [p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for path in files:
            z.write(path, f"cera_rs/{path.relative_to(package)}")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: cera_rs\nVersion: 0.1.0\n")
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
            "Tag: cp39-abi3-linux_x86_64\n",
        )
        names = [f"cera_rs/{p.relative_to(package)}" for p in files]
        names += [f"{info}/METADATA", f"{info}/WHEEL", f"{info}/RECORD"]
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in names))
    return wheel


def test_dry_run_installs_runs_each_step_within_its_limit_and_summarises(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "DIST": str(tmp_path / "dist"),
        "PYTHON": sys.executable,
        "PYTEST_ARGS": "tests/test_tensor_ops.py -k fewest",
        "BENCH_LIMIT": "1",
    }
    zip_wheel(tmp_path / "dist")
    proc = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (out / "gpu-check.log").read_text()
    summary = json.loads((out / "gpu-check.json").read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == ["install", "environment", "tests", "bench-layers", "bench"], log
    assert all(
        steps[name]["exit"] == 0 for name in ("install", "environment", "tests", "bench-layers")
    ), log
    # the embedding and conv cases' quick run, summarised with their targets
    assert summary["layers"]["rows"] == 4 and len(summary["layers"]["targets"]) == 8
    # the environment step checked that the installed copy, not this tree, is imported
    assert '/site/cera_rs/__init__.py"' in log, log
    assert summary["tests"] == {"tests": 1, "failures": 0, "errors": 0, "skipped": 0}
    # the benchmark's one-second limit stops it: recorded, summarised, the run fails
    assert steps["bench"]["timed_out"] and "error" in summary["bench"]
    assert summary["mode"] == "dry-run" and summary["ok"] is False and proc.returncode == 1
    assert summary["wheel"] == "cera_rs-0.1.0-cp39-abi3-linux_x86_64.whl"
