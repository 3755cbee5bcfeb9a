"""Makes PEFT itself accept ``CeraConfig``: after ``import cera_rs``,
``peft.get_peft_model(model, CeraConfig(...))`` and ``PeftModel.from_pretrained`` work.

PEFT 0.21's ``register_peft_method`` insists on a member of its ``PeftType`` enum,
which has none for CeRA and cannot be extended without patching the enum. The
registries it fills are plain dicts looked up with ``config.peft_type``; since
``PeftType`` is a ``str`` enum, a plain-string key is looked up the same way. So this
fills those registries directly, as ``register_peft_method`` would, and nothing else.
"""

from __future__ import annotations

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

from cera_rs.config import PEFT_TYPE, CeraConfig
from cera_rs.tuner import CeraTuner


def register() -> None:
    """Idempotent: importing cera_rs twice (or reloading it) registers once."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = CeraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = CeraTuner
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = CeraTuner.prefix
