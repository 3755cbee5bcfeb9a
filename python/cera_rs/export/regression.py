"""Streaming linear regression of an adapter's output delta ``y`` on its input ``x``:
the moments accumulate in Rust (``src/export``) in float64, in memory that does not
grow with the tokens, and one solve gives the best linear map of every rank.

``linearity[k] = 1 - E||y - W_k x||^2 / E||y||^2``: the share of the delta's energy
that the best rank-``k`` linear map reproduces. What a rank-``k`` map cannot reach is
either beyond rank ``k`` or non-linear in ``x``; at full rank it is the non-linear part.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cera_rs import _native
from cera_rs.spectral.core import Spectrum, all_reduce_state, as_tensor

STATE_KEYS = ("xx", "yx", "sum_x", "sum_y", "sum_yy")


def check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)):
        raise TypeError(f"ridge must be a float, got {type(ridge).__name__} {ridge!r}")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be finite and >= 0, got {ridge}")
    return float(ridge)


class LinearFit:
    """One layer's solution: ``W*`` (full rank), ``linearity`` for ``k = 0 ..
    min(d_in, d_out)`` and the rank-``k`` map as LoRA factors."""

    def __init__(self, native: _native.RegressionFit) -> None:
        self._native = native
        values = native.linearity
        values.flags.writeable = False
        self._linearity = values

    @property
    def linearity(self) -> np.ndarray:
        """float64, read-only; index ``k`` is rank ``k``."""
        return self._linearity

    @property
    def weight(self) -> Tensor:
        """``W*``, ``(d_out, d_in)``, float64."""
        return self._native.weight

    @property
    def tokens(self) -> int:
        return self._native.tokens

    @property
    def mean_square(self) -> float:
        """``E||y||^2`` per token: the energy linearity is a share of."""
        return self._native.mean_square

    @property
    def max_rank(self) -> int:
        return len(self._linearity) - 1

    def fitted_spectrum(self) -> Spectrum:
        """Singular values (per token) of the fitted outputs ``W* x``."""
        return Spectrum(self._native.fitted_spectrum())

    def energy_rank(self, energy: float) -> int:
        """The smallest rank (at least 1) whose map keeps ``energy`` of the fitted
        outputs' energy ``E||W* x||^2``."""
        return max(1, self.fitted_spectrum().energy_rank(energy))

    def linearity_on(self, held_out: StreamingRegression) -> np.ndarray:
        """The linearity of every rank's map on the tokens ``held_out`` has seen (e.g.
        a held-out split), index ``k`` rank ``k``. The calibration's own ``linearity``
        flatters the fit unless the tokens are many times ``d_in``; this does not. It
        can be negative: a map worse than none."""
        if not isinstance(held_out, StreamingRegression):
            raise TypeError(
                f"held_out must be a StreamingRegression, got {type(held_out).__name__}"
            )
        return self._native.linearity_on(held_out._native)

    def factors(self, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(B, A, bias)`` in float64: ``B A`` is the best rank-``k`` map, ``B``
        ``(d_out, k)`` and ``A`` ``(k, d_in)`` balanced; ``bias`` is None unless the
        fit has one."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__} {k!r}")
        if not 1 <= k <= self.max_rank:
            raise ValueError(f"k must be in 1..{self.max_rank} (min(d_in, d_out)), got {k}")
        return self._native.factors(k)

    def __repr__(self) -> str:
        return f"LinearFit(tokens={self.tokens}, full_rank_linearity={self._linearity[-1]:.4g})"


class StreamingRegression:
    """Moments of ``(x, y)`` token pairs fed to ``update``, in float64: ``sum x x^T``,
    ``sum y x^T``, the column sums and ``sum ||y||^2``; ``d_in^2 + d_out d_in`` doubles
    however many tokens go through.

    Accumulators over disjoint tokens merge by summation: ``merge`` in one process,
    ``state`` / ``load_state`` (or ``all_reduce``) across processes.
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device | str = "cpu") -> None:
        for name, value in (("d_in", d_in), ("d_out", d_out)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        self._device = torch.device(device)
        self._native = _native.RegressionAccumulator(d_in, d_out, str(self._device))

    @property
    def d_in(self) -> int:
        return self._native.d_in

    @property
    def d_out(self) -> int:
        return self._native.d_out

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokens_seen(self) -> int:
        return self._native.tokens_seen

    def update(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> None:
        """Adds the token pairs of ``x`` ``(..., d_in)`` and ``y`` ``(..., d_out)``
        (same leading shape). A rejected batch leaves the state as it was."""
        self._native.update(as_tensor(x, "x"), as_tensor(y, "y"))

    def merge(self, other: StreamingRegression) -> None:
        """Adds the tokens ``other`` has seen (``other`` is left as it is)."""
        if not isinstance(other, StreamingRegression):
            raise TypeError(f"can only merge a StreamingRegression, got {type(other).__name__}")
        self._native.merge(other._native)

    def solve(self, ridge: float = 0.0, bias: bool = False) -> LinearFit:
        """Least squares and every rank's reduced-rank regression; see ``solve_all``."""
        return solve_all([self], ridge=ridge, bias=bias)[0]

    def state(self) -> dict[str, Tensor]:
        """Copies of the sums (float64, full ``xx``) and ``tokens_seen`` (int64), on the
        accumulator's device: all of them sum under ``torch.distributed.all_reduce``."""
        *sums, tokens = self._native.state()
        state = dict(zip(STATE_KEYS, sums))
        state["tokens_seen"] = torch.tensor(tokens, device=sums[0].device)
        return state

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replaces the accumulated tokens with ``state`` (e.g. an all-reduced one)."""
        missing = [k for k in (*STATE_KEYS, "tokens_seen") if k not in state]
        if missing:
            raise KeyError(f"state lacks {missing}")
        tokens = int(state["tokens_seen"])
        if tokens < 0:
            raise ValueError(f"tokens_seen must be >= 0, got {tokens}")
        if tuple(state["xx"].shape) != (self.d_in, self.d_in) or tuple(state["yx"].shape) != (
            self.d_out,
            self.d_in,
        ):
            raise ValueError(
                f"xx must be ({self.d_in}, {self.d_in}) and yx ({self.d_out}, {self.d_in}), got "
                f"{tuple(state['xx'].shape)} and {tuple(state['yx'].shape)}"
            )
        sums = [state[k].to(self._device) for k in STATE_KEYS]
        self._native = _native.RegressionAccumulator.from_state(*sums, tokens)

    def all_reduce(self, group: Any = None) -> None:
        """Sums the state over a ``torch.distributed`` process group, in place: after
        it every process holds the moments of all tokens seen anywhere."""
        all_reduce_state(self, group)

    def __repr__(self) -> str:
        return (
            f"StreamingRegression(d_in={self.d_in}, d_out={self.d_out}, "
            f"tokens_seen={self.tokens_seen})"
        )


def solve_all(
    regressions: list[StreamingRegression], ridge: float = 0.0, bias: bool = False
) -> list[LinearFit]:
    """Solves many accumulators at once, in parallel.

    ``ridge = 0``: least squares, the minimum-norm solution when ``sum x x^T`` is
    singular (a pseudo-inverse); ``ridge > 0`` adds ``ridge`` times the mean
    eigenvalue of ``E[x x^T]`` to its diagonal (scale-free). ``bias`` fits
    ``y ~ W x + b``. The rank-``k`` maps are reduced-rank regression: ``W*``
    projected onto the top ``k`` eigenvectors of the fitted outputs' second moment.
    """
    ridge = check_ridge(ridge)
    natives = [r._native for r in regressions]
    return [LinearFit(f) for f in _native.solve_regressions(natives, ridge=ridge, bias=bool(bias))]
