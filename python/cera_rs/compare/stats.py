"""How sure a comparison can be: the Wilson interval of one method's exact match, and
the paired bootstrap of the difference between two methods over (seed, problem).

Both methods answer the same test problems after training on the same data order
from the same adapter-init seed, so their answers are paired. The bootstrap resamples
seeds and problems independently (a crossed design): the interval holds both the
spread from which problems were drawn and the spread from training's randomness,
which a single seed cannot show. With one seed only problems are resampled, and the
verdict says the seed-to-seed spread was not measured."""

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
        if self.low > 0:
            return BETTER
        if self.high < 0:
            return WORSE
        return TIE

    def sentence(self) -> str:
        size = (f"{self.seeds} seed{'s' if self.seeds > 1 else ''} x {self.problems} test "
                "problems")  # fmt: skip
        interval = (f"{100 * self.mean:+.1f} points (95 % bootstrap interval "
                    f"{100 * self.low:+.1f} to {100 * self.high:+.1f}; {size})")  # fmt: skip
        if self.verdict == TIE:
            text = (f"{self.method} and {self.reference} are not distinguishable at this "
                    f"size: {interval}")
        else:
            text = f"{self.method} is {self.verdict} than {self.reference}: {interval}"
        if self.seeds == 1:
            text += "; one seed, so training's own spread is not in the interval"
        return text + "."


def paired_bootstrap(method: np.ndarray, reference: np.ndarray, names: tuple[str, str],
                     resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> Difference:  # fmt: skip
    """The difference of two (seeds, problems) arrays of right/wrong answers, with a
    percentile interval from ``resamples`` crossed resamplings of seeds and
    problems. Deterministic for a given ``seed``."""
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
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Difference(names[0], names[1], float(diff.mean()), float(low), float(high),
                      n_seeds, n_problems, int(np.count_nonzero(diff)))  # fmt: skip
