"""What a comparison writes: ``summary.json`` (every figure), ``report.md`` (the
tables and one sentence per method against the reference), ``exact_match.png``
(exact match against trainable parameters, with intervals) and, per run, a results
JSON in the schema of PEFT's ``method_comparison`` benchmark (``peft_results/``), so
that PEFT's own ``processing.py`` reads it beside PEFT's published results.

Scores (exact match, loss, intervals, verdicts) depend only on the runs' records and
come out the same when a killed comparison is resumed; costs (time, tokens/s,
memory) are measured and vary from run to run, and are kept apart."""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cera_rs.atomic import atomic_file
from cera_rs.compare import curves, effective
from cera_rs.compare.engine import Comparison, lr_grid
from cera_rs.compare.methods import CONCEPTS, Method, _top_level
from cera_rs.compare.stats import Difference, convergence, paired_difference, wilson
from cera_rs.table import markdown_table
from cera_rs.table import pct as _pct

MiB = 1 << 20


def _tested(comparison: Comparison, method: Method) -> list[dict]:
    """The method's reported runs (at its choice), one per seed, in seed order."""
    return comparison.tested[method.name]


def _hits(comparison: Comparison, method: Method) -> np.ndarray:
    return np.array([r["test"]["hits"] for r in _tested(comparison, method)], dtype=bool)


def differences(comparison: Comparison) -> list[Difference]:
    """Each method against the reference (the first method unless one was named)."""
    reference = _reference(comparison)
    ref_hits = _hits(comparison, reference)
    return [
        paired_difference(
            _hits(comparison, m),
            ref_hits,
            (m.name, reference.name),
            resamples=comparison.settings.resamples,
        )
        for m in comparison.methods
        if m is not reference
    ]


def _paired(a: np.ndarray, b: np.ndarray, names: tuple[str, str], resamples: int, scale: float):
    d = paired_difference(a, b, names, resamples=resamples)
    return {
        "mean": d.mean * scale,
        "low": d.low * scale,
        "high": d.high * scale,
        "verdict": d.verdict,
    }


def split_differences(comparison: Comparison, method: Method) -> dict[str, Any]:
    """The method against the reference on the information stored (bits summed over
    problems) where the task scores bits, and on each extra split (phonebook's
    reworded prompts: exact match in points and bits), with paired intervals."""
    reference = _reference(comparison)
    runs, ref = _tested(comparison, method), _tested(comparison, reference)
    names, resamples = (method.name, reference.name), comparison.settings.resamples

    def arrays(split: str | None, key: str) -> tuple[np.ndarray, np.ndarray]:
        def of(rs):
            return np.array(
                [(r["test"] if split is None else r["test"][split])[key] for r in rs], float
            )

        return of(runs), of(ref)

    out: dict[str, Any] = {}
    if comparison.problems.score == "bits":
        a, b = arrays(None, "bits")
        out["test_bits"] = _paired(a, b, names, resamples, a.shape[1])
    for split in comparison.problems.extra_tests:
        a, b = arrays(split, "bits")
        hits_a, hits_b = arrays(split, "hits")
        out[split] = {
            "exact_match_points": _paired(hits_a, hits_b, names, resamples, 100),
            "bits": _paired(a, b, names, resamples, a.shape[1]),
        }
    return out


def _reference(comparison: Comparison) -> Method:
    """The method the others are compared with (``engine.run`` checked the name)."""
    name = comparison.settings.reference
    return next((m for m in comparison.methods if m.name == name), comparison.methods[0])


def _at_edge(value: Any, choices: list) -> bool:
    """Chosen at an end of two or more numeric choices, so one beyond might do better."""
    numbers = sorted(c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool))
    return len(numbers) > 1 and value in (numbers[0], numbers[-1])


def tuned_words(method: Method, settings: Any) -> set[str]:
    """What a method chose on its selection runs, in ``effective``'s words: "lr" for a
    rate grid, "dropout" and "scale" for tuned fields (others by their field's name)."""
    words = {CONCEPTS.get(f, f) for f, choices in method.tune.items() if len(choices) > 1}
    return words | ({"lr"} if len(lr_grid(method, settings)) > 1 else set())


def _method_summary(comparison: Comparison, method: Method) -> dict[str, Any]:
    runs = _tested(comparison, method)
    lr, choice = comparison.chosen[method.name]
    lrs = lr_grid(method, comparison.settings)
    selection = comparison.selection[method.name]
    hits = _hits(comparison, method)
    first = runs[0]["test"]
    tuned = {
        name: {
            "choices": list(choices),
            "chosen": choice[name],
            "at_edge": _at_edge(choice[name], list(choices)),
        }
        for name, choices in method.tune.items()
    }
    out = {
        "peft_type": method.peft_type,
        "fields": method.fields,
        "source": method.source,
        "training": method.training,
        "not_applied": list(method.not_applied),
        "lr": lr,
        "lr_grid": lrs,
        "lr_at_grid_edge": _at_edge(lr, lrs),
        "tuned": tuned,
        "selection_runs": [
            {"lr": r["lr"], "choice": r["choice"], "seed": r["seed"], "valid": r["valid"]}
            for r in selection
        ],
        "effective": runs[0]["effective"],
        "tuned_words": sorted(tuned_words(method, comparison.settings)),
        "convergence": convergence([r["train"]["curve"] for r in runs]),
        "seeds": list(comparison.seeds),
        "test_exact_match": [float(h.mean()) for h in hits],
        "test_exact_match_mean": float(hits.mean()),
        # over problems: every seed answers the same ones, so they are not more draws
        "wilson95": list(wilson(round(float(hits.mean(axis=0).sum())), hits.shape[1])),
        "test_loss": float(np.mean([r["test"]["loss"] for r in runs])),
        "teacher_forced_agreement": float(
            np.mean([r["test"]["teacher_forced_agreement"] for r in runs])
        ),
        "trainable_params": runs[0]["trainable_params"],
        "total_params": runs[0]["total_params"],
        "file_size": runs[0]["file_size"],
    }
    for key in ("spectra", "linearity", "extras"):
        if key in first:
            out[key] = first[key]
    out["test_bits"] = float(np.mean([np.sum(r["test"]["bits"]) for r in runs]))
    for name in comparison.problems.extra_tests:  # e.g. phonebook's reworded prompts
        out[name] = {
            "exact_match": [r["test"][name]["exact_match"] for r in runs],
            "bits": float(np.mean([np.sum(r["test"][name]["bits"]) for r in runs])),
        }
    trains = [r["train"] for r in runs]
    out["costs"] = {
        "train_time_s": float(np.mean([t["train_time"] for t in trains])),
        "tokens_per_s": float(np.mean([t["tokens"] / t["train_time"] for t in trains])),
        "peak_memory_bytes": int(max(t["memory"]["max"] for t in trains)),
        "score_time_s": float(np.mean([r["test"]["score_time"] for r in runs])),
        "ran_on": sorted({_place(r["ran_on"]) for r in runs}),
    }
    return out


def _selection(comparison: Comparison) -> dict[str, Any]:
    """Which runs chose (never reported), how many, and how many of them tuning adds."""
    s = comparison.settings
    runs = {m.name: len(comparison.selection[m.name]) for m in comparison.methods}
    rates_alone = {
        m.name: len(lr_grid(m, s)) if len(lr_grid(m, s)) > 1 else 0 for m in comparison.methods
    }
    return {
        "seed": s.select_seed,
        "runs": runs,
        "tuning_adds": sum(runs.values()) - sum(rates_alone.values()),
        "tune": list(s.tune),
    }


def _place(ran_on: dict[str, str]) -> str:
    """A run's machine and device; on Ray with the node's address and short id."""
    node = ran_on["node"]
    if "ray_node" in ran_on:
        node += f" [{ran_on['address']}, Ray node {ran_on['ray_node'][:8]}]"
    return f"{node} ({ran_on['device']})"


def summarise(comparison: Comparison) -> dict[str, Any]:
    p, s = comparison.problems, comparison.settings
    reference = _reference(comparison)
    ref_effective = _tested(comparison, reference)[0]["effective"]
    ref_words = tuned_words(reference, s)
    shown, shared = shown_names([m.name for m in comparison.methods])
    return {
        "model": comparison.model,
        "data": {
            "source": p.source,
            "digest": p.digest,
            "notes": list(p.notes),
            "extra_tests": list(p.extra_tests),
            "score": p.score,
            "sizes": {"train": len(p.train), "valid": len(p.valid), "test": len(p.test)},
        },
        "settings": {
            "steps": s.steps,
            "batch": s.batch,
            "lrs": list(s.lrs),
            "rate_chosen_by": comparison.problems.score,  # engine.merit: its valid split
            "seeds": list(comparison.seeds),
            "select_seed": s.select_seed,
            "adapted_layers": s.adapted_layers,
            "max_seq_length": s.max_seq_length,
            "resamples": s.resamples,
        },
        "device": comparison.device,
        "reference": reference.name,
        "base_exact_match": float(comparison.base_hits.mean()),
        "selection": _selection(comparison),
        "shown_as": shown,
        "shared": shared,
        "methods": {m.name: _method_summary(comparison, m) for m in comparison.methods},
        "differences": [
            {
                "method": d.method,
                "reference": d.reference,
                "mean": d.mean,
                "low": d.low,
                "high": d.high,
                "verdict": d.verdict,
                "discordant": d.discordant,
                "sentence": dataclasses.replace(
                    d, method=shown[d.method], reference=shown[d.reference]
                ).sentence(),
                "splits": split_differences(comparison, m),
                "confounds": effective.confounds(
                    _tested(comparison, m)[0]["effective"],
                    ref_effective,
                    tuned_words(m, s),
                    ref_words,
                ),
            }
            for d, m in zip(
                differences(comparison), [m for m in comparison.methods if m is not reference]
            )
        ],
        "curves": _curves(comparison),
        "resolve": comparison.resolved,
    }


def _curves(comparison: Comparison) -> dict[str, Any] | None:
    """Rank curves, multipliers and the ceiling, where the methods make a curve (a
    family of two or more ranks) or include a full-rank LoRA."""
    named = curves.families(comparison.methods)
    if not any(len(ms) > 1 for ms in named.values()) and not any(
        m.ceiling for m in comparison.methods
    ):
        return None
    runs = {m.name: _tested(comparison, m) for m in comparison.methods}
    params = {name: rs[0]["trainable_params"] for name, rs in runs.items()}
    return curves.summarise(
        comparison.methods,
        runs,
        params,
        comparison.problems.score,
        comparison.settings.resamples,
        shown_names([m.name for m in comparison.methods])[0],
    )


def shown_names(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Spec parts every method of one kind gives alike (``lora_alpha=8``, the targets),
    lifted out of the names: each name as the tables show it, and one line per kind of
    what was lifted. A kind of one method, and ranks, stay in the names."""
    parts = {}
    for n in names:
        kind, sep, rest = n.partition(":")
        parts[n] = (kind, [p for p in _top_level(rest) if p] if sep else [])
    shown, lifted = {n: n for n in names}, []
    for kind in dict.fromkeys(k for k, _ in parts.values()):
        members = [n for n in names if parts[n][0] == kind]
        common = [
            p
            for p in parts[members[0]][1]
            if not p.startswith("r=") and all(p in parts[m][1] for m in members)
        ]
        if len(members) < 2 or not common:
            continue
        short = {m: ",".join(p for p in parts[m][1] if p not in common) for m in members}
        short = {m: f"{kind}:{rest}" if rest else kind for m, rest in short.items()}
        others = {v for n, v in shown.items() if n not in members}
        if len(set(short.values())) == len(members) and not set(short.values()) & others:
            shown.update(short)
            lifted.append(f"{kind}: {', '.join(common)}")
    return shown, lifted


def _selection_sentence(summary: dict[str, Any]) -> str:
    """Which runs chose the rates (and tuned fields), by what, and that they are left out."""
    s, sel = summary["settings"], summary["selection"]
    by = (
        "valid loss (the bits stored)"
        if s.get("rate_chosen_by") == "bits"
        else "valid exact match (teacher-forced; lower valid loss on a tie)"
    )
    chose = [n for n, k in sel["runs"].items() if k]
    if not chose:
        return "No method had a rate or a field to choose: each ran at its one rate."
    added = (
        f"; tuning besides the rate added {sel['tuning_adds']} of them"
        if sel["tuning_adds"]
        else ""
    )
    return (
        f"Rates{' and tuned fields' if sel['tuning_adds'] else ''} were chosen by {by} on "
        f"selection runs of seed {sel['seed']} ({sum(sel['runs'].values())} runs"
        f"{added}), for {', '.join(chose) if len(chose) < len(sel['runs']) else 'every method'}"
        f"; those runs are excluded from every score below, which are seeds "
        f"{', '.join(map(str, s['seeds']))}."
    )


def _effective_markdown(summary: dict[str, Any], shown: dict[str, str]) -> list[str]:
    """What each branch is, read from the built models and the training that ran."""
    columns = [
        ("method", "method", "s"),
        ("form", "form", "s"),
        ("rank", "rank", ">s"),
        ("dropout (on)", "dropout", ">s"),
        ("scale", "scale", ">s"),
        ("A's initial std (in->out)", "stds", ">s"),
        ("B's init", "b_init", "s"),
        ("optimiser, rate, weight decay, clip", "train", "s"),
        ("tuned", "tuned", "s"),
    ]
    text, rows = effective.text, []
    for name, m in summary["methods"].items():
        e = m["effective"]
        if e.get("form") is None:
            rows.append(
                {k: "" for _, k, _ in columns} | {"method": shown[name], "form": "not read"}
            )
            continue
        dropout = text(e["dropout"]) + (f" ({e['dropout_on']})" if e["dropout_on"] != "-" else "")
        tuned = ", ".join(
            f"{f}={text(t['chosen'])}" + (" (at the edge of its choices)" if t["at_edge"] else "")
            for f, t in m["tuned"].items()
        )
        rows.append(
            {
                "method": shown[name],
                "form": e["form"],
                "rank": text(e["rank"]),
                "dropout": dropout,
                "scale": text(e["scale"]),
                "stds": "; ".join(f"{k} {v:.3g}" for k, v in e["a_init_std"].items()),
                "b_init": e["b_init"],
                "train": f"{e['optimizer']}, {e['lr']:g}, {text(e.get('weight_decay'))}, "
                f"{text(e['clip'])}",
                "tuned": tuned or "-",
            }
        )
    heading = "## What each branch is (read from the built model and the training that ran)"
    return [heading, "", *markdown_table(columns, rows)]


def _confounds_markdown(summary: dict[str, Any]) -> list[str]:
    """Each setting besides form and rank in which a method differs from the reference."""
    shown = summary["shown_as"]
    lines = [
        f"## What else differs from {summary['shown_as'][summary['reference']]}",
        "",
        "Besides what a comparison is about (the form of the branch and its rank), each "
        "setting below differs from the reference and was not tuned for both, so the "
        "verdict measures it too.",
        "",
    ]
    for d in summary["differences"]:
        if d["confounds"]:
            lines += [f"- {shown[d['method']]}: {c}." for c in d["confounds"]]
        else:
            lines.append(f"- {shown[d['method']]}: nothing besides form and rank.")
    return lines


def _splits_markdown(summary: dict[str, Any]) -> list[str]:
    """The differences on the bits stored and on each extra split, beside exact match."""
    rows = []
    for d in summary["differences"]:
        for split, figures in d.get("splits", {}).items():
            cells = (
                [("bits", figures)]
                if split == "test_bits"
                else [("points", figures["exact_match_points"]), ("bits", figures["bits"])]
            )
            where = "test" if split == "test_bits" else split
            for unit, f in cells:
                what = "bits stored" if unit == "bits" else "exact match"
                rows.append(
                    {
                        "method": summary["shown_as"][d["method"]],
                        "score": f"{where}: {what}",
                        "difference": f"{f['mean']:+.1f} {unit}",
                        "interval": f"{f['low']:+.1f} to {f['high']:+.1f}",
                        "verdict": f["verdict"],
                    }
                )
    if not rows:
        return []
    return [
        "",
        f"Beside exact match, against {summary['shown_as'][summary['reference']]} (paired "
        "over seeds and "
        "problems; bits summed over problems):",
        "",
        *markdown_table(
            [
                ("method", "method", "s"),
                ("split: score", "score", "s"),
                ("difference", "difference", ">s"),
                ("95 % interval", "interval", ">s"),
                ("verdict", "verdict", "s"),
            ],
            rows,
        ),
    ]


def _convergence_lines(summary: dict[str, Any]) -> list[str]:
    steps = summary["settings"]["steps"]
    out = []
    for name, m in summary["methods"].items():
        c = m.get("convergence")
        if c and c["still_learning"]:
            before, last = c["valid_loss"][-2], c["valid_loss"][-1]
            spread = (
                f"its seed spread {c['seed_spread']:.3g}"
                if c["seed_spread"] is not None
                else "a hundredth of it (one seed: no spread)"
            )
            out.append(
                f"{summary['shown_as'][name]} is still learning at {steps} steps (valid "
                f"loss {before:.3f} -> {last:.3f} over the last quarter, more than {spread}): "
                "this measures speed, not capacity; train longer."
            )
    return out


def _own_grid(method: dict[str, Any], summary: dict[str, Any]) -> bool:
    """Whether a method ran a rate grid of its own (``lrs=[...]`` in its spec)."""
    return set(method["lr_grid"]) != set(summary["settings"]["lrs"])


def _rate_grids(summary: dict[str, Any]) -> str:
    """The header's rate grid: the comparison's only where a method uses it (a method
    with a grid of its own has it listed further down)."""
    own = [_own_grid(m, summary) for m in summary["methods"].values()]
    text = f"rate grid {', '.join(f'{x:g}' for x in summary['settings']['lrs'])}"
    if not any(own):
        return text
    return (
        "each method's own rate grid" if all(own) else f"{text} (methods without one of their own)"
    )


def scores_markdown(summary: dict[str, Any]) -> str:
    """The part of the report that a resumed comparison reproduces exactly."""
    s, sizes = summary["settings"], summary["data"]["sizes"]
    shown = summary["shown_as"]
    lines = [
        f"# {summary['model']}: {summary['data']['source']}",
        "",
        f"{sizes['train']} training, {sizes['valid']} valid and {sizes['test']} test "
        f"problems; {s['steps']} steps of batch {s['batch']}; reported seeds "
        f"{', '.join(map(str, s['seeds']))}; {_rate_grids(summary)}"
        + (f"; adapters on the last {s['adapted_layers']} layers" if s["adapted_layers"] else "")
        + ".",
        "",
        _selection_sentence(summary),
    ]
    if summary["shared"]:
        lines += ["", "Shared, left out of the names below: " + "; ".join(summary["shared"]) + "."]
    lines += [
        "",
        "## Test exact match (greedy decoding)",
        "",
        f"The base model, no adapter: {_pct(summary['base_exact_match'])} %.",
        "",
        *markdown_table(
            [
                ("method", "method", "s"),
                ("trainable params", "params", ",d"),
                ("lr", "lr", ">s"),
                ("exact match % (mean)", "mean", ">s"),
                ("per seed", "per_seed", ">s"),
                ("Wilson 95 % (n = problems)", "wilson", ">s"),
                ("test loss", "loss", ".3f"),
                ("eff. rank", "rank", ".1f"),
                ("held-out lin@r", "lin", ".4f"),
            ],
            [
                {
                    "method": shown[name],
                    "params": m["trainable_params"],
                    "lr": f"{m['lr']:g}" + (" (edge)" if m["lr_at_grid_edge"] else ""),
                    "mean": _pct(m["test_exact_match_mean"]),
                    "per_seed": " / ".join(_pct(x) for x in m["test_exact_match"]),
                    "wilson": "-".join(_pct(x) for x in m["wilson95"]),
                    "loss": m["test_loss"],
                    "rank": m["spectra"]["effective_rank"] if "spectra" in m else None,
                    "lin": m["linearity"]["held_out_linearity_at_r"] if "linearity" in m else None,
                }
                for name, m in summary["methods"].items()
            ],
        ),
    ]
    lines += [
        "",
        "eff. rank: the effective rank (exp of the entropy of the normalised singular "
        "values) of the adapters' centred output deltas on the test tokens; held-out "
        "lin@r: for CeRA, the share of each adapter's output energy that the best linear "
        "map of its rank, fitted on the training tokens, reproduces on the test tokens; "
        "both from the first reported seed, averaged over the adapted layers.",
        "",
        "Plots: [exact_match.png](exact_match.png) (exact match against trainable "
        "parameters)"
        + (
            ", [curves.png](curves.png) (each family's score against trainable parameters)"
            if summary.get("curves")
            else ""
        )
        + ".",
        "",
        f"## Against {shown[summary['reference']]} (paired over seeds and problems)",
        "",
        *markdown_table(
            [
                ("method", "method", "s"),
                ("difference (points)", "mean", "+.1f"),
                ("95 % interval", "interval", ">s"),
                ("verdict", "verdict", "s"),
            ],
            [
                {
                    "method": shown[d["method"]],
                    "mean": 100 * d["mean"],
                    "interval": f"{100 * d['low']:+.1f} to {100 * d['high']:+.1f}",
                    "verdict": d["verdict"],
                }
                for d in summary["differences"]
            ],
        ),
    ]
    lines += [
        "",
        "Each interval is the crossed bootstrap over seeds and problems, widened to "
        "Student's t interval over the per-seed differences where that is wider"
        + (
            f"; with {len(summary['differences'])} comparisons, about one in twenty "
            "differences that are not there would still be called, so a single verdict "
            "among many is weaker than it reads."
            if len(summary["differences"]) > 1
            else "."
        ),
        "",
    ]
    lines += [d["sentence"] for d in summary["differences"]]
    lines += _splits_markdown(summary)
    lines += [""] + _confounds_markdown(summary) if summary["differences"] else []
    still = _convergence_lines(summary)
    if still:
        lines += ["", "## Unfinished training", ""] + still
    lines += [""] + _effective_markdown(summary, shown)
    if summary.get("resolve"):
        lines += ["", _resolve_markdown(summary["resolve"], shown, summary["reference"])]
    tuned_edges = [
        f"{shown[n]} ({f}={effective.text(t['chosen'])} of "
        f"{', '.join(map(effective.text, t['choices']))})"
        for n, m in summary["methods"].items()
        for f, t in m["tuned"].items()
        if t["at_edge"]
    ]
    if tuned_edges:
        lines += [
            "",
            "Tuned at the edge of its choices, so a value beyond might have done better: "
            f"{', '.join(tuned_edges)}.",
        ]
    edges = [
        f"{shown[n]} ({m['lr']:g})" for n, m in summary["methods"].items() if m["lr_at_grid_edge"]
    ]
    if edges:
        lines += [
            "",
            "Chosen at the edge of the rate grid, so a rate beyond it might have done "
            f"better: {', '.join(edges)}.",
        ]
    own = [
        f"{shown[n]} ({', '.join(f'{x:g}' for x in m['lr_grid'])})"
        for n, m in summary["methods"].items()
        if _own_grid(m, summary)
    ]
    if own:
        lines += ["", f"Rate grids of their own: {', '.join(own)}."]
    if summary["data"]["notes"]:
        lines += ["", "Data: " + "; ".join(summary["data"]["notes"]) + "."]
    for name in summary["data"]["extra_tests"]:
        lines += [
            "",
            f"## The {name} split (the same facts, asked in other words)",
            "",
            *markdown_table(
                [
                    ("method", "method", "s"),
                    ("exact match % per seed", "per_seed", ">s"),
                    ("bits stored (mean over seeds)", "bits", ".1f"),
                ],
                [
                    {
                        "method": shown[n],
                        "per_seed": " / ".join(_pct(x) for x in m[name]["exact_match"]),
                        "bits": m[name]["bits"],
                    }
                    for n, m in summary["methods"].items()
                ],
            ),
        ]
    if summary.get("curves"):
        lines += ["", curves.markdown(summary["curves"], shown)]
    notes = [
        f"{shown[n]}: {', '.join(m['not_applied'])}"
        for n, m in summary["methods"].items()
        if m["not_applied"]
    ]
    if notes:
        lines += ["", "Options of the method folders not applied: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def _resolve_markdown(r: dict[str, Any], shown: dict[str, str], reference: str) -> str:
    """How many seeds ``--resolve`` ran, why it stopped, and the pilot that sized it."""
    why = (
        f"every interval is within +-{r['target_points']:g} points"
        if r["stopped"] == "reached"
        else f"--max-seeds {r['max_seeds']} reached, short of +-{r['target_points']:g} points"
    )
    lines = [
        f"## Seeds (--resolve {r['target_points']:g}, --max-seeds {r['max_seeds']})",
        "",
        f"Seeds were added to the first {r['first_seeds']} until every interval against "
        f"{shown[reference]} was within +-{r['target_points']:g} points or {r['max_seeds']} seeds "
        f"were run: {r['seeds']} seeds, stopped because {why}. The seeds a method "
        "needs: the smallest k with t975(k-1) s / sqrt(k) within the target, s the "
        "per-seed spread of its difference after the first seeds.",
        "",
        *markdown_table(
            [
                ("method", "method", "s"),
                ("half-width reached (points)", "width", ".1f"),
                ("after the first seeds: per-seed spread (points)", "spread", ".1f"),
                ("seeds it needs", "needed", ">s"),
            ],
            [
                {
                    "method": shown[name],
                    "width": width,
                    "spread": r["pilot"][name]["spread_points"],
                    "needed": str(r["pilot"][name]["seeds_needed"] or "-"),
                }
                for name, width in r["half_width_points"].items()
            ],
        ),
    ]
    return "\n".join(lines)


def costs_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"## Costs (measured on {summary['device']}; they vary from run to run)",
        "",
        *markdown_table(
            [
                ("method", "method", "s"),
                ("adapter file (KiB)", "kib", ",.0f"),
                ("train time (s, mean)", "time", ".1f"),
                ("tokens/s", "speed", ",.0f"),
                ("peak memory growth (MiB)", "mib", ",.0f"),
            ],
            [
                {
                    "method": summary["shown_as"][name],
                    "kib": m["file_size"] / 1024,
                    "time": m["costs"]["train_time_s"],
                    "speed": m["costs"]["tokens_per_s"],
                    "mib": m["costs"]["peak_memory_bytes"] / MiB,
                }
                for name, m in summary["methods"].items()
            ],
        ),
    ]
    places = sorted({p for m in summary["methods"].values() for p in m["costs"]["ran_on"]})
    lines += ["", f"Trained on: {'; '.join(places)}."]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, m in summary["methods"].items():
        y = 100 * m["test_exact_match_mean"]
        low, high = (100 * v for v in m["wilson95"])
        # clamped: Wilson's bound at 0 % can sit a rounding error above the score
        ax.errorbar(
            m["trainable_params"],
            y,
            yerr=[[max(0.0, y - low)], [max(0.0, high - y)]],
            fmt="o",
            capsize=4,
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test exact match % (Wilson 95 %)")
    ax.set_title(summary["data"]["source"].split(" (")[0], fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """A PEFT config's dict in JSON's types, its sets (target_modules) sorted, so that a
    run writes the same file every time (a set's order follows the hash seed)."""
    return json.loads(json.dumps(config, default=sorted))


def peft_result(comparison: Comparison, method: Method, record: dict) -> dict[str, Any]:
    """One run in the schema of PEFT's ``method_comparison`` results (run_info,
    train_info, meta_info). Memory is the accelerator's on a GPU and the resident
    set's growth on CPU; ``valid accuracy`` and ``test accuracy`` are exact match."""
    s, train, test = comparison.settings, record["train"], record["test"]
    config = method.chosen(record["choice"]).config(None).to_dict()
    config["peft_type"] = method.peft_type
    used = dict(train["optimizer"])  # what the run trained with, as runner.train recorded it
    train_config = {
        "model_id": comparison.model,
        "batch_size": s.batch,
        "max_steps": s.steps,
        "seed": record["seed"],
        "optimizer_type": used.pop("optimizer"),
        "lr_scheduler": used.pop("schedule"),
        "grad_norm_clip": used.pop("clip"),
        "optimizer_kwargs": used,
        "max_seq_length": s.max_seq_length,
        "adapted_layers": s.adapted_layers,
        "dtype": record["precision"],
        "data": comparison.problems.source,
    }
    packages = ("transformers", "peft", "datasets", "bitsandbytes", "torch", "cera_rs")
    return {
        "run_info": {
            "created_at": record["created_at"],
            "total_time": train["train_time"] + test["score_time"],
            "experiment_name": f"{method.name} seed {record['seed']}",
            "peft_branch": "release",
            "train_config": train_config,
            "peft_config": plain_config(config),
            "error_msg": "",
        },
        "train_info": {
            "accelerator_memory_reserved_avg": train["memory"]["avg"],
            "accelerator_memory_max": train["memory"]["max"],
            "accelerator_memory_reserved_99th": train["memory"]["99th"],
            "train_time": train["train_time"],
            "file_size": record["file_size"],
            "num_trainable_params": record["trainable_params"],
            "num_total_params": record["total_params"],
            "status": "success",
            "metrics": [
                {
                    "step": s.steps,
                    "valid accuracy": record["valid"]["exact_match"],
                    "train loss": train["train_loss"],
                    "train samples": train["samples"],
                    "tokens / sec": train["tokens"] / train["train_time"],
                },
                {
                    "step": s.steps,
                    "test accuracy": test["exact_match"],
                    "test loss": test["loss"],
                    "train loss": train["train_loss"],
                    "train samples": train["samples"],
                    "train total tokens": train["tokens"],
                },
            ],
        },
        "meta_info": {
            "model_info": {"name": comparison.model},
            "dataset_info": {
                "source": comparison.problems.source,
                "digest": comparison.problems.digest,
            },
            "package_info": {f"{p}-version": _version(p) for p in packages},
            "system_info": {
                "system": platform.system(),
                "release": platform.release(),
                "machine": platform.machine(),
                "processor": platform.processor(),
                "accelerator": (
                    torch.cuda.get_device_name() if comparison.device == "cuda" else "cpu"
                ),
            },
            "pytorch_info": torch.__config__.show(),
        },
    }


def write(comparison: Comparison) -> dict[str, Any]:
    """Writes every output (each file atomically) and returns the summary."""
    out = comparison.out_dir
    summary = summarise(comparison)
    results = out / "peft_results"
    results.mkdir(parents=True, exist_ok=True)
    for method in comparison.methods:
        for record in _tested(comparison, method):
            path = results / f"{method.slug}--seed{record['seed']}.json"
            with atomic_file(path) as f:
                json.dump(peft_result(comparison, method, record), f, indent=1)
    with atomic_file(out / "summary.json") as f:
        json.dump(summary, f, indent=1)
    with atomic_file(out / "report.md") as f:
        f.write(scores_markdown(summary) + "\n\n" + costs_markdown(summary) + "\n")
    plot(summary, out / "exact_match.png")
    if summary["curves"]:
        curves.plot(summary["curves"], out / "curves.png", summary["data"]["source"].split(" (")[0])
    return summary
