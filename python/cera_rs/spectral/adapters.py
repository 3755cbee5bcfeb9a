"""The adapter layers a model holds, seen the same way whatever made them: CeRA's
``CeraLinear``, PEFT's LoRA ``Linear`` and DoRA (LoRA with ``use_dora=True``).

For each: its output delta for an input (what the adapter adds to the frozen layer's
output) and its linear update as low-rank factors ``(B, A)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import Tensor, nn

from cera_rs.functional import cera_delta
from cera_rs.layer import CeraLinear
from cera_rs.table import name_matches

PEFT_PREFIX = "base_model.model."
"""What ``PeftModel`` puts before the wrapped model's module names; dropped from
reported names so a CeRA and a LoRA model of one base show the same names."""


def display_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX)


@dataclass(frozen=True)
class Adapter:
    """One adapted layer: ``name`` (without PEFT's prefix), ``method`` ("cera",
    "lora" or "dora"), the active adapter names it runs, and their total rank."""

    name: str
    module: nn.Module
    method: str
    adapter_names: tuple[str, ...]
    rank: int

    @property
    def out_features(self) -> int:
        return self.module.out_features

    @property
    def device(self) -> torch.device:
        return self.module.base_layer.weight.device

    def delta(self, x: Tensor, output: Tensor) -> Tensor:
        """What the active adapters added to ``output`` for input ``x``, eval mode.

        CeRA and plain LoRA recompute their branch from the factors (exact, and two
        thin GEMMs). DoRA rescales the base output too, so its delta is ``output``
        minus the frozen layer's output.
        """
        m = self.module
        if isinstance(m, CeraLinear):
            return sum(
                cera_delta(
                    x.to(m.cera_A[a].weight.dtype), m.cera_A[a].weight, m.cera_B[a].weight,
                    activation=m.activation[a], scaling=m.scaling[a], training=False,
                )
                for a in self.adapter_names
            )  # fmt: skip
        if any(a in m.lora_variant for a in self.adapter_names):
            if m.merged:
                raise ValueError(
                    f"{self.name}: a merged DoRA layer has no separate delta; unmerge it first"
                )
            return output - m.base_layer(x)
        return sum(
            m.lora_B[a](m.lora_A[a](x.to(m.lora_A[a].weight.dtype))) * m.scaling[a]
            for a in self.adapter_names
        )

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(B, A)`` in float64 with ``B·A`` the linear update: ``scaling * B A``
        summed over the active adapters (the factors side by side). For DoRA this is
        the update of the direction; for CeRA, the linear part of the branch."""
        m = self.module
        if isinstance(m, CeraLinear):
            pairs = [(m.cera_B[a], m.cera_A[a], m.scaling[a]) for a in self.adapter_names]
        else:
            pairs = [(m.lora_B[a], m.lora_A[a], m.scaling[a]) for a in self.adapter_names]
        b = torch.cat([s * b.weight.detach().double() for b, _, s in pairs], dim=1)
        a = torch.cat([a.weight.detach().double() for _, a, _ in pairs], dim=0)
        return b, a


def _as_adapter(name: str, module: nn.Module) -> Adapter | None:
    if isinstance(module, CeraLinear):
        active = tuple(a for a in module.active_adapters if a in module.cera_A)
        method = "cera"
    elif isinstance(module, LoraLinear):
        active = tuple(a for a in module.active_adapters if a in module.lora_A)
        method = "dora" if any(module.use_dora.get(a, False) for a in active) else "lora"
    else:
        return None
    if not active:
        return None
    rank = sum(module.r[a] for a in active)
    return Adapter(display_name(name), module, method, active, rank)


def find_adapters(model: nn.Module, modules: Iterable[str] | None = None) -> list[Adapter]:
    """The model's adapted layers with an active adapter, in module order.

    ``modules`` narrows them down: each entry selects the layers whose name equals it
    or ends with ``"." + entry`` (``"q_proj"``, ``"layers.0.self_attn.v_proj"``).
    """
    found = [a for name, m in model.named_modules() if (a := _as_adapter(name, m)) is not None]
    if not found:
        raise ValueError(
            "the model has no active CeRA, LoRA or DoRA layers (CeraLinear, "
            "peft.tuners.lora.Linear) to analyse"
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
