"""Makes PEFT itself accept ``CeraConfig``: registers CeRA through PEFT's public
``register_peft_method`` (name ``"cera"``, prefix ``"cera_"``), after which
``peft.get_peft_model(model, CeraConfig(...))``, ``PeftModel.from_pretrained``,
``AutoPeftModel*``, ``PeftConfig.from_pretrained`` and transformers' ``load_adapter``
dispatch on ``PeftType.CERA`` as they do on LoRA. ``register_peft_method`` needs the
enum member, which ``cera_rs.config`` adds to PEFT's ``PeftType``.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from cera_rs.config import PEFT_TYPE, CeraConfig
from cera_rs.model import CeraModel


def register() -> None:
    """Idempotent: importing (or reloading) cera_rs again registers nothing twice
    (``register_peft_method`` refuses a second registration)."""
    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    # Not mixed-compatible: PeftMixedModel only combines the tuners it knows (LoRA, LoHa, ...).
    register_peft_method(
        name="cera",
        config_cls=CeraConfig,
        model_cls=CeraModel,
        prefix=CeraModel.prefix,
        is_mixed_compatible=False,
    )
