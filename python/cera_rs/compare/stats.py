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


_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}
"""Student's t, 97.5 % quantile, by degrees of freedom."""


def t975(df: int) -> float:
    """Student's t 97.5 % quantile: the table to 10 degrees of freedom, beyond it the
    Cornish-Fisher expansion (within 0.001)."""
    if df in _T975:
        return _T975[df]
    z = 1.959964
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


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
        size = (f"{self.seeds} seed{'s' if self.seeds > 1 else ''} x {self.problems} test "
                "problems")  # fmt: skip
        interval = (f"{100 * self.mean:+.1f} points (95 % interval "
                    f"{100 * self.low:+.1f} to {100 * self.high:+.1f}; {size})")  # fmt: skip
        if self.verdict == TIE:
            text = (f"{self.method} and {self.reference} are not distinguishable at this "
                    f"size: {interval}")
        else:
            text = f"{self.method} is {self.verdict} than {self.reference}: {interval}"
        if self.seeds == 1:
            text += ("; one seed: training's own spread is not measured, so no verdict "
                     "beyond this")  # fmt: skip
        return text + "."


def paired_bootstrap(method: np.ndarray, reference: np.ndarray, names: tuple[str, str],
                     resamples: int = 10_000, seed: int = 0) -> Difference:  # fmt: skip
    """The difference of two (seeds, problems) arrays of right/wrong answers: the
    percentile interval of ``resamples`` crossed resamplings of seeds and problems,
    widened to the t interval over the per-seed differences where that is wider (95 %
    only: the t table is for 95 %). Deterministic for a given ``seed``."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired answers must be two (seeds, problems) arrays of one shape; "
                         f"got {a.shape} and {b.shape}")  # fmt: skip
    diff = a - b
    n_seeds, n_problems = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # In chunks: each resample is a mean over a (seeds x problems) grid of draws.
    chunk = max(1, 2_000_000 // (n_seeds * n_problems))
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        s = rng.integers(0, n_seeds, size=(k, n_seeds)) if n_seeds > 1 else np.zeros((k, 1), int)
        p = rng.integers(0, n_problems, size=(k, n_problems))
        # mean over the grid = mean over drawn seeds of that seed's mean over drawn problems
        per_seed = diff[:, p].mean(axis=2)  # (n_seeds, k): each seed on the drawn problems
        means[start : start + k] = np.take_along_axis(per_seed.T, s, axis=1).mean(axis=1)
    tail = 0.025
    low, high = np.quantile(means, [tail, 1 - tail])
    if n_seeds > 1:  # the per-seed differences' t interval, which few seeds need
        per_seed = diff.mean(axis=1)
        half = t975(n_seeds - 1) * per_seed.std(ddof=1) / np.sqrt(n_seeds)
        low, high = min(low, per_seed.mean() - half), max(high, per_seed.mean() + half)
    return Difference(names[0], names[1], float(diff.mean()), float(low), float(high),
                      n_seeds, n_problems, int(np.count_nonzero(diff)))  # fmt: skip
