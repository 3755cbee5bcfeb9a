"""The Rust core (``src/python.rs``). Call it through ``cera_rs.functional``."""


from torch import Tensor

TORCH_VERSION: str
"""The ``torch.__version__`` the extension was compiled against."""

def forward(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    activation: str,
    scaling: float,
    dropout: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Training forward: ``(delta, h)`` with ``h = x A^T`` flattened to ``(N, r)``."""

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
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dA, dB)``, each ``None`` unless asked for."""
