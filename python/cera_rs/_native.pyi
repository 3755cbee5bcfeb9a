"""The Rust core (``src/python.rs``). Call it through ``cera_rs.functional``."""

import numpy as np
import numpy.typing as npt
from torch import Tensor

TORCH_VERSION: str
"""The ``torch.__version__`` the extension was compiled against."""

class DeviceError(ValueError):
    """Tensors on a device cera_rs cannot use, or on different devices."""

def forward(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    activation: str,
    scaling: float,
    dropout: float,
    seed: int,
    dropout_position: str = "hidden",
    tensor_ops: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Training forward: ``(delta, h, keep)`` with ``h = x A^T`` flattened to ``(N, r)``
    (``(x ⊙ m) A^T`` with the dropout on the input) and ``keep`` the bool ``(N, r)``
    hidden dropout mask the tensor-op path built (``None`` on the CPU loops, without
    dropout or with it on the input). ``tensor_ops=True`` takes the tensor-op path
    (every non-CPU device's) on CPU too: for tests."""

def delta(
    x: Tensor, a: Tensor, b: Tensor, *, activation: str, scaling: float, tensor_ops: bool = False
) -> Tensor:
    """Inference forward: the delta alone, without dropout."""

def backward(
    grad: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    h: Tensor,
    *,
    activation: str,
    scaling: float,
    dropout: float,
    seed: int,
    needs_x: bool,
    needs_a: bool,
    needs_b: bool,
    dropout_position: str = "hidden",
    keep: Tensor | None = None,
    tensor_ops: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each ``None`` unless asked for. ``keep``: forward's mask, which
    also selects the tensor-op path; without it that path builds the mask again."""

def elementwise_forward(
    h: Tensor,
    *,
    activation: str,
    scaling: float,
    dropout: float,
    seed: int,
    tensor_ops: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The fused pass alone: ``(scaling * mask * act(h), keep)`` for ``h`` of any shape
    (the mask over its flat element order), ``keep`` the tensor-op path's bool mask."""

def elementwise_backward(
    h: Tensor,
    gb: Tensor,
    *,
    activation: str,
    scaling: float,
    dropout: float,
    seed: int,
    keep: Tensor | None = None,
    tensor_ops: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(scaling * mask * act(h), scaling * mask * act'(h) * gb)``, the mask hashed again
    from the seed (or ``keep``, forward's)."""

# Spectral analysis (``src/spectral``). Call it through ``cera_rs.spectral``.

class Spectrum:
    """Singular values (descending) and the rank metrics over them."""

    @property
    def singular_values(self) -> npt.NDArray[np.float64]: ...
    @property
    def effective_rank(self) -> float: ...
    @property
    def stable_rank(self) -> float: ...
    @property
    def participation_ratio(self) -> float: ...
    def energy_rank(self, tau: float) -> int: ...
    def tail_energy(self, r: int) -> float: ...
    def __len__(self) -> int: ...

class GramAccumulator:
    """Streaming float64 Gram matrix of rows seen batch by batch; thread-safe."""

    def __init__(self, dim: int, device: str = "cpu", center: bool = False) -> None: ...
    @staticmethod
    def from_state(
        gram: Tensor, tokens: int, column_sums: Tensor | None = None
    ) -> GramAccumulator: ...
    @property
    def center(self) -> bool: ...
    @property
    def dim(self) -> int: ...
    @property
    def tokens_seen(self) -> int: ...
    def update(self, x: Tensor) -> None: ...
    def merge(self, other: GramAccumulator) -> None: ...
    def state(self) -> tuple[Tensor, int, Tensor | None]:
        """Copies of the full symmetric Gram matrix, the row count, and the column
        sums of a centred accumulator (else None)."""
    def spectrum(self) -> Spectrum: ...

def spectrum(matrix: Tensor) -> Spectrum:
    """Singular values of a 2-D matrix, in float64."""

def lowrank_spectra(pairs: list[tuple[Tensor, Tensor]]) -> list[Spectrum]:
    """Spectra of ``B·A`` for each ``(B, A)``, from the factors, in parallel."""

def gram_spectra(grams: list[GramAccumulator]) -> list[Spectrum]:
    """Spectra of many accumulators, in parallel."""

# Linear export (``src/export``). Call it through ``cera_rs.export``.

class RegressionAccumulator:
    """Streaming float64 moments of ``(x, y)`` token pairs; thread-safe."""

    def __init__(self, d_in: int, d_out: int, device: str = "cpu") -> None: ...
    @staticmethod
    def from_state(
        xx: Tensor, yx: Tensor, sum_x: Tensor, sum_y: Tensor, sum_yy: Tensor, tokens: int
    ) -> RegressionAccumulator: ...
    @property
    def d_in(self) -> int: ...
    @property
    def d_out(self) -> int: ...
    @property
    def tokens_seen(self) -> int: ...
    def update(self, x: Tensor, y: Tensor) -> None: ...
    def merge(self, other: RegressionAccumulator) -> None: ...
    def state(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        """Copies of ``(sum x x^T, sum y x^T, sum x, sum y, sum ||y||^2)`` and the token count."""

class RegressionFit:
    """One layer's least-squares map ``W*`` and the linearity of every rank."""

    @property
    def weight(self) -> Tensor:
        """``W*``, ``(d_out, d_in)``, float64 (a copy)."""
    @property
    def linearity(self) -> npt.NDArray[np.float64]:
        """``1 - E||y - W_k x||^2 / E||y||^2`` for ``k = 0 .. min(d_in, d_out)``."""
    @property
    def mean_square(self) -> float: ...
    @property
    def tokens(self) -> int: ...
    def fitted_spectrum(self) -> Spectrum:
        """Singular values (per token) of the fitted outputs ``W* x``."""
    def linearity_on(self, held_out: RegressionAccumulator) -> npt.NDArray[np.float64]:
        """Every rank's linearity on the tokens of ``held_out``."""

    def factors(self, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(B, A, bias)``, float64, with ``B A`` the best rank-``k`` map."""

def solve_regressions(
    accumulators: list[RegressionAccumulator], *, ridge: float, bias: bool
) -> list[RegressionFit]:
    """Solves each accumulator's regression, in parallel."""
