"""``--resolve D --max-seeds S``: the pilot arithmetic against t's own values, the seed
order, the stopping rule on planted answers (a large effect stops early, a null one
runs to the cap), and a whole comparison on the tiny model of tests/test_compare.py
that adds a seed, says why it stopped and, killed in the added seed, resumes to the
same report."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_compare import _scores, _tiny, compare_argv, killed_once_written

from cera_rs.cli import main
from cera_rs.compare import stats
from cera_rs.compare.resolve import MAX_SEEDS, REACHED, Round, decide, seed_order


def test_seeds_needed_is_the_smallest_k_whose_t_interval_fits():
    # the study's pilot: 5 points of per-seed spread need 7 seeds for +-5 (t(6) = 2.447)
    assert stats.seeds_needed(5.0, 5.0) == 7
    for spread, half in ((5.0, 5.0), (2.0, 1.0), (10.0, 3.0), (0.0, 1.0), (30.0, 0.5)):
        k = stats.seeds_needed(spread, half)
        assert stats.t975(k - 1) * spread / math.sqrt(k) <= half
        assert k == 2 or stats.t975(k - 2) * spread / math.sqrt(k - 1) > half
    with pytest.raises(ValueError, match="half_width > 0"):
        stats.seeds_needed(1.0, 0.0)


def test_seeds_come_in_a_fixed_order():
    assert seed_order((0, 1, 2), 6) == [0, 1, 2, 3, 4, 5]
    assert seed_order((5, 7), 5) == [5, 7, 6, 8, 9]
    assert seed_order((3,), 1) == [3]


def _rounds(
    method: np.ndarray, reference: np.ndarray, first: int, target: float, max_seeds: int
) -> list[Round]:
    """resolve's rounds on planted answers, row i being the i-th seed in order."""
    k, rounds = first, []
    while True:
        hits = {"B": method[:k], "A": reference[:k]}
        rounds.append(decide(hits, "A", target, max_seeds, tuple(range(first)), resamples=2000))
        if not rounds[-1].added:
            return rounds
        assert rounds[-1].added == tuple(range(k, k + len(rounds[-1].added)))
        k += len(rounds[-1].added)


def test_a_planted_large_effect_stops_as_soon_as_it_is_resolved():
    """B gets half of A's wrong answers right (about +30 points) on every seed: two
    seeds leave t(1)'s interval wide, the added ones narrow it below 5 points."""
    rng = np.random.default_rng(0)
    a = rng.random((10, 1000)) < 0.4
    b = a | (rng.random(a.shape) < 0.5)
    rounds = _rounds(b, a, first=2, target=5.0, max_seeds=10)
    assert rounds[0].stopped is None and rounds[0].half_width["B"] >= 5  # two seeds: too few
    assert rounds[0].spread["B"] is not None and rounds[0].needed["B"] > 2  # the pilot
    last = rounds[-1]
    assert last.stopped == REACHED and last.seeds < 10 and last.half_width["B"] < 5
    assert all(r.half_width["B"] >= 5 for r in rounds[:-1])  # it stopped at the first chance


def test_a_null_effect_runs_to_max_seeds():
    """A and B right with the same chance on each problem: the interval narrows as
    seeds come but not below 1 point by 6 seeds."""
    rng = np.random.default_rng(1)
    p = rng.random(1000)
    a, b = (rng.random((6, 1000)) < p for _ in range(2))
    rounds = _rounds(b, a, first=2, target=1.0, max_seeds=6)
    last = rounds[-1]
    assert last.stopped == MAX_SEEDS and last.seeds == 6 and last.half_width["B"] >= 1
    assert [r.seeds for r in rounds] == sorted({r.seeds for r in rounds})  # seeds only added


def _args(tiny: Path, out: Path) -> list[str]:
    """Two methods, seeds 0 and 1 (whose answers differ), and a target they do not
    reach: seed 2 is added (the selection seed, by default 2 here, is set apart)."""
    seeds = ("--seeds", "0,1", "--select-seed", "9")
    flags = ("--steps", "6", "--batch", "8", "--lrs", "0.03", *seeds)
    resolve = ("--resolve", "0.01", "--max-seeds", "3")
    return compare_argv(tiny, "lora:r=4", "cera:r=4", flags=(*flags, *resolve, "--out", str(out)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny"))


def test_resolve_adds_seeds_says_why_it_stopped_and_resumes_after_a_kill(tiny, tmp_path):
    whole = tmp_path / "whole"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(_args(tiny, whole)) == 0
    summary = json.loads((whole / "summary.json").read_text())
    resolved = summary["resolve"]
    assert summary["settings"]["seeds"] == [0, 1, 2] and resolved["seeds"] == 3
    assert resolved["stopped"] == MAX_SEEDS and resolved["first_seeds"] == 2
    width = resolved["half_width_points"]["cera:r=4"]
    assert width >= 0.01 and [r["added"] for r in resolved["rounds"]] == [[2], []]
    pilot = resolved["pilot"]["cera:r=4"]
    assert pilot["seeds_needed"] == stats.seeds_needed(pilot["spread_points"], 0.01)
    assert "per-seed spread of the difference" in printed.getvalue()  # the pilot, printed
    report = (whole / "report.md").read_text()
    assert "## Seeds (--resolve 0.01, --max-seeds 3)" in report
    assert "3 seeds, stopped because --max-seeds 3 reached" in report
    assert summary["methods"]["cera:r=4"]["seeds"] == [0, 1, 2]

    # Killed once the added seed's first run is on disk, then the same command again.
    resumed = tmp_path / "resumed"
    added = resumed / "runs" / "lora_r=4" / "lr0.03-seed2.json"
    killed_once_written(_args(tiny, resumed), added)
    assert added.is_file() and not (resumed / "report.md").exists()
    kept = json.loads(added.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(_args(tiny, resumed)) == 0
    assert json.loads(added.read_text()) == kept  # not run again
    assert _scores(resumed) == _scores(whole)


def test_resolve_is_checked_before_the_model_loads(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    base = compare_argv(tiny, "lora:r=4", "cera:r=4", flags=("--out", str(out)))
    assert main([*base, "--seeds", "0,1", "--resolve", "5", "--max-seeds", "2"]) == 2
    assert (
        "max_seeds (--max-seeds) 2 is not above the 2 first seeds (--seeds), so resolve "
        "could add none"
    ) in capsys.readouterr().err
    assert main([*base, "--resolve", "5"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main([*base[:2], *base[3:], "--resolve", "5", "--max-seeds", "5"]) == 2  # one method
    assert "give two methods or more" in capsys.readouterr().err
    assert not out.exists()
