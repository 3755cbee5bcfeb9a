"""The dtype and shape of each tensor in an adapter's weights file, read without loading
the tensors: what ``CeraConfig.from_pretrained`` checks before PEFT allocates anything.

Beneath ``config.py``: it imports nothing of ours.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

# safetensors' dtype names, as torch names them (the messages use torch's names).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}

Header = dict[str, tuple["torch.dtype | str", tuple[int, ...]]]


def read_weights_header(folder: Path) -> tuple[Path, Header]:
    """The weights file PEFT will load from ``folder`` (safetensors first, as PEFT) and
    the dtype and shape of each tensor in it, read without loading the tensors: the
    safetensors header, or a memory-mapped ``torch.load`` of a ``.bin`` file."""
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    if weights.is_file():
        try:
            with safe_open(weights, framework="pt") as f:
                header = {}
                for key in f.keys():
                    part = f.get_slice(key)
                    dtype = part.get_dtype()
                    header[key] = (_SAFETENSORS_DTYPES.get(dtype, dtype), tuple(part.get_shape()))
                return weights, header
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights} is not a valid safetensors file: {err}") from None
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"adapter folder {folder} has no {SAFETENSORS_WEIGHTS_NAME} (or {WEIGHTS_NAME})"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except (
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as err:
        raise ValueError(f"{weights} is not a state dict torch.load can read: {err}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{weights} must hold a dict from names to tensors")
    return weights, {key: (t.dtype, tuple(t.shape)) for key, t in state.items()}
