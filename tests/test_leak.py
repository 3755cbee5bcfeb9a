"""No leak: 2,000 steps grow resident memory by less than 20 MB after warm-up.

Shapes are chosen so that keeping one branch-sized tensor per step (the hidden
``h``, 128 x 64 float32 = 32 KB) would grow memory by 64 MB: the control test below
shows the measurement catches exactly that.
"""

from __future__ import annotations

import gc
from typing import Callable

import psutil
import pytest
import torch
from torch import nn

from cera_rs import CeraLinear, _native, cera_delta
from cera_rs.spectral import StreamingSpectrum, spectrum

STEPS, WARMUP, LIMIT_MB = 2000, 200, 20.0


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Small GEMMs on a busy 2-core machine run 10-100x slower with two OpenMP
    threads fighting for the cores; memory, not speed, is measured here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def growth_mb(step: Callable[[], object]) -> float:
    for _ in range(WARMUP):
        step()
    gc.collect()
    before = psutil.Process().memory_info().rss
    for _ in range(STEPS):
        step()
    gc.collect()
    return (psutil.Process().memory_info().rss - before) / 2**20


def training_step() -> Callable[[], None]:
    torch.manual_seed(0)
    layer = CeraLinear(nn.Linear(128, 128), r=64, dropout=0.1).train()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(128, 128, requires_grad=True)

    def step() -> None:
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


def inference_step() -> Callable[[], None]:
    x, a, b = torch.randn(128, 128), torch.randn(64, 128), torch.randn(128, 64)

    def step() -> None:
        with torch.no_grad():
            cera_delta(x, a, b, training=False)
            cera_delta(x, a, b, dropout=0.1)

    return step


def failing_step() -> Callable[[], None]:
    """The error paths: shape errors raised from Rust after tensors were converted."""
    x, a, b = torch.randn(128, 128), torch.randn(64, 128), torch.randn(128, 63)

    def step() -> None:
        for call in (
            lambda: _native.delta(x, a, b, activation="silu", scaling=1.0),
            lambda: _native.forward(x, a, b, activation="silu", scaling=1.0, dropout=0.1, seed=1),
        ):
            with pytest.raises(ValueError):
                call()

    return step


def spectral_step() -> Callable[[], None]:
    stream, rows = StreamingSpectrum(64), torch.randn(128, 64)

    def step() -> None:
        stream.update(rows)
        spectrum(rows).metrics()

    return step


@pytest.mark.parametrize(
    "make",
    [training_step, inference_step, failing_step, spectral_step],
    ids=["forward_backward", "inference", "errors", "spectral"],
)
def test_memory_stays_flat(make):
    grown = growth_mb(make())
    assert grown < LIMIT_MB, f"resident memory grew {grown:.1f} MB over {STEPS} steps"


def test_the_measurement_catches_one_leaked_hidden_state_per_step():
    x, a, b = torch.randn(128, 128), torch.randn(64, 128), torch.randn(128, 64)
    kept = []

    def leaky() -> None:
        _, h, _ = _native.forward(x, a, b, activation="silu", scaling=1.0, dropout=0.0, seed=0)
        kept.append(h)

    assert growth_mb(leaky) > LIMIT_MB
