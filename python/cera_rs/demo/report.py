"""The demo's outputs: summary.json, linear_ceiling.png, spectra.png, report.md and
the table on stdout. Every sentence of the report is computed from the measurements."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(summary: dict, path: Path) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))


def ceiling_table(part1: dict) -> str:
    lines = ["| family | method | trainable params | held-out unexplained (mean ± std) | "
             "eff. rank of delta | tail energy > r=16 | lr |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for family, block in part1["families"].items():
        lines.append(f"| {family} | least-squares linear ceiling | - | "
                     f"{block['least_squares_ceiling']:.3f} | - | - | - |")  # fmt: skip
        for name, row in block["methods"].items():
            lines.append(
                f"| {family} | {name} | {row['trainable_params']:,} | "
                f"{row['test_error_mean']:.3f} ± {row['test_error_std']:.3f} | "
                f"{row['effective_rank']:.1f} | {row['tail_energy']:.4f} | {row['lr']:g} |"
            )
    return "\n".join(lines)


def arithmetic_table(part2: dict) -> str:
    lines = ["| tier | method | trainable params | held-out accuracy |", "|---|---|---:|---:|"]
    for tier, rows in part2["tiers"].items():
        for name, row in rows.items():
            lines.append(f"| {tier} | {name} | {row['trainable_params']:,} | "
                         f"{row['test_accuracy']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def findings(summary: dict) -> list[str]:
    """Plain statements of what was measured, wins and losses alike."""
    out = []
    part1 = summary.get("part1")
    if part1:
        for family, block in part1["families"].items():
            rows = block["methods"]
            best_cera = min((r for r in rows.items() if r[1]["kind"] == "cera"),
                            key=lambda r: r[1]["test_error_mean"])  # fmt: skip
            best_linear = min((r for r in rows.items() if r[1]["kind"] != "cera"),
                              key=lambda r: r[1]["test_error_mean"])  # fmt: skip
            verdict = "below" if best_cera[1]["test_error_mean"] < best_linear[1][
                "test_error_mean"] else "not below"
            out.append(
                f"{family}: the best linear adapter ({best_linear[0]}) leaves "
                f"{best_linear[1]['test_error_mean']:.3f} of the residual unexplained "
                f"(least-squares ceiling {block['least_squares_ceiling']:.3f}); the best CeRA "
                f"({best_cera[0]}) leaves {best_cera[1]['test_error_mean']:.3f}, {verdict} it."
            )
        own_tail = max(row["tail_energy_beyond_own_r"] for block in part1["families"].values()
                       for row in block["methods"].values() if row["kind"] != "dora")  # fmt: skip
        out.append(
            f"The output delta of a LoRA or CeRA adapter lies in the column space of its B "
            f"(d_out x r), so its energy beyond its own rank r is round-off: at most "
            f"{own_tail:.1e} here (DoRA's magnitude rescaling is not rank-limited). CeRA's gain "
            f"is in what it fits inside those r directions, not in energy beyond them."
        )
    part2 = summary.get("part2")
    if part2:
        for tier, rows in part2["tiers"].items():
            accs = ", ".join(f"{name} {row['test_accuracy']:.3f}" for name, row in rows.items())
            out.append(f"MiniLM, {tier} (balanced yes/no, chance 0.5): held-out accuracy {accs}.")
    return out


def plot_ceiling(part1: dict, path: Path) -> None:
    families = list(part1["families"])
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families):
        block = part1["families"][family]
        for kind, style in (("lora", "o-"), ("dora", "s"), ("cera", "^-")):
            rows = [row for row in block["methods"].values() if row["kind"] == kind]
            if not rows:
                continue
            params = [row["trainable_params"] for row in rows]
            means = [row["test_error_mean"] for row in rows]
            stds = [row["test_error_std"] for row in rows]
            ax.errorbar(params, means, yerr=stds, fmt=style, capsize=3, label=kind.upper()
                        if kind != "cera" else "CeRA")  # fmt: skip
            for row, x, y in zip(rows, params, means):
                ax.annotate(f"r={row['r']}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)  # fmt: skip
        ax.axhline(block["least_squares_ceiling"], color="grey", ls="--",
                   label="linear ceiling (least squares)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(f"residual: {family}")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("held-out unexplained variance")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_spectra(part1: dict, path: Path, r: int = 16) -> None:
    families = list(part1["families"])
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, family in zip(axes[0], families):
        for name, row in part1["families"][family]["methods"].items():
            if row["r"] != r or row["kind"] == "dora":
                continue
            s = np.asarray(row["singular_values"])
            s = s / s[0] if len(s) and s[0] > 0 else s
            ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-12), label=name)
        ax.axvline(r, color="grey", ls=":", label=f"rank {r}")
        ax.set_xlim(0, 4 * r)
        ax.set_ylim(1e-8, 2)
        ax.set_title(f"adapter output delta, residual: {family}")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("s_i / s_1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def markdown(summary: dict) -> str:
    parts = ["# cera-rs demo", "", f"Machine: {summary['machine']}; date: {summary['date']}; "
             f"mode: {summary['mode']}; wall time {summary['seconds']:.0f} s.", ""]  # fmt: skip
    if "part1" in summary:
        s = summary["part1"]["settings"]
        parts += ["## Part 1: the linear ceiling", "",
                  f"d = {s['d']}, residual width k = {s['k']}, {s['n_train']} training and "
                  f"{s['n_eval']} held-out samples, Adam, {s['steps']} steps of batch "
                  f"{s['batch']}, learning rate chosen per method from {s['lrs']} on a "
                  f"validation split, seeds {s['seeds']}, dropout 0 for every method.", "",
                  ceiling_table(summary["part1"]), "",
                  "![linear ceiling](linear_ceiling.png)", "",
                  "![spectra](spectra.png)", ""]  # fmt: skip
    if "part2" in summary:
        s = summary["part2"]["settings"]
        parts += ["## Part 2: all-MiniLM-L6-v2 on arithmetic in two tiers", "",
                  f"{s['n_train']} training and {s['n_test']} held-out problems per tier, "
                  f"{s['steps']} AdamW steps of batch {s['batch']}, lr {s['lrs']}, adapter "
                  f"dropout {s['dropout']}, adapters on query/value, mean-pooling head "
                  f"trained.", "",
                  arithmetic_table(summary["part2"]), ""]  # fmt: skip
    parts += ["## What was measured", ""] + [f"- {line}" for line in findings(summary)]
    return "\n".join(parts) + "\n"


def write_all(summary: dict, out_dir: Path) -> list[Path]:
    written = [out_dir / "summary.json", out_dir / "report.md"]
    write_json(summary, written[0])
    if "part1" in summary:
        written += [out_dir / "linear_ceiling.png", out_dir / "spectra.png"]
        plot_ceiling(summary["part1"], written[2])
        plot_spectra(summary["part1"], written[3])
    text = markdown(summary)
    _atomic_write(written[1], lambda tmp: Path(tmp).write_text(text))
    return written
