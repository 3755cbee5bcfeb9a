"""``CeraLinear``: a frozen linear layer plus CeRA branches, one per adapter name.

Mirrors PEFT's LoRA layers (``peft.tuners.lora.layer``): the wrapped layer is
``base_layer``, the adapter weights live in ``ModuleDict``s keyed by adapter name
(``cera_A``, ``cera_B``), and PEFT's ``BaseTunerLayer`` supplies adapter switching.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from cera_rs.config import check_adapter_args
from cera_rs.functional import cera_delta

BASE_ADAPTER = "__base__"
"""The name in ``adapter_names`` of rows that get no adapter (PEFT LoRA's)."""


class CeraMergeError(NotImplementedError):
    """CeRA's branch is non-linear in x: there is no weight it could be folded into."""


def base_features(base_layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a layer CeRA can wrap: ``nn.Linear`` or transformers' ``Conv1D``."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        d_in, d_out = base_layer.weight.shape
        return d_in, d_out
    raise TypeError(
        f"CeRA wraps nn.Linear or transformers' Conv1D layers, got {type(base_layer).__name__}"
    )


class CeraLinear(nn.Module, BaseTunerLayer):
    """``base_layer(x) + scaling * B · Dropout(act(A x))`` for each active adapter (or
    ``scaling * B · act(A Dropout(x))`` with ``dropout_position="input"``).

    ``A`` (``cera_A[name]``, nn.Linear d_in -> r) starts Kaiming-normal as in the
    paper's reference, ``B`` (``cera_B[name]``, r -> d_out) at zero, so a new adapter
    leaves the layer's output unchanged (``init_weights=False``: B random as well, for
    tests). The base layer's parameters are frozen.
    """

    adapter_layer_names = ("cera_A", "cera_B")
    other_param_names = ("r", "cera_dropout", "activation", "scaling", "dropout_position")

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        *,
        dropout: float = 0.1,
        activation: str = "silu",
        scaling: float = 1.0,
        init_weights: bool = True,
        dropout_position: str = "hidden",
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = base_features(base_layer)
        self.base_layer = base_layer
        self.cera_A = nn.ModuleDict()
        self.cera_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.cera_dropout: dict[str, float] = {}
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_position: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        for param in self.base_layer.parameters():
            param.requires_grad_(False)
        self.update_layer(
            adapter_name, r, dropout=dropout, activation=activation, scaling=scaling,
            init_weights=init_weights, dropout_position=dropout_position,
        )  # fmt: skip

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        *,
        dropout: float = 0.1,
        activation: str = "silu",
        scaling: float = 1.0,
        init_weights: bool = True,
        dropout_position: str = "hidden",
    ) -> None:
        """Adds (or replaces) the adapter ``adapter_name`` with fresh weights."""
        check_adapter_args(r, dropout, activation, scaling, dropout_position)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        factory = {"device": weight.device, "dtype": dtype}
        self.cera_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.cera_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.r[adapter_name] = r
        self.cera_dropout[adapter_name] = float(dropout)
        self.activation[adapter_name] = activation
        self.scaling[adapter_name] = float(scaling)
        self.dropout_position[adapter_name] = dropout_position
        self.reset_cera_parameters(adapter_name, init_weights)
        self.set_adapter(self.active_adapters)

    def reset_cera_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """A: Kaiming normal (fan_in, ReLU gain, std sqrt(2 / d_in)); B: zeros, or with
        ``init_weights=False`` Kaiming normal too (fan_in r), so the adapter acts at once."""
        a, b = self.cera_A[adapter_name].weight, self.cera_B[adapter_name].weight
        nn.init.kaiming_normal_(a, mode="fan_in", nonlinearity="relu")
        if init_weights:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_normal_(b, mode="fan_in", nonlinearity="linear")

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise CeraMergeError(
            "CeRA adapters cannot be merged into the base weight: the branch "
            "B·act(A x) is non-linear in x, so no matrix equals it"
        )

    def unmerge(self) -> None:
        # As LoRA's layers do when nothing is merged (and a CeRA adapter never is).
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        for name in self.active_adapters:
            if name in self.cera_A:
                result = result + self._delta(name, x).to(result.dtype)
        return result

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.cera_A[name].weight
        return cera_delta(
            x.to(a.dtype),
            a,
            self.cera_B[name].weight,
            dropout=self.cera_dropout[name],
            activation=self.activation[name],
            training=self.training,
            scaling=self.scaling[name],
            dropout_position=self.dropout_position[name],
        )

    def _mixed_batch_forward(
        self, x: torch.Tensor, result: torch.Tensor, adapter_names: Sequence[str]
    ) -> torch.Tensor:
        """Row ``i`` of the batch gets adapter ``adapter_names[i]`` (``"__base__"``: none),
        as PEFT LoRA's mixed adapter batches; names this layer lacks add nothing."""
        for name in dict.fromkeys(adapter_names):
            if name == BASE_ADAPTER or name not in self.cera_A:
                continue
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            index = torch.tensor(rows, device=x.device)
            delta = self._delta(name, x.index_select(0, index))
            result = result.index_add(0, index, delta.to(result.dtype))
        return result

    def __repr__(self) -> str:
        return "cera." + super().__repr__()


@contextmanager
def route_adapter_names(
    model: nn.Module, adapter_names: Sequence[str] | None, num_beams: Any = None
) -> Iterator[None]:
    """Hands ``adapter_names`` to every CeRA layer and ``modules_to_save`` wrapper of
    ``model`` for one forward or generate call, with PEFT LoRA's checks: inference
    only, and every name an adapter of the model (or ``"__base__"``)."""
    if adapter_names is None:
        yield
        return
    if model.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    known = set()
    for module in model.modules():
        if isinstance(module, CeraLinear):
            known |= module.cera_A.keys()
    unknown = {name for name in adapter_names if name != BASE_ADAPTER} - known
    if unknown:
        missing = ", ".join(sorted(unknown))
        raise ValueError(f"Trying to infer with non-existing adapter(s): {missing}")
    # Beam search repeats each input num_beams times, but an encoder still sees the
    # original batch: its layers get the original names (their hooks run last).
    beams = num_beams if isinstance(num_beams, int) and num_beams > 1 else 1
    handles = _register_names(model, [n for n in adapter_names for _ in range(beams)])
    wrapped = getattr(model, "model", model)
    if beams > 1 and hasattr(wrapped, "get_encoder"):
        encoder = wrapped.get_encoder()  # transformers 5: the model itself when it has none
        if encoder is not wrapped:
            handles += _register_names(encoder, list(adapter_names))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _register_names(model: nn.Module, adapter_names: list[str]) -> list:
    hook = partial(_inject_adapter_names, adapter_names=adapter_names)
    return [
        module.register_forward_pre_hook(hook, with_kwargs=True)
        for module in model.modules()
        if isinstance(module, (CeraLinear, AuxiliaryTrainingWrapper))
    ]


def _inject_adapter_names(
    module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]
) -> tuple[tuple, dict]:
    return args, {**kwargs, "adapter_names": adapter_names}
