"""``CeraConfig``: PEFT's ``LoraConfig`` vocabulary for CeRA adapters, and the checks
an adapter folder passes before PEFT allocates anything for it (the weights file's
header is read by ``weights_header``).

Near the bottom of the Python layer: of ours it imports ``weights_header`` alone. A
``peft.PeftConfig`` dataclass whose ``peft_type`` is a real ``peft.PeftType`` member
(``PeftType.CERA``, added at import, see ``_cera_peft_type``), so PEFT and transformers
dispatch on it as on LoRA; it serialises to ``adapter_config.json`` with ``"peft_type": "CERA"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft.config import PeftConfig
from peft.tuners.lora import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType
from peft.utils.constants import CONFIG_NAME
from peft.utils.other import get_pattern_key

from cera_rs.weights_header import Header, read_weights_header

ACTIVATIONS = ("silu", "relu", "identity")
DROPOUT_POSITIONS = ("hidden", "input")
"""Where dropout applies: ``"hidden"`` on ``act(A x)`` (the paper's), ``"input"`` on ``x``
before ``A`` (LoRA's, and the CeRA authors' ``peft_aligned`` variant)."""
BIAS_OPTIONS = ("none", "all", "cera_only")


def _cera_peft_type() -> PeftType:
    """``PeftType.CERA``, added to PEFT's enum if it lacks it (PEFT 0.21 does).

    ``register_peft_method``, ``PeftModel``, transformers' ``load_adapter`` (which reads
    ``peft_type.value``) and PEFT's mixed-model check all need a real member. Python has
    no public API to extend an enum, so this builds the member as ``EnumType`` builds its
    own (a ``str`` instance of the class with ``_name_``/``_value_``) and enters it in
    the class attribute and the three tables behind ``PeftType.CERA``, ``PeftType["CERA"]``,
    ``PeftType("CERA")``, iteration and ``in``. Idempotent: a reload, or a PEFT that has
    the member already, reuses the existing one.
    """
    existing = PeftType._value2member_map_.get("CERA")
    if existing is not None:
        return existing
    member = str.__new__(PeftType, "CERA")
    member._name_ = member._value_ = "CERA"
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType.CERA = member  # before the tables: EnumType refuses to rebind a member
    PeftType._member_names_.append("CERA")
    PeftType._member_map_["CERA"] = member
    PeftType._value2member_map_["CERA"] = member
    return member


PEFT_TYPE = _cera_peft_type()

# LoraConfig keywords users bring along, and what CeRA has instead. Any other LoraConfig
# field CeraConfig lacks is refused as a LoRA-only option with no CeRA counterpart.
_LORA_ONLY = {
    "lora_alpha": "CeRA has no alpha/r factor: the branch is multiplied by `scaling` (default 1.0)",
    "alpha_pattern": "use scaling_pattern (per-module scaling; CeRA has no alpha)",
    "use_rslora": "CeRA has no alpha/r factor to rescale: set `scaling`",
    "lora_dropout": "use cera_dropout",
    "init_lora_weights": "use init_weights (True: the paper's Kaiming-normal A and zero B; "
    "False: non-zero B too, for tests)",
    "use_dora": "CeRA has no DoRA variant",
    "fan_in_fan_out": "not needed: CeRA recognises transformers' Conv1D layers itself",
    "lora_bias": "CeRA's B has no bias; bias='all' or 'cera_only' trains the base layers' biases",
    "target_parameters": "LoRA adapts bare parameters (MoE experts' weights) by adding a "
    "weight delta B·A to them, and CeRA's branch B·act(A x) is non-linear in x, so no weight "
    "delta equals it; target the Linear layers that use them (the experts' projections, "
    "where the model has them as nn.Linear) with target_modules",
}
# LoraConfig fields from_lora_config carries over under the same name.
_CARRIED = (
    "r",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
)


@dataclass
class CeraConfig(PeftConfig):
    """Configuration of CeRA adapters: ``y = W0 x + scaling * B · Dropout(act(A x))``.

    Args:
        r: rank of the branch (``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``).
        target_modules: module name suffixes, a regex matched against full names, or
            ``"all-linear"``; ``None`` picks the model type's defaults (q/v projections).
        exclude_modules: names or a regex to leave alone.
        cera_dropout: dropout probability (inverted scaling), on the activated hidden
            vector or on the input, as ``dropout_position`` says.
        dropout_position: ``"hidden"`` (the paper's: ``B · Dropout(act(A x))``) or
            ``"input"`` (LoRA's: ``B · act(A Dropout(x))``, the CeRA authors'
            ``peft_aligned`` variant).
        activation: ``"silu"`` (the paper's), ``"relu"`` or ``"identity"`` (ablations).
        scaling: factor on the branch; LoRA's ``alpha / r`` does not apply.
        rank_pattern: per-module ``r``, keyed by a name suffix or regex (as in LoRA).
        scaling_pattern: per-module ``scaling``, keyed the same way.
        init_weights: ``True``: the paper's init (Kaiming-normal ``A``, zero ``B``), a new
            adapter leaves the output unchanged; ``False``: ``B`` random too (for tests,
            as LoRA's ``init_lora_weights=False``).
        layers_to_transform: restrict to some layer indices, as in PEFT.
        layers_pattern: the name of the layer list those indices count in, as in PEFT.
        modules_to_save: modules besides the adapters to train and save (e.g. a head).
        bias: ``"none"``, ``"all"`` or ``"cera_only"`` (biases of adapted layers).

    LoRA-only keywords (``lora_alpha``, ``lora_dropout``, ...) raise a TypeError naming
    the CeRA equivalent; ``CeraConfig.from_lora_config`` converts a whole ``LoraConfig``.
    """

    r: int = field(default=8, metadata={"help": "CeRA rank"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names, a regex, or 'all-linear'"}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex to exclude"}
    )
    cera_dropout: float = field(default=0.1, metadata={"help": "Dropout probability"})
    dropout_position: Literal["hidden", "input"] = field(
        default="hidden",
        metadata={"help": "'hidden': after the activation (the paper's); 'input': on x"},
    )
    activation: Literal["silu", "relu", "identity"] = field(
        default="silu", metadata={"help": "Activation of the branch"}
    )
    scaling: float = field(default=1.0, metadata={"help": "Factor on the branch output"})
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module r: {name or regex: r}"}
    )
    scaling_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module scaling: {name or regex: scaling}"}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: Kaiming-normal A, zero B; False: random B too"}
    )
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

    def __new__(cls, *args: Any, **kwargs: Any) -> CeraConfig:
        # Before the dataclass __init__, whose message ("unexpected keyword argument")
        # would not say what to use instead.
        fields = {f.name for f in dataclasses.fields(cls)}
        for name in kwargs:
            if name in _LORA_ONLY or (name in _LORA_FIELDS and name not in fields):
                hint = _LORA_ONLY.get(name, "a LoRA-only option with no CeRA counterpart")
                raise TypeError(f"CeraConfig does not take {name!r}: {hint}")
            if name not in fields:  # a misspelt field: name the one meant
                close = difflib.get_close_matches(name, sorted(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise TypeError(f"CeraConfig got an unexpected keyword argument {name!r}{hint}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        check_adapter_args(
            self.r, self.cera_dropout, self.activation, self.scaling, self.dropout_position
        )
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights must be a bool, got {self.init_weights!r}")
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
        for name, check in (("rank_pattern", _check_rank), ("scaling_pattern", _check_scaling)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
                raise TypeError(f"{name} must be a dict from module names, got {pattern!r}")
            for key, value in pattern.items():
                check(f"{name}[{key!r}]", value)
        # PEFT matches these as regular expressions (target/exclude only when a str);
        # a broken one would raise re.error, not a ValueError, deep inside wrapping.
        for name in (
            "target_modules",
            "exclude_modules",
            "modules_to_save",
            "layers_pattern",
            "rank_pattern",
            "scaling_pattern",
        ):
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

    def _register_custom_module(self, mapping: dict[type, type]) -> None:
        """CeRA layers for layer types CeRA does not wrap itself, as LoRA's
        ``_register_custom_module``: ``mapping`` is ``{BaseLayerType: CeraLayerType}``.
        The CeRA type (a ``cera_rs.CeraLayer`` subclass) is built as CeRA's own:
        ``cls(base_layer, r, adapter_name=..., dropout=..., activation=..., scaling=...,
        init_weights=..., dropout_position=...)``. Not saved with the config: register
        again on the loaded config (``PeftModel.from_pretrained(..., config=...)``)."""
        if not isinstance(mapping, dict) or not all(
            isinstance(k, type) and isinstance(v, type) for k, v in mapping.items()
        ):
            raise TypeError(
                f"mapping must be a dict from layer types to layer types, got {mapping!r}"
            )
        if getattr(self, "_custom_modules", None) is None:
            self._custom_modules = {}
        self._custom_modules.update(mapping)

    def rank_for(self, module_name: str) -> int:
        """``r`` of the adapter on ``module_name``: ``rank_pattern`` matched as LoRA does."""
        return self.rank_pattern.get(get_pattern_key(self.rank_pattern, module_name), self.r)

    def scaling_for(self, module_name: str) -> float:
        """``scaling`` of the adapter on ``module_name`` (``scaling_pattern``, else ``scaling``)."""
        key = get_pattern_key(self.scaling_pattern, module_name)
        return float(self.scaling_pattern.get(key, self.scaling))

    @classmethod
    def from_lora_config(cls, lora_config: LoraConfig, **overrides: Any) -> CeraConfig:
        """The CeRA counterpart of a user's ``LoraConfig``: same rank, targets, exclusions,
        ``modules_to_save``, layers, ``rank_pattern``, task and bias (``lora_only`` ->
        ``cera_only``); ``lora_dropout`` becomes ``cera_dropout``. ``overrides`` set or
        replace fields (e.g. ``scaling=2.0``). Warns naming each LoRA setting it cannot
        carry: ``lora_alpha`` always (CeRA's branch has no alpha/r, ``scaling`` is 1 unless
        overridden), and every other LoRA-only option that is not at its default."""
        if not isinstance(lora_config, LoraConfig):
            kind = type(lora_config).__name__
            raise TypeError(f"from_lora_config needs a LoraConfig, got {kind}")
        kwargs: dict[str, Any] = {name: getattr(lora_config, name) for name in _CARRIED}
        kwargs["cera_dropout"] = lora_config.lora_dropout
        kwargs["bias"] = {"lora_only": "cera_only"}.get(lora_config.bias, lora_config.bias)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(kwargs[name], set):
                kwargs[name] = sorted(kwargs[name])
        defaults = LoraConfig()
        dropped = [f"lora_alpha={lora_config.lora_alpha}"]
        for name in sorted(_LORA_FIELDS - _CERA_FIELDS - {"lora_alpha", "lora_dropout"}):
            value = getattr(lora_config, name)
            if value != getattr(defaults, name):
                dropped.append(f"{name}={value!r}")
        warnings.warn(
            f"CeraConfig.from_lora_config could not carry over {', '.join(dropped)}: CeRA has "
            "no alpha/r factor (its branch is multiplied by `scaling`) and no counterpart "
            "for LoRA-only options",
            stacklevel=2,
        )
        return cls(**{**kwargs, **overrides})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> CeraConfig:
        """The config of a saved CeRA adapter, checked together with its weights file.

        PEFT calls this (``PeftModel.from_pretrained``, ``load_adapter``,
        ``AutoPeftModel*``) before it allocates the adapter: the folder must hold
        ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``), the JSON
        must describe a CeRA adapter, and the weights' header (dtypes and shapes, read
        without loading the tensors) must hold floating-point CeRA weights of the config's
        ranks. Errors name the file and what is wrong. A name that is not a local folder
        is a Hub repository: its two files are downloaded into the Hub cache first (where
        PEFT's load then finds them), as PEFT would download them.
        """
        folder = Path(pretrained_model_name_or_path, subfolder or "")
        if not folder.is_dir():
            folder = _hub_folder(os.fspath(pretrained_model_name_or_path), subfolder, kwargs)
            pretrained_model_name_or_path, subfolder = folder, None
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"adapter folder {folder} has no {CONFIG_NAME}")
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        # PEFT picks the config class from peft_type: another method's file would
        # otherwise build that method's adapters (or fail with a KeyError).
        if raw.get("peft_type", PEFT_TYPE.value) != PEFT_TYPE.value:
            raise ValueError(
                f"{path} describes a {raw['peft_type']!r} adapter, not a CeRA one "
                f"(peft_type {PEFT_TYPE.value!r})"
            )
        weights, header = read_weights_header(folder)
        try:
            config = super().from_pretrained(
                os.fspath(pretrained_model_name_or_path), subfolder, **kwargs
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        except TypeError as err:
            raise TypeError(f"{path}: {err}") from None
        check_weights_header(path, weights, config, header)
        return config


def _hub_folder(repo_id: str, subfolder: str | None, kwargs: dict[str, Any]) -> Path:
    """The cached folder of the Hub adapter ``repo_id`` after downloading its config and
    weights (safetensors, else ``.bin``) with ``kwargs``' download options."""
    accepted = inspect.signature(hf_hub_download).parameters.keys() - {"filename", "subfolder"}
    options = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        config = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **options)
        try:
            hf_hub_download(repo_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **options)
        except EntryNotFoundError:
            hf_hub_download(repo_id, WEIGHTS_NAME, subfolder=subfolder, **options)
    except (OSError, ValueError, EntryNotFoundError) as err:  # no such folder, repo or file
        raise FileNotFoundError(
            f"adapter folder {Path(repo_id, subfolder or '')} does not exist, and no Hub "
            f"repository {repo_id!r} with an adapter could be read ({type(err).__name__})"
        ) from None
    return Path(config).parent


_LORA_FIELDS = frozenset(f.name for f in dataclasses.fields(LoraConfig))
_CERA_FIELDS = frozenset(f.name for f in dataclasses.fields(CeraConfig))


def check_adapter_args(
    r: Any, dropout: Any, activation: Any, scaling: Any, dropout_position: Any = "hidden"
) -> None:
    """Raises ValueError/TypeError naming the first bad hyper-parameter."""
    _check_rank("r", r)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a float, got {type(dropout).__name__} {dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")
    _check_scaling("scaling", scaling)
    check_dropout_position(dropout_position)


def check_dropout_position(position: Any) -> None:
    if position not in DROPOUT_POSITIONS:
        raise ValueError(
            f"unknown dropout_position {position!r}: expected one of {DROPOUT_POSITIONS}"
        )


def _check_rank(name: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name} must be an int, got {type(r).__name__} {r!r}")
    if r < 1:
        raise ValueError(f"{name} must be >= 1, got {r}")


def _check_scaling(name: str, scaling: Any) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(scaling).__name__} {scaling!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"{name} must be finite, got {scaling}")


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


# The heads PEFT's PeftModelForSequenceClassification (etc.) add to modules_to_save.
_TASK_HEADS = {
    "SEQ_CLS": {"classifier", "score"},
    "TOKEN_CLS": {"classifier", "score"},
    "QUESTION_ANS": {"qa_outputs"},
}


def _saved(module: str, header: Header) -> bool:
    """Whether ``header`` holds a tensor of a module named (or ending in) ``module``."""
    return any(f".{module}." in f".{key}" for key in header)


def check_weights_header(
    config_path: Path, weights: Path, config: CeraConfig, header: Header
) -> None:
    """Refuses a weights file without CeRA weights, with non-float ones (loading would
    cast them silently), or with ranks other than the config's: a corrupted ``r`` must
    not allocate ``r x d_in`` weights."""
    parts = {
        key: shape
        for key, (_, shape) in header.items()
        if (".cera_A." in key or ".cera_B." in key) and len(shape) >= 2
    }
    if not parts:
        raise ValueError(
            f"{weights} holds no CeRA adapter weights (tensors of 2 or more dimensions named "
            "*.cera_A.* / *.cera_B.*)"
        )
    for key, (dtype, _) in header.items():
        floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
        if (".cera_A." in key or ".cera_B." in key) and not floating:
            raise ValueError(
                f"{weights} holds {dtype} adapter weights ({key}); CeRA weights are floating point"
            )
    # PEFT looks these up by name and fails with a bare KeyError when one is absent. The
    # heads PeftModelFor<task> adds by itself are alternatives: one of them suffices.
    wanted = set(config.modules_to_save or ())
    heads = wanted & _TASK_HEADS.get(config.task_type, set())
    absent = [name for name in sorted(wanted - heads) if not _saved(name, header)]
    if heads and not any(_saved(name, header) for name in heads):
        absent.append(" or ".join(sorted(heads)))
    if absent:
        raise ValueError(
            f"{weights} lacks weights for {', '.join(absent)}, which its {CONFIG_NAME} asks "
            "for (modules_to_save)"
        )
    for key, shape in parts.items():
        module, part = key.split(".cera_", 1)
        if part.startswith("B.") and len(shape) > 2:
            continue  # a grouped conv's B holds r / groups: A's shape[0] says r
        r = shape[0] if part.startswith("A.") else shape[1]
        expected = config.rank_for(module.removeprefix("base_model.model."))
        if r != expected:
            raise ValueError(
                f"{config_path} says r={expected}, but {weights} holds rank-{r} weights ({key})"
            )
