"""Import of checkpoints saved by the paper's reference implementation.

The reference wraps each adapted layer in a plain-PyTorch module: the frozen layer as
``original_layer`` and the branch as ``cera.A`` (d_in -> r) and ``cera.B`` (r -> d_out);
older files name them ``cera.down_proj`` and ``cera.up_proj``. Keys look like
``<module path>.cera.A.weight``.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel

from cera_rs.layer import CeraLinear

_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.cera\.(?P<part>A|B|down_proj|up_proj)\.weight$")
_PART = {"A": "A", "down_proj": "A", "B": "B", "up_proj": "B"}
_BASE_PREFIXES = ("base_model.model.", "module.", "model.")


def load_reference_checkpoint(
    model: PeftModel,
    checkpoint: Mapping[str, torch.Tensor] | str | os.PathLike,
    adapter_name: str = "default",
) -> list[str]:
    """Copies the reference's adapter weights into ``model``'s ``adapter_name`` adapter.

    ``checkpoint`` is a state dict or a file (``.safetensors``, or a ``torch.save``
    file, read with ``weights_only=True``). Base-layer weights (``original_layer``) are
    ignored: the model already has its own. Returns the adapted module paths loaded.
    Raises ValueError naming the keys when the file holds adapters for modules the
    model does not adapt, misses some it does, or has shapes that do not fit.
    """
    state = _read(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    layers = {
        name: module for name, module in model.named_modules()
        if isinstance(module, CeraLinear) and adapter_name in module.cera_A
    }  # fmt: skip
    by_bare_name = {_bare(name): name for name in layers}
    found: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"checkpoint entries must map str keys to tensors, got {key!r}: "
                f"{type(tensor).__name__}"
            )
        match = _ADAPTER_KEY.match(key)
        if match is None:
            if ".original_layer." not in key:
                foreign.append(key)
            continue
        module = by_bare_name.get(_bare(match["module"]))
        if module is None:
            foreign.append(key)
            continue
        found.setdefault(module, {})[_PART[match["part"]]] = tensor
    if foreign:
        raise ValueError(
            f"checkpoint has {len(foreign)} keys that match no adapted module of the model, "
            f"e.g. {foreign[:3]}; adapted modules are e.g. {sorted(layers)[:3]}"
        )
    incomplete = sorted(set(layers) - {m for m, parts in found.items() if len(parts) == 2})
    if incomplete:
        raise ValueError(f"checkpoint lacks A and B weights for {len(incomplete)} adapted "
                         f"modules, e.g. {incomplete[:3]}")  # fmt: skip
    for name, parts in found.items():
        layer = layers[name]
        for part, target in (("A", layer.cera_A[adapter_name].weight),
                             ("B", layer.cera_B[adapter_name].weight)):  # fmt: skip
            if not parts[part].is_floating_point():
                raise ValueError(f"{name}: checkpoint's {part} holds {parts[part].dtype}, "
                                 "not floating-point weights")  # fmt: skip
            if tuple(parts[part].shape) != tuple(target.shape):
                raise ValueError(
                    f"{name}: checkpoint's {part} has shape {tuple(parts[part].shape)}, the "
                    f"model's adapter expects {tuple(target.shape)}"
                )
    with torch.no_grad():
        for name, parts in found.items():
            layers[name].cera_A[adapter_name].weight.copy_(parts["A"])
            layers[name].cera_B[adapter_name].weight.copy_(parts["B"])
    return sorted(found)


def _bare(path: str) -> str:
    """A module path without wrapper prefixes (PEFT's, DDP's, the causal-LM's ``model.``),
    so the reference's paths and the model's compare equal."""
    stripped = None
    while stripped != path:
        stripped = path
        for prefix in _BASE_PREFIXES:
            path = path.removeprefix(prefix)
    return path


def _read(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} is not a file")
    # Malformed files raise the reader's own types (SafetensorError, UnpicklingError,
    # EOFError, RuntimeError); they become a ValueError that names the file.
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(
            f"{path} is not a state dict that torch.load(weights_only=True) can read: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state
