"""``cera-rs bench --spectral``: the spectrum of N tokens of adapter output (d
features), streamed into cera_rs's float64 Gram accumulator against the reference
implementation's route (keep a copy of every delta, concatenate, then
``torch.linalg.svdvals``).

Each case runs in a fresh subprocess, so its memory is its own: peak memory is the
kernel's high-water mark of the resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs exist) minus the resident set at that
moment. Time counts only the spectral work: the per-batch update or copy, and the
final decomposition; generating the deltas (the CeRA branch on random inputs) is
left out. Two values of N show whether memory grows with N. Every case runs a few
times, the two methods alternating, and reports its median time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from cera_rs.atomic import atomic_file
from cera_rs.measure import peak_growth_mib, reset_peak

METHODS = ("streaming", "reference")
QUICK = {"ns": (1024, 2048), "d": 64, "batch": 256, "r": 4, "repeats": 1}
"""Tiny shapes: checks that the benchmark runs."""


def _case(method: str, n: int, d: int, batch: int, r: int) -> dict:
    """One measurement, in this process: seconds, peak growth and the spectrum."""
    import torch

    from cera_rs import cera_delta
    from cera_rs.spectral import StreamingSpectrum

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(r, d, generator=gen) * (2 / d) ** 0.5
    b = torch.randn(d, r, generator=gen) * 0.02

    def deltas():
        for i in range(0, n, batch):
            x = torch.randn(min(batch, n - i), d, generator=gen)
            yield cera_delta(x, a, b, training=False)

    next(deltas())  # lazy initialisations before the baseline
    baseline = reset_peak()
    seconds = 0.0
    if method == "streaming":
        stream = StreamingSpectrum(d)
        for delta in deltas():
            start = time.perf_counter()
            stream.update(delta)
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        values = stream.spectrum().singular_values
    else:
        kept = []
        for delta in deltas():
            start = time.perf_counter()
            kept.append(delta.detach().cpu().clone())
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        values = torch.linalg.svdvals(torch.cat(kept)).double().numpy()
    seconds += time.perf_counter() - start
    return {
        "method": method,
        "n": n,
        "d": d,
        "seconds": seconds,
        "peak_mib": peak_growth_mib(baseline),
        "singular_values": values.tolist(),
    }


def run(
    ns: tuple[int, ...] = (16384, 65536),
    d: int = 2048,
    batch: int = 4096,
    r: int = 64,
    repeats: int = 3,
) -> dict:
    """Each (method, N) case ``repeats`` times, each time in its own subprocess, the
    methods alternating so a busy machine slows both alike; median time, largest
    peak."""
    from cera_rs.measure import describe_machine

    rows = []
    for n in ns:
        runs: dict[str, list[dict]] = {m: [] for m in METHODS}
        for _ in range(repeats):
            for method in METHODS:
                spec = json.dumps({"method": method, "n": n, "d": d, "batch": batch, "r": r})
                out = subprocess.run(
                    [sys.executable, "-m", __name__, spec],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs[method].append(json.loads(out.splitlines()[-1]))
        stream, ref = (
            {
                "method": m,
                "n": n,
                "d": d,
                "seconds": statistics.median(c["seconds"] for c in runs[m]),
                "all_seconds": [c["seconds"] for c in runs[m]],
                "peak_mib": max(c["peak_mib"] for c in runs[m]),
            }
            for m in METHODS
        )
        s_stream, s_ref = (runs[m][0]["singular_values"] for m in METHODS)
        gap = max(abs(x - y) for x, y in zip(s_stream, s_ref))
        stream["time_vs_reference"] = stream["seconds"] / ref["seconds"]
        stream["max_diff_vs_reference"] = gap / max(s_ref[0], 1e-300)
        rows += [stream, ref]
    return {
        "machine": describe_machine(),
        "date": date.today().isoformat(),
        "batch": batch,
        "r": r,
        "repeats": repeats,
        "rows": rows,
    }


def format_table(results: dict) -> str:
    lines = [
        f"Spectrum of N tokens x d of CeRA deltas (r={results['r']}, batches of "
        f"{results['batch']}): streaming Gram vs concatenate + torch.linalg.svdvals",
        f"machine: {results['machine']}; date: {results['date']}",
        f"median of {results['repeats']} runs, each in its own process; peak = largest "
        "growth of peak RSS (VmHWM) over a run",
        f"{'method':<10} {'N':>7} {'d':>5} {'time s':>8} {'peak MiB':>9} "
        f"{'time / ref':>10} {'max|ds|/s1':>11}",
    ]
    for row in results["rows"]:
        ratio = row.get("time_vs_reference")
        diff = row.get("max_diff_vs_reference")
        lines.append(
            f"{row['method']:<10} {row['n']:>7} {row['d']:>5} {row['seconds']:>8.2f} "
            f"{row['peak_mib']:>9.1f} {'' if ratio is None else f'{ratio:.3f}':>10} "
            f"{'' if diff is None else f'{diff:.1e}':>11}"
        )
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    with atomic_file(path) as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    print(json.dumps(_case(**json.loads(sys.argv[1]))))
