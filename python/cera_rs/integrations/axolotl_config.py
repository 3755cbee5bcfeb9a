"""Axolotl's YAML for CeRA, translated: the ``cera:`` block and Axolotl's ``lora_*`` keys
into a ``CeraConfig``, and every setting CeRA cannot honour refused by name.

Imports nothing of Axolotl (``cera_rs.integrations.axolotl`` is the plugin around it), so
the translation is tested without Axolotl installed. ``cfg`` is any mapping of the YAML's
top-level keys: the raw dict Axolotl hands a plugin's ``register`` before validation, or
its validated ``DictDefault``.

The YAML::

    plugins: [cera_rs.integrations.axolotl.CeraPlugin]
    adapter: cera
    lora_target_modules: [q_proj, v_proj]   # or lora_target_linear: true
    cera:
      r: 8
      dropout: 0.1          # on act(A x), the paper's; dropout_position: input for LoRA's
      activation: silu
      scaling: 1.0
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ADAPTER = "cera"
PLUGIN = "cera_rs.integrations.axolotl.CeraPlugin"

# The ``cera:`` block, in CeRA's vocabulary: its key -> CeraConfig's field.
BLOCK_KEYS = {
    "r": "r",
    "dropout": "cera_dropout",
    "dropout_position": "dropout_position",
    "activation": "activation",
    "scaling": "scaling",
    "rank_pattern": "rank_pattern",
    "scaling_pattern": "scaling_pattern",
    "init_weights": "init_weights",
    "bias": "bias",
    "exclude_modules": "exclude_modules",
}

# Axolotl keys with the same meaning for CeRA: its key -> CeraConfig's field. lora_r and
# lora_rank_pattern may also be given in the block (as r, rank_pattern), but not differently.
CARRIED = {
    "lora_r": "r",
    "lora_rank_pattern": "rank_pattern",
    "lora_target_modules": "target_modules",
    "lora_exclude_modules": "exclude_modules",
    "lora_modules_to_save": "modules_to_save",
    "peft_layers_to_transform": "layers_to_transform",
    "peft_layers_pattern": "layers_pattern",
}
# Read by the plugin's loader, not CeraConfig fields: lora_target_linear (the targets),
# lora_model_dir (a saved CeRA adapter to train on from), peft_autocast_adapter_dtype
# (PEFT's keyword), gradient_checkpointing(_kwargs).

MERGE_REFUSAL = (
    "a CeRA adapter cannot be merged into the base model: its branch B·act(A x) is "
    "non-linear in x, so no weight delta equals it (Axolotl's merge would write a model "
    "that is not the trained one). Nothing was written. Keep the adapter at inference "
    "(PeftModel.from_pretrained loads it), or fit the closest LoRA and merge that: "
    "`cera-rs export-lora ADAPTER_DIR LORA_DIR --rank K --data TOKENS`, then "
    "`axolotl merge-lora` with adapter: lora and lora_model_dir: LORA_DIR"
)
_NO_ALPHA = "CeRA has no alpha/r factor: its branch is multiplied by cera.scaling (default 1.0)"
_QUANTIZED = (
    "Axolotl builds the quantization config and runs prepare_model_for_kbit_training only "
    "for adapter: lora/qlora, and this plugin does not redo them for CeRA (untried); CeRA "
    "itself trains on bitsandbytes 4-bit and 8-bit layers through PEFT "
    "(docs/guides/layers.md). Train on a full-precision base"
)
_KERNEL = (
    "Axolotl's fused LoRA kernels replace PEFT's LoRA layers with LoRA's linear B·A x; "
    "CeRA's branch is non-linear and runs its own kernel"
)

# Axolotl settings CeRA cannot honour, and why. Refused when given any value but None,
# false or empty (an explicit `lora_dropout: 0.0` too: CeRA's default dropout is 0.1).
REFUSED = {
    "lora_alpha": _NO_ALPHA,
    "lora_alpha_pattern": "CeRA has no alpha: use cera.scaling_pattern (per-module scaling)",
    "lora_dropout": "use cera.dropout (dropout on act(A x), the paper's; add "
    "cera.dropout_position: input for LoRA's place, on x)",
    "lora_fan_in_fan_out": "not needed: CeRA recognises transformers' Conv1D layers itself",
    "lora_target_parameters": "LoRA adapts bare parameters (MoE experts) by adding a weight "
    "delta B·A, and CeRA's branch is non-linear in x, so no weight delta equals it; target "
    "the experts' Linear layers with lora_target_modules",
    "lora_fp32_gradients": "Axolotl upcasts LoRA adapters only; CeRA's weights keep the "
    "dtype PEFT gives them (float32 unless peft_autocast_adapter_dtype: false)",
    "lora_on_cpu": "an option of Axolotl's LoRA loading for merges, and CeRA is not merged",
    "lora_mlp_kernel": _KERNEL,
    "lora_qkv_kernel": _KERNEL,
    "lora_o_kernel": _KERNEL,
    "lora_embedding_kernel": _KERNEL,
    "loraplus_lr_ratio": "LoRA+ finds LoRA's B factors by their lora_ names; CeRA's are "
    "cera_B, which it would leave at the base rate",
    "loraplus_lr_embedding": "LoRA+ (see loraplus_lr_ratio) does not apply to CeRA",
    "peft_use_dora": "CeRA has no DoRA variant",
    "peft_use_rslora": _NO_ALPHA,
    "peft_init_lora_weights": "use cera.init_weights (true: Kaiming-normal A and zero B, "
    "the paper's; false: B random too, for tests)",
    "peft_layer_replication": "a LoraConfig option (layer_replication) with no CeRA counterpart",
    "peft_trainable_token_indices": "a LoraConfig option (trainable_token_indices) with no "
    "CeRA counterpart; train the embeddings through lora_modules_to_save",
    "peft_ensure_weight_tying": "a LoraConfig option (ensure_weight_tying) with no CeRA "
    "counterpart",
    "peft": "LoftQ (peft.loftq_config) initialises LoRA factors from a quantization "
    "residual; CeRA has no counterpart",
    "relora": "ReLoRA merges the adapter into the base at every restart, and CeRA's "
    "non-linear branch cannot be merged",
    "load_in_4bit": _QUANTIZED,
    "load_in_8bit": _QUANTIZED,
    "gptq": _QUANTIZED,
    "merge_lora": MERGE_REFUSAL,
}

# A LoRA word in the block, and what to write instead.
_BLOCK_HINTS = {
    "alpha": _NO_ALPHA,
    "lora_alpha": _NO_ALPHA,
    "lora_dropout": "write dropout",
    "cera_dropout": "write dropout",
    "target_modules": "give targets as Axolotl does: lora_target_modules or lora_target_linear",
    "use_rslora": _NO_ALPHA,
    "use_dora": "CeRA has no DoRA variant",
}


def _given(value: Any) -> bool:
    """Whether a setting is on: anything but None, false or an empty container."""
    if value is None or value is False:
        return False
    return not (isinstance(value, (list, tuple, dict, set, str)) and len(value) == 0)


def is_cera(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("adapter") == ADAPTER


def refuse_settings(cfg: Mapping[str, Any]) -> None:
    """ValueError naming every setting of ``cfg`` CeRA cannot honour, each with its reason
    (all at once: a user fixes the YAML in one go). For ``adapter: cera`` only."""
    refused = [f"{key}: {REFUSED[key]}" for key in REFUSED if _given(cfg.get(key))]
    if refused:
        raise ValueError(
            "adapter: cera does not take these Axolotl settings:\n  - " + "\n  - ".join(refused)
        )


def block(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``cera:`` block as CeraConfig keywords; unknown keys are refused, LoRA words
    with what to write instead, typos with the key meant."""
    raw = cfg.get("cera")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"cera: must be a mapping of CeRA settings, got {raw!r}")
    out = {}
    for key, value in raw.items():
        if key in BLOCK_KEYS:
            out[BLOCK_KEYS[key]] = value
        elif key in _BLOCK_HINTS:
            raise ValueError(f"cera.{key} is not a CeRA setting: {_BLOCK_HINTS[key]}")
        else:
            close = difflib.get_close_matches(str(key), sorted(BLOCK_KEYS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"cera.{key} is not a CeRA setting (known: {', '.join(sorted(BLOCK_KEYS))}){hint}"
            )
    return out


def _targets(
    modules: Any, linear: bool, linear_names: Iterable[str] | None
) -> list[str] | str | None:
    """Axolotl's targets as its LoRA loader forms them: ``lora_target_modules``, plus every
    linear layer but the output head when ``lora_target_linear`` (``linear_names``, found
    on the model; without them, PEFT's ``"all-linear"``, which leaves out the head too)."""
    if isinstance(modules, str):
        modules = [modules]
    modules = list(modules or [])
    if linear:
        if linear_names is None:
            return ["all-linear"] if not modules else modules  # a check, before the model
        return sorted(set(modules) | set(linear_names))
    return modules or None


def config_kwargs(
    cfg: Mapping[str, Any], linear_names: Iterable[str] | None = None
) -> dict[str, Any]:
    """CeraConfig's keywords for ``cfg``: the block, Axolotl's carried keys, the targets.
    A key given both ways with different values is refused, naming both."""
    kwargs = block(cfg)
    for key, field in CARRIED.items():
        value = cfg.get(key)
        if value is None or field == "target_modules":
            continue
        if field in kwargs and kwargs[field] != value:
            block_key = next(k for k, f in BLOCK_KEYS.items() if f == field)
            raise ValueError(
                f"{key}: {value!r} and cera.{block_key}: {kwargs[field]!r} disagree; give one"
            )
        kwargs[field] = value
    targets = _targets(
        cfg.get("lora_target_modules"), bool(cfg.get("lora_target_linear")), linear_names
    )
    if targets is None:
        raise ValueError(
            "adapter: cera needs targets: lora_target_modules (e.g. [q_proj, v_proj]) or "
            "lora_target_linear: true"
        )
    kwargs["target_modules"] = "all-linear" if targets == ["all-linear"] else targets
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return kwargs


def cera_config(cfg: Mapping[str, Any], linear_names: Iterable[str] | None = None) -> Any:
    """The ``CeraConfig`` ``cfg`` asks for; a bad value is a ValueError that names it."""
    from cera_rs.config import CeraConfig

    kwargs = config_kwargs(cfg, linear_names)
    try:
        return CeraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"adapter: cera: {err}") from None


def saved_adapter_type(folder: Any) -> str | None:
    """``peft_type`` of the adapter saved in ``folder`` (None where there is none)."""
    if not folder:
        return None
    path = Path(str(folder), "adapter_config.json")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("peft_type") if isinstance(saved, dict) else None


def refuse_merge(cfg: Mapping[str, Any]) -> None:
    """ValueError when ``cfg`` asks to merge (``merge_lora``, which `axolotl merge-lora`
    sets on both of its merge paths) a CeRA adapter: ``adapter: cera``, or an adapter
    folder (``lora_model_dir``, else ``output_dir``, as merge-lora picks) holding one."""
    if not cfg.get("merge_lora"):
        return
    folder = cfg.get("lora_model_dir") or cfg.get("output_dir")
    if is_cera(cfg) or saved_adapter_type(folder) == "CERA":
        raise ValueError(f"axolotl merge-lora of {folder}: {MERGE_REFUSAL}")


def check(cfg: Mapping[str, Any]) -> None:
    """Everything about ``cfg`` that can be checked before a model exists: a merge of a
    CeRA adapter, and for ``adapter: cera`` the refused settings and the CeraConfig."""
    refuse_merge(cfg)
    if not is_cera(cfg):
        if cfg.get("cera") is not None:
            raise ValueError(
                f"a cera: block does nothing with adapter: {cfg.get('adapter')!r}; "
                "set adapter: cera"
            )
        return
    refuse_settings(cfg)
    cera_config(cfg)
