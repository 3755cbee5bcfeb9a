"""CeRA in Axolotl: ``plugins: [cera_rs.integrations.axolotl.CeraPlugin]`` and
``adapter: cera`` in the YAML (docs/guides/axolotl.md).

The plugin declares the adapter name ``cera`` (``get_adapter_capabilities``: not
LoRA-like, so Axolotl never builds a ``LoraConfig`` for it, and no ReLoRA), adds the
``cera:`` block to the config schema (``get_input_args``), checks the raw YAML before
Axolotl validates it (``register``: refused settings, a merge of a CeRA adapter) and
builds the model in ``load_adapter``: ``get_peft_model`` with a ``CeraConfig``, or
``PeftModel.from_pretrained`` of ``lora_model_dir``. The translation itself lives in
``cera_rs.integrations.axolotl_config``, which imports nothing of Axolotl.
"""

from __future__ import annotations

import logging
from typing import Any

from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from pydantic import BaseModel, Field

from cera_rs.integrations import axolotl_config

# Axolotl's log filter passes INFO records only from loggers named axolotl.*.
LOG = logging.getLogger("axolotl.integrations.cera_rs")


class CeraArgs(BaseModel):
    """The ``cera:`` block of an Axolotl config (its keys: ``axolotl_config.BLOCK_KEYS``,
    checked by the plugin's ``register``)."""

    cera: dict[str, Any] | None = Field(
        default=None,
        description="CeRA settings for adapter: cera (r, dropout, dropout_position, "
        "activation, scaling, rank_pattern, scaling_pattern, init_weights, bias, "
        "exclude_modules); targets come from lora_target_modules / lora_target_linear",
    )


class CeraPlugin(BasePlugin):
    """Axolotl plugin for ``adapter: cera``."""

    def get_input_args(self) -> str:
        return "cera_rs.integrations.axolotl.CeraArgs"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        return [AdapterCapabilities(name=axolotl_config.ADAPTER, lora_like=False, relora=False)]

    def register(self, cfg: dict) -> None:
        # The raw YAML, before Axolotl's validators fill defaults (lora_dropout: 0.0, ...)
        # or refuse with LoRA's words; also `axolotl merge-lora`'s, with merge_lora: true.
        axolotl_config.check(cfg)

    def load_adapter(
        self,
        model: Any,
        cfg: Any,
        inference: bool = False,
        config_only: bool = False,
    ) -> tuple[Any, Any] | None:
        if not axolotl_config.is_cera(cfg):
            return None
        axolotl_config.refuse_merge(cfg)
        _refuse_quantized_base(model)
        linear_names = None
        if cfg.get("lora_target_linear"):
            from axolotl.loaders.adapter import find_all_linear_names

            linear_names = find_all_linear_names(model)
        config = axolotl_config.cera_config(cfg, linear_names)
        if config_only:
            return None, config

        from peft import PeftModel, get_peft_model
        from transformers.trainer_utils import set_seed

        import cera_rs  # noqa: F401  (registers CeRA with PEFT)

        if cfg.get("gradient_checkpointing") and hasattr(model, "gradient_checkpointing_enable"):
            # Axolotl enables it on the base model for lora/qlora only (before wrapping).
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=cfg.get("gradient_checkpointing_kwargs")
            )
        kwargs = {}
        if cfg.get("peft_autocast_adapter_dtype") is not None:
            kwargs["autocast_adapter_dtype"] = cfg.get("peft_autocast_adapter_dtype")
        folder = cfg.get("lora_model_dir")
        if folder:
            saved = axolotl_config.saved_adapter_type(folder)
            if saved not in (None, "CERA"):
                raise ValueError(
                    f"lora_model_dir {folder} holds a {saved} adapter, not a CeRA one "
                    "(adapter: cera)"
                )
            LOG.info("CeRA: loading the adapter in %s", folder)
            model = PeftModel.from_pretrained(model, folder, is_trainable=not inference, **kwargs)
        else:
            if cfg.get("seed") is not None:
                set_seed(cfg.get("seed"))
            model = get_peft_model(model, config, **kwargs)
        model.print_trainable_parameters()
        LOG.info(
            "CeRA: r=%s activation=%s dropout=%s scaling=%s on %s; gradient checkpointing %s",
            config.r,
            config.activation,
            config.cera_dropout,
            config.scaling,
            sorted(config.target_modules)
            if isinstance(config.target_modules, set)
            else config.target_modules,
            "on" if _checkpointing(model) else "off",
        )
        return model, config


def _checkpointing(model: Any) -> bool:
    """Whether gradient checkpointing is on (transformers 5.20 renamed the property)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def _refuse_quantized_base(model: Any) -> None:
    """A base loaded quantized (a pre-quantized checkpoint brings its own quantization
    config, whatever the YAML says) is refused, as ``load_in_4bit`` is."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is not None or getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "adapter: cera on a quantized base model: " + axolotl_config.REFUSED["load_in_4bit"]
        )
