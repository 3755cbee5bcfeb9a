"""The torch version check at import."""

from __future__ import annotations

import subprocess
import sys

import torch

import cera_rs


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
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import cera_rs, cera_rs.spectral, cera_rs.cli, cera_rs.demo, cera_rs.bench.suite\n"
            "loaded = {name.split('.')[0] for name, m in sys.modules.items() if m}\n"
            "assert 'matplotlib' not in loaded")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
