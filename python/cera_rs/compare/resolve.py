"""Seeds chosen for the difference that matters (``--resolve D --max-seeds S``).

After the first seeds, seeds are added in a fixed order (the given ones, then the
integers above the smallest of them not yet used) until every method's paired 95 %
interval against the reference, the one the report prints, has a half-width below D
points, or S seeds are run. A round adds the seeds that the pilot arithmetic (the
per-seed spread of the differences still too wide) says are needed, at least one,
all at once, so that on a cluster they run side by side. What is added depends only
on the scores so far, so a resumed comparison adds the same seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cera_rs.compare.stats import paired_difference, seeds_needed

REACHED, MAX_SEEDS = "reached", "max-seeds"


def seed_order(first: tuple[int, ...], count: int, skip: int | None = None) -> list[int]:
    """The first ``count`` seeds a comparison reports: ``first``, then the integers above
    the smallest of them that are not among them (nor ``skip``, the selection seed)."""
    out, n = list(first[:count]), min(first)
    while len(out) < count:
        n += 1
        if n not in first and n != skip:
            out.append(n)
    return out


@dataclass(frozen=True)
class Round:
    """What the seeds so far show: each method's half-width against the reference
    (points), the per-seed spread of its difference (points; none with one seed) and
    the seeds that spread needs for the target; the seeds added next, or why not."""

    seeds: int
    half_width: dict[str, float]
    spread: dict[str, float | None]
    needed: dict[str, int | None]
    added: tuple[int, ...]
    stopped: str | None  # REACHED, MAX_SEEDS, or None while seeds are added


def decide(
    hits: dict[str, np.ndarray],
    reference: str,
    target: float,
    max_seeds: int,
    first: tuple[int, ...],
    resamples: int = 10_000,
    skip: int | None = None,
) -> Round:
    """The round after the seeds in ``hits`` (method name: (seeds, problems) answers,
    the seeds in ``seed_order(first, ..., skip)``): stop when every half-width is below
    ``target`` points (two seeds at least: one measures no training spread) or
    ``max_seeds`` are run, else add the seeds the widest difference needs."""
    ref = hits[reference]
    k = ref.shape[0]
    half_width, spread, needed = {}, {}, {}
    for name, h in hits.items():
        if name == reference:
            continue
        d = paired_difference(h, ref, (name, reference), resamples=resamples)
        half_width[name] = 100 * (d.high - d.low) / 2
        per_seed = 100 * (h.astype(np.float64) - ref).mean(axis=1)
        spread[name] = float(per_seed.std(ddof=1)) if k > 1 else None
        needed[name] = seeds_needed(spread[name], target) if k > 1 else None
    wide = [n for n, w in half_width.items() if w >= target]
    if k > 1 and not wide:
        return Round(k, half_width, spread, needed, (), REACHED)
    if k >= max_seeds:
        return Round(k, half_width, spread, needed, (), MAX_SEEDS)
    goal = max([k + 1] + [needed[n] for n in wide if needed[n] is not None])
    added = tuple(seed_order(first, min(goal, max_seeds), skip)[k:])
    return Round(k, half_width, spread, needed, added, None)


def describe(step: Round, reference: str, target: float, max_seeds: int, pilot: bool) -> str:
    """What a comparison prints after each round; after the first, the pilot
    arithmetic: per method, the spread s and the smallest k with
    t975(k - 1) * s / sqrt(k) <= target."""
    lines = [
        f"resolve (+-{target:g} points against {reference}, at most {max_seeds} seeds), "
        f"after {step.seeds} seed{'s' if step.seeds > 1 else ''}"
        + (
            f" (seeds needed: the smallest k with t975(k-1) * spread / sqrt(k) <= {target:g})"
            if pilot and step.seeds > 1
            else ""
        )
        + ":"
    ]
    for name, w in step.half_width.items():
        s, k = step.spread[name], step.needed[name]
        line = f"  {name}: half-width {w:.1f} points"
        if pilot and s is not None:
            line += f"; per-seed spread of the difference {s:.1f} points -> {k} seeds needed"
        lines.append(line)
    if step.added:
        lines.append(f"  adding seeds {', '.join(map(str, step.added))}")
    elif step.stopped == REACHED:
        lines.append(f"  done: every half-width is below {target:g} points")
    else:
        lines.append(f"  stopped at max_seeds ({max_seeds}) short of +-{target:g} points")
    return "\n".join(lines)


def summary(rounds: list[Round], target: float, max_seeds: int) -> dict:
    """What the report states: the target, where the seeds stopped and why, the
    half-width reached per method, and the pilot after the first seeds."""
    first, last = rounds[0], rounds[-1]
    return {
        "target_points": target,
        "max_seeds": max_seeds,
        "first_seeds": first.seeds,
        "seeds": last.seeds,
        "stopped": last.stopped,
        "half_width_points": last.half_width,
        "pilot": {
            n: {"spread_points": first.spread[n], "seeds_needed": first.needed[n]}
            for n in first.half_width
        },
        "rounds": [
            {"seeds": r.seeds, "half_width_points": r.half_width, "added": list(r.added)}
            for r in rounds
        ],
    }
