"""``cera-rs bench``: every method side by side, interleaved, median of repeats.

For each shape it times the branch (forward+backward, train, p=0.1), the whole
adapted layer (forward+backward) and the inference forward, counts the bytes each
method keeps for backward and the peak memory growth of a training step, and states
each time as a ratio to the GEMM floor and to the plain composition. The issue's
targets are checked on the ratios. ``--device cuda`` runs the GPU grid (LLM shapes;
timers wait for the GPU, peak memory from ``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

from cera_rs.atomic import atomic_file
from cera_rs.bench import cases
from cera_rs.bench.cases import Shape
from cera_rs.measure import describe_machine, median_times, peak_growth, saved_bytes, synchronizer

DTYPES = (torch.float32, torch.bfloat16)
HEADLINE = {"n": 4096, "d": 2048, "r": 64}
CUDA_HEADLINE = {"n": 8192, "d": 4096, "r": 64}


@dataclass
class Grid:
    ds: tuple[int, ...] = (1024, 2048, 4096)
    rs: tuple[int, ...] = (16, 64, 256)
    train_n: int = 4096
    infer_ns: tuple[int, ...] = (1, 16, 4096)
    dtypes: tuple[torch.dtype, ...] = DTYPES
    repeats: int = 7
    compiled: bool = True
    memory: bool = True
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Grid:
        """Tiny shapes: keeps the benchmark working in the test suite (no timing asserted)."""
        return cls(ds=(32,), rs=(4,), train_n=64, infer_ns=(1, 16), repeats=2, compiled=False)

    @classmethod
    def cuda(cls) -> Grid:
        """The GPU grid: LLM shapes, the headline (d=4096, r=64, bf16) first so that a
        run cut short still has it; decode is one token."""
        return cls(
            ds=(4096, 2048),
            rs=(64, 16, 256),
            train_n=8192,
            infer_ns=(1,),
            dtypes=(torch.bfloat16, torch.float32),
            repeats=10,
            device="cuda",
        )

    @classmethod
    def cuda_quick(cls) -> Grid:
        """The GPU grid's kinds and methods (torch.compile included) at tiny shapes."""
        return cls(
            ds=(32,),
            rs=(4,),
            train_n=64,
            infer_ns=(1,),
            dtypes=(torch.float32,),
            repeats=2,
            device="cuda",
        )


@dataclass
class Results:
    machine: str
    date: str
    device: str = "cpu"
    rows: list[dict] = field(default_factory=list)

    def add(self, kind: str, shape: Shape, times: dict[str, float], **extra) -> dict:
        floor = times.pop("floor")
        row = {
            "kind": kind,
            "n": shape.n,
            "d": shape.d,
            "r": shape.r,
            "dtype": str(shape.dtype).removeprefix("torch."),
            "floor_ms": 1e3 * floor,
            "ms": {k: 1e3 * v for k, v in times.items()},
            "vs_floor": {k: v / floor for k, v in times.items()},
            "vs_plain": {k: v / times["plain"] for k, v in times.items()},
            **extra,
        }
        self.rows.append(row)
        return row


def run(grid: Grid, progress: bool = True, checkpoint: Path | None = None) -> Results:
    """Every shape of ``grid``; with ``checkpoint``, the JSON is rewritten after each
    shape so that a run cut short (a device's time limit) keeps what it measured."""
    results = Results(machine=describe_machine(), date=date.today().isoformat(), device=grid.device)
    kinds = [("train", grid.train_n)] + [("infer", n) for n in grid.infer_ns]
    shapes = [
        (kind, Shape(n, d, r, dt))
        for dt in grid.dtypes
        for d in grid.ds
        for r in grid.rs
        for kind, n in kinds
    ]
    for kind, shape in tqdm(shapes, desc="bench", disable=not progress):
        if kind == "train":
            _train(results, shape, grid)
        else:
            _infer(results, shape, grid)
        if checkpoint is not None:
            write_json(results, checkpoint)
    return results


def _train(results: Results, shape: Shape, grid: Grid) -> None:
    device = torch.device(grid.device)
    sync = synchronizer(device)
    s = cases.setup(shape, train=True, device=grid.device)
    if grid.compiled:
        # A fresh module per shape would otherwise count against dynamo's recompile
        # limit, past which it silently runs eager.
        torch._dynamo.reset()
    forwards = cases.branch_forwards(s, compiled=grid.compiled)
    steps = {name: cases.training_step(s, f) for name, f in forwards.items()}
    times = median_times(
        {**steps, "floor": cases.branch_floor(s, backward=True)}, repeats=grid.repeats, sync=sync
    )
    keep = s.params() + tuple(p for m in s.lora_layers.values() for p in m.parameters())
    keep += tuple(s.plain.parameters())
    saved = {name: saved_bytes(f, keep) for name, f in forwards.items() if name != "plain_compiled"}
    peak = {name: peak_growth(step, device) for name, step in steps.items()} if grid.memory else {}
    results.add("branch_train", shape, times, saved_bytes=saved, peak_bytes=peak)

    layer = cases.layer_forwards(s)
    layer_steps = {name: cases.training_step(s, f) for name, f in layer.items()}
    times = median_times(
        {**layer_steps, "floor": cases.layer_floor(s)}, repeats=grid.repeats, sync=sync
    )
    results.add("layer_train", shape, times)


def _infer(results: Results, shape: Shape, grid: Grid) -> None:
    s = cases.setup(shape, train=False, device=grid.device)
    forwards = cases.branch_forwards(s, compiled=False)
    runs = {name: cases.inference(f) for name, f in forwards.items()}
    repeats = grid.repeats if shape.n > 16 else 200  # decode is microseconds: many samples
    sync = synchronizer(torch.device(grid.device))
    times = median_times(
        {**runs, "floor": cases.branch_floor(s, backward=False)},
        warmup=5,
        repeats=repeats,
        sync=sync,
    )
    results.add("branch_infer", shape, times)


def targets(results: Results) -> list[dict]:
    """The issue's targets, checked on the headline shape's ratios, per dtype."""
    if results.device == "cuda":
        return [
            _check(f"branch fwd+bwd vs plain ({row['dtype']})", row["vs_plain"]["cera_rs"], 1.10)
            for row in results.rows
            if row["kind"] == "branch_train" and all(row[k] == v for k, v in CUDA_HEADLINE.items())
        ]
    checks = []
    for row in results.rows:
        n, d, r = row["n"], row["d"], row["r"]
        if (d, r) != (HEADLINE["d"], HEADLINE["r"]):
            continue
        ms, floor_ratio = row["ms"], row["vs_floor"]
        label = f"{row['dtype']}"
        if row["kind"] == "branch_train" and n == HEADLINE["n"]:
            saved = row["saved_bytes"]
            checks += [
                _check(f"branch fwd+bwd vs GEMM floor ({label})", floor_ratio["cera_rs"], 1.03),
                _check(f"branch fwd+bwd vs plain ({label})", ms["cera_rs"] / ms["plain"], 0.92),
                _check(
                    f"bytes saved for backward vs plain ({label})",
                    saved["cera_rs"] / saved["plain"],
                    0.4,
                ),
            ]
        elif row["kind"] == "layer_train" and n == HEADLINE["n"]:
            checks.append(
                _check(
                    f"whole layer fwd+bwd vs PEFT LoRA p=0.1 ({label})",
                    ms["cera_rs"] / ms["lora_p0.1"],
                    1.0,
                )
            )
        elif row["kind"] == "branch_infer" and n == 1:
            checks.append(
                _check(f"1-token inference vs plain ({label})", ms["cera_rs"] / ms["plain"], 0.4)
            )
    return checks


def _check(name: str, ratio: float, bound: float) -> dict:
    return {"target": name, "ratio": ratio, "bound": bound, "met": ratio <= bound}


def format_table(results: Results) -> str:
    lines = [f"machine: {results.machine}; device: {results.device}; date: {results.date}"]
    for kind, title in (
        ("branch_train", "CeRA branch, forward+backward, train, p=0.1"),
        ("layer_train", "whole layer (frozen base + adapter), forward+backward"),
        ("branch_infer", "branch inference forward (eval, no_grad)"),
    ):
        rows = [row for row in results.rows if row["kind"] == kind]
        if not rows:
            continue
        methods = list(rows[0]["ms"])
        lines += [
            "",
            title,
            "shape".ljust(34)
            + "floor ms".rjust(10)
            + "".join(f"{m:>16}" for m in methods)
            + "cera_rs/plain".rjust(15),
        ]
        for row in rows:
            shape = f"N={row['n']} d={row['d']} r={row['r']} {row['dtype']}"
            cells = "".join(
                f"{row['ms'][m]:9.3f} {row['vs_floor'][m]:5.2f}x".rjust(16) for m in methods
            )
            lines.append(
                shape.ljust(34)
                + f"{row['floor_ms']:10.3f}"
                + cells
                + f"{row['vs_plain']['cera_rs']:14.3f}x"
            )
        if kind == "branch_train":
            lines += ["", "saved for backward (MiB) / peak step growth (MiB)"]
            for row in rows:
                shape = f"N={row['n']} d={row['d']} r={row['r']} {row['dtype']}"
                cells = "  ".join(
                    f"{m} {row['saved_bytes'][m] / 2**20:.2f}/"
                    f"{row['peak_bytes'].get(m, float('nan')) / 2**20:.1f}"
                    for m in row["saved_bytes"]
                )
                lines.append(f"{shape.ljust(34)}{cells}")
    checks = targets(results)
    if checks:
        headline = CUDA_HEADLINE if results.device == "cuda" else HEADLINE
        shape = " ".join(f"{k}={v}" for k, v in headline.items()).replace("n=", "N=")
        lines += ["", f"targets (headline shape {shape}; 1 token for inference)"]
        lines += [
            f"  {'met ' if c['met'] else 'MISS'} {c['target']}: {c['ratio']:.3f} (<= {c['bound']})"
            for c in checks
        ]
    return "\n".join(lines)


def write_json(results: Results, path: Path) -> None:
    data = {
        "machine": results.machine,
        "date": results.date,
        "device": results.device,
        "rows": results.rows,
        "targets": targets(results),
    }
    with atomic_file(path) as f:
        json.dump(data, f, indent=2)
