"""Weight-level spectra of a saved adapter directory: PEFT's LoRA/DoRA, or CeRA's
(``"peft_type": "CERA"``): ``adapter_config.json`` plus ``adapter_model.safetensors``.

Reads the factor tensors by key suffix, so it needs neither the base model nor PEFT's
model classes: ``<prefix>.<module>.lora_A.weight`` / ``.lora_B.weight`` (scaling
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA, ``alpha_pattern``
honoured), or ``.cera_A.weight`` / ``.cera_B.weight`` (scaling from the config).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from peft.utils.other import get_pattern_key
from safetensors import safe_open

from cera_rs.spectral.adapters import display_name
from cera_rs.spectral.core import lowrank_spectra
from cera_rs.spectral.report import ModelSpectrum, ModuleSpectrum

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _lora_scaling(config: dict[str, Any], module: str, r: int) -> float:
    alphas = config.get("alpha_pattern") or {}
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_dir_spectrum(path: str | os.PathLike) -> ModelSpectrum:
    """The exact spectrum of every adapted module's linear update in ``path``."""
    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an adapter directory: {name} is missing")
    config = json.loads((path / CONFIG).read_text())
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
    suffix_a, suffix_b = f".{prefix}_A.weight", f".{prefix}_B.weight"
    with safe_open(path / WEIGHTS, framework="pt") as f:
        keys = set(f.keys())
        modules = sorted(k.removesuffix(suffix_a) for k in keys if k.endswith(suffix_a))
        if not modules:
            raise ValueError(f"{path / WEIGHTS} holds no '*{suffix_a}' tensors")
        factors, ranks, names = [], [], []
        for module in modules:
            if module + suffix_b not in keys:
                raise ValueError(f"{path / WEIGHTS}: {module + suffix_a} has no {suffix_b}")
            a = f.get_tensor(module + suffix_a).double()
            b = f.get_tensor(module + suffix_b).double()
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            name, r = display_name(module), a.shape[0]
            scaling = (
                float(config.get("scaling", 1.0)) if method == "cera"
                else _lora_scaling(config, name, r)
            )  # fmt: skip
            factors.append((scaling * b, a))
            ranks.append(r)
            names.append(name)
    spectra = lowrank_spectra(factors, ranks)
    return ModelSpectrum([ModuleSpectrum(n, method, s) for n, s in zip(names, spectra)])
