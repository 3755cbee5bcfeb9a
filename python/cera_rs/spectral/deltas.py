"""One pass of batches through a model that hands each adapter's input and output
delta to a callback, token by token as rows: what the spectral analysis and the
linear export both stream from."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cera_rs.spectral.adapters import Adapter

Sink = Callable[[Adapter, Tensor, Tensor], None]
"""Called with ``(adapter, x, delta)``: ``delta`` as rows (``Adapter.delta``), the
padding tokens already left out of both; a convolution's ``x`` is its input as the
layer got it (``(N, C_in, *spatial)``), its ``delta`` one row per output position."""


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


class _Hooks:
    """Forward hooks passing each adapter's ``(x, delta)`` to the sink. Tokens that a
    batch's ``attention_mask`` marks as padding are left out."""

    def __init__(self, adapters: list[Adapter], sink: Sink) -> None:
        self.mask: Tensor | None = None
        self.handles = [
            a.module.register_forward_hook(self._hook(a, sink), with_kwargs=True) for a in adapters
        ]

    def _hook(self, adapter: Adapter, sink: Sink):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            x = args[0] if args else kwargs["x"]
            delta = adapter.delta(x, output)
            # A conv's rows are output positions, not tokens: no padding mask applies.
            if (
                self.mask is not None
                and adapter.kind != "conv"
                and tuple(delta.shape[:-1]) == tuple(self.mask.shape)
            ):
                mask = self.mask.to(delta.device)
                x, delta = x[mask], delta[mask]
            sink(adapter, x, delta)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def stream_deltas(
    model: nn.Module,
    batches: Iterable[Any],
    adapters: list[Adapter],
    sink: Sink,
    progress: bool = True,
    desc: str = "analyze",
    what: str = "batches",
) -> None:
    """Runs ``batches`` through ``model`` (eval mode, no grad; its mode is restored),
    calling ``sink`` for every adapter on every batch. Batches move to the model's
    device; a dict is passed as keyword arguments (a tokenizer's output), a tuple as
    positional ones. No batch at all is a ValueError naming the argument (``what``)."""
    device = next(model.parameters()).device
    hooks = _Hooks(adapters, sink)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            total = len(batches) if hasattr(batches, "__len__") else None
            for batch in tqdm(batches, total=total, disable=not progress, desc=desc):
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                hooks.mask = None if mask is None else mask.bool()
                _call(model, batch)
                seen += 1
    finally:
        hooks.remove()
        model.train(was_training)
    if not seen:
        raise ValueError(f"{what} is empty: {desc} needs at least one batch to run the model on")
