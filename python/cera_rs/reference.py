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

Their ``train.py`` saves ``{"step", "data_count", "model_type", "model_state_dict",
"metrics"}`` with no config: its run settings (``act_fn``, ``dropout``,
``target_modules``) go only into the run's log, ``<model_type>_log.json``
(``{"config": {...}, "history": [...]}``) in the checkpoint's folder. Such a file is
read with that log; without one, nothing says which activation the adapters were trained
with, and the import refuses unless the caller passes ``activation=``. Files whose
adapters cover some layers only (their ``layer_indices``) are rebuilt with
``layers_to_transform``.
"""

from __future__ import annotations

import json
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

from cera_rs.config import ACTIVATIONS, CeraConfig
from cera_rs.layer import CeraLinear
from cera_rs.table import layer_index, name_matches

_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.cera\.(?P<part>A|B|up_proj|down_proj)\.weight$")
# Before their rename, A (d_in -> r) was ``up_proj`` and B (r -> d_out) ``down_proj``.
_PART = {"A": "A", "up_proj": "A", "B": "B", "down_proj": "B"}
_BASE_PREFIXES = ("base_model.model.", "module.", "model.")
_FORMAT_VERSIONS = (1, 2, 3)
_VARIANTS = {"legacy": "hidden", "peft_aligned": "input"}
# Their config's own name for each dropout position (format 2 and later).
_POSITION_NAMES = {"post_activation": "hidden", "input": "input"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_RUN_LOG = "{model_type}_log.json"
"""The run log the authors' trainer writes beside its checkpoints (``save_logs``)."""


@dataclass
class ReferenceCheckpoint:
    """A reference checkpoint's adapter tensors and, when it has one, its config."""

    state: dict[str, torch.Tensor]
    """The adapter weights (and any ``original_layer`` weights), keyed as saved."""
    config: dict[str, Any] | None
    """The ``config`` the file was saved with; None for plain state dicts."""
    run_config: dict[str, Any] | None = None
    """For a file without a config: the ``config`` of the run log beside it, if any."""
    origin: str = "the checkpoint"
    """What error messages call it: the file's path, or where its settings came from."""


def read_reference_checkpoint(
    checkpoint: Mapping[str, Any] | str | os.PathLike,
) -> ReferenceCheckpoint:
    """Reads a reference checkpoint: a file (``.safetensors``, or a ``torch.save`` file
    read with ``weights_only=True``) or what ``torch.load`` returned, either the wrapped
    training checkpoint or a plain state dict. A file without a config is read with the
    run log beside it (``CeRA_log.json``), when there is one. Raises ValueError for
    another method's checkpoint (LoRA, DoRA), a file that is neither form or an
    unreadable run log, TypeError for entries that are not tensors."""
    loaded = _read(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    config = None
    method = "CeRA"
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
    result = ReferenceCheckpoint(dict(loaded), None if config is None else dict(config))
    if not isinstance(checkpoint, Mapping):
        result.origin = str(checkpoint)
        if config is None:
            log = Path(checkpoint).parent / _RUN_LOG.format(model_type=method)
            if log.is_file():
                result.run_config, result.origin = _read_run_log(log), f"{checkpoint} (with {log})"
    return result


def reference_config(
    checkpoint: ReferenceCheckpoint | Mapping[str, Any] | str | os.PathLike, **overrides: Any
) -> CeraConfig:
    """The ``CeraConfig`` that rebuilds a reference checkpoint's adapters: from its
    versioned config; for files without one (their ``train.py``'s checkpoints, plain
    state dicts), the rank from the weights, the legacy branch (dropout after the
    activation, scale 1), and activation, dropout and targets from the file's
    unversioned config or else the run log beside the file (see the module doc).
    The targets default to the adapted modules' names, the dropout to 0.1; the layers
    the adapters sit on become ``layers_to_transform`` (``load_reference_model`` drops it
    when they are all of the model's layers). ``overrides`` are ``CeraConfig``
    fields that replace what the file says (e.g. ``cera_dropout`` to train on with
    another rate). Raises ValueError for what cera_rs does not implement, a config that
    contradicts itself or the weights, and a file that does not say its activation
    unless ``activation=`` is passed."""
    if not isinstance(checkpoint, ReferenceCheckpoint):
        checkpoint = read_reference_checkpoint(checkpoint)
    adapters = _adapter_weights(checkpoint.state)
    # Without a versioned config, the branch is the legacy one their train.py builds.
    legacy = {"dropout_position": "hidden", "scaling": 1.0}
    settings = {**legacy, **_file_settings(checkpoint, adapters)}
    if "activation" not in settings and "activation" not in overrides:
        raise ValueError(
            f"{checkpoint.origin} does not say which activation its adapters were trained "
            f"with: no config names act_fn, and no {_RUN_LOG.format(model_type='CeRA')} "
            "beside the file does (their train.py records --act_fn only in that run log); "
            f"pass activation= one of {', '.join(map(repr, ACTIVATIONS))}"
        )
    if "r" not in settings:
        settings["r"] = _rank_of_weights(adapters)
    names = sorted({m.rsplit(".", 1)[-1] for m in adapters})
    settings.setdefault("target_modules", names)
    layers = _layers_held(adapters)
    if layers is not None:
        settings["layers_to_transform"] = layers
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
    if "layers_to_transform" not in overrides and _covers_every_layer(model, config):
        config.layers_to_transform = None  # the file holds them all: a plain config
    # Checked before anything is allocated: a corrupted rank must not allocate r x d_in.
    ranks = _ranks_of_weights(_adapter_weights(checkpoint.state))
    if not config.rank_pattern and ranks - {config.r}:
        raise ValueError(
            f"the checkpoint's config says rank {config.r}, its A weights have rank {sorted(ranks)}"
        )
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
    wanted = _file_settings(checkpoint, _adapter_weights(checkpoint.state))
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, CeraLinear) and adapter_name in module.cera_A
    }
    by_bare_name = {_bare(name): name for name in layers}
    found: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for module, parts in _adapter_weights(checkpoint.state).items():
        name = by_bare_name.get(_bare(module))
        if name is None:
            foreign.extend(f"{module}.cera.{part}.weight" for part in parts)
        else:
            found[name] = parts
    foreign.extend(
        key
        for key in checkpoint.state
        if not _ADAPTER_KEY.match(key) and ".original_layer." not in key
    )
    if foreign:
        raise ValueError(
            f"checkpoint has {len(foreign)} keys that match no adapted module of the model, "
            f"e.g. {foreign[:3]}; adapted modules are e.g. {sorted(layers)[:3]}"
        )
    incomplete = sorted(set(layers) - {m for m, parts in found.items() if len(parts) == 2})
    if incomplete:
        held = sorted({layer_index(m) for m in found} - {None})
        hint = ""
        if held and not {layer_index(m) for m in incomplete} & set(held):
            hint = (
                f"; it holds adapters on layers {held} only: build the adapter with "
                f"layers_to_transform={held} (load_reference_model does)"
            )
        raise ValueError(
            f"checkpoint lacks A and B weights for {len(incomplete)} adapted "
            f"modules, e.g. {incomplete[:3]}{hint}"
        )
    for name, parts in found.items():
        layer = layers[name]
        for part, target in (
            ("A", layer.cera_A[adapter_name].weight),
            ("B", layer.cera_B[adapter_name].weight),
        ):
            if not parts[part].is_floating_point():
                raise ValueError(
                    f"{name}: checkpoint's {part} holds {parts[part].dtype}, "
                    "not floating-point weights"
                )
            if tuple(parts[part].shape) != tuple(target.shape):
                raise ValueError(
                    f"{name}: checkpoint's {part} has shape {tuple(parts[part].shape)}, the "
                    f"model's adapter expects {tuple(target.shape)}"
                )
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
            raise ValueError(
                f"checkpoint holds {match['module']}'s {part} twice, under both "
                f"key namings (A/B and up_proj/down_proj)"
            )
        parts[part] = tensor
    if unsupported:
        raise ValueError(
            f"checkpoint holds parameters of a CeRA extension cera_rs does not implement, "
            f"e.g. {unsupported[:3]}; only the branch's A and B can be imported"
        )
    return adapters


def _settings_from_config(config: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """``CeraConfig`` fields from a versioned reference config, checked as the
    reference checks its own files. Values come from a pickle: any type is possible."""
    version = config["cera_format_version"]
    if not _is_int(version) or version not in _FORMAT_VERSIONS:
        raise ValueError(
            f"cera_format_version {version!r} is not one cera_rs reads "
            f"(it reads {_FORMAT_VERSIONS})"
        )
    _check_plain_cera(config, origin)
    rank_mode = _optional_str(config, "rank_mode") or "fixed"
    if rank_mode != "fixed":
        raise ValueError(
            f"rank_mode {rank_mode!r} is not supported: cera_rs imports fixed-rank checkpoints"
        )
    variant = _optional_str(config, "cera_variant") or "legacy"
    if variant not in _VARIANTS:
        raise ValueError(f"unknown cera_variant {variant!r}: cera_rs reads {sorted(_VARIANTS)}")
    position = _VARIANTS[variant]
    saved_position = _optional_str(config, "dropout_position")
    if saved_position is not None and _POSITION_NAMES.get(saved_position) != position:
        raise ValueError(
            f"the config's dropout_position {saved_position!r} contradicts its "
            f"cera_variant {variant!r}"
        )
    rank = _field(config, "rank", _is_int)
    if rank < 1:
        raise ValueError(f"the checkpoint's config has rank {rank}; a rank is >= 1")
    scaling = _scaling(config, variant, rank)
    dtype = _optional_str(config, "adapter_dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"adapter_dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    branch = _branch_fields(config, required=True)
    return {"r": rank, "dropout_position": position, "scaling": scaling, **branch}


def _file_settings(
    checkpoint: ReferenceCheckpoint, adapters: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """The ``CeraConfig`` fields the file (or its run log) states: all of them from a
    versioned config; from an unversioned one (the file's, else the run log's) the
    activation, dropout and targets it names. A missing key: the file does not say."""
    config = checkpoint.config or {}
    if "cera_format_version" in config:
        return _settings_from_config(config, checkpoint.origin)
    run = config or checkpoint.run_config
    return _run_settings(run, checkpoint.origin, adapters) if run else {}


def _run_settings(
    config: Mapping[str, Any], origin: str, adapters: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, Any]:
    """Activation, dropout and targets from an unversioned run config (their
    ``train.py``'s: ``act_fn``, ``dropout``, ``target_modules`` as a comma-separated
    string), checked against the weights: a log of another run must not rebuild them.
    Their ``train.py`` builds the legacy branch only."""
    _check_plain_cera(config, origin)
    variant = _optional_str(config, "cera_variant") or "legacy"
    if variant != "legacy":
        raise ValueError(
            f"{origin}: an unversioned config with cera_variant {variant!r}: "
            "cera_rs reads that variant from versioned configs only"
        )
    settings = {
        "dropout_position": "hidden",
        "scaling": 1.0,
        **_branch_fields(config, required=False),
    }
    targets = settings.get("target_modules")
    held = {m.rsplit(".", 1)[-1] for m in adapters}
    if targets is not None and set(targets) != held:
        raise ValueError(
            f"{origin}: the run's target_modules {targets!r} are not the "
            f"modules its weights adapt ({sorted(held)})"
        )
    return settings


def _check_plain_cera(config: Mapping[str, Any], origin: str) -> None:
    """Refuses another method's config and recurrent CeRA (an experimental extension of
    the reference that cera_rs does not implement)."""
    model_type = _optional_str(config, "model_type") or "CeRA"
    if model_type != "CeRA":
        raise ValueError(f"{origin}: its model_type is {model_type!r}, not 'CeRA'")
    steps = config.get("recurrent_steps")
    if steps is not None and (not _is_int(steps) or steps < 0):
        raise ValueError(f"recurrent_steps must be a non-negative int, got {steps!r}")
    if steps:
        raise ValueError(
            f"this checkpoint is recurrent CeRA (recurrent_steps={steps}), an experimental "
            "extension of the reference that cera_rs does not implement"
        )


def _branch_fields(config: Mapping[str, Any], required: bool) -> dict[str, Any]:
    """``activation``, ``cera_dropout`` and ``target_modules`` from their ``act_fn``,
    ``dropout`` and ``target_modules`` (a list, or a comma-separated string); a missing
    one is an error if ``required``, else left out."""

    def names(value: Any) -> bool:
        return isinstance(value, str) or (
            isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value)
        )

    fields = (
        ("activation", "act_fn", lambda v: isinstance(v, str)),
        ("cera_dropout", "dropout", _is_number),
        ("target_modules", "target_modules", names),
    )
    settings = {
        name: _field(config, key, ok) for name, key, ok in fields if required or key in config
    }
    targets = settings.get("target_modules")
    if isinstance(targets, str):
        settings["target_modules"] = [name.strip() for name in targets.split(",") if name.strip()]
    elif targets is not None:
        settings["target_modules"] = list(targets)
    return settings


def _read_run_log(path: Path) -> dict[str, Any]:
    """The ``config`` of the authors' run log (``{"config": {...}, "history": [...]}``)."""
    try:
        log = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}, the checkpoint's run log, cannot be read: {err}") from None
    config = log.get("config") if isinstance(log, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"{path}, the checkpoint's run log, holds no 'config' object")
    return config


def _layers_held(adapters: Mapping[str, Any]) -> list[int] | None:
    """The layer indices of the adapted modules, when every module path has one and
    every such layer holds the same module names (what ``layers_to_transform`` can
    rebuild); None when a path has no layer index."""
    by_layer: dict[int, set[str]] = {}
    for module in adapters:
        index = layer_index(_bare(module))
        if index is None:
            return None
        by_layer.setdefault(index, set()).add(module.rsplit(".", 1)[-1])
    names = {frozenset(n) for n in by_layer.values()}
    if len(names) > 1:
        detail = "; ".join(
            f"layer {i}: {', '.join(sorted(names))}" for i, names in sorted(by_layer.items())
        )
        raise ValueError(
            f"the checkpoint adapts different modules on different layers "
            f"({detail}); cera_rs rebuilds one set of targets per layer"
        )
    return sorted(by_layer)


def _covers_every_layer(model: nn.Module, config: CeraConfig) -> bool:
    """Whether ``config.layers_to_transform`` names every layer of ``model`` that holds
    one of its targets (then the plain targets say the same)."""
    if config.layers_to_transform is None:
        return True
    targets = config.target_modules
    if isinstance(targets, str):
        return False
    found = {
        layer_index(name)
        for name, _ in model.named_modules()
        if any(name_matches(name, t) for t in targets)
    }
    return found <= set(config.layers_to_transform)


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
    """The model's adapter must compute (in eval mode) what the file's branch computed,
    as far as the file (or its run log) says."""
    activation, scaling = layer.activation[adapter_name], layer.scaling[adapter_name]
    for key, have, same in (
        ("activation", activation, activation == wanted.get("activation", activation)),
        ("scaling", scaling, math.isclose(scaling, wanted.get("scaling", scaling))),
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
    dtypes = {
        parts[p].dtype for parts in _adapter_weights(checkpoint.state).values() for p in parts
    }
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        found = sorted(map(str, dtypes))
        raise ValueError(
            f"the checkpoint's adapter weights have dtypes {found}; expected "
            "one floating-point dtype"
        )
    return dtypes.pop()


def _ranks_of_weights(adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> set[int]:
    return {
        parts["A"].shape[0] for parts in adapters.values() if "A" in parts and parts["A"].dim() == 2
    }


def _rank_of_weights(adapters: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    ranks = _ranks_of_weights(adapters)
    if len(ranks) != 1:
        found = sorted(ranks) if ranks else "none"
        raise ValueError(
            f"cannot tell the rank from the checkpoint's A weights (ranks: {found}); pass r=..."
        )
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
