"""How long, how much memory, and on what machine: timing, saved-for-backward
accounting and peak memory for the benchmarks, ``compare``'s training records and the
demo. Peak memory is read two ways because the questions differ: the resident
high-water mark (``VmHWM``) for a whole process (a benchmark case in its own
subprocess), and a sampling thread for one block inside a long-lived process (a
training run), where the process's earlier peak would hide the block's."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the work queued on ``device``: CUDA runs asynchronously, so a timer
    stops only once the GPU is done; CPU work is done when the call returns."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_times(
    cases: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    repeats: int = 7,
    sync: Callable[[], None] = lambda: None,
    samples: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median seconds per case; the cases run interleaved so machine noise hits all alike.
    ``sync`` runs before and after each timed call (see ``synchronizer``); ``samples``,
    a dict, receives every case's timings (for their spread on a busy machine)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples = {} if samples is None else samples
    samples.update({name: [] for name in cases})
    for _ in range(repeats):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples[name]) for name in cases}


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


def _pin_malloc_to_mmap() -> None:
    """Large blocks straight from mmap and back on free (glibc), so the process's
    resident size follows the tensors alive; without it freed memory stays resident
    and hides the next step's peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def sampled(probe: Callable[[], int], interval: float) -> Iterator[list[int]]:
    """``probe()`` minus its value at entry, sampled by a thread every ``interval``
    seconds while the block runs, and once more at its end: the list fills as the
    block runs."""
    before = probe()
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(probe() - before)
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        done.set()
        sampler.join()
        samples.append(probe() - before)


def peak_rss_growth(fn: Callable[[], object], interval: float = 2e-4) -> int:
    """How far the resident set rises above its level before ``fn`` while ``fn`` runs,
    sampled by a thread every ``interval`` seconds (Linux; CPU tensors)."""
    _pin_malloc_to_mmap()
    fn()  # warm-up: lazy initialisations do not count as the step's memory
    gc.collect()
    with sampled(rss_bytes, interval) as samples:
        fn()
    return max(0, *samples)


def peak_growth(fn: Callable[[], object], device: torch.device) -> int:
    """How far memory in use rises above its level before ``fn`` while ``fn`` runs: the
    CUDA caching allocator's own peak counter on a GPU, the resident set on CPU."""
    if device.type != "cuda":
        return peak_rss_growth(fn)
    fn()  # warm-up: lazy initialisations (cuBLAS workspaces) do not count
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> int:
    """Resets this process's resident high-water mark (``VmHWM``) to its resident set
    and returns that set in KiB: the baseline for ``peak_growth_mib``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def peak_growth_mib(baseline: int) -> float:
    """How far the resident high-water mark rose above ``baseline`` (from ``reset_peak``)."""
    return (_status_kib("VmHWM") - baseline) / 1024


def describe_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
