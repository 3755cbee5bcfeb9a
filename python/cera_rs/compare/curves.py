"""Rank curves and what they answer: each family's score against its trainable
parameters (a sweep such as ``lora:r=[1,2,4,8]`` is one family), the parameter
multiplier of each CeRA method (the linear family's budget that scores the same, as a
multiple of CeRA's own), and CeRA against the linear ceiling (``lora:r=full``).

The score is the task's: exact match, or for a memorisation task (phonebook) the
information stored, in bits summed over facts, which moves continuously where exact
match jumps. Every interval comes from the same crossed resampling of seeds and
problems as the paired differences (``stats``); the methods are compared over the
seeds all of them ran."""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np

from cera_rs.atomic import atomic_file
from cera_rs.compare.methods import Method
from cera_rs.compare.stats import (
    BELOW,
    FLAT,
    crossed_means,
    paired_difference,
    parameter_multiplier,
)
from cera_rs.table import markdown_table

NOT_IN_FAMILY = ("r", "rank_pattern", "alpha_pattern")
"""Fields that move a method along its family's curve rather than into another family."""
PAPER_MULTIPLIER = 8
"""The paper's claim: CeRA matches LoRA at 8x (or more) its rank."""


def family_key(method: Method) -> tuple:
    fields = {k: v for k, v in method.fields.items() if k not in NOT_IN_FAMILY}
    return (method.peft_type, repr(sorted(fields.items(), key=lambda kv: kv[0])))


def families(methods: list[Method]) -> dict[str, list[Method]]:
    """Methods grouped by everything but their rank, named by their first member's
    family label (its spec without the rank)."""
    grouped: dict[tuple, list[Method]] = {}
    for m in methods:
        grouped.setdefault(family_key(m), []).append(m)
    out: dict[str, list[Method]] = {}
    for ms in grouped.values():
        label = ms[0].family or ms[0].name
        out[label if label not in out else f"{label} ({ms[0].name})"] = ms
    return out


def linear_family(named: dict[str, list[Method]]) -> str | None:
    """The LoRA family (not DoRA) with the most members, if one has two or more: the
    curve a multiplier is read from."""
    linear = [
        (len(ms), name)
        for name, ms in named.items()
        if ms[0].peft_type == "LORA" and not ms[0].fields.get("use_dora") and len(ms) >= 2
    ]
    return max(linear, key=lambda x: x[0])[1] if linear else None


def scores(runs_by_method: dict[str, list[dict]], score: str) -> tuple[list[int], dict]:
    """Per method, its (seeds, problems) array of ``score`` ("exact_match": right or
    wrong; "bits": information stored per problem) over the seeds every method ran."""
    seeds = sorted(
        set.intersection(*({r["seed"] for r in runs} for runs in runs_by_method.values()))
    )
    key = "hits" if score == "exact_match" else "bits"
    out = {}
    for name, runs in runs_by_method.items():
        by_seed = {r["seed"]: r for r in runs}
        out[name] = np.array([by_seed[s]["test"][key] for s in seeds], dtype=np.float64)
    return seeds, out


def _interval(values: np.ndarray, resamples: int, total: bool) -> tuple[float, float, float]:
    """Mean (or, with ``total``, the sum over problems) and its 95 % interval under the
    crossed resampling."""
    scale = values.shape[1] if total else 1
    draws = crossed_means(values[None], resamples)[:, 0]
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(values.mean() * scale), float(low * scale), float(high * scale)


def summarise(
    methods: list[Method],
    runs_by_method: dict[str, list[dict]],
    params: dict[str, int],
    score: str,
    resamples: int,
    shown: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The curves, the multipliers and the ceiling comparisons, for summary.json; the
    sentences name methods as ``shown`` does (the report's names) and families as
    legends do."""
    seeds, arrays = scores(runs_by_method, score)
    total = score == "bits"
    named = families(methods)
    family_names = legend_names(list(named))

    def name(method: str) -> str:
        return (shown or {}).get(method, method)

    curves = {}
    for label, members in named.items():
        points = []
        for m in sorted(members, key=lambda m: params[m.name]):
            mean, low, high = _interval(arrays[m.name], resamples, total)
            points.append(
                {
                    "method": m.name,
                    "params": params[m.name],
                    "mean": mean,
                    "low": low,
                    "high": high,
                    "per_param": mean / params[m.name] if total else None,
                }
            )
        curves[label] = points
    out: dict[str, Any] = {
        "score": score,
        "seeds": seeds,
        "curves": curves,
        "linear_family": linear_family(named),
        "multipliers": [],
        "ceiling": [],
    }
    linear = out["linear_family"]
    cera = [m for m in methods if m.peft_type == "CERA"]
    if linear is not None:
        members = sorted(named[linear], key=lambda m: params[m.name])
        for m in cera:
            mult = parameter_multiplier(
                arrays[m.name],
                params[m.name],
                [arrays[x.name] for x in members],
                [params[x.name] for x in members],
                (name(m.name), family_names[linear]),
                resamples,
                unit="bits" if total else "points",
            )
            out["multipliers"].append(
                {
                    "method": m.name,
                    "family": linear,
                    "params": mult.params,
                    "point": finite(mult.point),
                    "low": finite(mult.low),
                    "high": finite(mult.high),
                    "where": mult.where,
                    "meets_paper": mult.where not in (FLAT, BELOW) and mult.low >= PAPER_MULTIPLIER,
                    "family_rise": {
                        "mean": mult.family_rise.mean,
                        "low": mult.family_rise.low,
                        "high": mult.family_rise.high,
                    },
                    "sentence": mult.sentence(),
                }
            )
    for ceiling in [m for m in methods if m.ceiling]:
        for m in cera:
            d = paired_difference(
                arrays[m.name], arrays[ceiling.name], (m.name, ceiling.name), resamples
            )
            scale = arrays[m.name].shape[1] if total else 100
            unit = "bits" if total else "points"
            out["ceiling"].append(
                {
                    "method": m.name,
                    "ceiling": ceiling.name,
                    "mean": d.mean * scale,
                    "low": d.low * scale,
                    "high": d.high * scale,
                    "unit": unit,
                    "verdict": d.verdict,
                    "sentence": f"{name(m.name)} against the linear ceiling {name(ceiling.name)}: "
                    f"{d.mean * scale:+.1f} {unit} (95 % interval {d.low * scale:+.1f} "
                    f"to {d.high * scale:+.1f}; {len(seeds)} "
                    f"seed{'s' * (len(seeds) > 1)} x {arrays[m.name].shape[1]} "
                    f"problems): {d.verdict}.",
                }
            )
    return out


def markdown(curves: dict[str, Any], shown: dict[str, str] | None = None) -> str:
    """The curves' table and sentences, methods named as ``shown`` does and families as
    legends do."""
    total = curves["score"] == "bits"
    scale = 1 if total else 100
    family_names = legend_names(list(curves["curves"]))
    what = "information stored (bits, summed over facts)" if total else "test exact match %"
    lines = [
        f"## Rank curves: {what} against trainable parameters",
        "",
        f"Over the seeds every method ran ({', '.join(map(str, curves['seeds']))}); 95 % "
        "intervals from the crossed resampling of seeds and problems.",
        "",
        *markdown_table(
            [
                ("family", "family", "s"),
                ("method", "method", "s"),
                ("trainable params", "params", ",d"),
                ("score", "mean", ".1f"),
                ("95 % interval", "interval", ">s"),
                *([("bits per param", "per_param", ".4f")] if total else []),
            ],
            [
                {
                    "family": family_names[label],
                    "method": (shown or {}).get(p["method"], p["method"]),
                    "params": p["params"],
                    "mean": p["mean"] * scale,
                    "interval": f"{p['low'] * scale:.1f} to {p['high'] * scale:.1f}",
                    "per_param": p["per_param"],
                }
                for label, points in curves["curves"].items()
                for p in points
            ],
        ),
    ]
    lines += ["", "### The parameter multiplier", ""]
    if curves["linear_family"] is None:
        lines.append("No LoRA family with two or more ranks, so no multiplier is read.")
    else:
        lines.append(
            f"Read off the {family_names[curves['linear_family']]} curve (monotone in log "
            f"parameters); the paper claims {PAPER_MULTIPLIER}x or more."
        )
        lines += [""] + [m["sentence"] for m in curves["multipliers"]]
    if curves["ceiling"]:
        lines += [
            "",
            "### Against the linear ceiling",
            "",
            "A LoRA at every layer's full rank can make any linear update of those "
            "layers; CeRA above it is gain no linear adapter of those layers can have.",
            "",
        ] + [c["sentence"] for c in curves["ceiling"]]
    return "\n".join(lines)


KIND_NAMES = {"cera": "CeRA", "lora": "LoRA", "dora": "DoRA"}
"""How the legends write a spec's kind (any other kind as the spec writes it)."""


def legend_names(labels: list[str]) -> dict[str, str]:
    """Each family label as a legend shows it: a spec label (``kind:field=value,...``)
    as the kind's name and, in brackets, only the fields that tell it from the other
    families of its kind (a field every one of them shares, such as one
    ``target_modules`` list, is left out); a label that is not a spec (the demo's
    ``CeRA, identity``, a folder) as it is."""
    parsed: dict[str, tuple[str, list[str]]] = {}
    for label in labels:
        kind, colon, rest = label.partition(":")
        if colon and kind.isidentifier():
            parts, depth, start = [], 0, 0
            for i, ch in enumerate(rest):
                depth += (ch in "[{") - (ch in "]}")
                if ch == "," and depth == 0:
                    parts.append(rest[start:i])
                    start = i + 1
            parsed[label] = (kind, [p for p in parts + [rest[start:]] if p])
    out = {}
    for label in labels:
        if label not in parsed:
            out[label] = label
            continue
        kind, parts = parsed[label]
        kin = [ps for k, ps in parsed.values() if k == kind]
        own = [p for p in parts if not all(p in ps for ps in kin)]
        name = KIND_NAMES.get(kind, kind)
        out[label] = f"{name} ({', '.join(own)})" if own else name
    return out


def plot(curves: dict[str, Any], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = curves["score"] == "bits"
    scale = 1 if total else 100
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = legend_names(list(curves["curves"]))  # short, as the tables beside it name them
    for label, points in curves["curves"].items():
        x = [p["params"] for p in points]
        y = [p["mean"] * scale for p in points]
        err = [
            [max(0.0, p["mean"] - p["low"]) * scale for p in points],
            [max(0.0, p["high"] - p["mean"]) * scale for p in points],
        ]
        ax.errorbar(
            x,
            y,
            yerr=err,
            fmt="o-" if len(points) > 1 else "o",
            capsize=3,
            label=textwrap.fill(names[label], 70),
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("bits stored (sum over facts)" if total else "test exact match %")
    ax.set_title(title, fontsize=10)
    # below the axes: a family's label is its spec, often longer than the plot is wide
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    if not total:
        ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def finite(x: float) -> float | None:
    """JSON has no infinity: an open end is written as null."""
    return x if math.isfinite(x) else None
