"""A bounded atheris run over adapter-folder and reference-checkpoint loading.

The target (``fuzz/fuzz_adapter.py``) allows only ValueError, TypeError and
FileNotFoundError out of loading; anything else, a native crash or a hang makes
libFuzzer stop with a non-zero status and a ``crash-*`` / ``timeout-*`` file. The run
is fixed (``-runs``, ``-seed``), starts from the kept seed corpus ``fuzz/corpus`` and
writes what it discovers to a temporary folder, never to the corpus.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TARGET = ROOT / "fuzz" / "fuzz_adapter.py"
CORPUS = ROOT / "fuzz" / "corpus"
RUNS = 1000


def test_seed_corpus_is_kept_for_every_mode():
    modes = {p.read_bytes()[0] % 5 for p in CORPUS.iterdir() if p.is_file()}
    assert modes == {0, 1, 2, 3, 4}


def test_bounded_fuzz_run_finds_no_crash(tmp_path):
    found = tmp_path / "found"
    found.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-runs={RUNS}",
            "-seed=1",
            "-timeout=30",
            "-rss_limit_mb=4096",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
            str(found),
            str(CORPUS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    log = proc.stdout + proc.stderr
    artifacts = sorted(p.name for p in tmp_path.iterdir() if p.name != "found")
    assert proc.returncode == 0, f"fuzzer found {artifacts}:\n{log[-4000:]}"
    assert f"Done {RUNS} runs" in log, log[-2000:]
    assert artifacts == []


def test_the_target_lets_only_clean_exceptions_through(monkeypatch):
    """The harness itself: seeds load, malformed input is swallowed as a clean
    error, and any other exception escapes (so libFuzzer would report it)."""
    monkeypatch.syspath_prepend(str(TARGET.parent))
    target = importlib.import_module("fuzz_adapter")
    for seed in sorted(CORPUS.iterdir()):
        target.fuzz_one_input(seed.read_bytes())
    target.fuzz_one_input(b"\x00{")  # bad JSON: ValueError, swallowed

    def broken(*args, **kwargs):
        raise KeyError("peft_type")

    monkeypatch.setattr(target.CeraConfig, "from_pretrained", broken)
    with pytest.raises(KeyError):
        target.fuzz_one_input(b"\x00{}")
