"""The demo's outputs: summary.json, linear_ceiling.png, spectra.png, rank_curve.png,
report.md and the tables on stdout (part 2's comparison also writes its own report
under ``phonebook/``). Every sentence of the report is computed from the
measurements."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cera_rs.atomic import atomic_file  # noqa: E402
from cera_rs.compare import curves  # noqa: E402
from cera_rs.demo import linearity  # noqa: E402
from cera_rs.demo.phonebook import TARGETS  # noqa: E402
from cera_rs.table import markdown_table, pct  # noqa: E402


def _spread(mean: float, std: float, seeds: int) -> str:
    """``mean ± std`` over seeds; one seed has no spread to show."""
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"


def ceiling_table(part1: dict) -> str:
    seeds = len(part1["settings"]["seeds"])
    rows = []
    for family, block in part1["families"].items():
        rows.append(
            {
                "family": family,
                "method": "least-squares linear ceiling",
                "params": None,
                "error": f"{block['least_squares_ceiling']:.3f}",
                "rank": None,
                "tail": None,
                "lr": None,
            }
        )
        for name, row in block["methods"].items():
            rows.append(
                {
                    "family": family,
                    "method": name,
                    "params": row["trainable_params"],
                    "error": _spread(row["test_error_mean"], row["test_error_std"], seeds),
                    "rank": row["effective_rank"],
                    "tail": row["tail_energy"],
                    "lr": row["lr"],
                }
            )
    error = "held-out unexplained" + (" (mean ± std)" if seeds > 1 else "")
    columns = [
        ("family", "family", "s"),
        ("method", "method", "s"),
        ("trainable params", "params", ",d"),
        (error, "error", ">s"),
        ("eff. rank of delta", "rank", ".1f"),
        ("tail energy > r=16", "tail", ".4f"),
        ("lr", "lr", "g"),
    ]
    return "\n".join(markdown_table(columns, rows))


def rank_table(part2: dict) -> str:
    """The rank curves' table, each CeRA method's multiplier and the ceiling
    (``compare.curves``), its headings one level below part 2's."""
    return "\n".join(
        "#" + line if line.startswith("#") else line
        for line in curves.markdown(part2["curves"]).splitlines()
    )


def recall_table(part2: dict) -> str:
    """Exact recall by greedy decoding, per seed, of the facts as trained and reworded."""
    columns = [
        ("method", "method", "s"),
        ("trainable params", "params", ",d"),
        ("lr", "lr", "g"),
        ("recall % per seed", "recall", ">s"),
        ("reworded: recall % per seed", "reworded", ">s"),
        ("reworded: bits stored", "bits", ".0f"),
    ]
    base = {
        "method": "base model, no adapter",
        "params": 0,
        "lr": None,
        "recall": pct(part2["base_recall"]),
        "reworded": None,
        "bits": None,
    }
    rows = [
        {
            "method": name,
            "params": row["trainable_params"],
            "lr": row["lr"],
            "recall": " / ".join(pct(x) for x in row["recall"]),
            "reworded": " / ".join(pct(x) for x in row["transfer"]["exact_match"]),
            "bits": row["transfer"]["bits"],
        }
        for name, row in part2["methods"].items()
    ]
    return "\n".join(markdown_table(columns, [base, *rows]))


def findings(summary: dict) -> list[str]:
    """Plain statements of what was measured, wins and losses alike."""
    out = []
    part1 = summary.get("part1")
    if part1:
        for family, block in part1["families"].items():
            rows = block["methods"]
            best_cera = min(
                (r for r in rows.items() if r[1]["kind"] == "cera"),
                key=lambda r: r[1]["test_error_mean"],
            )
            best_linear = min(
                (r for r in rows.items() if r[1]["kind"] != "cera"),
                key=lambda r: r[1]["test_error_mean"],
            )
            verdict = (
                "below"
                if best_cera[1]["test_error_mean"] < best_linear[1]["test_error_mean"]
                else "not below"
            )
            out.append(
                f"{family}: the best linear adapter ({best_linear[0]}) leaves "
                f"{best_linear[1]['test_error_mean']:.3f} of the residual unexplained "
                f"(least-squares ceiling {block['least_squares_ceiling']:.3f}); the best CeRA "
                f"({best_cera[0]}) leaves {best_cera[1]['test_error_mean']:.3f}, {verdict} it."
            )
        own_tail = max(
            row["tail_energy_beyond_own_r"]
            for block in part1["families"].values()
            for row in block["methods"].values()
            if row["kind"] != "dora"
        )
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
    """The base model and recall per method (the multipliers and the ceiling are
    sentences of the rank table, shown with it)."""
    recall = "; ".join(
        f"{name} {pct(float(np.mean(row['recall'])))} % "
        f"({pct(float(np.mean(row['transfer']['exact_match'])))} % reworded)"
        for name, row in part2["methods"].items()
    )
    return [
        f"{part2['model']}, {part2['data']}: the base model recalls "
        f"{pct(part2['base_recall'])} % of the facts; after training (mean over seeds "
        f"{', '.join(map(str, part2['curves']['seeds']))}): {recall}."
    ]


def _last_blocks(n: int) -> str:
    return "the last block" if n == 1 else f"the last {n} blocks"


def plot_rank_curve(part2: dict, path: Path) -> None:
    curves.plot(
        part2["curves"],
        path,
        f"{part2['data'].split(' (')[0]}, adapters on "
        f"{_last_blocks(part2['settings']['adapted_layers'])}",
    )


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
            ax.errorbar(
                params,
                means,
                yerr=stds,
                fmt=style,
                capsize=3,
                label=kind.upper() if kind != "cera" else "CeRA",
            )
            for row, x, y in zip(rows, params, means):
                ax.annotate(
                    f"r={row['r']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        ax.axhline(
            block["least_squares_ceiling"],
            color="grey",
            ls="--",
            label="linear ceiling (least squares)",
        )
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


def limits(part2: dict) -> list[str]:
    """What the sizes cannot separate, or that nothing shown is beyond them."""
    return part2["cannot_separate"] or [
        "Nothing above is beyond these sizes: each multiplier's interval excludes 1x and the "
        "paper's claim, and CeRA against the ceiling has a verdict."
    ]


def rank_summary(part2: dict) -> str:
    """Part 2 on stdout: the curves' table and sentences, then what the sizes cannot
    separate."""
    return "\n".join(
        [
            rank_table(part2),
            "",
            "What these sizes cannot separate:",
            *(f"- {x}" for x in limits(part2)),
        ]
    )


def _rates(s: dict) -> str:
    cera = ", ".join(f"r={r} {lr:g}" for r, lr in zip(s["cera_ranks"], s["cera_lrs"]))
    return (
        f"one rate per method, the one the capacity study chose from its grid for that "
        f"method on its selection runs (seed 0, never reported here) (LoRA "
        f"{s['lora_lr']:g} at every rank and at r=full; CeRA {cera}; the "
        f"control {s['control_lr']:g})"
    )


def _part2_markdown(part2: dict) -> list[str]:
    s = part2["settings"]
    specs = "\n".join(part2["specs"])
    return [
        f"## Part 2: {part2['model']}, the phonebook rank curve",
        "",
        f"{part2['data']}: trained on all {s['facts']} facts, scored on recalling them "
        f"(and on the same facts asked in other words). Adapters on "
        f"{'/'.join(TARGETS)} of {_last_blocks(s['adapted_layers'])} (the frozen blocks "
        f"below computed once), {s['steps']} AdamW steps of batch "
        f"{s['batch']} at a constant rate (clipping 1.0), {_rates(s)}, seeds {s['seeds']}. "
        f"LoRA is rsLoRA (alpha {s['lora_alpha']} / sqrt(r), dropout 0), `LoRA r=full` "
        f"every projection at its full rank min(in, out); CeRA with dropout 0 (matched "
        f"with LoRA's: the score is recall of the facts trained on) and its default "
        f"scaling 1 (the scale is each method's default, not tuned: the fair study "
        f"tunes it); the control is CeRA r={s['control_rank']} with the identity "
        f"activation. The score is the information stored: the base model's loss on the "
        f"numbers minus the adapted model's, in bits, summed over facts. One "
        f"`cera_rs.compare` comparison, in `{Path(part2['folder']).name}/` (its "
        f"report.md has every seed, the reworded split and the costs; run again into the "
        f"same folder, it reuses the finished runs); the same methods as `cera-rs "
        f"compare` takes them:",
        "",
        "```",
        specs,
        "```",
        "",
        "![rank curve](rank_curve.png)",
        "",
        rank_table(part2),
        "",
        "### Exact recall (greedy decoding)",
        "",
        recall_table(part2),
        "",
        f"One CeRA adapter's linearity (seed {s['seeds'][0]}; the share of its output "
        "energy the best linear map of its rank reproduces) and that map exported as a "
        "PEFT LoRA, merged into the base model and scored on the same facts (`cera_rs.export`):",
        "",
        linearity.lm_table(part2),
        "",
        "### What these sizes cannot separate",
        "",
        *(f"- {x}" for x in limits(part2)),
        "",
    ]


def markdown(summary: dict) -> str:
    parts = [
        "# cera-rs demo",
        "",
        f"Machine: {summary['machine']}; date: {summary['date']}; "
        f"mode: {summary['mode']}; wall time {summary['seconds']:.0f} s.",
        "",
    ]
    if "part1" in summary:
        s = summary["part1"]["settings"]
        parts += [
            "## Part 1: the linear ceiling",
            "",
            f"d = {s['d']}, residual width k = {s['k']}, {s['n_train']} training and "
            f"{s['n_eval']} held-out samples, Adam, {s['steps']} steps of batch "
            f"{s['batch']}, learning rate chosen per method from {s['lrs']} on a "
            f"validation split, seeds {s['seeds']}, dropout 0 for every method.",
            "",
            ceiling_table(summary["part1"]),
            "",
            "How linear each CeRA adapter is (the share of its output energy the best "
            "linear map of its rank reproduces, fitted on the training inputs and measured "
            "on them / on the held-out ones) and that map "
            "exported as a PEFT LoRA and merged (`cera_rs.export`):",
            "",
            linearity.ceiling_table(summary["part1"]),
            "",
            "![linear ceiling](linear_ceiling.png)",
            "",
            "![spectra](spectra.png)",
            "",
        ]
    if "part2" in summary:
        parts += _part2_markdown(summary["part2"])
    if "failed" in summary:
        parts += ["## Not finished", "", summary["failed"], ""]
    parts += ["## What was measured", ""] + [f"- {line}" for line in findings(summary)]
    return "\n".join(parts) + "\n"


TABLES = {"part1": ceiling_table, "part2": rank_summary}
FIGURES = {
    "part1": (("linear_ceiling.png", plot_ceiling), ("spectra.png", plot_spectra)),
    "part2": (("rank_curve.png", plot_rank_curve),),
}
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
    figures = [
        out_dir / name for key in TABLES if key in summary for name, _ in FIGURES.get(key, ())
    ]
    return [out_dir / "summary.json", out_dir / "report.md", *figures]
