"""SmolLM2-135M under ``cera_rs.compare``'s runner, as the demo's part 2 uses it:
offline loading, the cached-prefix forward, the exact-match scorer against generate,
the export of CeRA adapters to LoRA (part 2's extras), and runs that depend on their
seed only."""

from __future__ import annotations

import random
import socket

import pytest
import torch
from transformers.utils import logging as hf_logging

from cera_rs import smollm2
from cera_rs.compare import data
from cera_rs.compare.methods import parse_spec
from cera_rs.compare.runner import Runner, Stack, Suffix
from cera_rs.demo import linearity, llama_cpp, phonebook
from cera_rs.export import to_lora

QV = 'target_modules=["q_proj","v_proj"]'


@pytest.fixture(scope="module")
def smol():
    return smollm2.load()


def _runner(
    model, tokenizer, problems: data.Problems, k: int, steps: int = 1, batch: int = 4
) -> Runner:
    return Runner(
        model,
        tokenizer,
        problems,
        steps=steps,
        batch=batch,
        adapted_layers=k,
        device=torch.device("cpu"),
    )


def test_model_loads_with_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()  # the caller's choice, which load() must leave alone
    try:
        model, tokenizer = smollm2.load()
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(level)
    assert len(model.model.layers) == 30 and model.config.hidden_size == 576
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer("12+3=", add_special_tokens=False)["input_ids"] == [33, 34, 27, 35, 45]


def test_cached_prefix_forward_equals_the_full_model(smol):
    model, tokenizer = smol
    items = [("7+5=", "12"), ("48-93=", "-45"), ("3+4=", "7")]  # ragged: right padding
    encoded = data.encode(tokenizer, items)
    assert encoded.ids.shape[0] == 3 and len(set(encoded.lengths.tolist())) > 1
    stack = Stack(model, 4)
    rows = torch.arange(3)
    owners, positions, targets, _ = encoded.answer_positions(rows)
    assert targets.tolist() == encoded.ids[owners, positions + 1].tolist()
    assert len(owners) == sum(len(a) + 1 for _, a in items)  # digits, sign and the end token
    assert int((targets == tokenizer.eos_token_id).sum()) == 3
    with torch.no_grad():
        full = model(input_ids=encoded.ids).logits[owners, positions]
        cached = stack.logits(stack.prefix(encoded.ids), owners, positions)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_teacher_forced_scorer_agrees_with_generate(smol):
    """On a new CeRA model (B = 0: the base model's answers), few-shot, where the
    answers are right on some problems and wrong on others. The few-shot format ends
    an answer with a newline, which stands in for the end token here."""
    model, tokenizer = smol
    shots = "2+3=5\n4+1=5\n6+2=8\n"
    rng = random.Random(0)
    items = []
    for _ in range(24):
        a, b = rng.randrange(1, 10), rng.randrange(1, 10)
        items.append((f"{shots}{a}+{b}=", str(a + b)))
    eos = tokenizer.eos_token_id
    tokenizer.eos_token_id = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    try:
        runner = _runner(model, tokenizer, data.Problems(items, items, items, "few-shot", "-"), 2)
        adapted = runner.build(parse_spec(f"cera:r=8,{QV}"), 0)
        forced, _, _ = runner.forced_scores(adapted, "test", batch=10)  # batches of 10
        generated = runner.generated(adapted)
    finally:
        tokenizer.eos_token_id = eos
    assert 0 < generated.mean() < 1
    assert forced.tolist() == generated.tolist()


def _adapted(runner: Runner, activation: str, dropout: float, a_gain: float = 1.0):
    """CeRA r=4 on the runner's adapted layers with a non-zero B (and A times
    ``a_gain``), as if trained."""
    method = parse_spec(f"cera:r=4,activation={activation},cera_dropout={dropout},{QV}")
    model = runner.build(method, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cera_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "cera_A" in name:
                p.mul_(a_gain)
    return model.eval()


def _token_batches(encoded: data.Encoded, batch: int = 64) -> list[dict]:
    """Token ids with the ``attention_mask`` the export reads to leave padding out."""
    return [
        {
            "input_ids": encoded.ids[i : i + batch],
            "attention_mask": encoded.attention_mask(
                torch.arange(i, min(i + batch, len(encoded))), encoded.ids.shape[1]
            ),
        }
        for i in range(0, len(encoded), batch)
    ]


def test_exported_lora_of_a_linear_cera_adapter_gives_its_logits(smol):
    """Identity activation and no dropout: the adapter is exactly B A, so its rank-r
    export, merged into a copy of the base, reproduces its logits on held-out problems,
    and the base model is left untouched."""
    base, tokenizer = smol
    # More calibration tokens (~8 a problem) than q/v's 576 inputs: the fit is exact
    # everywhere, not only on the span of too few inputs.
    problems = data.tier("hard", 120, 8, 16)
    runner = _runner(base, tokenizer, problems, 2)
    calibration, test = runner.splits["train"].data, runner.splits["test"].data
    before = {n: p.clone() for n, p in base.named_parameters() if "layers.29.self_attn" in n}
    model = _adapted(runner, "identity", 0.0)
    merged, report = linearity.export_and_merge(
        model, base, _token_batches(calibration), 4, held_out=_token_batches(test)
    )
    assert len(report) == 4
    for column in ("linearity_at_adapter_rank", "held_out_linearity_at_adapter_rank"):
        assert report.mean(column) > 1 - 1e-5, column
    real = torch.arange(test.ids.shape[1]) < test.lengths[:, None]
    with torch.no_grad():
        want = model(input_ids=test.ids).logits[real]
        got = merged(input_ids=test.ids).logits[real]
        plain = base(input_ids=test.ids).logits[real]
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for name, p in base.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]), name

    # The demo's route: the same export streamed through the adapted layers alone, on
    # cached prefix states, gives the same fit under the same module names.
    suffix = to_lora(
        Suffix(runner.stack_of(model)),
        runner.splits["train"].batches(),
        rank=4,
        held_out=runner.splits["test"].batches(),
        progress=False,
    )
    full = to_lora(model, _token_batches(calibration), rank=4, progress=False)
    assert suffix.state_dict.keys() == full.state_dict.keys()
    for b_key in (k for k in full.state_dict if k.endswith("lora_B.weight")):
        a_key = b_key.replace("lora_B", "lora_A")
        torch.testing.assert_close(
            suffix.state_dict[b_key] @ suffix.state_dict[a_key],
            full.state_dict[b_key] @ full.state_dict[a_key],
            rtol=1e-3,
            atol=1e-5,
        )
    assert [m.tokens for m in suffix.report] == [m.tokens for m in report]
    spec = parse_spec(f"cera:r=4,activation=identity,cera_dropout=0.0,{QV}")
    row = phonebook.exported_lora(spec, model, runner, runner.generated(model))
    assert row["exported_lora_same_verdict"] == 1.0
    # The same LoRA run by llama.cpp from its GGUF adapter file when llama-cpp-python is
    # importable (scripts/llama-cpp-check.sh); otherwise the row and report say why not.
    reason = llama_cpp.unavailable()
    if reason is None:
        assert row["llama_cpp_same_verdict"] >= 0.9 and "llama_cpp_skipped" not in row
    else:
        assert row["llama_cpp_skipped"] == reason and "llama-cpp-python" in reason
    finding = linearity._llama_cpp_finding("CeRA r=4", {**row, "recall": [0.5]})
    assert ("run by llama.cpp" in finding) == (reason is None)
    assert row["linearity"]["held_out_linearity_at_r"] > 1 - 1e-5
    low, high = row["exported_lora_wilson95"]
    assert low <= row["exported_lora_test_exact_match"] <= high
    lora = parse_spec(f"lora:r=8,{QV}")
    assert phonebook.exported_lora(lora, model, runner, runner.generated(model)) == {}


def test_silu_cera_adapter_is_measured_below_linear(smol):
    """Identity is linear to round-off (the test above); SiLU is measured below it,
    on held-out tokens by more than on the tokens the map was fitted on. On these
    inputs SiLU is close to linear (held-out ~0.9987 at its init scale, ~0.997 with A
    ten times larger): the adapted layers' inputs are mostly their mean (64-77 % of
    their energy), so the branch works near one point of its curve."""
    base, tokenizer = smol
    runner = _runner(base, tokenizer, data.tier("hard", 120, 8, 40), 2)
    model = _adapted(runner, "silu", 0.0, a_gain=10.0)
    train, test = (_token_batches(runner.splits[k].data) for k in ("train", "test"))
    _, report = linearity.export_and_merge(model, base, train, 4, held_out=test)
    fitted, held_out = (
        report.mean(c) for c in ("linearity_at_adapter_rank", "held_out_linearity_at_adapter_rank")
    )
    assert 0.9 < held_out < fitted < 1 - 1e-5 and held_out < 0.999
    assert fitted <= report.mean("linearity_full_rank") + 1e-9


def test_a_run_depends_on_its_seed_not_on_the_runs_before_it(smol):
    """Adapters are initialised and batches drawn from the run's seed: what earlier
    runs, exports and adapter loads drew from the global generator does not change a
    run's result."""
    base, tokenizer = smol
    runner = _runner(base, tokenizer, data.tier("hard", 64, 24, 24), 2, steps=6, batch=8)
    method = parse_spec(f"cera:r=8,{QV}")
    trained = []
    for earlier_draws in (0, 5):
        torch.rand(earlier_draws)
        model = runner.build(method, 0)
        runner.train(model, method, 3e-3, 0)
        trained.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys() and trained[0]
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name


def test_padded_batches_give_each_prompt_its_own_greedy_answer(smol):
    """Greedy decoding batches prompts of different lengths, padded on the left and
    masked out: every row's continuation is the one that prompt gets alone, on the
    phonebook prompts (names of several token lengths, and their rewordings), for the
    base model and for a CeRA adapter with a non-zero B (as if trained)."""
    from cera_rs.compare import load_problems
    from cera_rs.compare.runner import greedy_tokens

    model, tokenizer = smol
    book = load_problems("phonebook:4")  # 8 prompts of 4 lengths
    runner = _runner(model, tokenizer, book, 1)
    prompts = [*runner.splits["test"].data.prompts(), *runner.splits["transfer"].data.prompts()]
    assert len({len(p) for p in prompts}) >= 3  # padding is exercised
    adapted = _adapted(runner, "silu", 0.0)
    eos = tokenizer.eos_token_id
    for m in (model, adapted):
        alone = [greedy_tokens(m, [p], 8, eos)[0] for p in prompts]
        assert greedy_tokens(m, prompts, 8, eos) == alone
