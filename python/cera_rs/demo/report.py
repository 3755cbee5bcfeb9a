"""The demo's outputs: summary.json, linear_ceiling.png, spectra.png, lm_spectra.png,
report.md and the tables on stdout. Every sentence of the report is computed from the
measurements."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cera_rs.atomic import atomic_file  # noqa: E402
from cera_rs.demo import linearity  # noqa: E402
from cera_rs.table import pct  # noqa: E402


def _spread(mean: float, std: float, seeds: int) -> str:
    """``mean ± std`` over seeds; one seed has no spread to show."""
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def ceiling_table(part1: dict) -> str:
    lines = ["| family | method | trainable params | held-out unexplained (mean ± std) | "
             "eff. rank of delta | tail energy > r=16 | lr |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    seeds = len(part1["settings"]["seeds"])
    if seeds == 1:
        lines[0] = lines[0].replace(" (mean ± std)", "")
    for family, block in part1["families"].items():
        lines.append(f"| {family} | least-squares linear ceiling | - | "
                     f"{block['least_squares_ceiling']:.3f} | - | - | - |")  # fmt: skip
        for name, row in block["methods"].items():
            lines.append(
                f"| {family} | {name} | {row['trainable_params']:,} | "
                f"{_spread(row['test_error_mean'], row['test_error_std'], seeds)} | "
                f"{row['effective_rank']:.1f} | {row['tail_energy']:.4f} | {row['lr']:g} |"
            )
    return "\n".join(lines)


def _spread_pct(row: dict) -> str:
    """The seeds' spread in points; one seed has none."""
    return pct(row["test_exact_match_spread"]) if len(row["test_exact_match"]) > 1 else "-"


def lm_table(part2: dict) -> str:
    """Exact match per tier and method: mean over seeds, the seeds' spread, the
    Wilson 95 % interval of all seeds' answers pooled, and the centred spectra."""
    lines = ["| tier | method | trainable params | lr | seeds | exact match % (mean) | "
             "seed spread | Wilson 95 % | eff. rank | 90 % dim |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for tier, block in part2["tiers"].items():
        lines.append(f"| {tier} | base model, zero-shot | 0 | - | - | "
                     f"{pct(block['zero_shot_exact_match'])} | - | - | - | - |")  # fmt: skip
        for name, row in block["methods"].items():
            low, high = row["wilson95"]
            spectra = row["spectra"]
            lines.append(
                f"| {tier} | {name} | {row['trainable_params']:,} | {row['lr']:g} | "
                f"{len(row['test_exact_match'])} | {pct(row['test_exact_match_mean'])} | "
                f"{_spread_pct(row)} | {pct(low)}-{pct(high)} | "
                f"{spectra['effective_rank']:.1f} | {spectra['dim90']:.1f} |"
            )
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
        out += linearity.ceiling_findings(part1)
    part2 = summary.get("part2")
    if part2:
        out += lm_findings(part2) + linearity.lm_findings(part2)
    return out


def lm_findings(part2: dict) -> list[str]:
    """Per tier: the base model zero-shot, then each method against the first by the
    paired bootstrap over seeds and problems (``cera_rs.compare``)."""
    out = []
    for tier, block in part2["tiers"].items():
        out.append(f"{part2['model']}, {tier} tier ({block['task']}): zero-shot "
                   f"{pct(block['zero_shot_exact_match'])} % exact match.")  # fmt: skip
        out += [f"{tier} tier: {d['sentence']}" for d in block["differences"]]
    for kind, label in (("lora", "LoRA"), ("cera", "CeRA")):
        for tier, block in part2["tiers"].items():
            rows = sorted((r for r in block["methods"].values() if r["kind"] == kind
                           and r["activation"] == "silu"), key=lambda r: r["r"])  # fmt: skip
            if len(rows) < 2:
                continue
            steps = ", ".join(f"r={r['r']}: {r['spectra']['effective_rank']:.1f} / "
                              f"{r['spectra']['dim90']:.1f}" for r in rows)  # fmt: skip
            out.append(f"{label} centred output-delta spectra, {tier} tier (effective rank / "
                       f"90 % dimension, mean over adapted q/v layers): {steps}.")  # fmt: skip
    return out


def plot_lm_spectra(part2: dict, path: Path) -> None:
    """Effective rank and 90 %-energy dimension of the centred output delta against
    r, for LoRA and CeRA, per tier: does LoRA collapse as r grows, does CeRA use more
    of its r?"""
    tiers = list(part2["tiers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], (("effective_rank", "effective rank"),
                                         ("dim90", "90 %-energy dimension"))):  # fmt: skip
        rs: set[int] = set()
        for tier, marker in zip(tiers, ("o", "s")):
            rows = part2["tiers"][tier]["methods"].values()
            for kind, color in (("lora", "tab:blue"), ("cera", "tab:red")):
                pts = sorted((r["r"], r["spectra"][key]) for r in rows
                             if r["kind"] == kind and r["activation"] == "silu")  # fmt: skip
                if pts:
                    rs.update(p[0] for p in pts)
                    ax.plot(*zip(*pts), marker=marker, color=color,
                            ls="-" if tier == tiers[0] else "--",
                            label=f"{'CeRA' if kind == 'cera' else 'LoRA'}, {tier}")  # fmt: skip
        grid = sorted(rs)
        ax.plot(grid, grid, color="grey", ls=":", label="= r")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("adapter rank r")
        ax.set_ylabel(label)
        ax.set_title(f"{label} of the centred output delta")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


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
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
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
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
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
                  "How linear each CeRA adapter is (the share of its output energy the best "
                  "linear map of its rank reproduces, fitted on the training inputs and measured "
                  "on them / on the held-out ones) and that map "
                  "exported as a PEFT LoRA and merged (`cera_rs.export`):", "",
                  linearity.ceiling_table(summary["part1"]), "",
                  "![linear ceiling](linear_ceiling.png)", "",
                  "![spectra](spectra.png)", ""]  # fmt: skip
    if "part2" in summary:
        s = summary["part2"]["settings"]
        parts += [f"## Part 2: {summary['part2']['model']}, arithmetic in two tiers", "",
                  f"Adapters on q_proj/v_proj of the last {s['adapted_layers']} of 30 layers "
                  f"(the frozen first layers' hidden states computed once), {s['n_train']} "
                  f"training, {s['n_val']} validation and {s['n_test']} test problems per "
                  f"tier, {s['steps']} AdamW steps of batch {s['batch']} at a constant rate "
                  f"(clipping 1.0), loss on the answer tokens; learning rate per method from "
                  f"{s['lrs']} by hard-tier validation exact match (teacher-forced, seed "
                  f"{s['hard_seeds'][0]}; the easy tier reuses it), hard-tier seeds "
                  f"{s['hard_seeds']} for every method, the first seed on the easy tier, "
                  f"which runs {', '.join(s['easy'])}; the answer ends with the "
                  f"end-of-sequence token; test exact match by greedy generate; each tier "
                  f"is one `cera_rs.compare` comparison. LoRA/DoRA alpha "
                  f"{s['lora_alpha']}, dropout 0; CeRA dropout {s['cera_dropout']}, no "
                  f"scaling. Spectra: each adapter's output delta over the test tokens, "
                  f"columns centred; effective rank and 90 %-energy dimension averaged over "
                  f"the adapted layers (seed 0).", "",
                  lm_table(summary["part2"]), "",
                  "How linear each CeRA adapter is (seed 0; the share of its output energy "
                  "the best linear map of its rank reproduces, fitted on the training tokens and "
                  "measured on them / on the test tokens) and "
                  "that map exported as a PEFT LoRA, merged into the base model and scored by "
                  "greedy generate on the same test problems (`cera_rs.export`):", "",
                  linearity.lm_table(summary["part2"]), "",
                  "![spectra against rank](lm_spectra.png)", ""]  # fmt: skip
    if "failed" in summary:
        parts += ["## Not finished", "", summary["failed"], ""]
    parts += ["## What was measured", ""] + [f"- {line}" for line in findings(summary)]
    return "\n".join(parts) + "\n"


TABLES = {"part1": ceiling_table, "part2": lm_table}
FIGURES = {"part1": (("linear_ceiling.png", plot_ceiling), ("spectra.png", plot_spectra)),
           "part2": (("lm_spectra.png", plot_lm_spectra),)}  # fmt: skip
"""Each part's table, and its figures: (file name, function of its results and a path)."""


def table(key: str, results: dict) -> str:
    return TABLES[key](results)


def write(summary: dict, out_dir: Path, figures_of: str | None = None) -> list[Path]:
    """Writes the figures of part ``figures_of`` (the one just finished), then
    ``summary.json`` and ``report.md`` with every part so far, each file atomically;
    returns the files of every part in ``summary``."""
    for name, plot in FIGURES.get(figures_of, ()):
        plot(summary[figures_of], out_dir / name)
    with atomic_file(out_dir / "summary.json") as f:
        json.dump(summary, f, indent=2)
    with atomic_file(out_dir / "report.md") as f:
        f.write(markdown(summary))
    figures = [out_dir / name for key in TABLES if key in summary
               for name, _ in FIGURES.get(key, ())]  # fmt: skip
    return [out_dir / "summary.json", out_dir / "report.md", *figures]
