"""cera_rs's build backend: maturin's, made to compile against the torch of the
environment it installs into.

The extension links libtorch's C++ API, which has no ABI promise across torch minors,
so a source build must compile against the very torch it will run with: the one
installed in the target environment. That is the convention of torch extensions
(flash-attn, torch-scatter): install torch first, then build with
``pip install --no-build-isolation``, so that the build sees that torch. This backend

- stops at once, with one line saying so, when torch is not importable here (pip's
  isolated build environment holds only maturin; a second torch fetched into it
  would not be the one the extension runs with);
- points torch-sys (and build.rs) at this interpreter, whatever PATH or VIRTUAL_ENV
  say: ``LIBTORCH_USE_PYTORCH=1`` and a ``python``/``python3`` that is
  ``sys.executable`` first on PATH, as both build scripts run that name;
- compiles the torch minors that ``tch`` 0.24 was not generated for (2.12 to 2.15;
  tch 0.24 is generated for 2.11) with a copy of torch-sys patched for the functions
  they removed (``scripts/patches/``), C++20 and tch's version check bypassed, in a
  Cargo target folder of that torch's own (torch-sys does not rebuild when only the
  torch it finds changes), leaving Cargo.lock as it was;
- refuses a torch outside the range ``pyproject.toml`` declares, naming it.

Everything else (metadata, sdist, the wheel's contents) is maturin's. Standard library
only: pip's isolated environment has nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TCH_TORCH_MINOR = (2, 11)
"""The torch minor ``tch`` 0.24 (Cargo.toml) is generated for: built as it is."""
PATCH = ROOT / "scripts" / "patches" / "torch-sys-0.24-removed-ops.patch"
"""What later minors removed from the C++ that torch-sys 0.24 generates."""
NO_TORCH = (
    "cera_rs compiles against the torch of the environment it installs into, but torch "
    "cannot be imported in this build: install torch first, then build with pip install "
    "--no-build-isolation (pip's default isolated build environment has no torch; "
    "maturin>=1.7,<2 must be installed too)"
)


class BuildError(Exception):
    """A reason to stop the build, told in one line."""


def _fail(message: str) -> None:
    """One line on stderr and exit status 1: what pip shows under the hook's output."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


try:
    import maturin
except ImportError:  # --no-build-isolation without maturin installed
    _fail(
        "cera_rs builds with maturin, which is not installed in this environment: "
        "pip install 'maturin>=1.7,<2', then build again with --no-build-isolation"
    )


def _minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def supported_minors() -> tuple[tuple[int, int], tuple[int, int]]:
    """The first and the first unsupported torch minor, from pyproject's requirement
    ``torch>=A.B,<C.D`` (the one place the range is written)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"torch\s*>=\s*(\d+\.\d+)\s*,\s*<\s*(\d+\.\d+)"', text)
    if found is None:
        raise BuildError("pyproject.toml declares no torch>=A.B,<C.D requirement")
    return _minor(found.group(1)), _minor(found.group(2))


def installed_torch() -> tuple[str, Path]:
    """The version and folder of the torch this interpreter imports."""
    code = "import torch, os; print(torch.__version__); print(os.path.dirname(torch.__file__))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        raise BuildError(NO_TORCH)
    version, folder = run.stdout.splitlines()[-2:]  # a folder may hold spaces
    return version, Path(folder)


def check_torch() -> tuple[str, Path]:
    version, folder = installed_torch()
    low, high = supported_minors()
    if not low <= _minor(version) < high:
        raise BuildError(
            f"cera_rs builds against torch {low[0]}.{low[1]} up to (not including) "
            f"{high[0]}.{high[1]}, but this environment has torch {version}; install one "
            f"of those first: pip install 'torch>={low[0]}.{low[1]},<{high[0]}.{high[1]}'"
        )
    return version, folder


def apply_patch(text: str, patch: str) -> str:
    """Applies a unified diff of one file to ``text``: each hunk's old lines (context
    and removals) must occur exactly once, and become its new lines. Line numbers are
    not trusted; a hunk that does not match exactly stops the build."""
    lines = text.split("\n")
    for hunk in re.split(r"^@@[^\n]*@@[^\n]*\n", patch, flags=re.M)[1:]:
        old, new = [], []
        for line in hunk.rstrip("\n").split("\n"):
            kind, body = line[:1], line[1:]
            if kind in (" ", ""):
                old.append(body)
                new.append(body)
            elif kind == "-":
                old.append(body)
            elif kind == "+":
                new.append(body)
        starts = [i for i in range(len(lines) - len(old) + 1) if lines[i : i + len(old)] == old]
        if len(starts) != 1:
            raise BuildError(
                f"{PATCH.name} does not apply to this torch-sys ({len(starts)} places match a hunk)"
            )
        lines[starts[0] : starts[0] + len(old)] = new
    return "\n".join(lines)


def torch_sys_source(env: dict[str, str]) -> Path:
    """The registry copy of torch-sys that Cargo.lock names (fetched if need be)."""
    run = subprocess.run(
        ["cargo", "metadata", "--format-version", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise BuildError(f"cargo metadata failed: {run.stderr.strip().splitlines()[-1:]}")
    packages = json.loads(run.stdout)["packages"]
    return Path(next(p["manifest_path"] for p in packages if p["name"] == "torch-sys")).parent


def patched_torch_sys(dest: Path, env: dict[str, str]) -> Path:
    """A copy of torch-sys at ``dest`` with PATCH applied; kept (and its build with it)
    while the source and the patch are the ones it was made from."""
    source = torch_sys_source(env)
    stamp = f"{source}\n{hashlib.sha256(PATCH.read_bytes()).hexdigest()}\n"
    stamp_file = dest / ".cera-rs-stamp"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    target = dest / "libtch" / "torch_api_generated.cpp"
    target.write_text(apply_patch(target.read_text(), PATCH.read_text()))
    stamp_file.write_text(stamp)
    return dest


def _python_shims(folder: Path) -> Path:
    """``python`` and ``python3`` that run this interpreter: the names torch-sys's and
    build.rs's build scripts run to find torch (a symlink would lose a venv)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    return folder


def build_environment(version: str, folder: Path) -> tuple[dict[str, str], list[str]]:
    """The environment and extra maturin arguments that compile against this torch."""
    env = dict(os.environ)
    env["LIBTORCH_USE_PYTORCH"] = "1"
    env["PYO3_PYTHON"] = sys.executable
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    work = ROOT / "target" / "pep517" / f"torch-{version.split('+')[0]}-{key}"
    bindir = Path(sys.executable).parent
    if os.name == "nt":  # python.exe: torch-sys runs that name
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    else:
        env["PATH"] = (
            f"{_python_shims(work / 'bin')}{os.pathsep}{bindir}{os.pathsep}{env.get('PATH', '')}"
        )
    args = ["--target-dir", str(work / "target")]
    if _minor(version) != TCH_TORCH_MINOR:
        env["LIBTORCH_BYPASS_VERSION_CHECK"] = "1"
        if os.name != "nt":  # torch 2.15's headers refuse C++17
            env["CXXFLAGS"] = f"{env.get('CXXFLAGS', '')} -std=c++20".strip()
        patched = patched_torch_sys(work / "torch-sys-patched", env)
        args += ["--config", f'patch.crates-io.torch-sys.path="{patched}"']
    return env, args


@contextmanager
def _environment(env: dict[str, str], maturin_args: list[str]) -> Iterator[None]:
    """``env`` (and ``maturin_args`` after the user's MATURIN_PEP517_ARGS) for the
    block; afterwards the process's environment and Cargo.lock as they were."""
    args = " ".join([os.environ.get("MATURIN_PEP517_ARGS", ""), *map(shlex.quote, maturin_args)])
    lock = ROOT / "Cargo.lock"
    locked = lock.read_bytes()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env, MATURIN_PEP517_ARGS=args.strip())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if lock.read_bytes() != locked:  # the patched torch-sys is a path dependency
            lock.write_bytes(locked)


def _checked(function: Callable[..., str], full: bool) -> Callable[..., str]:
    """maturin's hook ``function`` after the torch check, run with this interpreter's
    folder first on PATH (maturin's backend runs ``maturin`` by name) and, for a
    build (``full``), in the environment that compiles against its torch."""

    def hook(directory: str, config_settings=None, metadata_directory=None) -> str:
        try:
            version, folder = check_torch()
            if full:
                env, args = build_environment(version, folder)
            else:
                env, args = dict(os.environ), []
                bindir = str(Path(sys.executable).parent)
                env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        except BuildError as err:
            _fail(str(err))
        if full:
            print(f"cera_rs: building against torch {version} ({folder})", flush=True)
        with _environment(env, args):
            if metadata_directory is None:
                return function(directory, config_settings)
            return function(directory, config_settings, metadata_directory)

    hook.__name__ = function.__name__
    return hook


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    """pip's first call in an isolated build: the earliest place to stop."""
    try:
        check_torch()
    except BuildError as err:
        _fail(str(err))
    return maturin.get_requires_for_build_wheel(config_settings)


get_requires_for_build_editable = get_requires_for_build_wheel
prepare_metadata_for_build_wheel = _checked(maturin.prepare_metadata_for_build_wheel, full=False)
build_wheel = _checked(maturin.build_wheel, full=True)
build_editable = _checked(maturin.build_editable, full=True)
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
build_sdist = maturin.build_sdist
