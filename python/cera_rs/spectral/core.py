"""Spectra of matrices: one-shot, from low-rank factors, and streamed over tokens.

The numerics run in Rust (``src/spectral``) in float64; this module adds input
conversion, the adapter rank a spectrum is reported against, and distributed state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from cera_rs import _native

ENERGY_TAUS = (0.90, 0.95, 0.99)
"""The energy-rank thresholds every report shows."""


def as_tensor(value: Any, what: str) -> Tensor:
    """``value`` as a tensor (a numpy array shares its memory); anything else is a
    TypeError naming ``what``: the input check the spectral and regression engines share."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{what} must be a torch.Tensor or a numpy array, got {type(value).__name__}")


def _check_rank(rank: Any) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int or None, got {rank!r}")
    return rank


class Spectrum:
    """Singular values of one matrix, largest first, and the rank metrics over them
    (each defined on its property below). ``rank`` is the adapter rank ``r`` the
    spectrum is judged against: ``tail_energy()`` defaults to it."""

    def __init__(self, native: _native.Spectrum, rank: int | None = None) -> None:
        self._native = native
        self.rank = _check_rank(rank)
        values = native.singular_values
        values.flags.writeable = False
        self._values = values

    @property
    def singular_values(self) -> np.ndarray:
        """float64, descending, read-only."""
        return self._values

    @property
    def effective_rank(self) -> float:
        """Roy & Vetterli: ``exp`` of the entropy of ``s_i / sum s_j``."""
        return self._native.effective_rank

    @property
    def stable_rank(self) -> float:
        """``sum s_i^2 / s_1^2``."""
        return self._native.stable_rank

    @property
    def participation_ratio(self) -> float:
        """``(sum s_i^2)^2 / sum s_i^4``."""
        return self._native.participation_ratio

    def energy_rank(self, tau: float) -> int:
        """Smallest ``k`` whose top ``k`` values hold at least ``tau`` of the energy."""
        return self._native.energy_rank(float(tau))

    def tail_energy(self, r: int | None = None) -> float:
        """Share of the energy beyond the first ``r`` values (default: ``self.rank``);
        zero for a linear rank-``r`` update."""
        r = self.rank if r is None else _check_rank(r)
        if r is None:
            raise ValueError("tail_energy needs r: pass it, or give the spectrum a rank")
        return self._native.tail_energy(r)

    def metrics(self) -> dict[str, Any]:
        """Every scalar metric, keyed as in reports."""
        out: dict[str, Any] = {
            "effective_rank": self.effective_rank,
            "stable_rank": self.stable_rank,
            "participation_ratio": self.participation_ratio,
        }
        for tau in ENERGY_TAUS:
            out[f"energy_rank_{round(tau * 100)}"] = self.energy_rank(tau)
        out["rank"] = self.rank
        out["tail_energy"] = None if self.rank is None else self.tail_energy()
        return out

    def to_dict(self) -> dict[str, Any]:
        """The metrics and the singular values, JSON-ready."""
        return {**self.metrics(), "singular_values": self._values.tolist()}

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return (
            f"Spectrum(n={len(self)}, effective_rank={self.effective_rank:.4g}, "
            f"stable_rank={self.stable_rank:.4g}, rank={self.rank})"
        )


def spectrum(matrix: Tensor | np.ndarray, rank: int | None = None) -> Spectrum:
    """The spectrum of a 2-D matrix (any real dtype; computed in float64)."""
    return Spectrum(_native.spectrum(as_tensor(matrix, "matrix")), rank)


def lowrank_spectra(
    factors: list[tuple[Tensor, Tensor]], ranks: list[int | None] | None = None
) -> list[Spectrum]:
    """Exact spectra of ``B·A`` for each ``(B, A)``, from the factors (QR of each and
    an ``r x r`` SVD, no ``d x d`` decomposition), many at once in parallel."""
    ranks = ranks if ranks is not None else [None] * len(factors)
    if len(ranks) != len(factors):
        raise ValueError(f"{len(factors)} factor pairs but {len(ranks)} ranks")
    pairs = [(as_tensor(b, "B"), as_tensor(a, "A")) for b, a in factors]
    return [Spectrum(s, r) for s, r in zip(_native.lowrank_spectra(pairs), ranks)]


def lowrank_spectrum(B: Tensor, A: Tensor, rank: int | None = None) -> Spectrum:
    """The exact spectrum of ``B·A`` from its factors; see ``lowrank_spectra``."""
    return lowrank_spectra([(B, A)], [rank])[0]


class StreamingSpectrum:
    """The spectrum of every row fed to ``update``, in memory that does not grow with
    the rows: a float64 ``dim x dim`` Gram matrix accumulates batch by batch.

    ``center=True`` gives the spectrum of the rows minus their mean (each column
    centred, as the CeRA authors' analysis does), exactly and in the same single pass:
    the column sums accumulate beside the Gram matrix.

    Accumulators over disjoint rows merge by summing Gram matrices (and column sums):
    ``merge`` in one process, ``state`` / ``load_state`` (or ``all_reduce``) across
    processes.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", center: bool = False) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}")
        if not isinstance(center, bool):
            raise TypeError(f"center must be a bool, got {type(center).__name__}")
        self._device = torch.device(device)
        self._native = _native.GramAccumulator(dim, str(self._device), center)

    @property
    def dim(self) -> int:
        return self._native.dim

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def center(self) -> bool:
        """Whether the spectrum is of the mean-centred rows."""
        return self._native.center

    @property
    def tokens_seen(self) -> int:
        return self._native.tokens_seen

    def update(self, rows: Tensor | np.ndarray) -> None:
        """Adds every row of ``rows`` (any leading shape, last dimension ``dim``).
        A rejected batch leaves the accumulated rows as they were."""
        rows = as_tensor(rows, "rows")
        if rows.is_nested:
            raise TypeError(
                "update takes a dense tensor of rows, not a nested tensor: "
                "pass torch.cat(rows.unbind()) of its components"
            )
        self._native.update(rows)

    def merge(self, other: StreamingSpectrum) -> None:
        """Adds the rows ``other`` has seen (``other`` is left as it is)."""
        if not isinstance(other, StreamingSpectrum):
            raise TypeError(f"can only merge a StreamingSpectrum, got {type(other).__name__}")
        self._native.merge(other._native)

    def spectrum(self, rank: int | None = None) -> Spectrum:
        return Spectrum(self._native.spectrum(), rank)

    def state(self) -> dict[str, Tensor]:
        """``{"gram": (dim, dim) float64, "tokens_seen": int64 scalar}``, and for a
        centred accumulator ``"column_sums": (dim,) float64``; copies on the
        accumulator's device: all of them sum under ``torch.distributed.all_reduce``."""
        gram, tokens, sums = self._native.state()
        state = {"gram": gram, "tokens_seen": torch.tensor(tokens, device=gram.device)}
        if sums is not None:
            state["column_sums"] = sums
        return state

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replaces the accumulated rows with ``state`` (e.g. an all-reduced one); a
        centred accumulator needs the state of a centred one."""
        gram, tokens = state["gram"], int(state["tokens_seen"])
        if tokens < 0:
            raise ValueError(f"tokens_seen must be >= 0, got {tokens}")
        if tuple(gram.shape) != (self.dim, self.dim):
            raise ValueError(f"gram must be ({self.dim}, {self.dim}), got {tuple(gram.shape)}")
        sums = state.get("column_sums")
        if (sums is not None) != self.center:
            raise ValueError(
                "a centred accumulator needs a state with column_sums, an uncentred one "
                f"a state without (center={self.center})"
            )
        if sums is not None:
            sums = sums.to(self._device)
        self._native = _native.GramAccumulator.from_state(gram.to(self._device), tokens, sums)

    def all_reduce(self, group: Any = None) -> None:
        """Sums the state over a ``torch.distributed`` process group, in place: after
        it every process holds the spectrum of all rows seen anywhere."""
        all_reduce_state(self, group)

    def __repr__(self) -> str:
        return (
            f"StreamingSpectrum(dim={self.dim}, tokens_seen={self.tokens_seen}, "
            f"center={self.center})"
        )


def all_reduce_state(accumulator: Any, group: Any = None) -> None:
    """Sums ``accumulator.state()`` (a dict of tensors that add) over a
    ``torch.distributed`` process group and loads the sum back, in place."""
    import torch.distributed as dist

    state = accumulator.state()
    for tensor in state.values():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    accumulator.load_state(state)
