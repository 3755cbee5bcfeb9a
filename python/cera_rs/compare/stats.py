"""How sure a comparison can be: the Wilson interval of one method's exact match, and
the paired interval of the difference between two methods over (seed, problem).

Both methods answer the same test problems after training on the same data order
from the same adapter-init seed, so their answers are paired. Two things make the
difference uncertain: which problems were drawn, and training's own randomness (a
method's seed-to-seed spread). The bootstrap resamples seeds and problems
independently (a crossed design) and holds both; but a few seeds cannot show the
seed spread to a bootstrap (three seeds resampled understate it), so the interval is
widened to cover Student's t interval over the per-seed differences as well. With one
seed training's spread is not measured at all, and the verdict stays "not
distinguishable": one lucky run is not a result."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BETTER, WORSE, TIE = "better", "worse", "not distinguishable at this size"


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}
"""Student's t, 97.5 % quantile, by degrees of freedom."""


def t975(df: int) -> float:
    """Student's t 97.5 % quantile: the table to 10 degrees of freedom, beyond it the
    Cornish-Fisher expansion (within 0.001)."""
    if df in _T975:
        return _T975[df]
    z = 1.959964
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True)
class Difference:
    """``method`` minus ``reference`` in exact match, averaged over seeds and problems."""

    method: str
    reference: str
    mean: float
    low: float
    high: float
    seeds: int
    problems: int
    discordant: int  # (seed, problem) pairs where exactly one of the two is right

    @property
    def verdict(self) -> str:
        if self.seeds < 2:
            return TIE
        if self.low > 0:
            return BETTER
        if self.high < 0:
            return WORSE
        return TIE

    def sentence(self) -> str:
        size = f"{self.seeds} seed{'s' if self.seeds > 1 else ''} x {self.problems} test problems"
        interval = (
            f"{100 * self.mean:+.1f} points (95 % interval "
            f"{100 * self.low:+.1f} to {100 * self.high:+.1f}; {size})"
        )
        if self.verdict == TIE:
            text = (
                f"{self.method} and {self.reference} are not distinguishable at this "
                f"size: {interval}"
            )
        else:
            text = f"{self.method} is {self.verdict} than {self.reference}: {interval}"
        if self.seeds == 1:
            text += "; one seed: training's own spread is not measured, so no verdict beyond this"
        return text + "."


def paired_difference(
    method: np.ndarray,
    reference: np.ndarray,
    names: tuple[str, str],
    resamples: int = 10_000,
    seed: int = 0,
) -> Difference:
    """The difference of two (seeds, problems) arrays of right/wrong answers, with its
    95 % interval: the percentile interval of ``resamples`` crossed resamplings of
    seeds and problems, widened to the t interval over the per-seed differences where
    that is wider. Deterministic for a given ``seed``."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(
            f"paired answers must be two (seeds, problems) arrays of one shape; "
            f"got {a.shape} and {b.shape}"
        )
    diff = a - b
    n_seeds, n_problems = diff.shape
    means = crossed_means(diff[None], resamples, seed)[:, 0]
    tail = 0.025
    low, high = np.quantile(means, [tail, 1 - tail])
    if n_seeds > 1:  # the per-seed differences' t interval, which few seeds need
        per_seed = diff.mean(axis=1)
        half = t975(n_seeds - 1) * per_seed.std(ddof=1) / np.sqrt(n_seeds)
        low, high = min(low, per_seed.mean() - half), max(high, per_seed.mean() + half)
    return Difference(
        names[0],
        names[1],
        float(diff.mean()),
        float(low),
        float(high),
        n_seeds,
        n_problems,
        int(np.count_nonzero(diff)),
    )


def crossed_means(scores: np.ndarray, resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """Each method's mean score under crossed resamplings of seeds and problems, the one
    resampler of differences, curves and multipliers: ``scores`` is (methods, seeds,
    problems), the result (resamples, methods). Every method sees the same draws, so the
    pairing holds."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 3 or x.size == 0:
        raise ValueError(f"scores must be a (methods, seeds, problems) array, got {x.shape}")
    _, n_seeds, n_problems = x.shape
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, x.shape[0]))
    # In chunks of draws, their size set by the seeds and problems alone: any number of
    # methods (a difference is one) sees the same draws from the same ``seed``.
    chunk = max(1, 2_000_000 // (n_seeds * n_problems))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        s = rng.integers(0, n_seeds, size=(k, n_seeds)) if n_seeds > 1 else np.zeros((k, 1), int)
        p = rng.integers(0, n_problems, size=(k, n_problems))
        per_seed = x[:, :, p].mean(axis=3)  # (methods, seeds, k)
        picked = np.take_along_axis(per_seed, s.T[None, :, :], axis=1)  # (methods, n_seeds, k)
        out[start : start + k] = picked.mean(axis=1).T
    return out


def isotonic(y: np.ndarray) -> np.ndarray:
    """The non-decreasing least-squares fit of ``y`` (pool adjacent violators): a
    curve of score against parameters read as monotone, its dips treated as noise."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in np.asarray(y, dtype=np.float64):
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks])


def equivalent_params(params: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The parameter count at which a family's monotone curve (``scores`` at
    ``params``, ascending) reaches ``target``, interpolated linearly in log parameters:
    0 below its smallest member, inf above its largest."""
    fit = isotonic(scores)
    logs = np.log(np.asarray(params, dtype=np.float64))
    if target < fit[0]:
        return 0.0
    if target > fit[-1]:
        return math.inf
    i = int(np.argmax(fit >= target))
    if i == 0:
        return float(params[0])
    share = (target - fit[i - 1]) / (fit[i] - fit[i - 1])
    return float(np.exp(logs[i - 1] + share * (logs[i] - logs[i - 1])))


BELOW, ABOVE, FLAT, ON = "below", "above", "flat", "on"


@dataclass(frozen=True)
class Multiplier:
    """How many parameters the linear family needs to score as ``method`` does, as a
    multiple of the method's own, with its 95 % interval (inf: above the family's
    largest member in that share of resamples)."""

    method: str
    family: str
    params: int
    point: float
    low: float
    high: float
    where: str  # ON, BELOW or ABOVE the family's curve, or FLAT (no curve to read)
    family_rise: Difference  # the family's best member above its smallest, against it
    unit: str = "points"  # the score's: "points" of exact match, or "bits" summed over problems

    def sentence(self) -> str:
        if self.where == FLAT:
            rise = self.family_rise
            scale = 100 if self.unit == "points" else rise.problems
            below = f"; {self.method} scores below its smallest member" if self.point == 0 else ""
            return (
                f"{self.method}: no multiplier can be read, because the {self.family} "
                f"curve is not distinguishable from flat (its best member above the "
                f"smallest against the smallest: {scale * rise.mean:+.1f} {self.unit}, 95 % "
                f"interval {scale * rise.low:+.1f} to {scale * rise.high:+.1f}): rank is not "
                f"seen to bind here{below}."
            )
        if self.where == BELOW:
            return (
                f"{self.method} scores below the smallest {self.family} tried, so no "
                "multiplier above it can be read."
            )
        if self.where == ABOVE:
            low = f"at least {self.low:.2g}x" if math.isfinite(self.low) else "any multiple"
            return (
                f"{self.method} scores above the largest {self.family} tried ({low} its "
                "parameters, 95 % lower bound)."
            )
        high = f"{self.high:.2g}x" if math.isfinite(self.high) else "above the largest tried"
        low = f"{self.low:.2g}x" if self.low > 0 else "below the smallest tried"
        return (
            f"{self.method} scores like {self.family} with {self.point:.2g}x its parameters "
            f"(95 % interval {low} to {high})."
        )


def parameter_multiplier(
    method: np.ndarray,
    params: int,
    family: list[np.ndarray],
    family_params: list[int],
    names: tuple[str, str],
    resamples: int = 10_000,
    seed: int = 0,
    unit: str = "points",
) -> Multiplier:
    """``method``'s score (a (seeds, problems) array) read off the family's curve of
    score against parameters (one array per member, ascending parameters), under the
    paired crossed resampling ``paired_difference`` uses. The curve is flat, and no
    multiplier is read, when its best member is not distinguishable from its smallest."""
    order = np.argsort(family_params)
    fam_params = np.asarray(family_params, dtype=np.float64)[order]
    stacked = np.stack([method] + [family[i] for i in order])
    if len(fam_params) < 2:
        raise ValueError(f"{names[1]}: a curve needs at least two members, got {len(fam_params)}")
    means = stacked.mean(axis=(1, 2))
    best = 2 + int(np.argmax(means[2:]))  # the best member above the smallest
    rise = paired_difference(stacked[best], stacked[1], (names[1], names[1]), resamples, seed)
    draws = crossed_means(stacked, resamples, seed)
    multiples = np.array([equivalent_params(fam_params, d[1:], d[0]) for d in draws]) / params
    point = equivalent_params(fam_params, means[1:], means[0]) / params
    low, high = np.quantile(np.sort(multiples), [0.025, 0.975], method="inverted_cdf")
    low, high = _widened(low, high, stacked, fam_params, params)
    if rise.low <= 0:
        where = FLAT
    elif point == 0:
        where = BELOW
    elif math.isinf(point):
        where = ABOVE
    else:
        where = ON
    return Multiplier(
        names[0], names[1], int(params), float(point), float(low), float(high), where, rise, unit
    )


def _widened(
    low: float, high: float, stacked: np.ndarray, fam_params: np.ndarray, params: int
) -> tuple[float, float]:
    """The multiplier's interval widened to Student's t interval of the per-seed
    multipliers on the log scale (each seed's method read off that seed's curve), which a
    bootstrap of few seeds understates; a seed off the curve leaves that end open."""
    n_seeds = stacked.shape[1]
    if n_seeds < 2:
        return low, high
    per_seed = stacked.mean(axis=2)  # (1 + members, seeds)
    each = np.array(
        [equivalent_params(fam_params, per_seed[1:, s], per_seed[0, s]) for s in range(n_seeds)]
    )
    each = each / params
    if (each == 0).any():
        low = 0.0
    if np.isinf(each).any():
        high = math.inf
    if (each == 0).any() or np.isinf(each).any():
        return low, high
    logs = np.log(each)
    half = t975(n_seeds - 1) * logs.std(ddof=1) / math.sqrt(n_seeds)
    return min(low, math.exp(logs.mean() - half)), max(high, math.exp(logs.mean() + half))


def seeds_needed(spread: float, half_width: float) -> int:
    """The pilot arithmetic: the fewest seeds k (2 or more) whose t interval over the
    per-seed differences, t975(k - 1) * spread / sqrt(k), is within +-``half_width``
    (``spread``: the standard deviation of the per-seed differences, same units)."""
    if not half_width > 0 or not spread >= 0:
        raise ValueError(
            f"seeds_needed: spread >= 0 and half_width > 0, got {spread}, {half_width}"
        )
    k = max(2, math.floor((1.959964 * spread / half_width) ** 2))  # t975 > z: none fewer
    while t975(k - 1) * spread / math.sqrt(k) > half_width:
        k += 1
    return k


SETTLED = 0.01
"""With one seed (no spread measured) a loss that fell by less than this share of itself
over the last quarter is said to have settled."""


def convergence(curves: list[list[dict]]) -> dict | None:
    """Whether a method's valid loss still fell over the last quarter of training by
    more than its seed spread (the standard deviation of the final loss over seeds; with
    one seed, ``SETTLED`` of the loss): ``curves`` holds each seed's recorded points
    (``{"step", "valid_loss"}``, the last two a quarter apart). None where a run
    recorded fewer than two points."""
    if not curves or any(len(c) < 2 for c in curves):
        return None
    last = np.array([c[-1]["valid_loss"] for c in curves])
    before = np.array([c[-2]["valid_loss"] for c in curves])
    drop = float(before.mean() - last.mean())
    spread = float(last.std(ddof=1)) if len(last) > 1 else None
    bar = spread if spread is not None else SETTLED * float(last.mean())
    return {
        "steps": [p["step"] for p in curves[0]],
        "valid_loss": [
            float(np.mean([c[i]["valid_loss"] for c in curves])) for i in range(len(curves[0]))
        ],
        "last_quarter_drop": drop,
        "seed_spread": spread,
        "still_learning": drop > bar,
    }
