"""The adapter layers a model holds, seen the same way whatever made them: CeRA's
layers (``CeraLinear``, ``CeraEmbedding``, ``CeraConv``) and PEFT's LoRA and DoRA
(LoRA with ``use_dora=True``) on linear layers, embeddings and convolutions.

For each: its output delta for an input as rows (what the adapter adds to the frozen
layer's output, one row per token, or per output position of a convolution) and its
linear update as low-rank factors ``(B, A)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import Embedding as LoraEmbedding
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import _ConvNd as LoraConv
from torch import Tensor, nn
from torch.nn import functional as F

from cera_rs.functional import cera_delta
from cera_rs.layer import CeraConv, CeraEmbedding, CeraLayer, CeraLinear
from cera_rs.table import name_matches

PEFT_PREFIX = "base_model.model."
"""What ``PeftModel`` puts before the wrapped model's module names; dropped from
reported names so a CeRA and a LoRA model of one base show the same names."""

KINDS = {
    CeraLinear: "linear",
    CeraEmbedding: "embedding",
    CeraConv: "conv",
    LoraLinear: "linear",
    LoraEmbedding: "embedding",
    LoraConv: "conv",
}
"""The layer classes analysed, and what their input is: features, token ids, or a
convolution's channels-first input."""


def display_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


def channels_last(t: Tensor, spatial: int) -> Tensor:
    """A convolution's ``(N, C, *spatial)`` (or unbatched ``(C, *spatial)``) output as
    rows ``(N, *spatial, C)``: one row per output position, as tokens are."""
    return t.movedim(t.dim() - spatial - 1, -1)


def conv_matrix(weight: Tensor, groups: int) -> Tensor:
    """A conv weight ``(out, in / groups, *kernel)`` as the dense ``(out, in * K)`` map of
    flattened patches (channel-major, as ``weight.reshape(out, -1)`` of one group): the
    groups' blocks on the diagonal."""
    flat = weight.reshape(weight.shape[0], -1)
    return flat if groups == 1 else torch.block_diag(*flat.chunk(groups, dim=0))


@dataclass(frozen=True)
class Adapter:
    """One adapted layer: ``name`` (without PEFT's prefix), ``method`` ("cera",
    "lora" or "dora"), ``kind`` ("linear", "embedding" or "conv"), the active adapter
    names it runs, and their total rank."""

    name: str
    module: nn.Module
    method: str
    kind: str
    adapter_names: tuple[str, ...]
    rank: int

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def device(self) -> torch.device:
        return self.module.base_layer.weight.device

    @property
    def spatial(self) -> int:
        """A convolution's number of spatial dimensions (0 for the other kinds)."""
        return len(self.module.base_layer.kernel_size) if self.kind == "conv" else 0

    def delta(self, x: Tensor, output: Tensor) -> Tensor:
        """What the active adapters added to ``output`` for input ``x``, eval mode, as
        rows ``(..., out_features)``: per token, or per output position of a conv.

        CeRA and plain LoRA recompute their branch from the factors (exact, and two
        thin maps). DoRA rescales the base output too, so its delta is ``output``
        minus the frozen layer's output.
        """
        m = self.module
        if isinstance(m, CeraLinear):
            return sum(
                cera_delta(
                    x.to(m.cera_A[a].weight.dtype),
                    m.cera_A[a].weight,
                    m.cera_B[a].weight,
                    activation=m.activation[a],
                    scaling=m.scaling[a],
                    training=False,
                )
                for a in self.adapter_names
            )
        if isinstance(m, CeraLayer):
            delta = sum(_eval_delta(m, a, x) for a in self.adapter_names)
        elif any(a in m.lora_variant for a in self.adapter_names):
            if m.merged:
                raise ValueError(
                    f"{self.name}: a merged DoRA layer has no separate delta; unmerge it first"
                )
            delta = output - m.base_layer(x)
        elif self.kind == "embedding":
            delta = sum(
                F.embedding(x, m.lora_embedding_A[a].T) @ m.lora_embedding_B[a].T * m.scaling[a]
                for a in self.adapter_names
            )
        else:
            delta = sum(
                m.lora_B[a](m.lora_A[a](x.to(m.lora_A[a].weight.dtype))) * m.scaling[a]
                for a in self.adapter_names
            )
        return channels_last(delta, self.spatial) if self.kind == "conv" else delta

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(B, A)`` in float64 with ``B·A`` the linear update: ``scaling * B A``
        summed over the active adapters (the factors side by side). For DoRA this is
        the update of the direction; for CeRA, the linear part of the branch. An
        embedding's ``A`` is ``(r, num_embeddings)``; a convolution's is its map of
        flattened input patches ``(r, C_in * K)`` (grouped factors as block-diagonal
        matrices)."""
        m = self.module
        pairs = []
        for name in self.adapter_names:
            if isinstance(m, CeraLayer):
                b, a = m.cera_B[name].weight, m.cera_A[name].weight
            elif self.kind == "embedding":
                b, a = m.lora_embedding_B[name], m.lora_embedding_A[name]
            else:
                b, a = m.lora_B[name].weight, m.lora_A[name].weight
            b, a = b.detach().double(), a.detach().double()
            if self.kind == "conv":  # PEFT's LoRA A is never grouped, CeRA's is as B
                b_groups = a.shape[0] // b.shape[1]
                a_groups = b_groups if isinstance(m, CeraLayer) else 1
                b, a = conv_matrix(b, b_groups), conv_matrix(a, a_groups)
            pairs.append((m.scaling[name] * b, a))
        return torch.cat([b for b, _ in pairs], dim=1), torch.cat([a for _, a in pairs], dim=0)


def _eval_delta(m: CeraLayer, name: str, x: Tensor) -> Tensor:
    """Adapter ``name``'s branch on ``x`` with dropout off, the layer's mode kept."""
    was = m.training
    m.training = False
    try:
        return m.delta(name, x)
    finally:
        m.training = was


def _as_adapter(name: str, module: nn.Module) -> Adapter | None:
    kind = next((k for cls, k in KINDS.items() if isinstance(module, cls)), None)
    if kind is None:
        return None
    if isinstance(module, CeraLayer):
        active = tuple(a for a in module.active_adapters if a in module.cera_A)
        method = "cera"
    else:
        factors = module.lora_embedding_A if kind == "embedding" else module.lora_A
        active = tuple(a for a in module.active_adapters if a in factors)
        method = "dora" if any(module.use_dora.get(a, False) for a in active) else "lora"
    if not active:
        return None
    rank = sum(module.r[a] for a in active)
    return Adapter(display_name(name), module, method, kind, active, rank)


def find_adapters(model: nn.Module, modules: Iterable[str] | None = None) -> list[Adapter]:
    """The model's adapted layers with an active adapter, in module order.

    ``modules`` narrows them down: each entry selects the layers whose name equals it
    or ends with ``"." + entry`` (``"q_proj"``, ``"layers.0.self_attn.v_proj"``).
    """
    found = [a for name, m in model.named_modules() if (a := _as_adapter(name, m)) is not None]
    if not found:
        raise ValueError(
            "the model has no active CeRA, LoRA or DoRA layers (CeraLinear, CeraEmbedding, "
            "CeraConv, PEFT's LoRA Linear, Embedding and Conv) to analyse"
        )
    if modules is None:
        return found
    wanted = [modules] if isinstance(modules, str) else list(modules)
    chosen = []
    for entry in wanted:
        hits = [a for a in found if name_matches(a.name, entry)]
        if not hits:
            names = ", ".join(a.name for a in found[:8]) + (", ..." if len(found) > 8 else "")
            raise ValueError(f"no adapter layer matches {entry!r}; adapter layers: {names}")
        chosen += [a for a in hits if a not in chosen]
    return [a for a in found if a in chosen]
