"""CeRA adapters on diffusers models (UNets, DiT/Flux-style transformers).

diffusers injects adapters through PEFT: ``model.add_adapter(CeraConfig(...))`` puts CeRA
layers on the targets (attention's ``to_q``/``to_k``/``to_v``/``to_out.0`` Linear layers,
ResNet convolutions), and ``set_adapters(names, weights)``, ``disable_adapters()``,
``enable_adapters()``, ``delete_adapters()`` and the ``scale`` of
``cross_attention_kwargs`` work on them as on LoRA layers (``CeraLayer.set_scale``,
``scale_layer``, ``unscale_layer``).

diffusers' own file API is LoRA's: ``save_lora_adapter`` writes
``pytorch_lora_weights.safetensors``, which ``load_lora_adapter`` and pipelines'
``load_lora_weights`` read as LoRA weights and build a ``LoraConfig`` for. A CeRA adapter
is saved and loaded with this module's ``save_adapter`` / ``load_adapter`` instead: a
PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, the
format ``PeftModel.save_pretrained`` writes), checked on load as every CeRA load is.
``guard_lora_file_api`` (installed when diffusers' loader module is imported) makes
``save_lora_adapter``, ``load_lora_adapter`` and ``fuse_lora`` refuse CeRA adapters
with an error naming these functions, and leaves LoRA adapters to diffusers.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from peft.utils.constants import CONFIG_NAME
from safetensors.torch import load_file, save_file
from torch import nn

from cera_rs.atomic import atomic_update
from cera_rs.config import PEFT_TYPE, CeraConfig
from cera_rs.layer import CeraLayer, CeraMergeError

_PREFIX = "base_model.model."
"""Key prefix of PeftModel's adapter files, written here too so that the folder also
loads with ``PeftModel.from_pretrained(model, folder)``."""
CERA_WAY = (
    "save a CeRA adapter with cera_rs.diffusion.save_adapter(model, folder, adapter_name) "
    "and load it with cera_rs.diffusion.load_adapter(model, folder, adapter_name)"
)


def save_adapter(
    model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default"
) -> None:
    """Saves the CeRA adapter ``adapter_name`` of a diffusers model (added with
    ``add_adapter``) as a PEFT adapter folder, atomically."""
    config = _cera_config(model, adapter_name)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not state:
        raise ValueError(f"the model holds no weights of the CeRA adapter {adapter_name!r}")
    state = {_PREFIX + key: value.detach().contiguous() for key, value in state.items()}

    with atomic_update(save_directory, last=(CONFIG_NAME,)) as staging:  # config last
        save_file(state, staging / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        config.save_pretrained(staging)


def load_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
) -> CeraConfig:
    """Adds the CeRA adapter saved in ``folder`` (by ``save_adapter`` or
    ``PeftModel.save_pretrained``) to a diffusers model as ``adapter_name`` and makes it
    the active one, as ``load_lora_adapter`` does for LoRA. The config and the weights'
    header are checked before anything is allocated (``CeraConfig.from_pretrained``), and
    the weights before any is copied. ``is_trainable=False`` freezes the adapter."""
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    config = CeraConfig.from_pretrained(folder)
    config.inference_mode = not is_trainable
    path = Path(folder)
    if (path / SAFETENSORS_WEIGHTS_NAME).is_file():
        state = load_file(path / SAFETENSORS_WEIGHTS_NAME)
    else:
        state = torch.load(path / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    state = {key.removeprefix(_PREFIX): value for key, value in state.items()}
    if hasattr(model, "add_adapter") and hasattr(model, "set_adapters"):  # a diffusers model
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    except BaseException:
        _remove(model, adapter_name)
        raise
    unexpected = [k for k in getattr(result, "unexpected_keys", ()) if ".cera_" in k]
    if unexpected:
        _remove(model, adapter_name)
        raise ValueError(
            f"{folder} holds CeRA weights for layers the model does not have, e.g. {unexpected[0]}"
        )
    for module in model.modules():
        if isinstance(module, CeraLayer) and adapter_name in module.cera_A:
            module.cera_A[adapter_name].requires_grad_(is_trainable)
            module.cera_B[adapter_name].requires_grad_(is_trainable)
    return config


def _remove(model: nn.Module, adapter_name: str) -> None:
    if hasattr(model, "delete_adapters"):
        model.delete_adapters(adapter_name)


def _cera_config(model: nn.Module, adapter_name: str) -> CeraConfig:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    config = configs[adapter_name]
    if not isinstance(config, CeraConfig):
        raise TypeError(
            f"adapter {adapter_name!r} is a {type(config).__name__} adapter; save it with "
            "diffusers' save_lora_adapter"
        )
    return config


def _has_cera(model: nn.Module, adapter_name: str | None = None) -> bool:
    configs = getattr(model, "peft_config", None) or {}
    names = configs if adapter_name is None else [adapter_name]
    return any(isinstance(configs.get(name), CeraConfig) for name in names)


def _is_cera_source(source: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``load_lora_adapter``'s argument holds a CeRA adapter: a state dict with
    CeRA keys, or a folder with a CeRA ``adapter_config.json`` or CeRA weights."""
    if isinstance(source, dict):
        return any(".cera_A." in key or ".cera_B." in key for key in source)
    folder = Path(os.fspath(source), kwargs.get("subfolder") or "")
    if not folder.is_dir():
        return False
    config = folder / CONFIG_NAME
    if config.is_file():
        try:
            if json.loads(config.read_bytes()).get("peft_type") == PEFT_TYPE.value:
                return True
        except (ValueError, AttributeError):
            pass
    weights = [folder / (kwargs.get("weight_name") or ""), *folder.glob("*.safetensors")]
    for path in weights:
        if path.is_file() and path.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    if any(".cera_A." in key for key in f.keys()):
                        return True
            except Exception:  # not a safetensors file: diffusers reports it
                continue
    return False


def guard_lora_file_api(mixin: type) -> None:
    """Wraps diffusers' ``PeftAdapterMixin.save_lora_adapter``, ``load_lora_adapter`` and
    ``fuse_lora`` so that on a CeRA adapter they raise (naming ``save_adapter`` /
    ``load_adapter``, or the merge refusal) before writing, reading or changing anything;
    LoRA adapters go to diffusers' own methods. Idempotent."""
    if getattr(mixin, "_cera_guarded", False):
        return

    save, load, fuse = mixin.save_lora_adapter, mixin.load_lora_adapter, mixin.fuse_lora

    @functools.wraps(save)
    def save_lora_adapter(self, save_directory, adapter_name="default", *args, **kwargs):
        if _has_cera(self, adapter_name):
            raise TypeError(
                f"save_lora_adapter writes LoRA weight files, and {adapter_name!r} is a CeRA "
                f"adapter (B·act(A x), not a LoRA update): {CERA_WAY}"
            )
        return save(self, save_directory, adapter_name, *args, **kwargs)

    @functools.wraps(load)
    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, *args, **kwargs):
        if _is_cera_source(pretrained_model_name_or_path_or_dict, kwargs):
            raise TypeError(
                "load_lora_adapter reads LoRA weights and builds a LoraConfig, and this is a "
                f"CeRA adapter: {CERA_WAY}"
            )
        return load(self, pretrained_model_name_or_path_or_dict, *args, **kwargs)

    @functools.wraps(fuse)
    def fuse_lora(self, *args, **kwargs):
        if _has_cera(self):
            raise CeraMergeError.refusing("fuse_lora")
        return fuse(self, *args, **kwargs)

    mixin.save_lora_adapter = save_lora_adapter
    mixin.load_lora_adapter = load_lora_adapter
    mixin.fuse_lora = fuse_lora
    mixin._cera_guarded = True


_LOADER = "diffusers.loaders.peft"


class _GuardAfterLoad:
    """Runs diffusers' loader for ``diffusers.loaders.peft``, then guards its mixin."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AwaitDiffusers)]
        guard_lora_file_api(module.PeftAdapterMixin)


class _AwaitDiffusers:
    """A meta-path finder that answers only for diffusers' PEFT loader module."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _LOADER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _GuardAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    """Guards diffusers' LoRA file API now if diffusers' loader is imported, else when it
    is (importing cera_rs does not import diffusers)."""
    module = sys.modules.get(_LOADER)
    if module is not None:
        guard_lora_file_api(module.PeftAdapterMixin)
    elif not any(isinstance(f, _AwaitDiffusers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AwaitDiffusers())
