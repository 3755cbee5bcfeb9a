"""The notebook runs headless, and `cera-rs demo --quick` writes a complete summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from cera_rs.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs_every_cell(tmp_path):
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    html = [o for o in code[-2].outputs if "text/html" in o.get("data", {})]
    assert html and "eff.rank" in html[0]["data"]["text/html"]
    assert any("image/png" in o.get("data", {}) for o in code[-1].outputs)
    # no "IProgress not found" warning (the dev extra, as the notebook extra, brings
    # ipywidgets), and every file under the folder it names
    streams = [o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream"]
    assert streams and not [s for s in streams if "IProgress" in s]
    assert [p.name for p in tmp_path.iterdir()] == ["quickstart-output"]
    assert [p.name for p in (tmp_path / "quickstart-output").iterdir()] == ["spectrum.png"]


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_demo_writes_a_complete_finite_summary(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    for name in ("summary.json", "report.md", "linear_ceiling.png", "spectra.png",
                 "lm_spectra.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    families = summary["part1"]["families"]
    assert set(families) == {"linear", "gated", "quadratic"}
    for block in families.values():
        assert len(block["methods"]) == 8
        for row in block["methods"].values():
            assert {"trainable_params", "test_error_mean", "effective_rank",
                    "tail_energy"} <= set(row)  # fmt: skip
    part2 = summary["part2"]
    assert "Q4_1" in part2["model"] and set(part2["tiers"]) == {"easy", "hard"}
    for block in part2["tiers"].values():
        assert 0 <= block["zero_shot_exact_match"] <= 1
        for row in block["methods"].values():
            low, high = row["wilson95"]
            assert 0 <= low <= row["test_exact_match_mean"] <= high <= 1
            assert row["spectra"]["effective_rank"] >= 1 and row["spectra"]["dim90"] >= 1
            assert row["trainable_params"] > 0 and row["lr"] in part2["settings"]["lrs"]
            if row["kind"] == "cera":  # its linearity and its exported, merged LoRA's score
                lin = row["linearity"]
                assert lin["layers"] == 2 * part2["settings"]["adapted_layers"]
                assert 0 < lin["linearity_at_r"] <= lin["linearity_full_rank"] <= 1 + 1e-9
                assert lin["held_out_linearity_at_r"] <= lin["held_out_linearity_full_rank"] + 1e-9
                assert 0 <= row["exported_lora_test_exact_match"] <= 1
                assert 0 <= row["exported_lora_same_verdict"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "exported LoRA (merged) exact match %" in report
    assert all(math.isfinite(x) for x in _numbers(summary))
