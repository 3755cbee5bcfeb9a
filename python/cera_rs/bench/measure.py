"""Timing and saved-for-backward accounting shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_times(
    cases: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 7
) -> dict[str, float]:
    """Median seconds per case; the cases run interleaved so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs,
    not counting those of ``exclude`` (inputs and weights every method keeps alike)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())
