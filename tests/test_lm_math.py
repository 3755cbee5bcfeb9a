"""The real-model demo part on SmolLM2-135M: offline loading, the cached-prefix forward,
the exact-match scorer against generate, and the interval."""

from __future__ import annotations

import random
import socket

import pytest
import torch
from transformers.utils import logging as hf_logging

from cera_rs.demo import linearity, llama_cpp, lm_math, smollm2
from cera_rs.export import to_lora


@pytest.fixture(scope="module")
def smol():
    return smollm2.load()


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
    data = lm_math.encode(tokenizer, items)
    assert data.ids.shape[0] == 3 and len(set(data.lengths.tolist())) > 1
    stack = lm_math.Stack(model, 4)
    rows = torch.arange(3)
    owners, positions, targets, _ = data.answer_positions(rows)
    assert targets.tolist() == data.ids[owners, positions + 1].tolist()
    assert len(owners) == sum(len(a) + 1 for _, a in items)  # digits, sign and newline
    with torch.no_grad():
        full = model(input_ids=data.ids).logits[owners, positions]
        cached = stack.logits(stack.prefix(data.ids), owners, positions)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_teacher_forced_scorer_agrees_with_generate(smol):
    model, tokenizer = smol
    # A few-shot prefix makes the base model right on some problems and wrong on others.
    shots = "2+3=5\n4+1=5\n6+2=8\n"
    rng = random.Random(0)
    items = []
    for _ in range(24):
        a, b = rng.randrange(1, 10), rng.randrange(1, 10)
        items.append((f"{shots}{a}+{b}=", str(a + b)))
    data = lm_math.encode(tokenizer, items)
    stack = lm_math.Stack(model, 2)
    scored = lm_math.scored(stack, lm_math.Split(data, stack.prefix(data.ids)), batch=10)
    generated = lm_math.generated(model, tokenizer, items)
    assert 0 < generated.mean() < 1
    assert scored.tolist() == generated.tolist()


def test_wilson_interval():
    assert lm_math.wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = lm_math.wilson(0, 40)
    assert low == 0.0 and high == pytest.approx(0.0876, abs=1e-4)
    assert lm_math.wilson(0, 0) == (0.0, 1.0)


def test_dataset_keeps_held_out_problems_out_of_training():
    s = lm_math.Settings(n_train=300, n_val=50, n_test=50)
    for tier in lm_math.TIERS:
        data = lm_math.dataset(tier, s)
        held = {p for p, _ in data["val"] + data["test"]}
        assert len(held) == 100 and not held & {p for p, _ in data["train"]}
        for prompt, answer in data["test"]:
            assert eval(prompt[:-1]) == int(answer)  # noqa: S307 (our own digits and +/-)
    with pytest.raises(ValueError, match="unknown tier"):
        lm_math.problem("medium", random.Random(0))


def _adapted(base, activation: str, dropout: float, a_gain: float = 1.0):
    """CeRA r=4 on the last 2 layers with a non-zero B (and A times ``a_gain``), as
    if trained."""
    method = lm_math.Method("CeRA", "cera", 4, activation=activation, dropout=dropout)
    model = lm_math.build(base, method, lm_math.Settings(adapted_layers=2))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "cera_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "cera_A" in name:
                p.mul_(a_gain)
    return model.eval()


def test_exported_lora_of_a_linear_cera_adapter_gives_its_logits(smol):
    """Identity activation and no dropout: the adapter is exactly B A, so its rank-r
    export, merged into a copy of the base, reproduces its logits on held-out problems,
    and the base model is left untouched."""
    base, tokenizer = smol
    # More calibration tokens (~8 a problem) than q/v's 576 inputs: the fit is exact
    # everywhere, not only on the span of too few inputs.
    s = lm_math.Settings(n_train=120, n_val=8, n_test=16)
    data = lm_math.dataset("hard", s)
    calibration = lm_math.encode(tokenizer, data["train"])
    test = lm_math.encode(tokenizer, data["test"])
    before = {n: p.clone() for n, p in base.named_parameters() if "layers.29.self_attn" in n}
    model = _adapted(base, "identity", 0.0)
    merged, report = linearity.export_and_merge(model, base, lm_math.token_batches(calibration), 4,
                                                held_out=lm_math.token_batches(test))  # fmt: skip
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
    stack = lm_math.Stack(model.get_base_model(), 2)
    splits = [lm_math.Split(e, stack.prefix(e.ids)) for e in (calibration, test)]
    suffix = to_lora(lm_math.Suffix(stack), splits[0].batches(), rank=4,
                     held_out=splits[1].batches(), progress=False)  # fmt: skip
    full = to_lora(model, lm_math.token_batches(calibration), rank=4, progress=False)
    assert suffix.state_dict.keys() == full.state_dict.keys()
    for b_key in (k for k in full.state_dict if k.endswith("lora_B.weight")):
        a_key = b_key.replace("lora_B", "lora_A")
        torch.testing.assert_close(suffix.state_dict[b_key] @ suffix.state_dict[a_key],
                                   full.state_dict[b_key] @ full.state_dict[a_key],
                                   rtol=1e-3, atol=1e-5)  # fmt: skip
    assert [m.tokens for m in suffix.report] == [m.tokens for m in report]
    row = lm_math.exported_lora(base, stack, *splits, 4, tokenizer,
                                lm_math.generated(model, tokenizer, data["test"]))  # fmt: skip
    assert row["exported_lora_same_verdict"] == 1.0
    # The same LoRA run by llama.cpp from its GGUF adapter file when llama-cpp-python is
    # importable (scripts/llama-cpp-check.sh); otherwise the row and report say why not.
    reason = llama_cpp.unavailable()
    if reason is None:
        assert row["llama_cpp_same_verdict"] >= 0.9 and "llama_cpp_skipped" not in row
    else:
        assert row["llama_cpp_skipped"] == reason and "llama-cpp-python" in reason
    finding = linearity._llama_cpp_finding("hard", "CeRA r=4", {**row, "test_exact_match": [0.5]})
    assert ("run by llama.cpp" in finding) == (reason is None)
    assert row["linearity"]["held_out_linearity_at_r"] > 1 - 1e-5
    low, high = row["exported_lora_wilson95"]
    assert low <= row["exported_lora_test_exact_match"] <= high


def test_silu_cera_adapter_is_measured_below_linear(smol):
    """Identity is linear to round-off (the test above); SiLU is measured below it,
    on held-out tokens by more than on the tokens the map was fitted on. On these
    inputs SiLU is close to linear (held-out ~0.9987 at its init scale, ~0.997 with A
    ten times larger): the adapted layers' inputs are mostly their mean (64-77 % of
    their energy), so the branch works near one point of its curve."""
    base, tokenizer = smol
    s = lm_math.Settings(n_train=120, n_val=8, n_test=40)
    data = lm_math.dataset("hard", s)
    calibration, test = (lm_math.encode(tokenizer, data[k]) for k in ("train", "test"))
    model = _adapted(base, "silu", 0.0, a_gain=10.0)
    _, report = linearity.export_and_merge(model, base, lm_math.token_batches(calibration), 4,
                                           held_out=lm_math.token_batches(test))  # fmt: skip
    fitted, held_out = (report.mean(c) for c in ("linearity_at_adapter_rank",
                                                 "held_out_linearity_at_adapter_rank"))  # fmt: skip
    assert 0.9 < held_out < fitted < 1 - 1e-5 and held_out < 0.999
    assert fitted <= report.mean("linearity_full_rank") + 1e-9


def test_a_run_depends_on_its_seed_not_on_the_runs_before_it(smol):
    """Adapters are initialised from the run's seed: what earlier runs, exports and
    adapter loads drew from the global generator does not change a run's result."""
    base, tokenizer = smol
    s = lm_math.Settings.quick()
    encoded = lm_math.encode(tokenizer, lm_math.dataset("hard", s)["train"])
    stack = lm_math.Stack(base, s.adapted_layers)
    split = lm_math.Split(encoded, stack.prefix(encoded.ids))
    method = lm_math.Method("CeRA r=8", "cera", 8)
    trained = []
    for earlier_draws in (0, 5):
        torch.rand(earlier_draws)
        model, _ = lm_math._fit(base, method, s, split, 3e-3, 0, None)
        trained.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys() and trained[0]
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name
