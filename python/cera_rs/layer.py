"""CeRA layers: a frozen base layer plus CeRA branches, one per adapter name.

Mirrors PEFT's LoRA layers (``peft.tuners.lora.layer``): the wrapped layer is
``base_layer``, the adapter weights live in ``ModuleDict``s keyed by adapter name
(``cera_A``, ``cera_B``), and PEFT's ``BaseTunerLayer`` supplies adapter switching.
``CeraLayer`` holds what every type shares; ``CeraLinear`` (linear, Conv1D and
quantized linear bases), ``CeraEmbedding`` and ``CeraConv`` (Conv1d/2d/3d) differ in
their two linear maps.
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
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from cera_rs.config import check_adapter_args
from cera_rs.functional import ConvMaps, EmbeddingMaps, cera_delta, mapped_delta

BASE_ADAPTER = "__base__"
"""The name in ``adapter_names`` of rows that get no adapter (PEFT LoRA's)."""


class CeraMergeError(NotImplementedError):
    """CeRA's branch is non-linear in x: there is no weight it could be folded into."""

    @classmethod
    def refusing(cls, method: str) -> CeraMergeError:
        """The error ``method`` (``merge_adapter``, diffusers' ``fuse_lora``, ...) raises."""
        return cls(
            f"{method} is impossible for CeRA: the branch B·act(A x) is non-linear in x, so it "
            "cannot be folded into the base weight. Keep the adapter at inference, or use "
            "unload() to get the base model back without it."
        )


_NOT_A_WEIGHT_DELTA = (
    "PEFT's LoRA adapts it by adding a weight delta B·A to a weight the layer uses directly, "
    "and CeRA's branch B·act(A x) is non-linear in x, so no weight delta equals it"
)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def base_features(base_layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a layer ``CeraLinear`` wraps: ``nn.Linear``, transformers'
    ``Conv1D``, or any layer that says its sizes with int ``in_features`` and
    ``out_features`` (quantized linear layers: bitsandbytes, HQQ, GPTQ/AWQ, torchao),
    as PEFT LoRA's ``dispatch_default`` decides."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        d_in, d_out = base_layer.weight.shape
        return d_in, d_out
    sizes = getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None)
    if all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
        return sizes
    raise TypeError(unsupported_layer_message(base_layer))


def unsupported_layer_message(base_layer: nn.Module) -> str:
    """Why CeRA cannot wrap ``base_layer``, and what to target instead."""
    kind = type(base_layer).__name__
    if isinstance(base_layer, nn.MultiheadAttention):
        return (
            f"CeRA cannot adapt nn.MultiheadAttention: {_NOT_A_WEIGHT_DELTA} (torch's fused "
            "attention reads in_proj_weight and out_proj.weight itself). Target the model's "
            "query/key/value/output projections where it has them as nn.Linear layers, or "
            "register a layer of your own with CeraConfig._register_custom_module"
        )
    return (
        f"CeRA wraps nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d and layers "
        f"with int in_features/out_features (quantized linear layers), got {kind}; register a "
        "CeRA layer for it with CeraConfig._register_custom_module({" + kind + ": YourLayer})"
    )


def cera_layer_class(base_layer: nn.Module) -> type[CeraLayer]:
    """The CeRA layer type that wraps ``base_layer`` (TypeError naming why when none does)."""
    if isinstance(base_layer, nn.Embedding):
        return CeraEmbedding
    if isinstance(base_layer, _CONVS):
        return CeraConv
    base_features(base_layer)  # raises for layers CeRA cannot wrap
    return CeraLinear


def adapter_factory(base_layer: nn.Module) -> dict[str, Any]:
    """Device and dtype of new adapter weights: the base weight's (float32 when it is not
    floating point, as a quantized weight is); layers without a ``weight`` use their
    first parameter or buffer."""
    weight = getattr(base_layer, "weight", None)
    tensors = [weight] if isinstance(weight, torch.Tensor) else []
    tensors += [*base_layer.parameters(), *base_layer.buffers()]
    if not tensors:
        return {"device": torch.device("cpu"), "dtype": torch.float32}
    first = tensors[0]
    dtype = first.dtype if first.dtype.is_floating_point else torch.float32
    return {"device": first.device, "dtype": dtype}


class CeraLayer(nn.Module, BaseTunerLayer):
    """``base_layer(x) + scaling * B · Dropout(act(A x))`` for each active adapter (or
    ``scaling * B · act(A Dropout(x))`` with ``dropout_position="input"``), where ``A x``
    and ``B h`` are the layer type's linear maps: a GEMM (``CeraLinear``), an embedding
    lookup (``CeraEmbedding``) or a convolution (``CeraConv``).

    ``A`` (``cera_A[name].weight``) starts Kaiming-normal as in the paper's reference,
    ``B`` (``cera_B[name].weight``) at zero, so a new adapter leaves the layer's output
    unchanged (``init_weights=False``: B random as well, for tests). The base layer's
    parameters are frozen. ``scaling`` is the config's; ``set_scale``/``scale_layer``/
    ``unscale_layer`` (which diffusers' ``set_adapters`` and ``lora_scale`` call, as on
    PEFT's LoRA layers) multiply it, and ``unscale_layer()`` restores it.

    A subclass says the layer's sizes (``features``), builds the two weight holders
    (``make_factors``) and computes the branch (``delta``); one registered with
    ``CeraConfig._register_custom_module`` is built as these are:
    ``cls(base_layer, r, adapter_name=..., dropout=..., activation=..., scaling=...,
    init_weights=..., dropout_position=...)``.
    """

    adapter_layer_names = ("cera_A", "cera_B")
    other_param_names = (
        "r",
        "cera_dropout",
        "activation",
        "scaling",
        "configured_scaling",
        "dropout_position",
    )

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
        self.in_features, self.out_features = self.features(base_layer)
        self.base_layer = base_layer
        self.cera_A = nn.ModuleDict()
        self.cera_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.cera_dropout: dict[str, float] = {}
        self.activation: dict[str, str] = {}
        self.scaling: dict[str, float] = {}
        self.configured_scaling: dict[str, float] = {}
        self.dropout_position: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        for param in self.base_layer.parameters():
            param.requires_grad_(False)
        self.update_layer(
            adapter_name,
            r,
            dropout=dropout,
            activation=activation,
            scaling=scaling,
            init_weights=init_weights,
            dropout_position=dropout_position,
        )

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of ``base_layer`` (TypeError when unsupported)."""
        raise NotImplementedError

    def make_factors(self, r: int, factory: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        """The modules whose ``weight`` is A and B for a rank-``r`` adapter."""
        raise NotImplementedError

    def check_adapter(self, r: int, dropout: float, dropout_position: str) -> None:
        """Raises ValueError for settings this layer type cannot take (none here)."""

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
        self.check_adapter(r, dropout, dropout_position)
        a, b = self.make_factors(r, adapter_factory(self.base_layer))
        self.cera_A[adapter_name], self.cera_B[adapter_name] = a, b
        self.r[adapter_name] = r
        self.cera_dropout[adapter_name] = float(dropout)
        self.activation[adapter_name] = activation
        self.scaling[adapter_name] = self.configured_scaling[adapter_name] = float(scaling)
        self.dropout_position[adapter_name] = dropout_position
        self.reset_cera_parameters(adapter_name, init_weights)
        self.set_adapter(self.active_adapters)

    def reset_cera_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """A: Kaiming normal (fan_in, ReLU gain, std sqrt(2 / fan_in)); B: zeros, or with
        ``init_weights=False`` Kaiming normal too (fan_in r), so the adapter acts at once."""
        a, b = self.cera_A[adapter_name].weight, self.cera_B[adapter_name].weight
        nn.init.kaiming_normal_(a, mode="fan_in", nonlinearity="relu")
        if init_weights:
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_normal_(b, mode="fan_in", nonlinearity="linear")

    # The scale API diffusers calls on PEFT layers (set_adapters with weights, lora_scale).
    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling = configured scaling * scale`` for ``adapter`` (LoRA's, over alpha/r)."""
        if adapter in self.scaling:
            self.scaling[adapter] = self.configured_scaling[adapter] * scale

    def scale_layer(self, scale: float) -> None:
        """Multiplies the active adapters' scaling by ``scale``."""
        if scale == 1:
            return
        for name in self.active_adapters:
            if name in self.scaling:
                self.scaling[name] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divides the active adapters' scaling by ``scale``; ``None`` restores the config's."""
        for name in self.active_adapters:
            if name in self.scaling:
                if scale is None:
                    self.scaling[name] = self.configured_scaling[name]
                else:
                    self.scaling[name] /= scale

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
                result = result + self.delta(name, x).to(result.dtype)
        return result

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s scaled branch on the base layer's input ``x`` (what the
        layer adds to the base's output; the spectral engine reads it too)."""
        raise NotImplementedError

    def _branch_args(self, name: str) -> dict[str, Any]:
        return {
            "dropout": self.cera_dropout[name],
            "activation": self.activation[name],
            "training": self.training,
            "scaling": self.scaling[name],
            "dropout_position": self.dropout_position[name],
        }

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
            delta = self.delta(name, x.index_select(0, index))
            result = result.index_add(0, index, delta.to(result.dtype))
        return result

    def __repr__(self) -> str:
        return "cera." + super().__repr__()


class CeraLinear(CeraLayer):
    """CeRA on a layer mapping ``(..., d_in)`` to ``(..., d_out)``: ``nn.Linear``,
    transformers' ``Conv1D``, or a quantized linear layer with ``in_features`` and
    ``out_features`` (the base computes its own output; the branch reads only ``x``).
    ``A`` is an ``nn.Linear`` d_in -> r, ``B`` r -> d_out; the branch is ``cera_delta``."""

    features = staticmethod(base_features)

    def make_factors(self, r: int, factory: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        return (
            nn.Linear(self.in_features, r, bias=False, **factory),
            nn.Linear(r, self.out_features, bias=False, **factory),
        )

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.cera_A[name].weight
        return cera_delta(x.to(a.dtype), a, self.cera_B[name].weight, **self._branch_args(name))


class CeraEmbedding(CeraLayer):
    """CeRA on ``nn.Embedding``: ``B · Dropout(act(A[:, ids]))``, ``A`` ``(r,
    num_embeddings)`` looked up as LoRA's embedding A, ``B`` ``(embedding_dim, r)``.

    A new ``A`` is N(0, 1): a lookup reads one column, so there is no fan-in to divide
    by (LoRA initialises its embedding's non-zero factor the same way). The base's
    ``padding_idx`` gets no gradient and ``scale_grad_by_freq`` scales A's gradient, as
    for the base weight. Ids cannot be dropped out: ``dropout_position="input"`` is
    refused, and so is a base with ``max_norm`` (it would renormalise A in place)."""

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"CeraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        return base_layer.num_embeddings, base_layer.embedding_dim

    def check_adapter(self, r: int, dropout: float, dropout_position: str) -> None:
        if dropout_position == "input" and dropout > 0:
            raise ValueError(
                "dropout_position='input' cannot apply to an embedding: its input "
                "is token ids; use dropout_position='hidden'"
            )
        if self.base_layer.max_norm is not None:
            raise ValueError(
                "CeRA cannot adapt an nn.Embedding with max_norm: the lookup would "
                "renormalise the adapter's A in place"
            )

    def make_factors(self, r: int, factory: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        return (
            nn.Linear(self.in_features, r, bias=False, **factory),
            nn.Linear(r, self.out_features, bias=False, **factory),
        )

    def reset_cera_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        super().reset_cera_parameters(adapter_name, init_weights)
        nn.init.normal_(self.cera_A[adapter_name].weight)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        maps = EmbeddingMaps(base.num_embeddings, base.padding_idx, base.scale_grad_by_freq)
        return mapped_delta(
            x, self.cera_A[name].weight, self.cera_B[name].weight, maps, **self._branch_args(name)
        )


class CeraConv(CeraLayer):
    """CeRA on ``nn.Conv1d/2d/3d``: ``A`` a convolution with the base's kernel, stride,
    padding (mode included), dilation and groups into ``r`` channels, the activation and
    dropout per element, ``B`` a 1x1 convolution with the same groups back to the base's
    out channels (LoRA's conv B). With both grouped, output group ``j`` reads only input
    group ``j``, as in the base layer; ``r`` must be divisible by ``groups`` (LoRA's rule)."""

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        if not isinstance(base_layer, _CONVS):
            raise TypeError(f"CeraConv wraps nn.Conv1d/2d/3d, got {type(base_layer).__name__}")
        return base_layer.in_channels, base_layer.out_channels

    def check_adapter(self, r: int, dropout: float, dropout_position: str) -> None:
        groups = self.base_layer.groups
        if r % groups:
            raise ValueError(
                f"r={r} is not divisible by the {type(self.base_layer).__name__}'s groups="
                f"{groups}: CeRA's A and B convolutions keep the base's groups (choose r as a "
                "multiple of groups, or do not target this layer)"
            )

    def make_factors(self, r: int, factory: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        conv = type(base) if type(base) in _CONVS else _CONVS[base.weight.dim() - 3]
        a = conv(
            self.in_features,
            r,
            base.kernel_size,
            stride=base.stride,
            dilation=base.dilation,
            groups=base.groups,
            bias=False,
            **factory,
        )
        b = conv(r, self.out_features, 1, groups=base.groups, bias=False, **factory)
        return a, b

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a = self.cera_A[name].weight
        x, maps = self._padded(x.to(a.dtype))
        return mapped_delta(x, a, self.cera_B[name].weight, maps, **self._branch_args(name))

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, ConvMaps]:
        """``x`` padded as the base pads it when torch's conv cannot (a padding mode other
        than zeros, or ``"same"`` with uneven sides), and the maps with int padding. There
        ``dropout_position="input"`` drops elements of the padded input A reads."""
        base = self.base_layer
        nd = len(base.kernel_size)
        mode, padding = base.padding_mode, base.padding
        if isinstance(padding, str):  # "valid" or "same"
            sides = base._reversed_padding_repeated_twice  # (last dim left, right, ...)
            even = all(sides[i] == sides[i + 1] for i in range(0, len(sides), 2))
            if mode == "zeros" and even:
                padding = tuple(sides[::2][::-1])
            else:
                x = F.pad(x, sides, mode="constant" if mode == "zeros" else mode)
                padding = (0,) * nd
        elif mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * nd
        maps = ConvMaps(tuple(base.stride), tuple(padding), tuple(base.dilation), base.groups)
        return x, maps


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
        if isinstance(module, CeraLayer):
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
        if isinstance(module, (CeraLayer, AuxiliaryTrainingWrapper))
    ]


def _inject_adapter_names(
    module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]
) -> tuple[tuple, dict]:
    return args, {**kwargs, "adapter_names": adapter_names}
