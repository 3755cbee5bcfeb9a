"""What every method of a comparison shares: steps, batch, the rate grid, what else is
tuned, the selection seed and the reported seeds, and how far ``--resolve`` narrows the
intervals. Checked when made, before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

TUNE_WORDS = ("dropout", "scale")
"""What ``--tune`` names: each family's field for it is in ``methods.PRESETS``."""


@dataclass
class Settings:
    """What every method shares. The rate grid is per method (a method folder's own
    rate joins it); a grid wide enough that no chosen rate sits at its edge is part of
    a fair comparison, and the report says where one does."""

    steps: int = 200
    batch: int = 16
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    seeds: tuple[int, ...] = (1, 2, 3)  # the reported runs'
    select_seed: int | None = None  # the runs that choose (default: below the seeds, or above)
    tune: tuple[str, ...] = ()  # --tune: words of PRESETS tuned for every method
    adapted_layers: int | None = None
    max_seq_length: int | None = None
    reference: str | None = None  # default: the first method
    device: str = "auto"
    resamples: int = 10_000
    resolve: float | None = None  # points: add seeds until every interval is within +-resolve
    max_seeds: int | None = None  # with resolve: the most seeds, the first ones included

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "resamples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lrs or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in self.lrs
        ):
            raise ValueError(f"lrs must be positive learning rates, got {self.lrs!r}")
        if (
            not self.seeds
            or len(set(self.seeds)) != len(self.seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in self.seeds)
        ):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds!r}")
        if self.select_seed is None:  # the one below the seeds, or above them from 0
            below = min(self.seeds) - 1
            self.select_seed = below if below >= 0 else max(self.seeds) + 1
        if not isinstance(self.select_seed, int) or self.select_seed in self.seeds:
            raise ValueError(
                f"select_seed (--select-seed) {self.select_seed!r} must be an integer "
                f"not among the reported seeds {tuple(self.seeds)}: the runs that choose "
                "the rate are not reported"
            )
        unknown = [w for w in self.tune if w not in TUNE_WORDS]
        if unknown or len(set(self.tune)) != len(self.tune):
            raise ValueError(
                f"tune (--tune) takes {', '.join(TUNE_WORDS)}, each once; got {','.join(self.tune)}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self._check_resolve()
        self.lrs, self.seeds, self.tune = tuple(self.lrs), tuple(self.seeds), tuple(self.tune)

    def _check_resolve(self) -> None:
        if self.resolve is None and self.max_seeds is None:
            return
        if self.resolve is None or self.max_seeds is None:
            raise ValueError(
                "resolve (--resolve D) and max_seeds (--max-seeds S) go together: "
                "the half-width to reach, in points, and the most seeds to run"
            )
        if (
            isinstance(self.resolve, bool)
            or not isinstance(self.resolve, (int, float))
            or not self.resolve > 0
        ):
            raise ValueError(
                f"resolve (--resolve) must be a positive number of points, got {self.resolve!r}"
            )
        if not isinstance(self.max_seeds, int) or self.max_seeds <= len(self.seeds):
            raise ValueError(
                f"max_seeds (--max-seeds) {self.max_seeds!r} is not above the "
                f"{len(self.seeds)} first seeds (--seeds), so resolve could add "
                "none"
            )

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no CUDA device")
        return torch.device(self.device)

    def shared(self) -> dict[str, Any]:
        """What a run's result depends on (not the grid, seeds or reference: a run is a
        rate and a seed of its own)."""
        return {
            "steps": self.steps,
            "batch": self.batch,
            "adapted_layers": self.adapted_layers,
            "max_seq_length": self.max_seq_length,
        }
