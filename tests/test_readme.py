"""The README's Python examples run as written (tests/codeblocks.py: which blocks run)."""

from __future__ import annotations

from codeblocks import ROOT, check_shown_output, python_blocks, run

README = ROOT / "README.md"


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks(README)
    # the diffusers example runs on its own in tests/test_diffusers.py
    blocks = [b for b in blocks if "cera_rs.diffusion" not in b]
    assert len(blocks) == 3, "README: the quick start, the spectral and the export examples"
    done = run(blocks, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable params" in done.stdout and "step 2: loss" in done.stdout
    assert "eff.rank" in done.stdout and "lin@k" in done.stdout
    for name in ("cera-adapter/adapter_model.safetensors", "spectra.png", "spectra.json",
                 "lora-adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert check_shown_output(README, done.stdout) == 4
