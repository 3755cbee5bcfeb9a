"""What ``compare`` needs to answer the paper's question: sweeps (``r=[1,2,4]``), the
full-rank linear ceiling (``r=full``), the parameter multiplier read off a rank curve
(on synthetic curves with a planted answer), the phonebook task, and bad input refused
in one line before the model loads; then a small sweep end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_compare import _tiny
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cera_rs.cli import main
from cera_rs.compare import curves, data, load_problems, stats
from cera_rs.compare.methods import at_full_rank, methods, parse_spec, parse_specs

# --- sweeps and specs -----------------------------------------------------------------


def test_a_sweep_expands_to_one_method_per_value_in_one_family():
    found = parse_specs("lora:r=[1,2,4,8],lora_alpha=32")
    assert [m.name for m in found] == [f"lora:r={r},lora_alpha=32" for r in (1, 2, 4, 8)]
    assert [m.fields for m in found] == [{"r": r, "lora_alpha": 32} for r in (1, 2, 4, 8)]
    assert {m.family for m in found} == {"lora:lora_alpha=32"}
    cera = parse_specs("cera:r=[1,2],activation=identity")
    assert [m.name for m in cera] == [
        "cera:r=1,activation=identity",
        "cera:r=2,activation=identity",
    ]
    # Two lists: every combination, each in the family of its non-rank fields.
    grid = parse_specs("lora:r=[2,4],lora_dropout=[0.0,0.1]")
    assert len(grid) == 4 and len(curves.families(grid)) == 2
    # A list the field takes as one value is not a sweep.
    one = parse_specs('lora:r=8,target_modules=["q_proj","v_proj"]')
    assert len(one) == 1 and one[0].fields["target_modules"] == ["q_proj", "v_proj"]
    assert one[0].name == 'lora:r=8,target_modules=["q_proj","v_proj"]'  # the spec as given
    # Families: a sweep, a full-rank LoRA with the same fields, DoRA apart.
    named = curves.families(
        [
            *found,
            parse_spec("lora:r=full,lora_alpha=32"),
            parse_spec("dora:r=8,lora_alpha=32"),
            *cera,
        ]
    )
    assert [len(v) for v in named.values()] == [5, 1, 2]
    assert curves.linear_family(named) == "lora:lora_alpha=32"
    with pytest.raises(ValueError, match="a sweep of 4 methods"):
        parse_spec("lora:r=[1,2,4,8]")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lora:r=two", "r=two is not a valid value: r is int"),
        ("lora:r=[1,2", r"r=\[1,2 is not a list"),
        ("cera:r=[]", r"r=\[\] is an empty sweep"),
        ('cera:r=[1,"x"]', "r=x is not a valid value"),
        ("lora:use_dora=maybe", "use_dora=maybe is not a valid value: use_dora is bool"),
        ("cera:activation=gelu", "activation=gelu is not a valid value"),
        ("ia3:r=full", "has no field 'r'"),
        ("vera:r=full", "r=full needs a method with an integer rank r and a rank_pattern"),
        ("lora:lora_alhpa=4", "has no field 'lora_alhpa'; did you mean 'lora_alpha'"),
        ("lora:r=4,lrs=[]", r"lrs=\[\] is not a rate grid"),
        ("lora:r=4,lrs=[1e-3,-1]", "is not a rate grid: give positive learning rates"),
        ("cera:r=4,lrs=fast", "lrs=fast is not a rate grid"),
    ],
)
def test_bad_specs_are_refused_naming_the_spec_and_field(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        methods(spec)
    assert spec.split(":")[0] in str(err.value)


def test_a_config_set_is_written_in_the_same_order_every_run():
    """peft_results/ holds each run's PEFT config; PEFT keeps target_modules as a set,
    whose order follows the hash seed, so it is written sorted."""
    from cera_rs.compare.report import plain_config

    names = ["v_proj", "q_proj", "up_proj", "down_proj", "k_proj", "o_proj", "gate_proj"]
    (method,) = parse_specs(f"lora:r=4,target_modules={json.dumps(names)}")
    config = method.config(None).to_dict()
    assert isinstance(config["target_modules"], set)
    assert plain_config(config)["target_modules"] == sorted(names)


def test_a_spec_sets_its_own_rate_grid_which_is_never_swept():
    """``lrs=[...]`` is the method's grid (each member of a sweep gets it); the name
    leaves it out, since a run is its config, rate and seed."""
    found = parse_specs("lora:r=[1,64],lrs=[3e-3,1e-3],lora_alpha=8")
    assert [m.name for m in found] == ["lora:r=1,lora_alpha=8", "lora:r=64,lora_alpha=8"]
    assert [m.lrs for m in found] == [(1e-3, 3e-3)] * 2
    one = parse_spec('cera:r=4,lrs=1e-2,target_modules=["q_proj"]')
    assert one.lrs == (1e-2,) and one.name == 'cera:r=4,target_modules=["q_proj"]'
    assert parse_spec("cera:r=4").lrs is None


def test_the_rate_is_chosen_on_the_score_the_curves_read():
    """Exact match first where the task scores it; by loss alone where it scores bits
    stored (a fact more or less recalled must not outweigh the bits)."""
    from cera_rs.compare.engine import merit

    a, b = {"exact_match": 0.02, "loss": 1.9}, {"exact_match": 0.0, "loss": 1.2}
    assert max((a, b), key=lambda v: merit("exact_match", v)) is a
    assert max((a, b), key=lambda v: merit("bits", v)) is b


def test_r_full_gives_each_layer_its_own_full_rank():
    """q/o are 32 -> 32, k/v 32 -> 16 (two key-value heads), gate/up 32 -> 64 and down
    64 -> 32: every layer at min(in, out), the most common as r and the rest through
    rank_pattern; with the last layer only, only its modules."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    spec = f"lora:r=full,target_modules={json.dumps(targets, separators=(',', ':'))}"
    m = at_full_rank(parse_spec(spec), model)
    assert m.ceiling and m.fields["r"] == 32
    assert m.fields["rank_pattern"] == {
        rf"model\.layers\.{i}\.self_attn\.{p}": 16 for i in (0, 1) for p in ("k_proj", "v_proj")
    }
    from peft import get_peft_model

    peft_model = get_peft_model(model, m.config())
    ranks = {
        name.removeprefix("base_model.model."): mod.r["default"]
        for name, mod in peft_model.named_modules()
        if hasattr(mod, "lora_A")
    }
    expected = {
        f"model.layers.{i}.{part}.{p}": min(shape)
        for i in (0, 1)
        for part, p, shape in (
            ("self_attn", "q_proj", (32, 32)),
            ("self_attn", "k_proj", (32, 16)),
            ("self_attn", "v_proj", (32, 16)),
            ("self_attn", "o_proj", (32, 32)),
            ("mlp", "gate_proj", (32, 64)),
            ("mlp", "up_proj", (32, 64)),
            ("mlp", "down_proj", (64, 32)),
        )
    }
    assert ranks == expected
    last = at_full_rank(parse_spec('lora:r=full,target_modules=["v_proj"]'), model, [1])
    assert last.fields["r"] == 16 and "rank_pattern" not in last.fields
    with pytest.raises(ValueError, match="resolved against the model first"):
        parse_spec("lora:r=full").config()
    conv = nn.Sequential(nn.Conv2d(4, 32, 3), nn.Embedding(10, 6))
    m = at_full_rank(parse_spec('lora:r=full,target_modules=["0","1"]'), conv)
    assert m.fields["r"] == 32 and m.fields["rank_pattern"] == {"1": 6}  # 4*3*3=36 > 32


# --- the multiplier -----------------------------------------------------------------


def _hits_with_mean(mean: float, seeds: int = 3, problems: int = 400, seed: int = 0):
    """Right/wrong answers whose every seed scores exactly ``mean``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((seeds, problems))
    for s in range(seeds):
        out[s, rng.permutation(problems)[: round(mean * problems)]] = 1
    return out


def test_the_multiplier_recovers_a_planted_one():
    """LoRA at 100..1600 parameters scores 10..50 %; a CeRA of 100 parameters scoring
    30 % scores as LoRA with 400: 4x. Between members the reading is linear in log
    parameters: 35 % lies halfway between 400 and 800 in log, sqrt(2) * 4."""
    params = [100, 200, 400, 800, 1600]
    family = [_hits_with_mean(m, seed=i) for i, m in enumerate((0.1, 0.2, 0.3, 0.4, 0.5))]
    m = stats.parameter_multiplier(
        _hits_with_mean(0.3, seed=9), 100, family, params, ("cera", "lora"), resamples=2000
    )
    assert m.where == stats.ON and m.point == pytest.approx(4.0)
    assert m.low < 4.0 < m.high and m.high < 16
    assert m.sentence().startswith("cera scores like lora with 4x its parameters (95 % interval")
    half = stats.parameter_multiplier(
        _hits_with_mean(0.35), 100, family, params, ("cera", "lora"), resamples=500
    )
    assert half.point == pytest.approx(4 * math.sqrt(2))
    # Identical families: each member read off its own curve is 1x.
    for i in range(len(params)):
        same = stats.parameter_multiplier(
            family[i], params[i], family, params, ("x", "lora"), resamples=500
        )
        assert same.point == pytest.approx(1.0)


def test_off_the_curve_and_a_flat_curve_are_said_not_read():
    params = [100, 400, 1600]
    rising = [_hits_with_mean(m, seed=i) for i, m in enumerate((0.1, 0.3, 0.5))]
    above = stats.parameter_multiplier(
        _hits_with_mean(0.8), 100, rising, params, ("c", "l"), resamples=500
    )
    assert above.where == stats.ABOVE and math.isinf(above.point)
    assert "above the largest l tried" in above.sentence()
    below = stats.parameter_multiplier(
        _hits_with_mean(0.02), 100, rising, params, ("c", "l"), resamples=500
    )
    assert below.where == stats.BELOW and below.point == 0
    assert "below the smallest l tried" in below.sentence()
    rng = np.random.default_rng(5)
    p = rng.random(400) * 0.6
    flat = [(rng.random((3, 400)) < p).astype(float) for _ in params]  # one skill, three draws
    m = stats.parameter_multiplier(
        _hits_with_mean(0.3), 100, flat, params, ("c", "l"), resamples=1000
    )
    assert m.where == stats.FLAT and "rank is not seen to bind here" in m.sentence()
    assert "points, 95 % interval" in m.sentence()
    bits = stats.parameter_multiplier(
        _hits_with_mean(0.3), 100, flat, params, ("c", "l"), resamples=1000, unit="bits"
    )
    rise = bits.family_rise
    assert f"{400 * rise.mean:+.1f} bits, 95 % interval {400 * rise.low:+.1f}" in bits.sentence()


def test_isotonic_and_crossed_means():
    assert stats.isotonic(np.array([1.0, 3.0, 2.0, 4.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    x = np.stack([_hits_with_mean(0.2), _hits_with_mean(0.6)])
    draws = stats.crossed_means(x, resamples=300)
    assert draws.shape == (300, 2) and abs(draws[:, 0].mean() - 0.2) < 0.01
    # paired: the same draws for both, so a method against itself never differs
    same = stats.crossed_means(np.stack([x[0], x[0]]), resamples=100)
    assert np.array_equal(same[:, 0], same[:, 1])


# --- the phonebook task ------------------------------------------------------------


def test_phonebook_is_deterministic_unique_and_valid_prompt_completion(tmp_path):
    facts = data.phonebook_facts(500)
    assert facts == data.phonebook_facts(500)
    assert data.phonebook_facts(50) == facts[:50]  # a larger book extends a smaller
    assert len({name for name, _ in facts}) == 500
    assert all(len(n) == data.PHONEBOOK_DIGITS and n.isdigit() for _, n in facts)
    book = load_problems("phonebook:300")
    assert book.train == book.test == book.valid and len(book.train) == 300
    assert book.score == "bits" and list(book.extra_tests) == ["transfer"]
    assert [c for _, c in book.extra_tests["transfer"]] == [c for _, c in book.train]
    assert all(p != q for (p, _), (q, _) in zip(book.train, book.extra_tests["transfer"]))
    path = tmp_path / "book.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in book.train)
    )
    assert data.read_jsonl(path) == book.train
    for bad in ("phonebook:0", "phonebook:x", "phonebook:"):
        with pytest.raises(ValueError, match="positive number of facts"):
            load_problems(bad)


def test_a_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n'
    )
    with pytest.raises(ValueError, match=r"latin1.jsonl, line 2: not UTF-8 \(byte 0xe9"):
        data.read_jsonl(path)


def test_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # loading it would fail: nothing gets there
    cases = [
        (["lora:r=two"], "r=two is not a valid value"),
        (["lora:r=[]"], "empty sweep"),
        (["ia3:r=full"], "has no field 'r'"),
        (["lora:r=4", "--data", "phonebook:0"], "positive number of facts"),
        (
            ["lora:r=4", "--data", "phonebook:5", "--out", "/proc/cera-rs-out"],
            "cannot create the output folder /proc/cera-rs-out",
        ),
    ]
    for args, message in cases:
        argv = ["compare", *args, "--model", missing_model]
        if "--data" not in args:
            argv += ["--data", "phonebook:5"]
        if "--out" not in args:
            argv += ["--out", str(tmp_path / "out")]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --- a sweep end to end -----------------------------------------------------------


def test_a_sweep_with_the_ceiling_end_to_end(tmp_path):
    """LoRA r=1,2 and full, CeRA r=1 on the tiny model: the report draws the curves,
    reads a multiplier (or says why not), sets CeRA against the ceiling, and the
    full-rank LoRA has every layer at its full rank."""
    from cera_rs.compare import Settings, compare

    tiny = _tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    summary = compare(
        ["lora:r=[1,2],lora_alpha=4", "lora:r=full,lora_alpha=4", "cera:r=1"],
        model=tiny / "model",
        train=tiny / "train.jsonl",
        test=tiny / "test.jsonl",
        out_dir=out,
        progress=False,
        settings=Settings(steps=4, batch=8, lrs=(0.01,), seeds=(0, 1), resamples=500),
    )
    assert list(summary["methods"]) == [
        "lora:r=1,lora_alpha=4",
        "lora:r=2,lora_alpha=4",
        "lora:r=full,lora_alpha=4",
        "cera:r=1",
    ]
    # q_proj 32 -> 32 (full rank 32), v_proj 32 -> 16 (16), two layers
    full = summary["methods"]["lora:r=full,lora_alpha=4"]
    assert full["trainable_params"] == 2 * (32 * 64 + 16 * 48)
    c = summary["curves"]
    assert c["score"] == "exact_match" and c["linear_family"] == "lora:lora_alpha=4"
    assert [p["method"] for p in c["curves"]["lora:lora_alpha=4"]] == [
        "lora:r=1,lora_alpha=4",
        "lora:r=2,lora_alpha=4",
        "lora:r=full,lora_alpha=4",
    ]
    (mult,) = c["multipliers"]
    assert mult["method"] == "cera:r=1" and mult["where"] in ("on", "below", "above", "flat")
    (ceiling,) = c["ceiling"]
    assert ceiling["ceiling"] == "lora:r=full,lora_alpha=4" and ceiling["unit"] == "points"
    report = (out / "report.md").read_text()
    assert "## Rank curves" in report and mult["sentence"] in report
    assert summary["settings"]["rate_chosen_by"] == "exact_match"
    assert "No method had a rate or a field to choose: each ran at its one rate." in report
    assert "Shared, left out of the names below: lora: lora_alpha=4." in report
    assert "| lora:r=full | " in report  # the row, its shared field lifted out
    # once lifted, a shared field is in no table, sentence or heading: only in that line
    assert report.count("lora_alpha=4") == 1
    assert "cera:r=1 against the linear ceiling lora:r=full: " in ceiling["sentence"]
    assert "| LoRA | lora:r=1 | " in report  # the family as the legend names it
    assert ceiling["sentence"] in report and (out / "curves.png").stat().st_size > 0
    # bits stored: the base's loss minus the adapted model's, per problem, in every run
    record = json.loads((out / "runs" / "cera_r=1" / "lr0.01-seed1.json").read_text())
    assert len(record["test"]["bits"]) == 40
    assert summary["methods"]["cera:r=1"]["test_bits"] == pytest.approx(
        np.mean(
            [
                sum(
                    json.loads((out / "runs" / "cera_r=1" / f"lr0.01-seed{s}.json").read_text())[
                        "test"
                    ]["bits"]
                )
                for s in (0, 1)
            ]
        )
    )


def test_a_grid_that_grows_keeps_the_runs_it_had(tmp_path):
    """A comparison over two rates, then again with the method's own grid around them:
    the selection runs at the first two rates are read back, not trained again, and
    the grid is reported (the header names the comparison's grid only where a method
    uses it)."""
    from cera_rs.compare import Settings, compare

    tiny = _tiny(tmp_path / "tiny")
    out = tmp_path / "out"

    def once(spec):
        return compare(
            [spec],
            model=tiny / "model",
            train=tiny / "train.jsonl",
            test=tiny / "test.jsonl",
            out_dir=out,
            progress=False,
            settings=Settings(steps=2, batch=8, lrs=(0.01, 0.03), seeds=(1,), resamples=200),
        )

    once("lora:r=2")
    runs = [out / "runs" / "lora_r=2" / f"lr{lr}-seed0.json" for lr in ("0.01", "0.03")]
    kept = [(p.read_bytes(), p.stat().st_mtime_ns) for p in runs]
    summary = once("lora:r=2,lrs=[0.003,0.01,0.03]")
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in runs] == kept  # not written again
    assert (out / "runs" / "lora_r=2" / "lr0.003-seed0.json").is_file()
    assert summary["methods"]["lora:r=2"]["lr_grid"] == [0.003, 0.01, 0.03]
    report = (out / "report.md").read_text()
    assert "reported seeds 1; each method's own rate grid." in report  # not 0.01, 0.03
    assert "Rate grids of their own: lora:r=2 (0.003, 0.01, 0.03)." in report


def test_the_model_digest_is_exact_and_independent_of_threads():
    """A Ray worker (one thread) checks it loaded the driver's model (two): the digest
    is the weights' bytes, not a sum whose rounding follows the thread count."""
    from cera_rs.compare.jobs import model_digest

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 256), nn.Embedding(10, 8).to(torch.bfloat16))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_digest(model)
        torch.set_num_threads(max(2, threads))
        assert model_digest(model) == one
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        model[0].weight[3, 5] = torch.nextafter(model[0].weight[3, 5], torch.tensor(1.0))
    assert model_digest(model) != one  # one ulp in one weight
