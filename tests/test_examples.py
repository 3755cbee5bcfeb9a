"""The notebook runs headless, and `cera-rs demo --quick` writes a complete summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from cera_rs.cli import main
from cera_rs.demo import phonebook

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs_every_cell(tmp_path):
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
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


def test_quick_demo_part_2_writes_a_complete_finite_summary(tmp_path):
    """Part 2 of ``cera-rs demo --quick``, in this process; part 1 runs from the
    installed wheel in tests/test_wheel.py, which checks its half of the summary (the
    slowest test of the suite ran both parts here and part 1 again there)."""
    assert main(["demo", "--quick", "--part", "2", "--out", str(tmp_path)]) == 0
    for name in (
        "summary.json",
        "report.md",
        "rank_curve.png",
        "phonebook/report.md",
        "phonebook/curves.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "part1" not in summary
    part2, quick = summary["part2"], phonebook.Settings.quick()
    assert "Q4_1" in part2["model"] and part2["data"].startswith(f"phonebook:{quick.facts} ")
    assert list(part2["methods"]) == [m.name for m in quick.methods()]
    s = part2["settings"]
    rates = {s["lora_lr"], *s["cera_lrs"], s["control_lr"]}  # each method's own
    for row in part2["methods"].values():
        assert row["trainable_params"] > 0 and row["lr"] in rates
        assert all(0 <= x <= 1 for x in row["recall"] + row["transfer"]["exact_match"])
    curves = part2["curves"]
    assert curves["score"] == "bits" and list(curves["curves"]) == [
        "LoRA",
        "CeRA",
        "CeRA, identity",
    ]
    lora = curves["curves"]["LoRA"]
    assert lora[-1]["method"] == "LoRA r=full" and sorted(p["params"] for p in lora) == [
        p["params"] for p in lora
    ]  # the ceiling tops the LoRA curve
    assert all(p["low"] <= p["mean"] <= p["high"] for ps in curves["curves"].values() for p in ps)
    cera = len(quick.cera_ranks) + 1  # and the control
    assert len(curves["multipliers"]) == len(curves["ceiling"]) == cera
    assert part2["cannot_separate"][0].startswith("These are the --quick sizes")
    # one CeRA adapter exported: its linearity and its merged LoRA's recall
    exported = part2["methods"][f"CeRA r={quick.exported_rank}"]
    lin = exported["linearity"]
    assert lin["layers"] == len(phonebook.TARGETS) * quick.adapted_layers
    assert 0 < lin["linearity_at_r"] <= lin["linearity_full_rank"] <= 1 + 1e-9
    assert lin["held_out_linearity_at_r"] <= lin["held_out_linearity_full_rank"] + 1e-9
    assert 0 <= exported["exported_lora_test_exact_match"] <= 1
    assert 0 <= exported["exported_lora_same_verdict"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "![rank curve](rank_curve.png)" in report
    assert "exported LoRA (merged) recall %" in report
    assert "### What these sizes cannot separate\n\n- These are the --quick sizes" in report
    assert all(math.isfinite(x) for x in _numbers(summary))
