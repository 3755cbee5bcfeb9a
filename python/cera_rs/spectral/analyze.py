"""Spectra of a model's adapters: of their output deltas over real batches
(``analyze``), and of their weight updates (``weight_spectrum``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from cera_rs import _native
from cera_rs.spectral.adapters import find_adapters
from cera_rs.spectral.core import Spectrum, StreamingSpectrum, lowrank_spectra
from cera_rs.spectral.deltas import stream_deltas
from cera_rs.spectral.report import ModelSpectrum, ModuleSpectrum


def analyze(
    model: nn.Module,
    batches: Iterable[Any],
    modules: Iterable[str] | None = None,
    progress: bool = True,
    center: bool = False,
) -> ModelSpectrum:
    """Runs ``batches`` through ``model`` (eval mode, no grad; its mode is restored)
    and returns the spectrum of each adapter's output delta over all their tokens.

    Works on CeRA layers and on PEFT's LoRA and DoRA layers. Batches move to the
    model's device; a dict is passed as keyword arguments (a tokenizer's output), a
    tuple as positional ones. ``modules`` selects layers by name or name suffix.
    ``center=True`` centres each output column over the tokens first (the CeRA
    authors' recipe), exactly and in the same single pass.
    """
    adapters = find_adapters(model, modules)
    streams = {a.name: StreamingSpectrum(a.out_features, a.device, center) for a in adapters}
    stream_deltas(
        model,
        batches,
        adapters,
        lambda a, x, delta: streams[a.name].update(delta),
        progress=progress,
    )
    spectra = _native.gram_spectra([streams[a.name]._native for a in adapters])
    return ModelSpectrum(
        [
            ModuleSpectrum(a.name, a.method, Spectrum(native, a.rank), streams[a.name].tokens_seen)
            for a, native in zip(adapters, spectra)
        ]
    )


def weight_spectrum(model: nn.Module, modules: Iterable[str] | None = None) -> ModelSpectrum:
    """The exact spectrum of each adapter's linear update, from its factors: LoRA's
    ``scaling * B A``, DoRA's update of the direction, CeRA's linear part ``B A``."""
    adapters = find_adapters(model, modules)
    spectra = lowrank_spectra([a.factors() for a in adapters], [a.rank for a in adapters])
    return ModelSpectrum([ModuleSpectrum(a.name, a.method, s) for a, s in zip(adapters, spectra)])
