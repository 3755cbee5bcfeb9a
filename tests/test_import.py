"""The torch version check at import, and the choice of the wheel's build per torch minor."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cera_rs
from cera_rs._native_loader import select_build, torch_minor


def test_extension_records_the_torch_it_was_built_for():
    assert cera_rs._native.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]


def test_other_torch_version_is_refused_with_both_versions_named():
    code = "import torch; torch.__version__ = '2.10.1'; import cera_rs"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1
    assert "ImportError" in run.stderr
    assert "built for torch 2.11.0" in run.stderr and "torch 2.10.1 is installed" in run.stderr


def test_core_imports_without_matplotlib():
    """matplotlib is the demo extra's: the package, the spectral API and the CLI import
    without it (the wheel test also runs the quick start where it is not installed)."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import cera_rs, cera_rs.spectral, cera_rs.cli, cera_rs.demo, cera_rs.bench.suite\n"
        "loaded = {name.split('.')[0] for name, m in sys.modules.items() if m}\n"
        "assert 'matplotlib' not in loaded"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_torch_minor():
    assert torch_minor("2.15.1+cu130") == "2.15"
    assert torch_minor("2.11.0") == "2.11"
    assert torch_minor("3.0.0a0+git1234") == "3.0"


def _fake_builds(root: Path, minors: list[str]) -> Path:
    for minor in minors:
        folder = root / f"torch-{minor}"
        folder.mkdir(parents=True)
        (folder / "_native.abi3.so").write_bytes(b"")
    (root / "torch-2.99").mkdir()  # a folder without a build is not a build
    return root


def test_select_build_picks_the_installed_minor_and_names_the_range_otherwise(tmp_path):
    builds = _fake_builds(tmp_path, ["2.11", "2.12", "2.13", "2.14", "2.15"])
    assert select_build(builds, "2.13.0+cu130") == builds / "torch-2.13" / "_native.abi3.so"
    assert select_build(builds, "2.15.1") == builds / "torch-2.15" / "_native.abi3.so"
    for outside in ("2.16.0", "2.10.1", "2.99.0"):
        with pytest.raises(ImportError) as err:
            select_build(builds, outside)
        message = str(err.value)
        assert f"torch {outside} is installed" in message
        assert "supports torch 2.11 to 2.15" in message
        assert "2.11, 2.12, 2.13, 2.14, 2.15" in message
        assert "pip install 'torch>=2.11,<2.16'" in message


@pytest.fixture(scope="module")
def wheel_layout(tmp_path_factory) -> Path:
    """The package laid out as the wheel lays it out: no _native beside the sources, the
    build for this torch under _native_builds/torch-<minor>/."""
    root = tmp_path_factory.mktemp("site")
    package = Path(cera_rs.__file__).parent
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    shutil.copytree(package, root / "cera_rs", ignore=skip)
    build = root / "cera_rs" / "_native_builds" / f"torch-{torch_minor(torch.__version__)}"
    build.mkdir(parents=True)
    shutil.copy(cera_rs._native.__file__, build / "_native.abi3.so")
    return root


def _run_in(root: Path, code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_wheel_layout_loads_the_build_for_the_installed_torch(wheel_layout):
    code = (
        "import torch, cera_rs\n"
        "print(cera_rs.__file__); print(cera_rs._native.__file__)\n"
        "f64 = torch.float64\n"
        "x, a, b = (torch.randn(*s, dtype=f64) for s in ((3, 8), (2, 8), (4, 2)))\n"
        "y = cera_rs.cera_delta(x, a, b, activation='silu')\n"
        "torch.testing.assert_close(y, torch.nn.functional.silu(x @ a.T) @ b.T)"
    )
    run = _run_in(wheel_layout, code)
    assert run.returncode == 0, run.stderr[-3000:]
    package_file, native_file = run.stdout.split()
    assert Path(package_file).parent == wheel_layout / "cera_rs"
    minor = torch_minor(torch.__version__)
    build = wheel_layout / "cera_rs" / "_native_builds" / f"torch-{minor}"
    assert Path(native_file) == build / "_native.abi3.so"


def test_wheel_layout_refuses_a_torch_without_a_build(wheel_layout):
    run = _run_in(wheel_layout, "import torch; torch.__version__ = '2.16.0'; import cera_rs")
    assert run.returncode == 1
    minor = torch_minor(torch.__version__)
    assert run.stderr.strip().splitlines()[-1] == (
        f"ImportError: cera_rs supports torch {minor} to {minor} (one build per minor: "
        f"{minor}), but torch 2.16.0 is installed; install a supported torch: pip install "
        f"'torch>={minor},<{minor.split('.')[0]}.{int(minor.split('.')[1]) + 1}'"
    )
