"""The methods a comparison runs: short specs (``cera:r=64``, ``lora:r=512,lora_alpha=32``,
``dora:r=8``, ``hira:r=32``) or experiment folders laid out as PEFT's
``method_comparison`` lays them out (``adapter_config.json`` and an optional
``training_params.json``). Any method the installed PEFT has runs through PEFT
unchanged; CeRA is one of them once ``cera_rs`` is imported."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

SPECTRAL_METHODS = ("LORA", "CERA")
"""PEFT types whose adapters cera_rs's spectral engine reads (LoRA, DoRA, CeRA)."""
PER_METHOD_TRAINING = ("optimizer_type", "optimizer_kwargs", "lr_scheduler", "grad_norm_clip")
"""Options of PEFT's ``training_params.json`` that a comparison applies per method. The
learning rate in ``optimizer_kwargs`` joins that method's rate grid."""
SHARED_TRAINING = ("batch_size", "max_steps", "max_seq_length")
"""Options every method shares, so that they see the same data in the same order: set
for the whole comparison; a method folder's own values are reported as not applied."""
IGNORED_TRAINING = ("model_id", "dtype", "batch_size_eval", "eval_steps", "compile", "use_gc",
                    "seed", "use_amp", "autocast_adapter_dtype", "attn_implementation",
                    "generation_kwargs", "query_template", "init_kv_cache_prefix")  # fmt: skip
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

    @property
    def slug(self) -> str:
        """A file name for the method's runs."""
        return re.sub(r"[^A-Za-z0-9._=-]+", "_", self.name).strip("_") or "method"

    @property
    def rank(self) -> int | None:
        r = self.fields.get("r")
        return r if isinstance(r, int) else None

    def config(self, layers_to_transform: list[int] | None = None) -> PeftConfig:
        """A fresh PEFT config; with ``layers_to_transform``, adapters only on those layers."""
        cls = config_class(self.peft_type)
        fields = dict(self.fields)
        if layers_to_transform is not None:
            names = {f.name for f in dataclasses.fields(cls)}
            if "layers_to_transform" not in names:
                raise ValueError(f"{self.name}: {cls.__name__} has no layers_to_transform, so it "
                                 "cannot be kept to the last layers; compare without "
                                 "adapted_layers")  # fmt: skip
            if isinstance(fields.get("target_modules"), str):
                raise ValueError(f"{self.name}: target_modules is a regex, which PEFT does not "
                                 "combine with layers_to_transform; give a list of names, or "
                                 "compare without adapted_layers")  # fmt: skip
            fields["layers_to_transform"] = layers_to_transform
        return make_config(cls, fields, self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "peft_type": self.peft_type, "fields": self.fields,
                "training": self.training, "source": self.source,
                "not_applied": list(self.not_applied),
                "lrs": None if self.lrs is None else list(self.lrs)}  # fmt: skip


def config_class(peft_type: str) -> type[PeftConfig]:
    try:
        member = PeftType(peft_type.upper())
    except ValueError:
        known = sorted(t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING)
        close = difflib.get_close_matches(peft_type.lower(), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {peft_type.lower()!r}{hint}; the installed PEFT has: "
                         f"dora, {', '.join(known)}") from None  # fmt: skip
    if member not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"the installed PEFT has no config for {member.value}")
    return PEFT_TYPE_TO_CONFIG_MAPPING[member]


def make_config(cls: type[PeftConfig], fields: dict[str, Any], name: str) -> PeftConfig:
    """``cls(**fields)``; a field the class does not have is refused naming the method,
    the field and the closest field there is."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in fields:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{name}: {cls.__name__} has no field {key!r}{hint}")
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


def parse_spec(spec: str) -> Method:
    """``kind[:key=value,...]``: ``kind`` is ``dora`` (LoRA with ``use_dora``) or any
    PEFT method's name (``lora``, ``cera``, ``hira``, ...); the keys are its config's
    fields."""
    kind, _, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if not kind:
        raise ValueError(f"method spec {spec!r}: expected kind[:key=value,...], e.g. cera:r=64")
    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in _top_level(rest))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method spec {spec!r}: {part!r} is not key=value")
        fields[key.strip()] = _value(value.strip())
    peft_type = "LORA" if kind == "dora" else kind.upper()
    if kind == "dora":
        fields.setdefault("use_dora", True)
    make_config(config_class(peft_type), fields, spec)  # refused now, not after other runs
    return Method(spec.strip(), PeftType(peft_type).value, fields)


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
        raise FileNotFoundError(f"{folder}: no adapter_config.json (a PEFT experiment folder "
                                "holds one, and optionally training_params.json)")  # fmt: skip
    raw = _read_json(config_path)
    if "peft_type" not in raw:
        raise ValueError(f"{config_path}: no peft_type")
    cls = config_class(str(raw["peft_type"]))
    known = {f.name for f in dataclasses.fields(cls)}
    # Written by another PEFT version: fields this one lacks are left out (and named).
    fields = {k: v for k, v in raw.items() if k in known and k not in ("peft_type", "peft_version",
              "base_model_name_or_path", "revision", "inference_mode", "auto_mapping")}  # fmt: skip
    dropped = [f"{k} (adapter_config.json: not in this PEFT's {cls.__name__})"
               for k in raw if k not in known and k not in ("peft_type", "peft_version")]
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
    name = "/".join(folder.resolve().parts[-2:])
    make_config(cls, fields, name)
    return Method(name, PeftType(str(raw["peft_type"]).upper()).value, fields, training,
                  str(folder.resolve()), tuple(dropped))  # fmt: skip


def method(spec_or_folder: str | os.PathLike) -> Method:
    """A folder when the path is one, else a short spec."""
    path = Path(spec_or_folder)
    if path.is_dir():
        return read_folder(path)
    if os.sep in str(spec_or_folder) or path.suffix == ".json":
        raise FileNotFoundError(f"{spec_or_folder}: no such experiment folder")
    return parse_spec(str(spec_or_folder))


def distinct(methods: list[Method]) -> list[Method]:
    """``methods`` if each has a name and a run folder of its own."""
    if not methods:
        raise ValueError("no methods to compare")
    seen: dict[str, str] = {}
    for m in methods:
        if m.name in seen.values():
            raise ValueError(f"method {m.name!r} is given twice")
        if m.slug in seen:
            raise ValueError(f"methods {seen[m.slug]!r} and {m.name!r} would share the run "
                             f"folder {m.slug!r}; rename one")  # fmt: skip
        seen[m.slug] = m.name
    return methods
