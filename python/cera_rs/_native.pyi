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
) -> tuple[Tensor, Tensor]:
    """Training forward: ``(delta, h)`` with ``h = x A^T`` flattened to ``(N, r)``
    (``(x ⊙ m) A^T`` with the dropout on the input)."""

def delta(x: Tensor, a: Tensor, b: Tensor, *, activation: str, scaling: float) -> Tensor:
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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each ``None`` unless asked for."""

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

    def __init__(self, dim: int, device: str = "cpu") -> None: ...
    @staticmethod
    def from_state(gram: Tensor, tokens: int) -> GramAccumulator: ...
    @property
    def dim(self) -> int: ...
    @property
    def tokens_seen(self) -> int: ...
    def update(self, x: Tensor) -> None: ...
    def merge(self, other: GramAccumulator) -> None: ...
    def state(self) -> tuple[Tensor, int]:
        """A copy of the full symmetric Gram matrix, and the row count."""
    def spectrum(self) -> Spectrum: ...

def spectrum(matrix: Tensor) -> Spectrum:
    """Singular values of a 2-D matrix, in float64."""

def lowrank_spectra(pairs: list[tuple[Tensor, Tensor]]) -> list[Spectrum]:
    """Spectra of ``B·A`` for each ``(B, A)``, from the factors, in parallel."""

def gram_spectra(grams: list[GramAccumulator]) -> list[Spectrum]:
    """Spectra of many accumulators, in parallel."""
