"""Loads the build of the extension that matches the installed torch.

libtorch's C++ API makes no ABI promise across minor releases, so the wheel carries one
build of ``_native`` per torch minor (``_native_builds/torch-2.N/``), each compiled
against that minor's headers and libraries, and loads the one for the torch that is
imported. A build from source (``maturin develop``, an sdist) has a single ``_native``
beside this file, built for the torch it was compiled with. Any other torch gets an
ImportError naming the versions, never an undefined-symbol error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

NAME = "cera_rs._native"
BUILDS = Path(__file__).with_name("_native_builds")


def torch_minor(version: str) -> str:
    """'2.15.1+cu130' -> '2.15': the releases of one minor share libtorch's ABI."""
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def _minor_key(minor: str) -> tuple[int, ...]:
    return tuple(int(part) for part in minor.split("."))


def builds_in(builds: Path) -> dict[str, Path]:
    """The extension files of a wheel's builds, by the torch minor each is for."""
    found = {}
    for folder in builds.glob("torch-*"):
        files = sorted(folder.glob("_native*.so"))
        if files:
            found[folder.name.removeprefix("torch-")] = files[0]
    return dict(sorted(found.items(), key=lambda item: _minor_key(item[0])))


def select_build(builds: Path, torch_version: str) -> Path:
    """The build for ``torch_version``'s minor, or an ImportError naming what exists."""
    available = builds_in(builds)
    minor = torch_minor(torch_version)
    if minor in available:
        return available[minor]
    if not available:
        raise ImportError(f"cera_rs's wheel has no build of its extension in {builds}")
    first, last = next(iter(available)), list(available)[-1]
    major, last_minor = _minor_key(last)[:2]
    raise ImportError(
        f"cera_rs supports torch {first} to {last} (one build per minor: "
        f"{', '.join(available)}), but torch {torch_version} is installed; install a "
        f"supported torch: pip install 'torch>={first},<{major}.{last_minor + 1}'"
    )


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(NAME, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    return module


def load_native() -> ModuleType:
    installed = torch.__version__
    if BUILDS.is_dir():
        native = _load_file(select_build(BUILDS, installed))
    else:
        try:
            native = importlib.import_module(NAME)
        except ImportError as err:
            raise ImportError(
                f"cera_rs could not load its extension with the installed torch "
                f"{installed}; rebuild cera_rs against this torch. ({err})"
            ) from err
    built_for = native.TORCH_VERSION
    if torch_minor(built_for) != torch_minor(installed):
        raise ImportError(
            f"cera_rs was built for torch {built_for} but torch {installed} is installed; "
            f"install torch=={built_for.split('+', 1)[0]} or rebuild cera_rs against this "
            f"torch"
        )
    return native
