"""cera_rs: CeRA (Capacity-enhanced Rank Adaptation) for PyTorch, with a Rust core.

``y = W0 x + scaling * B · Dropout(act(A x))``: a non-linear low-rank branch beside a
frozen layer. The branch's forward and backward run in Rust (``cera_rs._native``).
Swap ``peft.LoraConfig`` for ``CeraConfig`` and keep the rest of a PEFT script.
"""

import torch  # noqa: F401  (first: the extension links the libtorch that importing torch loads)

from cera_rs._native_loader import load_native

_native = load_native()
DeviceError = _native.DeviceError  # tensors on unusable or mismatched devices (a ValueError)

from cera_rs import diffusion, registration  # noqa: E402
from cera_rs.config import CeraConfig  # noqa: E402
from cera_rs.functional import cera_delta, mapped_delta  # noqa: E402
from cera_rs.layer import CeraConv, CeraEmbedding, CeraLayer, CeraLinear, CeraMergeError  # noqa: E402
from cera_rs.model import CeraModel, get_cera_model, save_pretrained  # noqa: E402
from cera_rs.reference import (  # noqa: E402
    load_reference_checkpoint,
    load_reference_model,
    reference_config,
)

registration.register()
diffusion.install()  # guards diffusers' LoRA file API against CeRA adapters, once it is imported

__all__ = [
    "CeraConfig",
    "CeraConv",
    "CeraEmbedding",
    "CeraLayer",
    "CeraLinear",
    "CeraMergeError",
    "CeraModel",
    "DeviceError",
    "LinearityCallback",
    "SpectralCallback",
    "cera_delta",
    "get_cera_model",
    "mapped_delta",
    "load_reference_checkpoint",
    "load_reference_model",
    "reference_config",
    "save_pretrained",
]
__version__ = "0.1.0"

# The Trainer callbacks, imported on first use: they import transformers' Trainer
# machinery, which imports peft, and importing peft can import cera_rs (the wheel's hook
# registers CeRA with peft then): importing them here would make that a cycle.
_ON_FIRST_USE = {
    "LinearityCallback": "cera_rs.export.callback",
    "SpectralCallback": "cera_rs.spectral.callback",
}


def __getattr__(name: str):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'cera_rs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))
