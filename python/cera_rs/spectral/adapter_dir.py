"""Weight-level spectra of a saved adapter folder: PEFT's LoRA/DoRA, or CeRA's
(``"peft_type": "CERA"``): ``adapter_config.json`` plus the weights in either format
PEFT writes, ``adapter_model.safetensors`` or ``adapter_model.bin``.

Reads the factor tensors by key suffix, so it needs neither the base model nor PEFT's
model classes: ``<prefix>.<module>.lora_A.weight`` / ``.lora_B.weight`` (scaling
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA, ``alpha_pattern``
honoured; an embedding's ``.lora_embedding_A`` / ``.lora_embedding_B``), or
``.cera_A.weight`` / ``.cera_B.weight`` (scaling from the config). A convolution's
factors are its maps of flattened input patches (``cera_rs.spectral.adapters.conv_matrix``).
PEFT saves the adapters of a model with several beside each other: the default one in
the folder itself, each other one in a subfolder named after it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights
from peft.utils.other import get_pattern_key

from cera_rs.spectral.adapters import conv_matrix, display_name
from cera_rs.spectral.core import lowrank_spectra
from cera_rs.spectral.report import ModelSpectrum, ModuleSpectrum
from cera_rs.table import natural_key

CONFIG = "adapter_config.json"


def _lora_scaling(config: dict[str, Any], module: str, r: int) -> float:
    alphas = config.get("alpha_pattern") or {}
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_subfolders(path: str | os.PathLike) -> list[str]:
    """The subfolders of ``path`` that hold a saved adapter (PEFT's layout for a model
    with several), sorted."""
    path = Path(path)
    return sorted(p.name for p in path.iterdir() if (p / CONFIG).is_file())


def _check_folder(path: Path) -> Path:
    """The weights file of the adapter saved in ``path``; a clear error when ``path``
    is not such a folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{path} is a file; pass the folder that holds {CONFIG} and the weights"
        )
    if not (path / CONFIG).is_file():
        inner = adapter_subfolders(path)
        if len(inner) > 1:
            raise FileNotFoundError(
                f"{path} holds several adapters, in the subfolders {', '.join(inner)}; "
                f"pass one of them, e.g. {path / inner[0]}"
            )
        if inner:
            raise FileNotFoundError(
                f"{path} holds an adapter in the subfolder {inner[0]}; pass {path / inner[0]}"
            )
        raise FileNotFoundError(f"{path} is not an adapter folder: {CONFIG} is missing")
    for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(
        f"{path} holds no adapter weights: neither {SAFETENSORS_WEIGHTS_NAME} nor {WEIGHTS_NAME}"
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CONFIG} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG} holds a {type(config).__name__}, not a JSON object")
    return config


def _read_weights(weights: Path) -> dict[str, Any]:
    try:
        return load_peft_weights(str(weights.parent), device="cpu")
    except Exception as err:  # safetensors, pickle and zip each raise their own kind
        raise ValueError(f"{weights} cannot be read: {str(err).splitlines()[0]}") from err


def adapter_dir_spectrum(path: str | os.PathLike) -> ModelSpectrum:
    """The exact spectrum of every adapted module's linear update in ``path``."""
    path = Path(path)
    weights = _check_folder(path)
    config = _read_config(path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "CERA":
        prefix, method = "cera", "cera"
    elif peft_type == "LORA":
        prefix, method = "lora", "dora" if config.get("use_dora") else "lora"
    else:
        raise ValueError(
            f"{path / CONFIG}: peft_type {config.get('peft_type')!r} is not supported "
            "(expected LORA or CERA)"
        )
    tensors = _read_weights(weights)
    suffixes = [(f".{prefix}_A.weight", f".{prefix}_B.weight")]
    if prefix == "lora":  # PEFT's LoRA embeddings: lora_embedding_A (r, vocab), no .weight
        suffixes.append((".lora_embedding_A", ".lora_embedding_B"))
    found = [(k.removesuffix(sa), sa, sb) for k in tensors for sa, sb in suffixes if k.endswith(sa)]
    if not found:
        raise ValueError(f"{weights} holds no '*{suffixes[0][0]}' tensors")
    factors, ranks, names = [], [], []
    for module, suffix_a, suffix_b in sorted(found, key=lambda f: natural_key(f[0])):
        if module + suffix_b not in tensors:
            raise ValueError(f"{weights}: {module + suffix_a} has no {suffix_b}")
        a = tensors[module + suffix_a].double()
        b = tensors[module + suffix_b].double()
        if a.dim() > 2:  # a convolution: B's groups are r / its in channels; CeRA's A
            groups = a.shape[0] // max(b.shape[1], 1)  # has them too, PEFT LoRA's not
            b, a = conv_matrix(b, groups), conv_matrix(a, groups if method == "cera" else 1)
        name, r = display_name(module), a.shape[0]
        scaling = (
            float(config.get("scaling", 1.0))
            if method == "cera"
            else _lora_scaling(config, name, r)
        )
        factors.append((scaling * b, a))
        ranks.append(r)
        names.append(name)
    spectra = lowrank_spectra(factors, ranks)
    return ModelSpectrum([ModuleSpectrum(n, method, s) for n, s in zip(names, spectra)])
