"""``to_lora``: the best LoRA of a given rank for a model's CeRA adapters, fitted on
calibration batches, and ``save_lora``: a standard PEFT LoRA adapter folder of it.

CeRA's branch ``B·act(A x)`` cannot be merged into the base weight; the linear map
``W_k`` (rank ``k``) that best reproduces it over real inputs can. One pass over the
batches streams each adapted layer's input ``x`` and branch output ``y`` (eval mode:
dropout off) into float64 moments; one solve per layer gives every rank's map and
its linearity (``cera_rs.export.regression``); a second pass over held-out batches,
when given, scores every rank's map on their tokens. A convolution is fitted on its
input patches (a LoRA conv), an embedding exactly from its branch table, weighted by
the ids' counts (``cera_rs.export.layers``). The export is an ordinary LoRA
(``lora_alpha = r``, so scaling 1): ``PeftModel.from_pretrained(base, folder)`` loads
it and ``merge_and_unload()`` folds it into the base weights; a diffusers model loads
it with ``model.load_lora_adapter(folder, prefix="base_model.model",
weight_name="adapter_model.safetensors")``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from cera_rs.export import layers
from cera_rs.export.regression import LinearFit
from cera_rs.export.report import LinearityReport, ModuleLinearity
from cera_rs.model import save_pretrained
from cera_rs.spectral.adapters import PEFT_PREFIX, Adapter, find_adapters
from cera_rs.spectral.deltas import stream_deltas


@dataclass
class LoraExport:
    """What ``to_lora`` returns: the PEFT ``config``, the ``state_dict`` in PEFT's saved
    naming (``base_model.model.<module>.lora_A.weight``, ...), and the ``report`` of
    each layer's linearity and exported rank. ``save_lora`` writes it as an adapter
    folder."""

    config: LoraConfig
    state_dict: dict[str, Tensor]
    report: LinearityReport

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the two files into ``directory`` in place, as PEFT's own
        ``save_pretrained`` does; ``save_lora`` is the atomic save."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict, directory / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        self.config.save_pretrained(str(directory))


def check_target(rank: Any, energy: Any) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("pass exactly one of rank= (an int) or energy= (a share in (0, 1])")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
    else:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)):
            raise TypeError(f"energy must be a float, got {type(energy).__name__} {energy!r}")
        if not (math.isfinite(energy) and 0 < energy <= 1):
            raise ValueError(f"energy must be in (0, 1], got {energy}")


def _factor_dtype(adapter: Adapter) -> torch.dtype:
    weight = adapter.module.base_layer.weight
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


def _lora_config(
    model: nn.Module, adapters: list[Adapter], ranks: dict[str, int], bias: bool
) -> LoraConfig:
    """One ``r`` for most layers; ``rank_pattern`` / ``alpha_pattern`` (full module
    names, which PEFT matches exactly) for the others, alpha = rank throughout."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    others = {name: k for name, k in ranks.items() if k != common}
    source = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=dict(others),
        alpha_pattern=dict(others),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        lora_bias=bias,
        fan_in_fan_out=any(isinstance(a.module.base_layer, Conv1D) for a in adapters),
        base_model_name_or_path=getattr(source, "base_model_name_or_path", None),
        task_type=getattr(source, "task_type", None),
    )


def _moments(
    model: nn.Module,
    batches: Iterable[Any] | None,
    adapters: list[Adapter],
    progress: bool,
    what: str,
) -> list:
    """Each adapter's accumulator (``export.layers.accumulator``) over the tokens of
    ``batches``; without batches (embeddings only) every id counts once."""
    accs = [layers.accumulator(a) for a in adapters]
    if batches is None:
        for acc in accs:
            acc.counts += 1
        return accs
    index = {a.name: i for i, a in enumerate(adapters)}
    stream_deltas(
        model,
        batches,
        adapters,
        lambda a, x, y: layers.feed(a, accs[index[a.name]], x, y),
        progress=progress,
        desc="to_lora",
        what=what,
    )
    empty = [a.name for a, m in zip(adapters, accs) if m.tokens_seen == 0]
    if empty:
        raise ValueError(f"no tokens of {what} reached {empty[0]}: nothing to fit or score")
    return accs


def _fits(
    model: nn.Module,
    batches: Iterable[Any] | None,
    held_out: Iterable[Any] | None,
    ridge: float,
    bias: bool,
    modules: Iterable[str] | None,
    progress: bool,
    export: bool,
):
    """The adapters, each one's fit at every rank on ``batches``, and (with
    ``held_out``) every rank's linearity on the held-out tokens with their count;
    ``export``: layers PEFT's LoRA cannot hold are refused first."""
    adapters = find_adapters(model, modules)
    for adapter in adapters if export else ():
        layers.check_exportable(adapter, bias)
    if batches is None:
        others = [a.name for a in adapters if a.kind != "embedding"]
        if others:
            raise ValueError(
                f"batches are needed to fit {others[0]} ({len(others)} such "
                "layers): only embeddings export without calibration "
                "data"
            )
    accs = _moments(model, batches, adapters, progress, "batches")
    fits = layers.solve(adapters, accs, ridge, bias)
    curves: dict[str, Any] = {}
    if held_out is not None:
        tests = _moments(model, held_out, adapters, progress, "held_out")
        curves = {
            a.name: (fit.linearity_on(test), test.tokens_seen)
            for a, fit, test in zip(adapters, fits, tests)
        }
    return adapters, fits, curves


def _row(
    adapter: Adapter, fit: LinearFit | layers.TableFit, k: int, curves: dict[str, Any]
) -> ModuleLinearity:
    held_out_curve, held_out_tokens = curves.get(adapter.name, (None, 0))
    return ModuleLinearity(
        adapter.name,
        adapter.method,
        adapter.rank,
        k,
        fit.tokens,
        fit.linearity,
        held_out_curve,
        held_out_tokens,
    )


def measure_linearity(
    model: nn.Module,
    batches: Iterable[Any],
    held_out: Iterable[Any] | None = None,
    modules: Iterable[str] | None = None,
    ridge: float = 0.0,
    progress: bool = True,
) -> LinearityReport:
    """``to_lora``'s report without the export: each adapted layer's linearity at
    every rank (``lin@k`` at the adapter's own rank) on ``batches``, and with
    ``held_out`` the same maps' on its tokens. Arguments as for ``to_lora``."""
    adapters, fits, curves = _fits(
        model, batches, held_out, ridge, False, modules, progress, export=False
    )
    return LinearityReport(
        [_row(a, fit, min(a.rank, fit.max_rank), curves) for a, fit in zip(adapters, fits)]
    )


def to_lora(
    model: nn.Module,
    batches: Iterable[Any] | None,
    rank: int | None = None,
    energy: float | None = None,
    ridge: float = 0.0,
    bias: bool = False,
    modules: Iterable[str] | None = None,
    held_out: Iterable[Any] | None = None,
    progress: bool = True,
) -> LoraExport:
    """The best LoRA for ``model``'s adapters over the tokens of ``batches``.

    Args:
        model: a model with CeRA adapters (``CeraModel``, a diffusers model with
            ``add_adapter``, or any model holding CeRA layers: linear, embedding and
            convolution; PEFT LoRA/DoRA layers work too).
        batches: calibration inputs, run through ``model`` as ``cera_rs.spectral.analyze``
            runs them (dicts as keyword arguments; ``attention_mask`` drops padding).
            An embedding's export weights each id by its count here; ``None`` (only
            when every adapted layer is an embedding) weights all ids alike.
        rank: the same rank ``k`` for every layer; it must not exceed a layer's
            ``min(d_in, d_out)`` (a convolution's d_in: ``C_in`` times its kernel size;
            an embedding's: its vocabulary).
        energy: instead of ``rank``, each layer's smallest rank whose map keeps this
            share of the best full-rank map's output energy (e.g. 0.99).
        ridge: 0 for least squares (pseudo-inverse); > 0 adds ``ridge`` times the mean
            eigenvalue of ``E[x x^T]`` to its diagonal, for ill-conditioned inputs.
        bias: also fit a bias per layer (PEFT's ``lora_bias``; the base layers need
            a bias of their own for PEFT to merge it).
        modules: adapted layers to export, by name or name suffix (default: all).
        held_out: other inputs, given as ``batches`` are: the report then also holds
            each map's linearity on their tokens. On calibration tokens alone the
            linearity is optimistic unless they are many times a layer's ``d_in``
            (the full-rank map fits noise too).
    """
    check_target(rank, energy)
    adapters, fits, curves = _fits(
        model, batches, held_out, ridge, bias, modules, progress, export=True
    )
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    rows = []
    for adapter, fit in zip(adapters, fits):
        k = rank if rank is not None else fit.energy_rank(energy)
        if k > fit.max_rank:
            raise ValueError(f"rank {k} exceeds {adapter.name}'s min(d_in, d_out) = {fit.max_rank}")
        key = PEFT_PREFIX + adapter.name
        for suffix, tensor in layers.lora_tensors(adapter, fit, k, _factor_dtype(adapter)).items():
            state[f"{key}.{suffix}"] = tensor
        ranks[adapter.name] = k
        rows.append(_row(adapter, fit, k, curves))
    return LoraExport(_lora_config(model, adapters, ranks, bias), state, LinearityReport(rows))


def save_lora(export: LoraExport, directory: str | os.PathLike) -> None:
    """Writes ``export`` as a PEFT LoRA adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``), atomically as ``cera_rs.save_pretrained`` saves:
    staged beside ``directory`` and moved into place, weights first, all or none."""
    if not isinstance(export, LoraExport):
        raise TypeError(f"save_lora takes what to_lora returns, got {type(export).__name__}")
    save_pretrained(export, directory)
