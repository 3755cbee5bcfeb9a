"""``cera-rs bench --export``: the linear export of L adapted layers (d x d, CeRA
rank r) over N tokens. cera_rs streams each layer's inputs and CeRA deltas into
float64 moments (``cera_rs.export``) and solves every layer once, for every rank;
the direct route keeps every layer's inputs and deltas, then runs
``torch.linalg.lstsq`` (float64) and a truncated SVD of the solution per layer.

Each case runs in a fresh subprocess, so its memory is its own: peak memory is the
growth of the resident set's high-water mark (``VmHWM``, reset once the weights
exist). Time counts the accumulation (or the copies kept) and the solves;
generating the inputs and deltas is left out. The deltas are made one layer at a
time, as a model's forward hooks see them, so the peak is the method's own state
plus one layer's batch. The direct route holds
``L * N * 2d`` float32 values, 27.6 GB at 60 layers, d = 576 and 100k tokens, more
than this machine has, so it runs on fewer layers (``ref_layers``), and cera_rs
runs on those layers too, side by side; cera_rs also runs on all L layers and on a
quarter of the tokens (its memory must not change with N).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from cera_rs.bench.spectral import peak_growth_mib, reset_peak

FULL = {"layers": 60, "n": 100_000, "d": 576, "r": 16, "batch": 4096, "ref_layers": 6}
QUICK = {"layers": 3, "n": 2048, "d": 48, "r": 4, "batch": 512, "ref_layers": 2, "isolate": False}
"""Tiny shapes, in this process: checks that the benchmark runs."""


def _case(method: str, layers: int, n: int, d: int, r: int, batch: int, out: str) -> dict:
    """One measurement in this process; layer 0's full-rank map is saved to ``out``."""
    import torch

    from cera_rs import cera_delta
    from cera_rs.export import StreamingRegression, solve_all

    gen = torch.Generator().manual_seed(0)
    weights = [
        (torch.randn(r, d, generator=gen) * (2 / d) ** 0.5, torch.randn(d, r, generator=gen) * 0.02)
        for _ in range(layers)
    ]

    def pairs():
        """Each layer's ``(x, delta)``, one layer at a time as a model's hooks see
        them, so nothing but the method's own state outlives a layer's turn."""
        for i in range(0, n, batch):
            x = torch.randn(min(batch, n - i), d, generator=gen)
            for layer, (a, b) in enumerate(weights):
                yield layer, x, cera_delta(x, a, b, training=False)

    next(pairs())  # lazy initialisations before the baseline
    baseline = reset_peak()
    seconds = 0.0
    if method == "streaming":
        streams = [StreamingRegression(d, d) for _ in range(layers)]
        for layer, x, y in pairs():
            start = time.perf_counter()
            streams[layer].update(x, y)
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        fits = solve_all(streams)
        for fit in fits:
            fit.factors(r)
        first = fits[0].weight
    else:
        kept: list[list[tuple]] = [[] for _ in range(layers)]
        for layer, x, y in pairs():
            start = time.perf_counter()
            kept[layer].append((x.clone(), y.clone()))
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        for layer, store in enumerate(kept):
            xs = torch.cat([x for x, _ in store]).double()
            ys = torch.cat([y for _, y in store]).double()
            w = torch.linalg.lstsq(xs, ys).solution.T
            u, s, vh = torch.linalg.svd(w)
            (u[:, :r] * s[:r]) @ vh[:r]
            if layer == 0:
                first = w
    seconds += time.perf_counter() - start
    torch.save(first, out)
    return {
        "method": method,
        "layers": layers,
        "n": n,
        "d": d,
        "seconds": seconds,
        "peak_mib": peak_growth_mib(baseline),
    }


def run(
    layers: int, n: int, d: int, r: int, batch: int, ref_layers: int, isolate: bool = True
) -> dict:
    """The cases, each in its own subprocess (``isolate``; in this one otherwise, which
    makes the peaks meaningless but the run quick); the largest last."""
    import torch

    from cera_rs.measure import describe_machine

    cases = [
        ("reference", ref_layers, n),
        ("streaming", ref_layers, n),
        ("streaming", layers, n // 4),
        ("streaming", layers, n),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, count, tokens) in enumerate(cases):
            out = str(Path(tmp) / f"w{i}.pt")
            spec = json.dumps(
                {
                    "method": method,
                    "layers": count,
                    "n": tokens,
                    "d": d,
                    "r": r,
                    "batch": batch,
                    "out": out,
                }
            )
            if not isolate:
                rows.append(_case(**json.loads(spec)))
                continue
            text = subprocess.run(
                [sys.executable, "-m", __name__, spec], check=True, capture_output=True, text=True
            ).stdout
            rows.append(json.loads(text.splitlines()[-1]))
        ref, side = torch.load(Path(tmp) / "w0.pt"), torch.load(Path(tmp) / "w1.pt")
    rows[1]["time_vs_reference"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["memory_vs_reference"] = rows[1]["peak_mib"] / rows[0]["peak_mib"]
    rows[1]["max_diff_vs_reference"] = float((side - ref).abs().max() / ref.abs().max())
    return {
        "machine": describe_machine(),
        "date": date.today().isoformat(),
        "d": d,
        "r": r,
        "batch": batch,
        "rows": rows,
    }


def format_table(results: dict) -> str:
    lines = [
        f"Linear export of L layers (d={results['d']}, CeRA r={results['r']}, batches of "
        f"{results['batch']}): streaming float64 moments + one solve per layer vs keep every "
        "input and delta + torch.linalg.lstsq (float64) + truncated SVD",
        f"machine: {results['machine']}; date: {results['date']}; one run per case, each in "
        "its own process; peak = growth of peak RSS (VmHWM)",
        f"{'method':<10} {'L':>4} {'N':>7} {'time s':>8} {'peak MiB':>9} {'time/ref':>9} "
        f"{'mem/ref':>8} {'max|dW|/|W|':>12}",
    ]
    for row in results["rows"]:
        extra = [
            row.get(k)
            for k in ("time_vs_reference", "memory_vs_reference", "max_diff_vs_reference")
        ]
        lines.append(
            f"{row['method']:<10} {row['layers']:>4} {row['n']:>7} {row['seconds']:>8.2f} "
            f"{row['peak_mib']:>9.1f} {'' if extra[0] is None else f'{extra[0]:.3f}':>9} "
            f"{'' if extra[1] is None else f'{extra[1]:.3f}':>8} "
            f"{'' if extra[2] is None else f'{extra[2]:.1e}':>12}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_case(**json.loads(sys.argv[1]))))
