"""The demo driver: each part's results are on disk as soon as the part finishes, a
part that fails keeps the finished ones and ends the command with one line."""

from __future__ import annotations

import json

from cera_rs.cli import main
from cera_rs.demo import ceiling, lm_math, report


def tiny(cls):
    return cls(d=32, k=4, n_train=256, n_eval=128, steps=3, batch=64, lrs=(3e-3,), seeds=(0,),
               spectrum_rank=4)  # fmt: skip


def two_methods(settings):
    return [ceiling.Method("LoRA r=4", "lora", 4), ceiling.Method("CeRA r=4", "cera", 4)]


def test_a_failing_part_keeps_the_finished_ones(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ceiling.Settings, "quick", classmethod(tiny))
    monkeypatch.setattr(ceiling.Settings, "methods", two_methods)
    seen_before_part2 = {}

    def part2_fails(settings, progress=True):
        seen_before_part2.update(json.loads((tmp_path / "summary.json").read_text()))
        raise RuntimeError("out of memory\nsecond line of the message")

    monkeypatch.setattr(lm_math, "run", part2_fails)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "part1" in seen_before_part2 and "part2" not in seen_before_part2
    assert captured.err.splitlines()[-1] + "\n" == (  # above it: part 1's progress bar
        "cera-rs: error: demo part 2 (SmolLM2-135M on arithmetic) failed: RuntimeError: "
        f"out of memory; the parts finished before it are in {tmp_path} "
        "(--debug shows the traceback)\n"
    )
    assert "| linear | least-squares linear ceiling |" in captured.out  # part 1's table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["part1"]["families"]) == set(ceiling.FAMILIES)
    assert summary["failed"].startswith("demo part 2") and "part2" not in summary
    text = (tmp_path / "report.md").read_text()
    assert "## Part 1: the linear ceiling" in text and "## Not finished" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "linear_ceiling.png", "report.md", "spectra.png", "summary.json"]  # no temp left

    # One seed: no "± 0.000" pretending to be a spread; several seeds show it.
    assert "±" not in report.ceiling_table(summary["part1"])
    summary["part1"]["settings"]["seeds"] = [0, 1]
    assert "±" in report.ceiling_table(summary["part1"])
