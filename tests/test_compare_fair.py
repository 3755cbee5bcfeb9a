"""``compare`` fair by construction: every branch's effective settings read from the
built model, the confounds named against the reference, the rate and tuned fields
chosen on selection runs that are never reported, unfinished training flagged, the
multiplier's interval at least the per-seed t interval, shared fields lifted out of the
names; on planted answers and small models (the whole comparison that chooses on
selection runs is in tests/test_compare.py, on its tiny model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import get_peft_model
from test_compare_curves import _hits_with_mean
from transformers import LlamaConfig, LlamaForCausalLM

from cera_rs.compare import Settings, effective, stats
from cera_rs.compare.methods import parse_spec, with_preset
from cera_rs.compare.report import shown_names


def _built(spec: str, seed: int = 0) -> dict:
    """The effective settings of ``spec`` built on a 2-layer Llama (hidden 64), with
    the optimiser settings a run would add."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM(config), parse_spec(spec).config())
    train = {"optimizer": "AdamW", "weight_decay": 0.0, "lr": 1e-3, "clip": 1.0}
    return {**effective.of_model(model), **train, "schedule": "constant"}


def test_effective_settings_are_read_from_the_built_model():
    """LoRA r=4 at PEFT's defaults: scale alpha/r = 8/4, no dropout, A kaiming-uniform
    (std 1/sqrt(3 fan_in)); CeRA r=4: SiLU, scale 1, dropout 0.1 on the hidden vector,
    A Kaiming-normal (std sqrt(2/fan_in)); B zero in both; rsLoRA's scale alpha/sqrt(r)."""
    lora, cera = _built("lora:r=4"), _built("cera:r=4")
    assert (lora["form"], lora["rank"], lora["dropout"], lora["scale"]) == ("linear", 4, 0.0, 2.0)
    assert (cera["form"], cera["rank"], cera["dropout"], cera["scale"]) == ("silu", 4, 0.1, 1.0)
    assert cera["dropout_on"] == "the hidden vector" and lora["b_init"] == cera["b_init"] == "zeros"
    assert lora["a_init_std"]["64->64"] == pytest.approx(1 / math.sqrt(3 * 64), rel=0.1)
    assert cera["a_init_std"]["64->64"] == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    assert _built("lora:r=4,use_rslora=true")["scale"] == 4.0
    assert _built("cera:r=4,activation=identity")["form"] == "linear"


def test_a_confound_is_named_against_the_reference():
    """Two LoRAs differing only in dropout: that one line. LoRA against CeRA at their
    defaults: the dropout, the scale and A's initial spread, not the form or rank.
    Tuned for both, a setting is no confound."""
    lora, dropped = _built("lora:r=4"), _built("lora:r=4,lora_dropout=0.1", seed=1)
    assert effective.confounds(dropped, lora, set(), set()) == [
        "dropout 0.1 against 0: tune it for both, or match it"
    ]
    assert effective.confounds(_built("lora:r=8,lora_alpha=16"), lora, set(), set()) == []
    # at a fixed alpha, a higher rank is a smaller scale (alpha/r): that is named
    assert effective.confounds(_built("lora:r=8"), lora, set(), set()) == [
        "scale 1 against 2: tune it for both, or match it"
    ]
    found = effective.confounds(_built("cera:r=4"), lora, set(), set())
    assert found[:2] == [
        "dropout 0.1 against 0: tune it for both, or match it",
        "scale 1 against 2: tune it for both, or match it",
    ]
    assert len(found) == 3 and found[2].startswith("A's initial std 2.")
    assert "x the reference's (64->64 0.1" in found[2] and "against 0.07" in found[2]
    both = {"dropout", "scale", "lr"}
    assert effective.confounds(_built("cera:r=4"), lora, both, both) == []
    assert effective.confounds(dropped, lora, {"dropout"}, set()) == [
        "dropout 0.1 against 0: tune it for both, or match it"
    ]


def test_a_run_cut_short_is_flagged_and_a_converged_one_is_not():
    """Valid loss at the quarters of three seeds: falling by 0.3 over the last quarter
    against a seed spread of 0.05 is still learning; flat within its spread is not."""
    rng = np.random.default_rng(0)

    def seeds(path):
        return [
            [
                {"step": 25 * (i + 1), "valid_loss": v + rng.normal(0, 0.05)}
                for i, v in enumerate(path)
            ]
            for _ in range(3)
        ]

    falling = stats.convergence(seeds([3.0, 2.4, 1.9, 1.6]))
    assert falling["still_learning"] and falling["last_quarter_drop"] > falling["seed_spread"]
    settled = stats.convergence(seeds([3.0, 1.2, 1.0, 1.0]))
    assert not settled["still_learning"] and settled["steps"] == [25, 50, 75, 100]
    one = [[{"step": 1, "valid_loss": 2.0}, {"step": 2, "valid_loss": 1.5}]]
    assert (
        stats.convergence(one)["still_learning"] and stats.convergence(one)["seed_spread"] is None
    )
    assert stats.convergence([[{"step": 1, "valid_loss": 2.0}]]) is None


def test_the_multiplier_interval_holds_the_per_seed_t_interval():
    """A planted curve (LoRA 100..1600 parameters at 10..50 %) and a method whose seeds
    score 30, 30 and 45 %: the crossed bootstrap alone sees three draws of the seed;
    the interval must hold the t interval of the per-seed log multipliers."""
    params = [100, 200, 400, 800, 1600]
    family = [_hits_with_mean(m, seed=i) for i, m in enumerate((0.1, 0.2, 0.3, 0.4, 0.5))]
    noisy = np.stack(
        [_hits_with_mean(x, seeds=1, seed=9 + i)[0] for i, x in enumerate((0.3, 0.3, 0.45))]
    )
    m = stats.parameter_multiplier(noisy, 100, family, params, ("c", "l"), resamples=2000)
    logs = np.log(
        [
            stats.equivalent_params(
                np.array(params, float), np.array([f[s].mean() for f in family]), noisy[s].mean()
            )
            / 100
            for s in range(3)
        ]
    )
    half = stats.t975(2) * logs.std(ddof=1) / math.sqrt(3)
    assert m.low <= math.exp(logs.mean() - half) + 1e-9
    assert m.high >= math.exp(logs.mean() + half) - 1e-9
    assert m.high / m.low > 8  # far wider than the draws of three seeds alone show


def test_a_falling_curve_reads_its_fall_and_a_method_below_it():
    """The smallest member best (a curve that falls): the flat line reads the best
    larger member against the smallest (a fall, not +0.0) and says the method scores
    below the smallest."""
    params = [100, 400, 1600]
    falling = [_hits_with_mean(m, seed=i) for i, m in enumerate((0.5, 0.3, 0.4))]
    m = stats.parameter_multiplier(
        _hits_with_mean(0.1), 100, falling, params, ("c", "l"), resamples=500
    )
    assert m.where == stats.FLAT and m.family_rise.mean == pytest.approx(-0.1)
    assert "-10.0 points" in m.sentence() and "c scores below its smallest member" in m.sentence()


def test_one_resampler_for_differences_and_means():
    """A paired difference's draws are the difference of the two methods' crossed means."""
    rng = np.random.default_rng(4)
    a, b = (rng.random((3, 200)) < p for p in (0.3, 0.5))
    draws = stats.crossed_means(np.stack([b, a]).astype(float), resamples=500)
    d = stats.paired_difference(b, a, ("B", "A"), resamples=500)
    low, high = np.quantile(draws[:, 0] - draws[:, 1], [0.025, 0.975])
    assert d.low <= low + 1e-12 and d.high >= high - 1e-12


def test_shared_fields_are_lifted_out_of_the_names():
    names = [
        "lora:r=1,lora_alpha=8,use_rslora=true",
        "lora:r=4,lora_alpha=8,use_rslora=true",
        "cera:r=4,activation=identity",
        "cera:r=4",
    ]
    shown, lifted = shown_names(names)
    assert [shown[n] for n in names] == ["lora:r=1", "lora:r=4", *names[2:]]
    assert lifted == ["lora: lora_alpha=8, use_rslora=true"]
    alone, none = shown_names(["lora:r=4,lora_dropout=0.1", "lora:r=4"])
    assert none == [] and list(alone.values()) == ["lora:r=4,lora_dropout=0.1", "lora:r=4"]


def test_tuning_presets_and_choices_in_a_spec():
    m = parse_spec("cera:r=4,cera_dropout={0,0.2}")
    assert m.tune == {"cera_dropout": (0, 0.2)} and m.name == "cera:r=4,cera_dropout={0,0.2}"
    assert with_preset(parse_spec("lora:r=4,lora_alpha=8"), ("dropout", "scale")).tune == {
        "lora_dropout": (0.0, 0.1),
        "lora_alpha": (4.0, 8, 16),
    }
    assert with_preset(parse_spec("cera:r=4"), ("scale",)).tune == {"scaling": (0.5, 1.0, 2.0)}
    with pytest.raises(ValueError, match="no preset for hira"):
        with_preset(parse_spec("hira:r=4"), ("dropout",))
    with pytest.raises(ValueError, match="is not a valid choice"):
        parse_spec('lora:r=4,lora_dropout={0,"x"}')
    with pytest.raises(ValueError, match="not a set of choices"):
        parse_spec("lora:r=4,lora_dropout={0,x}")
    with pytest.raises(ValueError, match="not a set of choices"):
        parse_spec("lora:r={1,2}")
    with pytest.raises(ValueError, match="tune .--tune. takes dropout, scale"):
        Settings(tune=("rank",))
    with pytest.raises(ValueError, match="not among the reported seeds"):
        Settings(seeds=(0, 1), select_seed=1)


def test_transfer_and_bits_stand_beside_exact_match_in_the_verdicts(tmp_path):
    """A memorisation task with a transfer split: each method against the reference on
    the bits stored (summed over facts) and, on the transfer split, in exact match and
    bits, each with its paired interval. Planted: B stores 2 bits more per fact on
    every seed, and transfers 1 bit less."""
    from cera_rs.compare import load_problems
    from cera_rs.compare.engine import Comparison
    from cera_rs.compare.report import split_differences

    rng = np.random.default_rng(0)
    book = load_problems("phonebook:50")
    a, b = parse_spec("lora:r=4"), parse_spec("cera:r=4")

    def run(seed, bits, transfer, hits):
        test = {"hits": hits, "bits": bits.tolist()}
        return {
            "seed": seed,
            "test": {**test, "transfer": {"hits": hits, "bits": transfer.tolist()}},
        }

    tested = {a.name: [], b.name: []}
    for seed in (1, 2, 3):
        bits, transfer = rng.normal(5, 1, 50), rng.normal(2, 1, 50)
        hits = (rng.random(50) < 0.5).astype(int).tolist()
        tested[a.name].append(run(seed, bits, transfer, hits))
        tested[b.name].append(run(seed, bits + 2, transfer - 1, hits))
    comparison = Comparison(
        "m", book, Settings(resamples=300), [a, b], {}, tested, {}, np.zeros(50), "cpu", tmp_path
    )
    found = split_differences(comparison, b)
    assert (
        found["test_bits"]["mean"] == pytest.approx(100)
        and found["test_bits"]["verdict"] == "better"
    )
    assert found["transfer"]["bits"]["mean"] == pytest.approx(-50)
    assert found["transfer"]["bits"]["verdict"] == "worse"
    assert found["transfer"]["exact_match_points"]["mean"] == 0


def test_the_selection_seed_is_below_the_seeds_or_above_them_from_0():
    """Never a reported seed, and never negative (seeds 0,1 select on 2, not on -1)."""
    assert Settings(seeds=(1, 2, 3)).select_seed == 0
    assert Settings(seeds=(0, 1)).select_seed == 2
    assert Settings(seeds=(0, 1), select_seed=5).select_seed == 5
    with pytest.raises(ValueError, match="not among the reported seeds"):
        Settings(seeds=(0, 1), select_seed=1)


def test_building_a_run_prints_no_warning_of_peft_to_the_user():
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a
    model: the comparison's build keeps that warning out of the progress bar; any other
    warning still shows."""
    import warnings

    from models import tiny_llama

    from cera_rs.compare.runner import peft_quietly

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with peft_quietly():
            get_peft_model(tiny_llama(), parse_spec("cera:r=4").config())
            warnings.warn("another", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        get_peft_model(tiny_llama(), parse_spec("cera:r=4").config())
    assert any("is_gradient_checkpointing" in str(w.message) for w in seen)  # what it hides
