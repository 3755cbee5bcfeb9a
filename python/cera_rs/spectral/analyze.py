"""Spectra of a model's adapters: of their output deltas over real batches
(``analyze``), and of their weight updates (``weight_spectrum``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cera_rs import _native
from cera_rs.spectral.adapters import Adapter, find_adapters
from cera_rs.spectral.core import Spectrum, StreamingSpectrum, lowrank_spectra
from cera_rs.spectral.report import ModelSpectrum, ModuleSpectrum


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch: Any) -> None:
    """A dict is keyword arguments (a tokenizer's output), a tuple or list positional
    ones, anything else the single input."""
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (list, tuple)):
        model(*batch)
    else:
        model(batch)


class _Collector:
    """Forward hooks feeding each adapter's delta into its own StreamingSpectrum.
    Tokens that a batch's ``attention_mask`` marks as padding are left out."""

    def __init__(self, adapters: list[Adapter]) -> None:
        self.streams = {a.name: StreamingSpectrum(a.out_features, a.device) for a in adapters}
        self.mask: Tensor | None = None
        self.handles = [
            a.module.register_forward_hook(self._hook(a), with_kwargs=True) for a in adapters
        ]

    def _hook(self, adapter: Adapter):
        stream = self.streams[adapter.name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            x = args[0] if args else kwargs["x"]
            delta = adapter.delta(x, output)
            if self.mask is not None and tuple(delta.shape[:-1]) == tuple(self.mask.shape):
                delta = delta[self.mask.to(delta.device)]
            stream.update(delta)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def analyze(
    model: nn.Module,
    batches: Iterable[Any],
    modules: Iterable[str] | None = None,
    progress: bool = True,
) -> ModelSpectrum:
    """Runs ``batches`` through ``model`` (eval mode, no grad; its mode is restored)
    and returns the spectrum of each adapter's output delta over all their tokens.

    Works on CeRA layers and on PEFT's LoRA and DoRA layers. Batches move to the
    model's device; a dict is passed as keyword arguments (a tokenizer's output), a
    tuple as positional ones. ``modules`` selects layers by name or name suffix.
    """
    adapters = find_adapters(model, modules)
    device = next(model.parameters()).device
    collector = _Collector(adapters)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=total, disable=not progress, desc="spectra"):
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                collector.mask = None if mask is None else mask.bool()
                _call(model, batch)
                seen += 1
    finally:
        collector.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("batches is empty: analyze needs at least one batch to run the model on")
    streams = [collector.streams[a.name] for a in adapters]
    spectra = _native.gram_spectra([s._native for s in streams])
    return ModelSpectrum([
        ModuleSpectrum(a.name, a.method, Spectrum(native, a.rank), s.tokens_seen)
        for a, s, native in zip(adapters, streams, spectra)
    ])  # fmt: skip


def weight_spectrum(model: nn.Module, modules: Iterable[str] | None = None) -> ModelSpectrum:
    """The exact spectrum of each adapter's linear update, from its factors: LoRA's
    ``scaling * B A``, DoRA's update of the direction, CeRA's linear part ``B A``."""
    adapters = find_adapters(model, modules)
    spectra = lowrank_spectra([a.factors() for a in adapters], [a.rank for a in adapters])
    return ModelSpectrum(
        [ModuleSpectrum(a.name, a.method, s) for a, s in zip(adapters, spectra)]
    )
