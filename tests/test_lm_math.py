"""The real-model demo part on SmolLM2-135M: offline loading, the cached-prefix forward,
the exact-match scorer against generate, and the interval."""

from __future__ import annotations

import random
import socket

import pytest
import torch

from cera_rs.demo import lm_math, smollm2


@pytest.fixture(scope="module")
def smol():
    return smollm2.load()


def test_model_loads_with_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = smollm2.load()
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
