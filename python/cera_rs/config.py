"""``CeraConfig``: PEFT's ``LoraConfig`` vocabulary for CeRA adapters.

A ``peft.PeftConfig`` dataclass, so PEFT's own ``get_peft_model`` and
``PeftModel.from_pretrained`` accept it once ``cera_rs`` is imported. It serialises to
``adapter_config.json`` with ``"peft_type": "CERA"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from cera_rs.layer import check_adapter_args

PEFT_TYPE = "CERA"
"""PEFT 0.21's ``PeftType`` enum has no CeRA member; PEFT's registries are keyed by
plain strings as well as by enum members (it is a ``str`` enum), so this is the key."""

BIAS_OPTIONS = ("none", "all", "cera_only")


@dataclass
class CeraConfig(PeftConfig):
    """Configuration of CeRA adapters: ``y = W0 x + scaling * B · Dropout(act(A x))``.

    Args:
        r: rank of the branch (``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``).
        target_modules: module name suffixes, a regex matched against full names, or
            ``"all-linear"``; ``None`` picks the model type's defaults (q/v projections).
        exclude_modules: names or a regex to leave alone.
        cera_dropout: dropout on the activated hidden vector (inverted scaling).
        activation: ``"silu"`` (the paper's), ``"relu"`` or ``"identity"`` (ablations).
        scaling: factor on the branch; LoRA's ``alpha / r`` does not apply.
        layers_to_transform, layers_pattern: restrict to some layer indices, as in PEFT.
        modules_to_save: modules besides the adapters to train and save (e.g. a head).
        bias: ``"none"``, ``"all"`` or ``"cera_only"`` (biases of adapted layers).
    """

    r: int = field(default=8, metadata={"help": "CeRA rank"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names, a regex, or 'all-linear'"}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex to exclude"}
    )
    cera_dropout: float = field(default=0.1, metadata={"help": "Dropout after the activation"})
    activation: Literal["silu", "relu", "identity"] = field(
        default="silu", metadata={"help": "Activation of the branch"}
    )
    scaling: float = field(default=1.0, metadata={"help": "Factor on the branch output"})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt"}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, with layers_to_transform"}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules to train and save besides the adapters"}
    )
    bias: Literal["none", "all", "cera_only"] = field(
        default="none", metadata={"help": "Which biases to train"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_adapter_args(self.r, self.cera_dropout, self.activation, self.scaling)
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                if not all(isinstance(v, str) for v in value):
                    raise TypeError(f"{name} must hold strings, got {value!r}")
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a list of names or a string, got {value!r}")
        _check_optional("modules_to_save", self.modules_to_save, (list, tuple), str)
        _check_optional("layers_to_transform", self.layers_to_transform, (list, tuple, int), int)
        _check_optional("layers_pattern", self.layers_pattern, (list, tuple, str), str)
        # PEFT matches these as regular expressions (target/exclude only when a str);
        # a broken one would raise re.error, not a ValueError, deep inside wrapping.
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            elif name in ("target_modules", "exclude_modules"):
                continue  # lists of names are matched literally
            for pattern in value or ():
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"{name}: {pattern!r} is not a valid pattern: {err}") from None
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform as well")


def _check_optional(name: str, value: object, kinds: tuple[type, ...], item: type) -> None:
    """TypeError naming ``name`` unless ``value`` is None, a bare ``item`` (when ``item`` is
    in ``kinds``) or a list/tuple of ``item``s (bools are not ints)."""
    def ok(v: object) -> bool:
        return isinstance(v, item) and not isinstance(v, bool)

    if value is None or (item in kinds and ok(value)):
        return
    if isinstance(value, (list, tuple)) and all(ok(v) for v in value):
        return
    raise TypeError(f"{name} must be None or a {item.__name__} or list of them, got {value!r}")
