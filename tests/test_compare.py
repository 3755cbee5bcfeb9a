"""``cera-rs compare``: the bootstrap on cases with a known answer, method specs and
PEFT experiment folders, and a whole comparison on a tiny local model and JSONL
files that, killed after its first run and started again, resumes and reports the
same scores."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cera_rs.cli import main
from cera_rs.compare import data, stats
from cera_rs.compare.engine import merit
from cera_rs.compare.methods import method, parse_spec, read_folder

# PEFT's method_comparison/MetaMathQA/experiments/lora/llama-3.2-3B-rank32/adapter_config.json
# (huggingface/peft, 2026-08), field for field.
PEFT_LORA_RANK32 = {
    "alpha_pattern": {},
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "bias": "none",
    "corda_config": None,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": False,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 64,
    "lora_bias": False,
    "lora_dropout": 0.0,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 32,
    "rank_pattern": {},
    "revision": None,
    "target_modules": None,
    "task_type": "CAUSAL_LM",
    "use_dora": False,
    "use_rslora": False,
}


# --- the bootstrap -----------------------------------------------------------------


def test_identical_methods_give_an_interval_at_zero():
    rng = np.random.default_rng(0)
    hits = rng.random((3, 200)) < 0.4
    d = stats.paired_difference(hits, hits.copy(), ("B", "A"), resamples=2000)
    assert d.mean == 0 and d.low == 0 and d.high == 0 and d.discordant == 0
    assert d.verdict == stats.TIE
    assert d.sentence().startswith("B and A are not distinguishable at this size: +0.0 points")


def test_same_skill_different_draws_is_not_distinguishable():
    """Two methods that are right with the same probability on each problem, answers
    drawn independently: the interval covers 0."""
    rng = np.random.default_rng(1)
    p = rng.random(300)
    a, b = (rng.random((3, 300)) < p for _ in range(2))
    d = stats.paired_difference(a, b, ("B", "A"), resamples=4000)
    assert d.low < 0 < d.high and d.verdict == stats.TIE


def test_a_planted_difference_is_found_and_its_sign_kept():
    """B is A with a tenth of A's wrong answers turned right (about +6 points): found,
    with an interval around the planted difference; swapped, it is "worse"."""
    rng = np.random.default_rng(2)
    a = rng.random((3, 400)) < 0.4
    b = a | ((rng.random(a.shape) < 0.1) & ~a)
    planted = b.mean() - a.mean()
    d = stats.paired_difference(b, a, ("B", "A"), resamples=4000)
    assert d.verdict == stats.BETTER and 0 < d.low < planted < d.high
    assert d.sentence().startswith("B is better than A: +")
    assert stats.paired_difference(a, b, ("A", "B"), resamples=4000).verdict == stats.WORSE


def test_seed_spread_widens_the_interval_and_one_seed_gives_no_verdict():
    """A gain on one seed and a loss on another is not a gain; and three seeds that
    agree in sign but spread widely are not enough either: the interval covers the t
    interval over the per-seed differences, which a bootstrap of three seeds
    understates."""
    rng = np.random.default_rng(3)
    a = rng.random((2, 400)) < 0.5
    b = a.copy()
    b[0] |= rng.random(400) < 0.3  # seed 0: much better
    b[1] &= rng.random(400) < 0.7  # seed 1: much worse
    d = stats.paired_difference(b, a, ("B", "A"), resamples=4000)
    assert d.verdict == stats.TIE and d.high - d.low > 0.2
    one = stats.paired_difference(b[:1], a[:1], ("B", "A"), resamples=2000)
    assert one.low > 0 and one.verdict == stats.TIE  # above zero on its one seed, no verdict
    assert "one seed: training's own spread is not measured" in one.sentence()

    a = rng.random((3, 600)) < 0.3
    b = a.copy()
    for seed, gain in enumerate((0.12, 0.02, 0.06)):  # all gains, spread widely
        b[seed] |= rng.random(600) < gain
    per_seed = (b.astype(float) - a).mean(axis=1)
    half = stats.t975(2) * per_seed.std(ddof=1) / np.sqrt(3)
    d = stats.paired_difference(b, a, ("B", "A"), resamples=4000)
    assert d.low <= per_seed.mean() - half + 1e-12 and d.verdict == stats.TIE


def test_t_quantiles():
    assert stats.t975(2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t975(11) == pytest.approx(2.201, abs=1e-3)
    assert stats.t975(30) == pytest.approx(2.042, abs=1e-3)
    assert stats.t975(1000) == pytest.approx(1.962, abs=1e-3)


def test_bootstrap_refuses_unpaired_answers():
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_difference(np.ones((2, 5)), np.ones((2, 6)), ("B", "A"))


def test_wilson_interval():
    assert stats.wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = stats.wilson(0, 40)
    assert low == 0.0 and high == pytest.approx(0.0876, abs=1e-4)
    assert stats.wilson(0, 0) == (0.0, 1.0)


# --- methods ---------------------------------------------------------------------


def test_specs_name_any_peft_method():
    m = parse_spec(
        'cera:r=64,activation=identity,cera_dropout=0,target_modules=["q_proj","v_proj"]'
    )
    assert m.peft_type == "CERA"
    assert m.fields == {
        "r": 64,
        "activation": "identity",
        "cera_dropout": 0,
        "target_modules": ["q_proj", "v_proj"],
    }
    assert m.config().activation == "identity"
    dora = parse_spec("dora:r=8")
    assert dora.peft_type == "LORA" and dora.config().use_dora is True
    assert type(parse_spec("hira:r=4").config()).__name__ == "HiraConfig"
    with pytest.raises(ValueError, match="unknown method 'lorra'.*did you mean 'lora'"):
        parse_spec("lorra:r=8")
    with pytest.raises(ValueError, match="no field 'cera_dropot'; did you mean 'cera_dropout'"):
        parse_spec("cera:r=8,cera_dropot=0.1")
    with pytest.raises(ValueError, match="'r' is not key=value"):
        parse_spec("lora:r")
    with pytest.raises(ValueError, match="cera:r=0"):
        parse_spec("cera:r=0")


def test_a_peft_experiment_folder_is_read_as_peft_lays_it_out(tmp_path):
    folder = tmp_path / "lora" / "llama-3.2-3B-rank32"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_LORA_RANK32))
    (folder / "training_params.json").write_text(
        json.dumps({"optimizer_kwargs": {"lr": 4.5e-3, "weight_decay": 0.0}, "max_steps": 5000})
    )
    m = method(folder)
    assert m.name == "lora/llama-3.2-3B-rank32" and m.peft_type == "LORA"
    assert m.fields["r"] == 32 and m.fields["lora_alpha"] == 64
    assert m.training == {"optimizer_kwargs": {"lr": 4.5e-3, "weight_decay": 0.0}}
    assert any(n.startswith("max_steps") for n in m.not_applied)
    (folder / "training_params.json").write_text('{"optimizer_kwargs": {"lr": true}}')
    with pytest.raises(ValueError, match="optimizer_kwargs.lr True is not a positive rate"):
        read_folder(folder)
    (folder / "training_params.json").write_text('{"warmup": 3}')
    with pytest.raises(ValueError, match="unknown option 'warmup'"):
        read_folder(folder)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        read_folder(tmp_path)


def test_jsonl_is_checked_line_by_line(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "1+1=", "completion": "2"}\n\n')
    assert data.read_jsonl(good) == [("1+1=", "2")]
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"messages": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected an object"):
        data.read_jsonl(bad)
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not JSON"):
        data.read_jsonl(bad)


def test_tiers_keep_held_out_problems_out_of_training():
    for tier in data.TIERS:
        problems = data.tier(tier, 300, 50, 50)
        held = {p for p, _ in problems.valid + problems.test}
        assert len(held) == 100 and not held & {p for p, _ in problems.train}
        for prompt, answer in problems.test:
            assert eval(prompt[:-1]) == int(answer)  # noqa: S307 (our own digits and +)
    assert data.tier("hard", 10, 50, 100).test[:50] == data.tier("hard", 10, 50, 50).test
    with pytest.raises(ValueError, match="unknown tier"):
        data.tier_problem("medium", random.Random(0))


# --- a whole comparison ------------------------------------------------------------


def _tiny(folder: Path, attention_bias: bool = False) -> Path:
    """A 2-layer Llama with a character tokenizer, and one-digit sums as JSONL."""
    chars = list("0123456789+= ")
    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        attention_bias=attention_bias,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    fast.save_pretrained(folder / "model")
    rng = random.Random(0)
    for name, n in (("train", 160), ("test", 40)):
        rows = [
            {"prompt": f"{a}+{b}=", "completion": str(a + b)}
            for a, b in ((rng.randrange(10), rng.randrange(10)) for _ in range(n))
        ]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lora = folder / "experiments" / "lora" / "llama-3.2-3B-rank32"
    lora.mkdir(parents=True)
    (lora / "adapter_config.json").write_text(json.dumps(PEFT_LORA_RANK32))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny"))


def compare_argv(tiny: Path, *methods: str, flags: tuple[str, ...] = ()) -> list[str]:
    """``cera-rs compare`` METHODS on the tiny model and its JSONL data, then FLAGS."""
    data = ("--train", str(tiny / "train.jsonl"), "--test", str(tiny / "test.jsonl"))
    return ["compare", *methods, "--model", str(tiny / "model"), *data, *flags]


def _args(tiny: Path, out: Path) -> list[str]:
    folder = str(tiny / "experiments" / "lora" / "llama-3.2-3B-rank32")
    flags = ("--steps", "6", "--batch", "8", "--lrs", "0.01,0.03", "--seeds", "1,2")
    cera = "cera:r=4,cera_dropout={0.0,0.3}"  # tuned with the rate on the selection runs
    return compare_argv(tiny, folder, cera, "hira:r=4", flags=(*flags, "--out", str(out)))


def _scores(out: Path) -> tuple[str, dict]:
    report = (out / "report.md").read_text().split("## Costs")[0]
    summary = json.loads((out / "summary.json").read_text())
    for m in summary["methods"].values():
        m.pop("costs")
    return report, summary


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    """One whole comparison, as ``cera-rs compare`` runs it, and what it printed."""
    out = tmp_path_factory.mktemp("whole")
    with open(out / "printed.txt", "w") as f, contextlib.redirect_stdout(f):
        assert main(_args(tiny, out)) == 0
    return out


def test_compare_runs_end_to_end_and_resumes_after_a_kill(tiny, whole, tmp_path):
    printed = (whole / "printed.txt").read_text()
    report, summary = _scores(whole)
    assert report in printed and "## Costs" in printed
    assert list(summary["methods"]) == ["lora/llama-3.2-3B-rank32", CERA, "hira:r=4"]
    assert summary["methods"]["hira:r=4"]["peft_type"] == "HIRA"  # PEFT's own HiRA, unchanged
    # q_proj 32 -> 32, v_proj 32 -> 16 (two key-value heads), r=4, two layers
    assert summary["methods"][CERA]["trainable_params"] == 2 * 4 * ((32 + 32) + (32 + 16))
    assert [d["verdict"] for d in summary["differences"]] and all(
        d["verdict"] in (stats.BETTER, stats.WORSE, stats.TIE) for d in summary["differences"]
    )
    assert "linearity" in summary["methods"][CERA]
    assert "spectra" in summary["methods"]["lora/llama-3.2-3B-rank32"]
    assert "spectra" not in summary["methods"]["hira:r=4"]
    results = sorted(p.name for p in (whole / "peft_results").iterdir())
    assert len(results) == 6 and (whole / "exact_match.png").stat().st_size > 0

    # Killed once its first run is on disk, then the same command again.
    resumed = tmp_path / "resumed"
    first = resumed / "runs" / "lora_llama-3.2-3B-rank32" / "lr0.01-seed0.json"
    killed_once_written(_args(tiny, resumed), first)
    assert first.is_file() and not (resumed / "report.md").exists()
    kept = json.loads(first.read_text())
    assert main(_args(tiny, resumed)) == 0
    assert json.loads(first.read_text()) == kept  # the finished run was not trained again
    assert _scores(resumed) == (report, summary)
    # Nothing left to do: a third run trains nothing and reports the same.
    stamp = {p: p.stat().st_mtime_ns for p in (resumed / "runs").rglob("*.safetensors")}
    assert main(_args(tiny, resumed)) == 0
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert _scores(resumed) == (report, summary)


CERA = "cera:r=4,cera_dropout={0.0,0.3}"


def test_choices_are_made_on_selection_runs_that_are_not_reported(whole):
    """Two rates for every method and CeRA's dropout given two choices: every candidate
    trains on the selection seed (0), the best valid score chooses, the reported seeds
    (1, 2) exclude it, and the report says which runs chose and that they are left out."""
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["settings"]["seeds"] == [1, 2] and summary["selection"]["seed"] == 0
    assert summary["selection"]["runs"] == {"lora/llama-3.2-3B-rank32": 2, CERA: 4, "hira:r=4": 2}
    assert summary["selection"]["tuning_adds"] == 2  # 8 runs, 6 of them for the rates alone
    for m in summary["methods"].values():
        runs = m["selection_runs"]
        assert {r["seed"] for r in runs} == {0}
        best = max(runs, key=lambda r: merit("exact_match", r["valid"]))
        assert (m["lr"], {f: t["chosen"] for f, t in m["tuned"].items()}) == (
            best["lr"],
            best["choice"],
        )
        assert m["seeds"] == [1, 2] and m["convergence"]["steps"] == [1, 3, 4, 6]
    cera = summary["methods"][CERA]
    assert cera["tuned"]["cera_dropout"]["choices"] == [0.0, 0.3]
    assert cera["tuned"]["cera_dropout"]["at_edge"]  # two choices: either is an edge
    assert cera["effective"]["dropout"] == cera["tuned"]["cera_dropout"]["chosen"]
    reported = sorted(p.name for p in (whole / "peft_results").iterdir())
    assert reported and not any(p.endswith("seed0.json") for p in reported)
    record = json.loads(next((whole / "runs" / "hira_r=4").glob("*-seed1.json")).read_text())
    assert record["seed"] == 1 and len(record["train"]["curve"]) == 4
    report = (whole / "report.md").read_text()
    assert "on selection runs of seed 0 (8 runs; tuning besides the rate added 2 of them)" in report
    assert "those runs are excluded from every score below, which are seeds 1, 2." in report
    assert "cera_dropout=0" in report and "(at the edge of its choices)" in report
    assert "## What each branch is" in report and "## What else differs from" in report


def killed_once_written(args: list[str], path: Path, timeout: float = 300) -> None:
    """``cera-rs ARGS`` in a process of its own, killed as soon as ``path`` is on disk
    (or it ended, or ``timeout`` seconds passed): a comparison stopped mid-way."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cera_rs.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while not path.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()


def test_results_carry_what_peft_processing_reads(whole):
    """The fields PEFT's method_comparison/processing.py reads from each results JSON
    (checked against PEFT's file outside the tests: see the README)."""
    for path in (whole / "peft_results").iterdir():
        row = json.loads(path.read_text())
        run, train, meta = row["run_info"], row["train_info"], row["meta_info"]
        assert run["peft_config"]["peft_type"] in ("LORA", "CERA", "HIRA")
        for key in ("experiment_name", "train_config", "total_time", "peft_branch", "created_at"):
            assert key in run
        assert isinstance(run["train_config"]["model_id"], str)
        for key in (
            "accelerator_memory_reserved_avg",
            "accelerator_memory_max",
            "accelerator_memory_reserved_99th",
            "file_size",
            "num_trainable_params",
        ):
            assert isinstance(train[key], int) and train[key] >= 0, key
        assert train["status"] == "success" and isinstance(train["train_time"], float)
        last = train["metrics"][-1]
        assert 0 <= last["test accuracy"] <= 1 and isinstance(last["train samples"], int)
        for key in ("train loss", "train total tokens"):
            assert key in last
        for key in (
            "peft-version",
            "transformers-version",
            "datasets-version",
            "torch-version",
            "bitsandbytes-version",
        ):
            assert key in meta["package_info"]
        assert {"system_info", "pytorch_info"} <= set(meta)


def test_bad_arguments_are_one_line_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    assert (
        main(
            [
                "compare",
                "lora:r=4",
                "--model",
                str(tiny / "model"),
                "--data",
                "tiers:medium",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "unknown built-in data 'tiers:medium'" in capsys.readouterr().err
    assert main(compare_argv(tiny, "lora:r=4", "lora:r=4", flags=("--out", str(out)))) == 2
    assert "given twice" in capsys.readouterr().err
    assert (
        main(
            [
                "compare",
                "cera:r=4",
                "--adapted-layers",
                "1",
                "--model",
                str(tiny / "model"),
                "--train",
                str(tiny / "train.jsonl"),
                "--test",
                str(tiny / "test.jsonl"),
                "--reference",
                "lora:r=9",
                "--out",
                str(out),
                "--steps",
                "1",
                "--seeds",
                "0",
                "--lrs",
                "0.01",
            ]
        )
        == 2
    )
    assert "reference 'lora:r=9' is not one of the methods" in capsys.readouterr().err
    assert (
        main(
            ["compare", "lora:r=4", "--data", "tiers:hard", "--sizes", "10,0,5", "--out", str(out)]
        )
        == 2
    )
    assert "three positive counts" in capsys.readouterr().err
    assert main(["compare", "lora:r=4", "--out", str(out)]) == 2
    assert "no data: give --data tiers:hard" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("spec", ['lora:r=4,init_lora_weights="pissa"', "lora:r=4,bias=all"])
def test_a_method_that_changes_the_shared_base_is_refused(tmp_path, spec):
    """Every run shares the base's weights: PiSSA's init rewrites them, bias="all"
    trains them (the q/k/v biases here); either would change the runs after it."""
    from cera_rs.compare import Settings, compare

    tiny = _tiny(tmp_path / "tiny", attention_bias=True)
    with pytest.raises(ValueError, match="writes to or trains the base model's own weights"):
        compare(
            [spec],
            model=tiny / "model",
            train=tiny / "train.jsonl",
            test=tiny / "test.jsonl",
            out_dir=tmp_path / "out",
            progress=False,
            settings=Settings(steps=1, batch=2, lrs=(0.01,), seeds=(0,)),
        )
