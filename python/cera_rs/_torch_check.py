"""Loads the extension only next to the torch it was compiled against.

A wheel built for one libtorch fails on another with an unreadable undefined-symbol
error, or worse; this turns that into an ImportError naming both versions.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from types import ModuleType

import torch


def _base(version: str) -> str:
    """'2.11.0+cu130' -> '2.11.0': CPU and CUDA builds of one release share the ABI."""
    return version.split("+", 1)[0]


def _pinned_torch() -> str:
    try:
        requirements = metadata.requires("cera_rs") or []
    except metadata.PackageNotFoundError:
        return "the pinned version"
    for requirement in requirements:
        if requirement.replace(" ", "").startswith("torch=="):
            return requirement.split("==", 1)[1].strip()
    return "the pinned version"


def load_native() -> ModuleType:
    installed = torch.__version__
    try:
        native = importlib.import_module("cera_rs._native")
    except ImportError as err:
        raise ImportError(
            f"cera_rs could not load its extension with the installed torch {installed}; "
            f"it is built for torch {_pinned_torch()}. Install that torch or rebuild "
            f"cera_rs against this one. ({err})"
        ) from err
    built_for = native.TORCH_VERSION
    if _base(built_for) != _base(installed):
        raise ImportError(
            f"cera_rs was built for torch {built_for} but torch {installed} is installed; "
            f"install torch=={_base(built_for)} or rebuild cera_rs against this torch"
        )
    return native
