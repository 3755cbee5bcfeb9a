"""The methods a comparison runs: short specs (``cera:r=64``, ``lora:r=512,lora_alpha=32``,
``dora:r=8``, ``hira:r=32``) or experiment folders laid out as PEFT's
``method_comparison`` lays them out (``adapter_config.json`` and an optional
``training_params.json``). Any method the installed PEFT has runs through PEFT
unchanged; CeRA is one of them once ``cera_rs`` is imported."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

LRS = "lrs"
"""``lrs=[1e-3,3e-3]`` in a spec: that method's rate grid instead of the comparison's
(``--lrs``); a run's identity is its config, rate and seed, so a grid that grows keeps
the runs it had."""
CHOICES = re.compile(r"^\{(.*)\}$", re.S)
"""``cera_dropout={0,0.1}`` in a spec: a set of choices, chosen on the selection runs
jointly with the rate (one method; a list, ``r=[1,4]``, is a sweep: one method per value)."""
PRESETS = {
    "LORA": {"dropout": ("lora_dropout", (0.0, 0.1)), "scale": ("lora_alpha", (0.5, 1, 2))},
    "CERA": {"dropout": ("cera_dropout", (0.0, 0.1)), "scale": ("scaling", (0.5, 1, 2))},
}
"""``--tune dropout,scale``: per PEFT type, the field each word tunes and its choices;
a scale's choices are multiples of the method's own value (LoRA's alpha, CeRA's
scaling), a dropout's are probabilities."""
CONCEPTS = {field: word for fields in PRESETS.values() for word, (field, _) in fields.items()}
"""What a tuned field is, in the report's words (``lora_dropout`` and ``cera_dropout`` are
both the dropout)."""
FULL = "full"
"""``r=full``: each targeted layer at min(in, out), the linear ceiling of those layers."""
SPECTRAL_METHODS = ("LORA", "CERA")
"""PEFT types whose adapters cera_rs's spectral engine reads (LoRA, DoRA, CeRA)."""
PER_METHOD_TRAINING = ("optimizer_type", "optimizer_kwargs", "lr_scheduler", "grad_norm_clip")
"""Options of PEFT's ``training_params.json`` that a comparison applies per method. The
learning rate in ``optimizer_kwargs`` joins that method's rate grid."""
SHARED_TRAINING = ("batch_size", "max_steps", "max_seq_length")
"""Options every method shares, so that they see the same data in the same order: set
for the whole comparison; a method folder's own values are reported as not applied."""
IGNORED_TRAINING = (
    "model_id",
    "dtype",
    "batch_size_eval",
    "eval_steps",
    "compile",
    "use_gc",
    "seed",
    "use_amp",
    "autocast_adapter_dtype",
    "attn_implementation",
    "generation_kwargs",
    "query_template",
    "init_kv_cache_prefix",
)
"""Options of PEFT's benchmark that do not apply here: the model, data, seeds and
precision are the comparison's, and prompts are the data's own."""


@dataclass(frozen=True)
class Method:
    """One adapter method: its PEFT type, the fields of its config, its training
    options, and the name the report gives it."""

    name: str
    peft_type: str  # a PeftType member's value, e.g. "LORA", "CERA"
    fields: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    source: str = "spec"
    not_applied: tuple[str, ...] = ()  # training_params.json keys left out, and why
    lrs: tuple[float, ...] | None = None  # this method's rate grid instead of the comparison's
    family: str = ""  # the curve it belongs to: its spec without the rank (``lora:lora_alpha=32``)
    ceiling: bool = False  # ``r=full`` made concrete: the linear ceiling of its layers
    tune: dict[str, tuple] = field(default_factory=dict)  # field: its choices (selection runs)

    @property
    def slug(self) -> str:
        """A file name for the method's runs."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.name).strip("_") or "method"

    @property
    def rank(self) -> int | None:
        r = self.fields.get("r")
        return r if isinstance(r, int) else None

    @property
    def full_rank(self) -> bool:
        """``r=full``: every targeted layer at its own full rank, set by ``at_full_rank``
        once the model is known."""
        return self.fields.get("r") == FULL

    def config(self, layers_to_transform: list[int] | None = None) -> PeftConfig:
        """A fresh PEFT config; with ``layers_to_transform``, adapters only on those layers."""
        if self.full_rank:
            raise ValueError(
                f"{self.name}: r=full is resolved against the model first (Method.at_full_rank)"
            )
        cls = config_class(self.peft_type)
        fields = dict(self.fields)
        if layers_to_transform is not None:
            names = {f.name for f in dataclasses.fields(cls)}
            if "layers_to_transform" not in names:
                raise ValueError(
                    f"{self.name}: {cls.__name__} has no layers_to_transform, so it "
                    "cannot be kept to the last layers; compare without "
                    "adapted_layers"
                )
            if isinstance(fields.get("target_modules"), str):
                raise ValueError(
                    f"{self.name}: target_modules is a regex, which PEFT does not "
                    "combine with layers_to_transform; give a list of names, or "
                    "compare without adapted_layers"
                )
            fields["layers_to_transform"] = layers_to_transform
        return make_config(cls, fields, self.name)

    def chosen(self, choice: dict[str, Any]) -> Method:
        """The method with its tuned fields set to ``choice``: what a run trains."""
        return dataclasses.replace(self, fields={**self.fields, **choice}, tune={}, lrs=None)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "peft_type": self.peft_type,
            "fields": self.fields,
            "training": self.training,
            "source": self.source,
            "not_applied": list(self.not_applied),
            "lrs": None if self.lrs is None else list(self.lrs),
        }


def config_class(peft_type: str) -> type[PeftConfig]:
    try:
        member = PeftType(peft_type.upper())
    except ValueError:
        known = sorted(t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        close = difflib.get_close_matches(peft_type.lower(), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown method {peft_type.lower()!r}{hint}; the installed PEFT has: "
            f"dora, {', '.join(known)}"
        ) from None
    if member not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"the installed PEFT has no config for {member.value}")
    return PEFT_TYPE_TO_CONFIG_MAPPING[member]


def _check_field(cls: type[PeftConfig], key: str, label: str) -> None:
    """Refuses a field the config class does not have, naming the closest it has."""
    known = {f.name for f in dataclasses.fields(cls)}
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{label}: {cls.__name__} has no field {key!r}{hint}")


def make_config(cls: type[PeftConfig], fields: dict[str, Any], name: str) -> PeftConfig:
    """``cls(**fields)``; a field the class does not have is refused naming the method,
    the field and the closest field there is."""
    for key in fields:
        _check_field(cls, key, name)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: {' '.join(str(err).split())}") from None


def _value(text: str) -> Any:
    """A spec's value: JSON where it parses (numbers, true/false/null, lists), Python's
    True/False/None, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def _top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, so that a value may be a JSON
    list (``target_modules=["q_proj","v_proj"]``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))  # X | Y from Python 3.10


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` (parsed from a spec) fits a config field's type; a type this
    check does not know is left to the config class itself."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in _UNIONS:
        return any(_accepts(arg, value) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        return (
            isinstance(value, list) and all(_accepts(args[0], v) for v in value)
            if args and origin is list
            else isinstance(value, list)
        )
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _field_types(cls: type[PeftConfig]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a PEFT config whose annotations this Python cannot evaluate
        return {}


def _swept(hint: Any, value: Any) -> bool:
    """A list is a sweep (one method per value) where the field does not take a list
    itself (``r=[1,2,4]``; ``target_modules=["q_proj"]`` is one value)."""
    if not isinstance(value, list):
        return False
    return hint is None or not _accepts(hint, value) or any(isinstance(v, list) for v in value)


def _render(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def parse_specs(spec: str) -> list[Method]:
    """``kind[:key=value,...]``: ``kind`` is ``dora`` (LoRA with ``use_dora``) or any
    PEFT method's name (``lora``, ``cera``, ``hira``, ...); the keys are its config's
    fields. A list where the field takes one value is a sweep, one method per value
    (``lora:r=[1,4,16],lora_alpha=32``; several lists give every combination),
    ``r=full`` gives each targeted layer its own full rank, and ``lrs=[1e-3,3e-3]``
    is the method's own rate grid (every method of a sweep gets it)."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not kind:
        raise ValueError(f"method spec {spec!r}: expected kind[:key=value,...], e.g. cera:r=64")
    peft_type = "LORA" if kind == "dora" else kind.upper()
    cls = config_class(peft_type)
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    parts: list[tuple[str, list[Any]]] = []  # key and its values (one unless swept)
    written: list[str] = []  # the spec's parts as given, its rate grid left out
    lrs: tuple[float, ...] | None = None
    tune: dict[str, tuple] = {}  # fields given a set of choices
    tuned: list[str] = []  # their parts as written
    for part in filter(None, (p.strip() for p in _top_level(rest))):
        key, eq, text = part.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or not key:
            raise ValueError(f"method spec {spec!r}: {part!r} is not key=value")
        if key == LRS:
            lrs = _rate_grid(spec, text)
            continue
        written.append(part)
        _check_field(cls, key, spec)
        if CHOICES.match(text) and not isinstance(_value(text), dict):
            tune[key] = _choices(spec, key, text, hints.get(key))
            tuned.append(part)
            continue
        if text.startswith("[") and not isinstance(_value(text), list):
            raise ValueError(
                f"{spec}: {key}={text} is not a list; write a sweep as {key}=[1,2,4] (a JSON list)"
            )
        value = _value(text)
        values = value if _swept(hints.get(key), value) else [value]
        if not values:
            raise ValueError(f"{spec}: {key}=[] is an empty sweep; give at least one value")
        for v in values:
            if key == "r" and v == FULL:
                if hints.get("r") is not int or "rank_pattern" not in known:
                    raise ValueError(
                        f"{spec}: r=full needs a method with an integer rank r and a "
                        f"rank_pattern (each layer at its own full rank); {cls.__name__} "
                        "has not both: give r as a number"
                    )
            elif key in hints and not _accepts(hints[key], v):
                raise ValueError(
                    f"{spec}: {key}={_render(v)} is not a valid value: {key} is "
                    f"{_type_name(hints[key])}"
                )
        parts.append((key, values))
    swept = any(len(values) > 1 for _, values in parts)
    keys = [k for k, _ in parts]
    out = []
    for combo in itertools.product(*(values for _, values in parts)):
        fields = dict(zip(keys, combo))
        if kind == "dora":
            fields.setdefault("use_dora", True)
        body = ",".join([*(f"{k}={_render(v)}" for k, v in zip(keys, combo)), *tuned])
        name = f"{kind}:{body}" if swept else (f"{kind}:{','.join(written)}" if body else kind)
        rest = ",".join([*(f"{k}={_render(v)}" for k, v in zip(keys, combo) if k != "r"), *tuned])
        family = f"{kind}:{rest}" if rest else kind
        checked = dict(fields, r=1) if fields.get("r") == FULL else fields
        for choice in product(tune):  # refused now, not after other runs
            make_config(cls, {**checked, **choice}, name)
        out.append(
            Method(name, PeftType(peft_type).value, fields, lrs=lrs, family=family, tune=tune)
        )
    return out


def _choices(spec: str, key: str, text: str, hint: Any) -> tuple:
    """``{0,0.1}``: the field's choices, each a value the field takes."""
    try:
        values = json.loads(f"[{CHOICES.match(text).group(1)}]")
    except json.JSONDecodeError:
        values = None
    if not values or key in ("r", LRS):
        raise ValueError(
            f"{spec}: {key}={text} is not a set of choices: give values the field takes, "
            f"e.g. cera_dropout={{0,0.1}} (r is swept, r=[1,4], and the rate has lrs=[...])"
        )
    for v in values:
        if hint is not None and not _accepts(hint, v):
            raise ValueError(
                f"{spec}: {key}={_render(v)} is not a valid choice: {key} is {_type_name(hint)}"
            )
    return tuple(dict.fromkeys(values))


def product(tune: dict[str, tuple]) -> list[dict[str, Any]]:
    """Every combination of a method's tuned fields' choices (one empty one untuned)."""
    return [dict(zip(tune, combo)) for combo in itertools.product(*tune.values())]


def with_preset(method: Method, words: tuple[str, ...]) -> Method:
    """``--tune dropout,scale``: the method with those words' fields given their family's
    choices (``PRESETS``) around its own value (the spec's, else the config's default):
    a scale's are multiples of it, a dropout's include it. A field the spec already
    gives choices keeps them."""
    if not words:
        return method
    preset = PRESETS.get(method.peft_type)
    if preset is None:
        raise ValueError(
            f"--tune {','.join(words)}: no preset for {method.peft_type.lower()} "
            f"({method.name}); give its fields' choices in the spec, e.g. field={{a,b}}"
        )
    tune = dict(method.tune)
    for word in words:
        name, choices = preset[word]
        if name in tune:
            continue
        own = method.fields.get(name, getattr(config_class(method.peft_type)(), name))
        if word == "scale":
            tune[name] = tuple(own * x for x in choices)
        else:
            tune[name] = tuple(sorted({*choices, own}))
    return dataclasses.replace(method, tune=tune)


def _rate_grid(spec: str, text: str) -> tuple[float, ...]:
    """``lrs=[1e-3,3e-3]`` (or one rate): the method's own rate grid, never a sweep."""
    value = _value(text)
    rates = value if isinstance(value, list) else [value]
    if not rates or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in rates
    ):
        raise ValueError(
            f"{spec}: {LRS}={text} is not a rate grid: give positive learning "
            f"rates, e.g. {LRS}=[1e-3,3e-3]"
        )
    return tuple(sorted({float(x) for x in rates}))


def parse_spec(spec: str) -> Method:
    """One method from a spec without a sweep (``parse_specs`` expands sweeps)."""
    methods = parse_specs(spec)
    if len(methods) != 1:
        raise ValueError(f"{spec}: a sweep of {len(methods)} methods; use parse_specs")
    return methods[0]


def _full_rank_of(module: nn.Module, name: str) -> int:
    """The rank of a full update of a layer: min(inputs, outputs)."""
    if isinstance(module, nn.Embedding):
        return min(module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.modules.conv._ConvNd):
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        return min(fan_in, module.out_channels)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        return min(module.weight.shape)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return min(module.in_features, module.out_features)
    raise ValueError(
        f"r=full: cannot tell the full rank of {name} ({type(module).__name__}); give r as a number"
    )


def at_full_rank(
    method: Method, model: nn.Module, layers_to_transform: list[int] | None = None
) -> Method:
    """``method`` with ``r=full`` made concrete for ``model``: each targeted layer at
    min(in, out), through ``rank_pattern`` where layers differ (``r`` is the most
    common one). Other methods are returned as they are."""
    if not method.full_rank:
        return method
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = Method(method.name, method.peft_type, dict(method.fields, r=1)).config(
        layers_to_transform
    )
    if probe.target_modules is None:  # PEFT's default targets for the architecture
        defaults = getattr(
            PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType(method.peft_type)), "target_module_mapping", {}
        )
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ValueError(
                f"{method.name}: r=full needs target_modules: PEFT has no "
                f"default targets for {model_type or type(model).__name__}"
            )
        probe.target_modules = set(defaults[model_type])
    ranks = {
        name: _full_rank_of(module, name)
        for name, module in model.named_modules()
        if name and check_target_module_exists(probe, name)
    }
    if not ranks:
        raise ValueError(f"{method.name}: r=full: no layer of the model matches its targets")
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(name): r for name, r in ranks.items() if r != common}
    fields = dict(method.fields, r=common)
    if pattern:
        fields["rank_pattern"] = {**fields.get("rank_pattern", {}), **pattern}
    return dataclasses.replace(method, fields=fields, ceiling=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_folder(folder: str | os.PathLike) -> Method:
    """A PEFT ``method_comparison`` experiment folder. Its name in the report is the
    folder's last two parts (``lora/llama-3.2-3B-rank32``), as in PEFT's results."""
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder}: no adapter_config.json (a PEFT experiment folder "
            "holds one, and optionally training_params.json)"
        )
    raw = _read_json(config_path)
    if "peft_type" not in raw:
        raise ValueError(f"{config_path}: no peft_type")
    cls = config_class(str(raw["peft_type"]))
    known = {f.name for f in dataclasses.fields(cls)}
    # Written by another PEFT version: fields this one lacks are left out (and named).
    fields = {
        k: v
        for k, v in raw.items()
        if k in known
        and k
        not in (
            "peft_type",
            "peft_version",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "auto_mapping",
        )
    }
    dropped = [
        f"{k} (adapter_config.json: not in this PEFT's {cls.__name__})"
        for k in raw
        if k not in known and k not in ("peft_type", "peft_version")
    ]
    training: dict[str, Any] = {}
    params_path = folder / "training_params.json"
    if params_path.is_file():
        for key, value in _read_json(params_path).items():
            if key in PER_METHOD_TRAINING:
                training[key] = value
            elif key in SHARED_TRAINING:
                dropped.append(f"{key} (shared by every method of a comparison)")
            elif key in IGNORED_TRAINING:
                dropped.append(f"{key} (set by the comparison, not per method)")
            else:
                raise ValueError(f"{params_path}: unknown option {key!r}")
    own = training.get("optimizer_kwargs", {}).get("lr")
    if own is not None and (isinstance(own, bool) or not isinstance(own, (int, float)) or own <= 0):
        raise ValueError(f"{params_path}: optimizer_kwargs.lr {own!r} is not a positive rate")
    name = "/".join(folder.resolve().parts[-2:])
    make_config(cls, fields, name)
    return Method(
        name,
        PeftType(str(raw["peft_type"]).upper()).value,
        fields,
        training,
        str(folder.resolve()),
        tuple(dropped),
    )


def methods(spec_or_folder: str | os.PathLike) -> list[Method]:
    """A folder when the path is one, else a short spec (a sweep gives several)."""
    path = Path(spec_or_folder)
    if path.is_dir():
        return [read_folder(path)]
    if os.sep in str(spec_or_folder) or path.suffix == ".json":
        raise FileNotFoundError(f"{spec_or_folder}: no such experiment folder")
    return parse_specs(str(spec_or_folder))


def method(spec_or_folder: str | os.PathLike) -> Method:
    """One method: a folder, or a short spec without a sweep."""
    found = methods(spec_or_folder)
    if len(found) != 1:
        raise ValueError(f"{spec_or_folder}: a sweep of {len(found)} methods; use methods()")
    return found[0]


def distinct(methods: list[Method]) -> list[Method]:
    """``methods`` if each has a name and a run folder of its own."""
    if not methods:
        raise ValueError("no methods to compare")
    seen: dict[str, str] = {}
    for m in methods:
        if m.name in seen.values():
            raise ValueError(f"method {m.name!r} is given twice")
        if m.slug in seen:
            raise ValueError(
                f"methods {seen[m.slug]!r} and {m.name!r} would share the run "
                f"folder {m.slug!r}; rename one"
            )
        seen[m.slug] = m.name
    return methods
