"""Installing from source, as the README's "Install from source" says: the sdist that
`maturin sdist` writes, built by pip in a fresh venv that already holds the user's torch
(CERA_RS_SOURCE_TORCH, default 2.15.0: a minor tch 0.24 was not generated for, so the
build patches torch-sys), with the README's commands and no variable set by hand. The
build runs in the venv's environment, not the developer's: no VIRTUAL_ENV, LIBTORCH_*
or dev venv on PATH. Then torch is as it was, and the README quick start runs.

A full release build of torch-sys and the crate: about 25 minutes on 2 busy cores, so
it is marked `slow` and left out of `make test` (pyproject's addopts); run it with
`pytest -m slow tests/test_source_build.py -s` (it prints its timings).

The quick failure without --no-build-isolation is checked on every run
(`test_backend_stops_at_once_without_torch`): the backend's hook, in an interpreter that
cannot import torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TORCH = os.environ.get("CERA_RS_SOURCE_TORCH", "2.15.0")
SDIST = f"cera_rs-{PROJECT['version']}.tar.gz"


def sh(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)


def ok(*args, **kwargs) -> str:
    run = sh(*args, **kwargs)
    assert run.returncode == 0, f"{args}:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run.stdout


def readme_source_commands() -> list[str]:
    """The `pip install` lines of the README's "Install from source" block."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install from source", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S).group(1)
    return [
        line.split("#", 1)[0].strip()
        for line in block.splitlines()
        if line.startswith("pip install")
    ]


def user_env(venv: Path) -> dict[str, str]:
    """A shell of the user's: cargo on PATH, no dev venv, no build variables."""
    dev_bin = str(Path(sys.executable).parent)
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and p != dev_bin]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LIBTORCH", "CARGO_TARGET", "MATURIN", "PYO3"))
        and k not in ("VIRTUAL_ENV", "PYTHONPATH", "CXXFLAGS")
    }
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *path])
    env["VIRTUAL_ENV"] = str(venv)
    return env


def test_readme_names_the_source_commands():
    commands = readme_source_commands()
    assert commands[-1] == f"pip install --no-build-isolation {SDIST}"
    assert any(c.startswith("pip install torch") for c in commands)
    assert "pip install 'maturin>=1.7,<2'" in commands


def test_backend_stops_at_once_without_torch(tmp_path):
    """pip's first hook in an isolated build, in an interpreter where torch cannot be
    imported: one line naming --no-build-isolation, exit status 1, nothing built."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['torch'] = None\n")
    code = "import cera_rs_backend; cera_rs_backend.get_requires_for_build_wheel()"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT / 'build_backend'}"}
    run = sh(sys.executable, "-c", code, cwd=ROOT, env=env, timeout=60)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: cera_rs compiles")
    assert "torch cannot be imported" in run.stderr and "--no-build-isolation" in run.stderr


@pytest.mark.slow
def test_sdist_builds_against_the_installed_torch(tmp_path):
    venv = tmp_path / "venv"
    try:
        _build_and_run(tmp_path, venv)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # several GB: never left behind


def _build_and_run(root: Path, venv: Path) -> None:
    maturin = Path(sys.executable).parent / "maturin"
    ok(maturin, "sdist", "--out", root / "dist", cwd=ROOT, timeout=300)
    sdist = root / "dist" / SDIST
    assert sdist.is_file()
    ok(sys.executable, "-m", "venv", venv)
    env = user_env(venv)
    py = venv / "bin" / "python"
    constraints = root / "constraints.txt"  # the dev pins, for all but torch
    constraints.write_text(
        "\n".join(r for r in PROJECT["optional-dependencies"]["dev"] if not r.startswith("torch"))
    )
    ok(py, "-m", "pip", "install", "--quiet", f"torch=={TORCH}", env=env, timeout=1800)

    def torch_install() -> list[str]:
        shown = ok(py, "-m", "pip", "show", "--files", "torch", env=env)
        return [line for line in shown.splitlines() if not line.startswith("Required-by:")]

    before = torch_install()
    # Without --no-build-isolation: pip's isolated environment has no torch; stops at once.
    started = time.monotonic()
    run = sh(py, "-m", "pip", "install", sdist, cwd=root, env=env, timeout=600)
    refused_in = time.monotonic() - started
    assert run.returncode != 0
    assert "torch cannot be imported" in run.stdout + run.stderr
    assert "--no-build-isolation" in run.stdout + run.stderr

    # The README's commands, with the sdist's path (torch is installed already).
    started = time.monotonic()
    for command in readme_source_commands():
        if command.startswith("pip install torch"):
            continue
        args = command.split()[2:]
        args = [str(sdist) if a == SDIST else a.strip("'\"") for a in args]
        ok(
            py,
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            constraints,
            *args,
            cwd=root,
            env=env,
            timeout=5400,
        )
    built_in = time.monotonic() - started
    assert torch_install() == before

    readme = (ROOT / "README.md").read_text()
    quick_start = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    out = ok(py, "-c", quick_start, cwd=root, env=env, timeout=600)
    assert "trainable params" in out and "step 2: loss" in out
    version = ok(venv / "bin" / "cera-rs", "--version", env=env)
    assert f"extension built for torch {TORCH}" in version
    print(
        f"\nsource build against torch {TORCH}: refused without --no-build-isolation in "
        f"{refused_in:.0f} s; README commands {built_in / 60:.1f} min; {version.strip()}"
    )
