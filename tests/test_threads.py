"""Threads: the Rust calls release the GIL, and concurrent use matches sequential use.

Every thread is a daemon joined with a timeout, so a deadlock fails the test instead
of hanging the suite.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

import pytest
import torch
from models import tiny_llama

from cera_rs import CeraConfig, _native, get_cera_model
from cera_rs.spectral import StreamingSpectrum

TIMEOUT_S = 120


def run_threads(work: list[Callable[[], object]]) -> list[object]:
    """Runs each callable in its own daemon thread, all started together; returns
    their results (re-raising the first error) and fails on a thread still running
    after TIMEOUT_S (a deadlock)."""
    results: list[object] = [None] * len(work)
    errors: list[BaseException] = []
    start = threading.Barrier(len(work))

    def body(i: int) -> None:
        try:
            start.wait()
            results[i] = work[i]()
        except BaseException as err:  # reported to the test below
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(work))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    assert stuck == 0, f"{stuck} of {len(threads)} threads still running after {TIMEOUT_S} s"
    if errors:
        raise errors[0]
    return results


@pytest.fixture
def one_intra_op_thread():
    """The spinning thread below needs a core of its own while the native call runs,
    and hands the GIL over quickly (1 ms switch interval)."""
    before, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(0.001)
    yield
    torch.set_num_threads(before)
    sys.setswitchinterval(interval)


def longest_gil_stall(call: Callable[[], object], seconds: float = 0.6) -> tuple[float, float]:
    """Runs ``call`` repeatedly in a thread for about ``seconds``, while this thread
    spins taking the GIL; returns (the longest gap between two spins, the shortest
    duration of one call). A call that held the GIL would stall the spinning for its
    whole duration."""
    durations: list[float] = []
    done = threading.Event()

    def worker() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or not durations:
            t0 = time.perf_counter()
            call()
            durations.append(time.perf_counter() - t0)
        done.set()

    call()  # warm-up: allocations, thread pools
    thread = threading.Thread(target=worker, daemon=True)
    last, gap = time.perf_counter(), 0.0
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    thread.join(TIMEOUT_S)
    return gap, min(durations)


def gil_cases():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 512, generator=gen)
    a, b = 0.05 * torch.randn(384, 512, generator=gen), torch.randn(512, 384, generator=gen)
    y, h, _ = _native.forward(x, a, b, activation="silu", scaling=1.0, dropout=0.1, seed=3)
    grad = torch.randn_like(y)
    stream = StreamingSpectrum(512)
    return {
        "delta": lambda: _native.delta(x, a, b, activation="silu", scaling=1.0),
        "backward": lambda: _native.backward(
            grad,
            x,
            a,
            b,
            h,
            activation="silu",
            scaling=1.0,
            dropout=0.1,
            seed=3,
            needs_x=True,
            needs_a=True,
            needs_b=True,
        ),
        "gram_update": lambda: stream.update(x),
    }


@pytest.mark.parametrize("name", ["delta", "backward", "gram_update"])
def test_native_calls_release_the_gil(name, one_intra_op_thread):
    gap, shortest = longest_gil_stall(gil_cases()[name])
    assert shortest > 0.04, f"calls too short ({shortest:.4f} s) to tell"
    assert gap < 0.5 * shortest, f"GIL held: spinning stalled {gap:.3f} s, call {shortest:.3f} s"


def test_four_threads_on_one_model_match_one_thread():
    model = get_cera_model(
        tiny_llama(), CeraConfig(r=4, target_modules=["q_proj", "v_proj"], cera_dropout=0.1)
    ).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cera_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    batches = [torch.randint(0, 128, (2, 12), generator=gen) for _ in range(4)]

    def infer(ids: torch.Tensor, repeats: int = 6) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(input_ids=ids).logits for _ in range(repeats)]

    sequential = [infer(ids, repeats=1)[0] for ids in batches]
    concurrent = run_threads([lambda ids=ids: infer(ids) for ids in batches])
    for want, got in zip(sequential, concurrent):
        for logits in got:
            assert torch.equal(logits, want)


def test_four_threads_share_one_streaming_spectrum():
    """Concurrent updates of one accumulator equal the sequential ones (the Gram sum
    is order-dependent only to rounding)."""
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(50, 24, generator=gen, dtype=torch.float64) for _ in range(16)]
    shared = StreamingSpectrum(24)
    run_threads([lambda k=k: [shared.update(p) for p in parts[k::4]] for k in range(4)])
    sequential = StreamingSpectrum(24)
    for p in parts:
        sequential.update(p)
    assert shared.tokens_seen == sequential.tokens_seen == 800
    torch.testing.assert_close(
        shared.state()["gram"], sequential.state()["gram"], rtol=1e-12, atol=1e-10
    )


def test_merging_two_accumulators_both_ways_at_once_does_not_deadlock():
    a, b = StreamingSpectrum(64), StreamingSpectrum(64)
    a.update(torch.ones(1, 64))
    b.update(torch.ones(1, 64))

    def merge_many(into: StreamingSpectrum, other: StreamingSpectrum) -> None:
        for _ in range(300):
            into.merge(other)

    run_threads([lambda: merge_many(a, b), lambda: merge_many(b, a)])
    assert a.tokens_seen > 300 and b.tokens_seen > 300
