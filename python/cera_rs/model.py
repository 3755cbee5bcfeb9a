"""``CeraModel``: PEFT's ``BaseTuner`` for CeRA, the counterpart of PEFT's ``LoraModel``.

Registered with ``peft.register_peft_method``, it is what ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``load_adapter`` and transformers' ``load_adapter``
build: it finds the target modules, swaps each for a CeRA layer (``CeraLinear``,
``CeraEmbedding``, ``CeraConv``, or a type registered with
``CeraConfig._register_custom_module``) and freezes the
rest; matching, ``modules_to_save``, bias handling, adapter switching, state-dict keys
and ``unload`` are PEFT's own machinery. Loading is checked twice: the folder and the
weights' header by ``CeraConfig.from_pretrained`` before anything is allocated, and
every state dict loaded into the model by ``_check_adapter_state`` before any weight
is copied. ``save_pretrained`` here is PEFT's save made atomic.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peft
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.constants import CONFIG_NAME
from torch import nn
from transformers.pytorch_utils import Conv1D

from cera_rs.atomic import atomic_update
from cera_rs.config import CeraConfig
from cera_rs.layer import (
    CeraLayer,
    CeraMergeError,
    cera_layer_class,
    route_adapter_names,
    unsupported_layer_message,
)

TAG = "cera"
"""The model-card tag of a CeRA adapter (PEFT tags LoRA's ``lora``)."""
_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Base models that carry the state-dict check (registered once per model)."""
_TAGGED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""Base models whose ``TAG`` this module added (and ``unload`` removes)."""


class CeraModel(BaseTuner):
    """Adds CeRA adapters to a model; built by ``peft.get_peft_model(model, CeraConfig(...))``."""

    prefix: str = "cera_"
    tuner_layer_cls = CeraLayer
    # The paper adapts the attention's query and value projections, as LoRA's defaults do.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str, **kwargs: Any):
        super().__init__(model, peft_config, adapter_name, **kwargs)
        # On the base model, not the tuner: peft.inject_adapter_in_model (which
        # transformers' load_adapter uses) returns the base model and drops the tuner.
        if model not in _CHECKED:
            model.register_load_state_dict_pre_hook(_check_adapter_state)
            _CHECKED.add(model)
        # PeftModel.create_or_update_model_card reads the base model's model_tags.
        tags = list(getattr(model, "model_tags", None) or [])
        if TAG not in tags:
            model.model_tags = [*tags, TAG]
            _TAGGED.add(model)

    def _create_and_replace(
        self,
        config: CeraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        r = config.rank_for(current_key)
        args = {
            "dropout": config.cera_dropout,
            "activation": config.activation,
            "scaling": config.scaling_for(current_key),
            "init_weights": config.init_weights,
            "dropout_position": config.dropout_position,
        }
        if isinstance(target, CeraLayer):
            target.update_layer(adapter_name, r, **args)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"{current_key} already holds a {type(target).__name__} adapter; "
                "CeRA cannot stack on another PEFT method's layer"
            )
        if isinstance(parent, nn.MultiheadAttention):
            # Its forward reads out_proj.weight itself: a wrapped out_proj would never run.
            raise TypeError(f"target module {current_key!r}: {unsupported_layer_message(parent)}")
        layer_cls = _custom_class(config, target)
        try:
            layer_cls = layer_cls or cera_layer_class(target)
        except TypeError as err:
            raise TypeError(f"target module {current_key!r}: {err}") from None
        new_module = layer_cls(target, r, adapter_name=adapter_name, **args)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any):
        try:
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as err:
            if "not found in the base model" not in str(err):
                raise
            candidates = sorted(
                {
                    name.rsplit(".", 1)[-1]
                    for name, module in model.named_modules()
                    if isinstance(module, _ADAPTABLE) and name
                }
            )
            raise ValueError(
                f"{err} Layers CeRA can adapt in this model are named: {', '.join(candidates)}"
            ) from None

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT calls this around forward and generate: mixed adapter batches."""
        names = kwargs.pop("adapter_names", None)
        with route_adapter_names(self, names, kwargs.get("num_beams")):
            yield

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise CeraMergeError.refusing("merge_and_unload")

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise CeraMergeError.refusing("merge_adapter")

    def unload(self) -> nn.Module:
        model = super().unload()
        if model in _TAGGED:  # a plain model again: no CeRA tag on its model card
            model.model_tags = [t for t in model.model_tags if t != TAG] or None
            _TAGGED.discard(model)
        return model

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise CeraMergeError(
            "add_weighted_adapter is impossible for CeRA: it combines adapters by weighting "
            "their linear updates B·A, but a CeRA branch B·act(A x) is non-linear in x, so "
            "no weighted sum of weights equals a weighted sum of branches. Load the adapters "
            "side by side instead and pick one with set_adapter (or per row with adapter_names=)."
        )


_ADAPTABLE = (nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layer types the error on unmatched targets lists (PEFT LoRA's own list)."""


def _custom_class(config: CeraConfig, target: nn.Module) -> type[nn.Module] | None:
    """The layer class ``config._register_custom_module`` maps ``target``'s type to."""
    for base_cls, layer_cls in (getattr(config, "_custom_modules", None) or {}).items():
        if isinstance(target, base_cls):
            return layer_cls
    return None


def _check_adapter_state(
    model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """A ``load_state_dict`` pre-hook on the base model: for each adapter the state dict holds
    CeRA weights of, every adapted layer's A and B must be there, floating point and of
    the model's shapes. Runs before any weight is copied, so a bad file changes nothing
    (PEFT would only warn about missing weights and leave them at their initial values)."""
    expected: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, module in model.named_modules(prefix=prefix.removesuffix(".")):
        if isinstance(module, CeraLayer):
            for part in ("cera_A", "cera_B"):
                for adapter, linear in getattr(module, part).items():
                    key = f"{name}.{part}.{adapter}.weight"
                    expected.setdefault(adapter, []).append((key, linear.weight))
    for adapter, params in expected.items():
        present = [(key, p) for key, p in params if key in state_dict]
        if not present:
            continue  # this load does not touch the adapter
        missing = [key for key, p in params if key not in state_dict]
        if missing:
            raise ValueError(
                f"the weights loaded for adapter {adapter!r} lack {len(missing)} of its "
                f"{len(params)} adapter tensors, e.g. {missing[0]}"
            )
        for key, param in present:
            value = state_dict[key]
            if not value.is_floating_point():
                raise ValueError(
                    f"the weights loaded hold {value.dtype} adapter weights ({key}); CeRA "
                    "weights are floating point"
                )
            if value.shape != param.shape:
                raise ValueError(
                    f"adapter weights do not fit the model: size mismatch for {key}: the "
                    f"checkpoint holds {tuple(value.shape)}, the model {tuple(param.shape)}"
                )


def save_pretrained(
    model: peft.PeftModel, save_directory: str | os.PathLike, **kwargs: Any
) -> None:
    """``model.save_pretrained(save_directory, **kwargs)``, atomic: PEFT's save writes into
    a staging folder beside ``save_directory``, and the files are moved into place one
    by one (``os.replace``). A failed write leaves the old files intact; a failure while
    moving puts back the files already replaced. (``PeftModel.save_pretrained`` itself
    writes in place, and no tuner hook spans its whole save.)"""
    # Weights before config: a reader never sees a new config with old weights.
    with atomic_update(save_directory, last=(CONFIG_NAME,)) as staging:
        model.save_pretrained(staging, **kwargs)


def get_cera_model(
    model: nn.Module, config: CeraConfig, adapter_name: str = "default", **kwargs: Any
) -> peft.PeftModel:
    """``peft.get_peft_model`` for a ``CeraConfig`` (a thin alias that refuses other
    configs); ``kwargs`` are get_peft_model's (``autocast_adapter_dtype``, ...)."""
    if not isinstance(config, CeraConfig):
        raise TypeError(f"get_cera_model needs a CeraConfig, got {type(config).__name__}")
    return peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
