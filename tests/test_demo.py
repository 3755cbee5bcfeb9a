"""The demo driver: each part's results are on disk as soon as the part finishes, a
part that fails keeps the finished ones and ends the command with one line. Part 2:
the methods it hands ``cera_rs.compare``, and a report that shows the curve, the
multipliers and the ceiling and says what its sizes cannot separate."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import cera_rs.compare
from cera_rs.cli import main
from cera_rs.compare import curves
from cera_rs.compare.methods import parse_specs
from cera_rs.demo import ceiling, phonebook, report


def tiny(cls):
    return cls(
        d=32,
        k=4,
        n_train=256,
        n_eval=128,
        steps=3,
        batch=64,
        lrs=(3e-3,),
        seeds=(0,),
        spectrum_rank=4,
    )


def two_methods(settings):
    return [ceiling.Method("LoRA r=4", "lora", 4), ceiling.Method("CeRA r=4", "cera", 4)]


def test_part1_reports_the_run_that_chose_the_rate_instead_of_training_it_again(monkeypatch):
    """Seed 0's run at the chosen rate is the one that chose it: each method trains once
    per rate and once per further seed, and seed 0's test error is that run's (a fresh
    training at the same rate and seed gives the same model)."""
    settings = dataclasses.replace(tiny(ceiling.Settings), lrs=(3e-3, 3e-2), seeds=(0, 1))
    monkeypatch.setattr(ceiling.Settings, "methods", two_methods)
    calls = []
    train = ceiling.train

    def counted(method, task, s, lr, seed):
        calls.append((method.name, lr, seed))
        return train(method, task, s, lr, seed)

    monkeypatch.setattr(ceiling, "train", counted)
    monkeypatch.setattr(ceiling, "FAMILIES", ("linear",))
    results = ceiling.run(settings, progress=False)
    assert len(calls) == len(two_methods(settings)) * (2 + 1)
    for name, row in results["families"]["linear"]["methods"].items():
        assert sorted(seed for m, _, seed in calls if m == name) == [0, 0, 1]
        assert [(lr, seed) for m, lr, seed in calls if m == name][2] == (row["lr"], 1)
        method = next(m for m in two_methods(settings) if m.name == name)
        task = ceiling.make_task("linear", settings)
        again = ceiling.unexplained(train(method, task, settings, row["lr"], 0), task, "test")
        assert row["test_error"][0] == again


def test_a_failing_part_keeps_the_finished_ones(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ceiling.Settings, "quick", classmethod(tiny))
    monkeypatch.setattr(ceiling.Settings, "methods", two_methods)
    seen_before_part2 = {}

    def part2_fails(settings, progress=True, out_dir=None):
        assert out_dir == tmp_path / "phonebook"  # compare's folder, under the demo's
        seen_before_part2.update(json.loads((tmp_path / "summary.json").read_text()))
        raise RuntimeError("out of memory\nsecond line of the message")

    monkeypatch.setattr(phonebook, "run", part2_fails)
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "part1" in seen_before_part2 and "part2" not in seen_before_part2
    assert captured.err.splitlines()[-1] + "\n" == (  # above it: part 1's progress bar
        "cera-rs: error: demo part 2 (SmolLM2-135M, the phonebook rank curve) failed: "
        "RuntimeError: "
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
        "linear_ceiling.png",
        "report.md",
        "spectra.png",
        "summary.json",
    ]  # no temp left

    # One seed: no "± 0.000" pretending to be a spread; several seeds show it.
    assert "±" not in report.ceiling_table(summary["part1"])
    summary["part1"]["settings"]["seeds"] = [0, 1]
    assert "±" in report.ceiling_table(summary["part1"])


def test_part2_methods_are_a_lora_sweep_its_ceiling_cera_and_the_control():
    s = phonebook.Settings()
    methods = s.methods()
    assert [m.name for m in methods] == [
        *(f"LoRA r={r}" for r in s.lora_ranks),
        "LoRA r=full",
        *(f"CeRA r={r}" for r in s.cera_ranks),
        f"CeRA r={s.control_rank}, identity",
    ]
    # what a user gets from the same specs, under short names
    assert [(m.peft_type, m.fields) for m in methods] == [
        (m.peft_type, m.fields) for spec in s.specs() for m in parse_specs(spec)
    ]
    lora, control = methods[0].fields, methods[-1].fields
    assert lora["use_rslora"] is True and lora["lora_alpha"] == s.lora_alpha
    assert lora["target_modules"] == control["target_modules"] == list(phonebook.TARGETS)
    assert methods[len(s.lora_ranks)].full_rank
    assert control["activation"] == "identity" and "activation" not in methods[-2].fields
    assert {label: [m.name for m in ms] for label, ms in curves.families(methods).items()} == {
        "LoRA": [m.name for m in methods[: len(s.lora_ranks) + 1]],
        "CeRA": [f"CeRA r={r}" for r in s.cera_ranks],
        "CeRA, identity": [methods[-1].name],
    }
    assert s.compare_settings().adapted_layers == 1 and s.sized_to_separate
    quick = phonebook.Settings.quick()
    assert not quick.sized_to_separate and quick.facts < s.facts
    assert f"CeRA r={s.exported_rank}" in [m.name for m in methods]
    assert f"CeRA r={quick.exported_rank}" in [m.name for m in quick.methods()]


FULL_PARAMS = 5_000_000


def _fake_compare(s: phonebook.Settings, score, seeds: tuple[int, ...], calls: dict, noise: float):
    """``compare`` as part 2 calls it, returning a summary whose curves come from
    ``score(params)`` (bits per fact) plus each run's own ``noise`` and the facts'
    (the same for every method: some facts are harder), through ``curves.summarise``."""

    def compare(methods, **kwargs):
        calls.update(kwargs, methods=methods)
        rng = np.random.default_rng(0)
        facts = rng.normal(0, 1, s.facts)
        methods = [
            dataclasses.replace(m, fields=dict(m.fields, r=576), ceiling=True) if m.full_rank else m
            for m in methods
        ]  # what at_full_rank does
        params = {m.name: FULL_PARAMS if m.ceiling else 10_000 * m.fields["r"] for m in methods}
        bits = {
            m.name: [
                score(m, params[m.name]) + facts + rng.normal(0, noise, s.facts) for _ in seeds
            ]
            for m in methods
        }
        runs = {
            name: [{"seed": seed, "test": {"bits": b.tolist()}} for seed, b in zip(seeds, bs)]
            for name, bs in bits.items()
        }
        out = {
            "model": "SmolLM2-135M-Instruct, Q4_1",
            "base_exact_match": 0.0,
            "data": {"source": f"phonebook:{s.facts} (made-up names)"},
            "curves": curves.summarise(methods, runs, params, "bits", 2_000),
            "methods": {
                m.name: {
                    "peft_type": m.peft_type,
                    "fields": m.fields,
                    "lr": m.lrs[0],
                    "trainable_params": params[m.name],
                    "test_exact_match": [0.5] * len(seeds),
                    "test_bits": float(np.mean([np.sum(r["test"]["bits"]) for r in runs[m.name]])),
                    "transfer": {"exact_match": [0.0] * len(seeds), "bits": 1.0},
                }
                for m in methods
            },
        }
        for m in methods:  # as the engine calls it: each method's first seed
            extras = kwargs["extras"](m, None, None, None)
            if extras:
                out["methods"][m.name]["extras"] = extras
        return out

    return compare


def _on_log_curve(m, params: int) -> float:
    """LoRA's bits per fact rise with log parameters; CeRA (SiLU) scores like LoRA with
    20x its parameters, the control like LoRA with 2x."""
    return 3 * np.log(params * {"CeRA": 20, "CeRA, identity": 2}.get(m.family, 1) / 1000)


EXPORT_ROW = {
    "linearity": {
        "linearity_at_r": 0.99,
        "held_out_linearity_at_r": 0.98,
        "linearity_full_rank": 0.995,
        "held_out_linearity_full_rank": 0.99,
        "layers": 7,
    },
    "exported_lora_test_exact_match": 0.4,
    "exported_lora_wilson95": [0.3, 0.5],
    "exported_lora_same_verdict": 0.9,
    "llama_cpp_skipped": "not installed",
}


def _part2(monkeypatch, tmp_path, s, score, noise=0.3):
    calls: dict = {}
    monkeypatch.setattr(cera_rs.compare, "compare", _fake_compare(s, score, s.seeds, calls, noise))
    exported = []
    monkeypatch.setattr(
        phonebook, "exported_lora", lambda m, *rest: exported.append(m.name) or EXPORT_ROW
    )
    part2 = phonebook.run(s, tmp_path / "phonebook", progress=False)
    assert calls["data"] == f"phonebook:{s.facts}" and calls["model"] == "smollm2"
    assert calls["out_dir"] == tmp_path / "phonebook"
    assert calls["settings"].adapted_layers == 1 and calls["settings"].seeds == s.seeds
    assert [m.name for m in calls["methods"]] == [m.name for m in s.methods()]
    # the export (a scoring pass of its own) runs for one CeRA method only
    assert exported == [f"CeRA r={s.exported_rank}"]
    assert [n for n, m in part2["methods"].items() if "linearity" in m] == exported
    summary = {
        "machine": "test",
        "date": "2026-12-06",
        "mode": "full",
        "seconds": 1.0,
        "part2": part2,
    }
    written = report.write(summary, tmp_path, figures_of="part2")
    assert tmp_path / "rank_curve.png" in written
    assert (tmp_path / "rank_curve.png").stat().st_size > 0
    return part2, (tmp_path / "report.md").read_text()


def test_part2_report_shows_the_curve_the_multipliers_and_the_ceiling(monkeypatch, tmp_path):
    """Three seeds, a rising LoRA curve and planted multipliers (20x; 2x for the
    control), all below the ceiling: every sentence the figure rests on is in the
    report, and it says that nothing shown is beyond these sizes."""
    s = dataclasses.replace(phonebook.Settings(), facts=60, seeds=(0, 1, 2), resamples=2_000)
    part2, text = _part2(monkeypatch, tmp_path, s, _on_log_curve)
    *cera, control = part2["curves"]["multipliers"]
    for m in cera:
        assert m["where"] == "on" and 15 < m["low"] <= m["point"] <= m["high"] < 25, m
    assert control["where"] == "on" and 1.5 < control["low"] <= control["high"] < 3
    assert part2["curves"]["ceiling"] and all(
        c["verdict"] == "worse" for c in part2["curves"]["ceiling"]
    )
    assert part2["cannot_separate"] == []
    assert "![rank curve](rank_curve.png)" in text
    assert f"LoRA {s.lora_lr:g} at every rank and at r=full" in text  # its rates, said
    assert "### Rank curves: information stored" in text  # compare's table, one level down
    assert "| family | method | trainable params | score | 95 % interval | bits per param |" in text
    for sentence in [m["sentence"] for m in [*cera, control]] + [
        c["sentence"] for c in part2["curves"]["ceiling"]
    ]:
        assert sentence in text
    assert "### What these sizes cannot separate\n\n- Nothing above is beyond these sizes" in text
    assert f"| CeRA r={s.exported_rank} | 0.9900 / 0.9800 |" in text  # the exported LoRA row
    assert "GGUF adapter was not run in llama.cpp (skipped: not installed)" in text


def test_part2_says_plainly_what_quick_sizes_cannot_separate(monkeypatch, tmp_path):
    """One seed and a flat LoRA curve (every method alike, fact by fact): the report
    says it is the quick run, that one seed is no verdict, that the flat curve has no
    multiplier and the ceiling is not separated, on stdout too."""
    s = phonebook.Settings.quick()
    part2, text = _part2(monkeypatch, tmp_path, s, lambda m, params: 5.0, noise=0.0)
    limits = part2["cannot_separate"]
    assert limits[0].startswith("These are the --quick sizes")
    assert limits[1].startswith("One seed: training's own spread is not measured")
    flat = [x for x in limits if x.startswith("The LoRA curve is not distinguishable from flat")]
    assert len(part2["curves"]["multipliers"]) == len(s.cera_ranks) + 1
    cera = ", ".join(m.name for m in s.methods() if m.peft_type == "CERA")
    assert len(flat) == 1 and flat[0].endswith(f"no multiplier can be read for {cera}.")
    assert " bits, 95 % interval " in flat[0]  # in bits over the facts, not points
    ceiling = [x for x in limits if "and the linear ceiling (LoRA r=full) are not separated" in x]
    assert len(ceiling) == len(s.cera_ranks) + 1
    for line in limits:
        assert f"- {line}" in text
        assert f"- {line}" in report.table("part2", part2)  # stdout, after the table


@pytest.mark.parametrize(
    "low, high, says",
    [(2.0, 4.0, []), (0.5, 3.0, ["1x"]), (5.0, None, ["8x"]), (0.0, None, ["1x", "8x"])],
)
def test_a_multiplier_interval_that_holds_1x_or_8x_is_said_to(low, high, says):
    curve = {
        "seeds": [0, 1, 2],
        "ceiling": [],
        "multipliers": [
            {
                "method": "CeRA r=4",
                "family": "LoRA",
                "where": "on",
                "low": low,
                "high": high,
                "family_rise": {"mean": 1.0, "low": 0.5, "high": 1.5},
            }
        ],
    }
    limits = phonebook.cannot_separate(curve, 100, True)
    assert [x.split(" includes ")[1].split(":")[0] for x in limits] == says
    assert all("below the smallest LoRA" in x for x in limits if low == 0)
