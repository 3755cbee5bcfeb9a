"""Spectral analysis of adapters: the singular values of what an adapter adds, and
the rank-collapse metrics over them (each defined on its ``Spectrum`` property).

- ``spectrum`` / ``lowrank_spectrum`` / ``StreamingSpectrum``: one matrix, a factored
  update ``B·A``, or rows streamed batch by batch (memory independent of their count).
- ``analyze``: spectra of each adapter's output delta over real batches (CeRA, PEFT
  LoRA and DoRA layers; linear, embedding and convolution: a row per token, per id
  looked up, per output position); ``weight_spectrum``: of each adapter's linear update.
- ``SpectralCallback``: logs effective rank and tail energy during Trainer training, to
  every integration the Trainer reports to (TensorBoard, W&B, ...); ``ProbeCallback``:
  the schedule and the logging it shares with ``cera_rs.export.LinearityCallback``.
"""

from cera_rs.spectral.adapter_dir import adapter_dir_spectrum
from cera_rs.spectral.analyze import analyze, weight_spectrum
from cera_rs.spectral.callback import ProbeCallback, SpectralCallback
from cera_rs.spectral.core import (
    Spectrum,
    StreamingSpectrum,
    lowrank_spectra,
    lowrank_spectrum,
    spectrum,
)
from cera_rs.spectral.report import ModelSpectrum, ModuleSpectrum

__all__ = [
    "ModelSpectrum",
    "ModuleSpectrum",
    "ProbeCallback",
    "SpectralCallback",
    "Spectrum",
    "StreamingSpectrum",
    "adapter_dir_spectrum",
    "analyze",
    "lowrank_spectra",
    "lowrank_spectrum",
    "spectrum",
    "weight_spectrum",
]
