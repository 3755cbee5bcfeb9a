"""``CeraTuner``: PEFT's ``BaseTuner`` for CeRA, the counterpart of PEFT's ``LoraModel``.

It finds the target modules, swaps each for a ``CeraLinear`` and freezes the rest;
matching, ``modules_to_save``, bias handling, adapter switching, state-dict keys and
``unload`` are PEFT's own machinery.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from cera_rs.config import CeraConfig
from cera_rs.layer import CeraLinear, CeraMergeError, base_features


class CeraTuner(BaseTuner):
    prefix: str = "cera_"
    tuner_layer_cls = CeraLinear
    # The paper adapts the attention's query and value projections, as LoRA's defaults do.
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
        args = {"dropout": config.cera_dropout, "activation": config.activation,
                "scaling": config.scaling}  # fmt: skip
        if isinstance(target, CeraLinear):
            target.update_layer(adapter_name, config.r, **args)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"{current_key} already holds a {type(target).__name__} adapter; "
                "CeRA cannot stack on another PEFT method's layer"
            )
        try:
            base_features(target)
        except TypeError as err:
            raise TypeError(f"target module {current_key!r}: {err}") from None
        new_module = CeraLinear(target, config.r, adapter_name=adapter_name, **args)
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
                {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if isinstance(module, (nn.Linear, Conv1D))}
            )  # fmt: skip
            raise ValueError(
                f"{err} Layers CeRA can adapt in this model are named: {', '.join(candidates)}"
            ) from None

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise CeraMergeError(
            "merge_and_unload is impossible for CeRA: the branch B·act(A x) is non-linear in "
            "x, so it cannot be folded into the base weight. Keep the adapter at inference, "
            "or use unload() to get the base model back without it."
        )

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        self.merge_and_unload()

