"""Import of checkpoints saved by the CeRA authors' reference implementation.

Their code wraps each adapted linear layer in a plain-PyTorch module: the frozen layer
as ``original_layer``, the branch as ``cera.A`` (d_in -> r) and ``cera.B`` (r -> d_out).
Files from before their A/B rename call A ``up_proj`` and B ``down_proj``. Keys look
like ``model.layers.0.self_attn.q_proj.cera.A.weight``. Their training checkpoints are
``torch.save({"model_state_dict": {...}, "config": {...}, "step": ..., ...})``; plain
state dicts (``{key: tensor}``) are read too. A versioned config
(``cera_format_version`` 1 to 3) says how to rebuild the branch:

=============================  =====================================================
their config                   ``CeraConfig``
=============================  =====================================================
``rank``                       ``r``
``act_fn``                     ``activation``
``dropout``                    ``cera_dropout``
``cera_variant: legacy``       ``dropout_position="hidden"``, ``scaling=1``
``cera_variant: peft_aligned`` ``dropout_position="input"``, ``scaling=alpha / rank``
``target_modules: "q,v"``      ``target_modules=["q", "v"]``
``adapter_dtype``              the dtype the adapter weights are kept in
=============================  =====================================================

The variants' initialisations (Kaiming-normal or -uniform A) do not matter to an import:
the weights come from the file. What cera_rs does not implement is refused: recurrent
steps (format 3's experimental extension) and any other parameter under ``.cera.``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cera_rs.config import CeraConfig
from cera_rs.layer import CeraLinear

_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.cera\.(?P<part>A|B|up_proj|down_proj)\.weight$")
# Before their rename, A (d_in -> r) was ``up_proj`` and B (r -> d_out) ``down_proj``.
_PART = {"A": "A", "up_proj": "A", "B": "B", "down_proj": "B"}
_BASE_PREFIXES = ("base_model.model.", "module.", "model.")
_FORMAT_VERSIONS = (1, 2, 3)
_VARIANTS = {"legacy": "hidden", "peft_aligned": "input"}
# Their config's own name for each dropout position (format 2 and later).
_POSITION_NAMES = {"post_activation": "hidden", "input": "input"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ReferenceCheckpoint:
    """A reference checkpoint's adapter tensors and, when it has one, its config."""

    state: dict[str, torch.Tensor]
    """The adapter weights (and any ``original_layer`` weights), keyed as saved."""
    config: dict[str, Any] | None
    """The ``config`` the file was saved with; None for plain state dicts."""


def read_reference_checkpoint(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
) -> ReferenceCheckpoint:
    """Reads a reference checkpoint: a file (``.safetensors``, or a ``torch.save`` file
    read with ``weights_only=True``) or what ``torch.load`` returned, either the wrapped
    training checkpoint or a plain state dict. Raises ValueError for another method's
    checkpoint (LoRA, DoRA) or a file that is neither form, TypeError for entries that
    are not tensors."""
    loaded = _read(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    config = None
    if "model_state_dict" in loaded:
        method = loaded.get("model_type", "CeRA")
        if not isinstance(method, str) or method != "CeRA":
            raise ValueError(f"this is a {method!r} checkpoint of the reference, not a CeRA one")
        config = loaded.get("config")
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"the checkpoint's config is a {type(config).__name__}, not a dict")
        loaded = loaded["model_state_dict"]
        if not isinstance(loaded, Mapping):
            raise ValueError(
                f"the checkpoint's model_state_dict is a {type(loaded).__name__}, not a dict"
            )
    for key, tensor in loaded.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"checkpoint entries must map str keys to tensors, got {key!r}: "
                f"{type(tensor).__name__}"
            )
    return ReferenceCheckpoint(dict(loaded), None if config is None else dict(config))


def reference_config(
    checkpoint: ReferenceCheckpoint | Mapping[str, Any] | str | os.PathLike, **overrides: Any
) -> CeraConfig:
    """The ``CeraConfig`` that rebuilds a reference checkpoint's adapters: from its
    versioned config, or for files without one (plain state dicts, checkpoints from
    before the versioned format), rank and targets from the weights and the paper's
    branch (SiLU, dropout after it, scale 1). ``overrides`` are
    ``CeraConfig`` fields that replace what the file says (e.g. ``cera_dropout`` to
    train on with another rate). Raises ValueError for what cera_rs does not implement
    or a config that contradicts itself."""
    if not isinstance(checkpoint, ReferenceCheckpoint):
        checkpoint = read_reference_checkpoint(checkpoint)
    adapters = _adapter_weights(checkpoint.state)
    config = checkpoint.config or {}
    if "cera_format_version" in config:
        settings = _settings_from_config(config)
    else:
        settings = {"r": _rank_of_weights(adapters)}
    settings.setdefault("target_modules", sorted({m.rsplit(".", 1)[-1] for m in adapters}))
    return CeraConfig(**{**settings, **overrides})


def load_reference_model(
    model: nn.Module,
    checkpoint: ReferenceCheckpoint | Mapping[str, Any] | str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Wraps ``model`` (a fresh base model) with CeRA adapters built from the checkpoint's
    own config (``reference_config``) and loads its weights, kept in the file's adapter
    dtype: the ``PeftModel`` that ``PeftModel.from_pretrained`` would give for a saved
    cera_rs adapter, frozen and in eval mode unless ``is_trainable``."""
    from peft import get_peft_model

    if not isinstance(checkpoint, ReferenceCheckpoint):
        checkpoint = read_reference_checkpoint(checkpoint)
    config = reference_config(checkpoint, **overrides)
    # Checked before anything is allocated: a corrupted rank must not allocate r x d_in.
    ranks = _ranks_of_weights(_adapter_weights(checkpoint.state))
    if not config.rank_pattern and ranks - {config.r}:
        raise ValueError(f"the checkpoint's config says rank {config.r}, its A weights have "
                         f"rank {sorted(ranks)}")  # fmt: skip
    config.inference_mode = not is_trainable
    dtype = _adapter_dtype(checkpoint)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    load_reference_checkpoint(peft_model, checkpoint, adapter_name)
    for module in peft_model.modules():
        if isinstance(module, CeraLinear) and adapter_name in module.cera_A:
            module.cera_A[adapter_name].to(dtype)
            module.cera_B[adapter_name].to(dtype)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def load_reference_checkpoint(
    model: nn.Module,
    checkpoint: ReferenceCheckpoint | Mapping[str, Any] | str | os.PathLike,
    adapter_name: str = "default",
) -> list[str]:
    """Copies a reference checkpoint's adapter weights into ``model``'s existing
    ``adapter_name`` adapter (in the model's dtype); ``load_reference_model`` builds the
    adapters from the file instead. Base-layer weights (``original_layer``) are ignored:
    the model has its own. Returns the adapted module paths loaded. Raises ValueError
    naming the keys when the file holds adapters for modules the model does not adapt,
    misses some it does, has shapes that do not fit, or says (in its config) that its
    branch computes something else than the model's adapter; nothing is copied then."""
    if not isinstance(checkpoint, ReferenceCheckpoint):
        checkpoint = read_reference_checkpoint(checkpoint)
    config = checkpoint.config or {}
    wanted = _settings_from_config(config) if "cera_format_version" in config else None
    layers = {
        name: module for name, module in model.named_modules()
        if isinstance(module, CeraLinear) and adapter_name in module.cera_A
    }  # fmt: skip
    by_bare_name = {_bare(name): name for name in layers}
    found: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for module, parts in _adapter_weights(checkpoint.state).items():
        name = by_bare_name.get(_bare(module))
        if name is None:
            foreign.extend(f"{module}.cera.{part}.weight" for part in parts)
        else:
            found[name] = parts
    foreign.extend(key for key in checkpoint.state
                   if not _ADAPTER_KEY.match(key) and ".original_layer." not in key)  # fmt: skip
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
        if wanted is not None:
            _check_branch_matches(name, layer, adapter_name, wanted)
    with torch.no_grad():
        for name, parts in found.items():
            layers[name].cera_A[adapter_name].weight.copy_(parts["A"])
            layers[name].cera_B[adapter_name].weight.copy_(parts["B"])
    return sorted(found)


def _adapter_weights(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"A": tensor, "B": tensor}}`` from either key naming; refuses
    parameters of the reference's extensions (recurrent steps, mixing weights)."""
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, tensor in state.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            if ".cera." in key:
                unsupported.append(key)
            continue
        parts = adapters.setdefault(match["module"], {})
        part = _PART[match["part"]]
        if part in parts:
            raise ValueError(f"checkpoint holds {match['module']}'s {part} twice, under both "
                             f"key namings (A/B and up_proj/down_proj)")  # fmt: skip
        parts[part] = tensor
    if unsupported:
        raise ValueError(
            f"checkpoint holds parameters of a CeRA extension cera_rs does not implement, "
            f"e.g. {unsupported[:3]}; only the branch's A and B can be imported"
        )
    return adapters


def _settings_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``CeraConfig`` fields from a versioned reference config, checked as the
    reference checks its own files. Values come from a pickle: any type is possible."""
    version = config["cera_format_version"]
    if not _is_int(version) or version not in _FORMAT_VERSIONS:
        raise ValueError(f"cera_format_version {version!r} is not one cera_rs reads "
                         f"(it reads {_FORMAT_VERSIONS})")  # fmt: skip
    model_type = _optional_str(config, "model_type") or "CeRA"
    if model_type != "CeRA":
        raise ValueError(f"the checkpoint's model_type is {model_type!r}, not 'CeRA'")
    rank_mode = _optional_str(config, "rank_mode") or "fixed"
    if rank_mode != "fixed":
        raise ValueError(f"rank_mode {rank_mode!r} is not supported: cera_rs imports "
                         "fixed-rank checkpoints")  # fmt: skip
    steps = config.get("recurrent_steps")
    if steps is not None and (not _is_int(steps) or steps < 0):
        raise ValueError(f"recurrent_steps must be a non-negative int, got {steps!r}")
    if steps:
        raise ValueError(
            f"this checkpoint is recurrent CeRA (recurrent_steps={steps}), an experimental "
            "extension of the reference that cera_rs does not implement"
        )
    variant = _optional_str(config, "cera_variant") or "legacy"
    if variant not in _VARIANTS:
        raise ValueError(f"unknown cera_variant {variant!r}: cera_rs reads {sorted(_VARIANTS)}")
    position = _VARIANTS[variant]
    saved_position = _optional_str(config, "dropout_position")
    if saved_position is not None and _POSITION_NAMES.get(saved_position) != position:
        raise ValueError(f"the config's dropout_position {saved_position!r} contradicts its "
                         f"cera_variant {variant!r}")  # fmt: skip
    rank = _field(config, "rank", _is_int)
    if rank < 1:
        raise ValueError(f"the checkpoint's config has rank {rank}; a rank is >= 1")
    scaling = _scaling(config, variant, rank)
    targets = _field(config, "target_modules", lambda v: isinstance(v, (str, list, tuple)))
    if isinstance(targets, str):
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    dtype = _optional_str(config, "adapter_dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"adapter_dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return {
        "r": rank,
        "activation": _field(config, "act_fn", lambda v: isinstance(v, str)),
        "cera_dropout": _field(config, "dropout", _is_number),
        "dropout_position": position,
        "scaling": scaling,
        "target_modules": list(targets),
    }


def _scaling(config: Mapping[str, Any], variant: str, rank: int) -> float:
    """Legacy branches have no scale; aligned ones scale by alpha / rank (alpha = rank
    when the file has none, as the reference does)."""
    scale = config.get("scale")
    if scale is not None and not _is_number(scale):
        raise TypeError(f"the config's scale must be a finite number, got {scale!r}")
    if variant == "legacy":
        if scale is not None and scale != 1.0:
            raise ValueError(f"a legacy CeRA checkpoint has scale 1, this one says {scale}")
        return 1.0
    alpha = config.get("alpha")
    if alpha is None:
        return float(scale) if scale is not None else 1.0
    if not _is_number(alpha):
        raise TypeError(f"the config's alpha must be a finite number, got {alpha!r}")
    try:
        scaling = float(alpha) / rank
    except OverflowError:  # a rank beyond float's range
        raise ValueError(f"the config's rank {rank} is out of range") from None
    if scale is not None and not math.isclose(scale, scaling, rel_tol=1e-12):
        raise ValueError(f"the config's scale {scale} is not alpha / rank = {alpha} / {rank}")
    return scaling


def _check_branch_matches(
    name: str, layer: CeraLinear, adapter_name: str, wanted: Mapping[str, Any]
) -> None:
    """The model's adapter must compute (in eval mode) what the file's branch computed."""
    activation, scaling = layer.activation[adapter_name], layer.scaling[adapter_name]
    for key, have, same in (
        ("activation", activation, activation == wanted["activation"]),
        ("scaling", scaling, math.isclose(scaling, wanted["scaling"])),
    ):
        if not same:
            raise ValueError(
                f"{name}: the checkpoint's branch has {key}={wanted[key]!r}, the model's "
                f"adapter {have!r}; load_reference_model builds the adapters from the file"
            )


def _adapter_dtype(checkpoint: ReferenceCheckpoint) -> torch.dtype:
    """The versioned config's adapter_dtype (checked by ``reference_config``), or else
    the dtype the weights were saved in."""
    config = checkpoint.config or {}
    name = config.get("adapter_dtype") if "cera_format_version" in config else None
    if name is not None:
        return _DTYPES[name]
    dtypes = {parts[p].dtype for parts in _adapter_weights(checkpoint.state).values()
              for p in parts}  # fmt: skip
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        found = sorted(map(str, dtypes))
        raise ValueError(f"the checkpoint's adapter weights have dtypes {found}; expected "
                         "one floating-point dtype")  # fmt: skip
    return dtypes.pop()


def _ranks_of_weights(adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> set[int]:
    return {parts["A"].shape[0] for parts in adapters.values()
            if "A" in parts and parts["A"].dim() == 2}  # fmt: skip


def _rank_of_weights(adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    ranks = _ranks_of_weights(adapters)
    if len(ranks) != 1:
        found = sorted(ranks) if ranks else "none"
        raise ValueError(f"cannot tell the rank from the checkpoint's A weights (ranks: {found}); "
                         "pass r=...")  # fmt: skip
    return ranks.pop()


def _field(config: Mapping[str, Any], key: str, ok) -> Any:
    if key not in config:
        raise ValueError(f"the checkpoint's config has no {key!r}")
    value = config[key]
    if not ok(value):
        raise TypeError(f"the checkpoint's config has {key}={value!r} of the wrong type")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool), within float range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _optional_str(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"the checkpoint's config has {key}={value!r}, not a string")
    return value


def _bare(path: str) -> str:
    """A module path without wrapper prefixes (PEFT's, DDP's, the causal-LM's ``model.``),
    so the reference's paths and the model's compare equal."""
    stripped = None
    while stripped != path:
        stripped = path
        for prefix in _BASE_PREFIXES:
            path = path.removeprefix(prefix)
    return path


def _read(path: str | os.PathLike) -> Mapping[str, Any]:
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
