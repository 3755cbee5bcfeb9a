"""cera_rs: CeRA (Capacity-enhanced Rank Adaptation) for PyTorch, with a Rust core.

``y = W0 x + scaling * B · Dropout(act(A x))``: a non-linear low-rank branch beside a
frozen layer. The branch's forward and backward run in Rust (``cera_rs._native``).
"""

import torch  # first: the extension links the libtorch that importing torch loads

from cera_rs._torch_check import load_native

_native = load_native()

from cera_rs.functional import cera_delta  # noqa: E402
from cera_rs.layer import CeraLinear  # noqa: E402

__all__ = ["CeraLinear", "cera_delta", "torch"]
__version__ = "0.1.0"
