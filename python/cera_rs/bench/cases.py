"""What the benchmark runs: each method as a zero-argument callable over shared inputs.

Methods compared, on the same tensors:
- ``cera_rs``: our kernel (``cera_delta`` / ``CeraLinear``);
- ``plain``: the paper reference's composition, nn.Linear -> SiLU -> Dropout -> nn.Linear;
- ``plain_compiled``: that composition under ``torch.compile``;
- ``lora_p0`` / ``lora_p0.1``: PEFT's LoRA at the same rank, lora_dropout 0 and 0.1;
- ``floor``: the same GEMMs alone, the bound no implementation of the formula beats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from cera_rs.functional import cera_delta
from cera_rs.layer import CeraLinear

P = 0.1  # dropout of every training case, as in the paper's runs


@dataclass(frozen=True)
class Shape:
    n: int
    d: int
    r: int
    dtype: torch.dtype

    def label(self) -> str:
        return f"N={self.n} d={self.d} r={self.r} {str(self.dtype).removeprefix('torch.')}"


class PlainBranch(nn.Module):
    """The reference implementation's branch: B(Dropout(SiLU(A(x))))."""

    def __init__(self, d_in: int, d_out: int, r: int, p: float) -> None:
        super().__init__()
        self.A = nn.Linear(d_in, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.drop(self.act(self.A(x))))


class PlainCeraLayer(nn.Module):
    def __init__(self, base: nn.Linear, branch: PlainBranch) -> None:
        super().__init__()
        self.base, self.branch = base, branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.branch(x)


@dataclass
class Setup:
    """Inputs and one instance of every method for a shape, sharing weights."""

    shape: Shape
    x: torch.Tensor
    grad: torch.Tensor
    base: nn.Linear
    a: torch.Tensor
    b: torch.Tensor
    plain: PlainBranch
    cera_layer: CeraLinear
    lora_layers: dict[str, nn.Module]

    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.x, self.a, self.b, self.base.weight, self.base.bias)


def setup(shape: Shape, train: bool = True, device: str = "cpu") -> Setup:
    torch.manual_seed(0)
    n, d, r, dtype = shape.n, shape.d, shape.r, shape.dtype
    base = nn.Linear(d, d).to(device, dtype).requires_grad_(False)
    plain = PlainBranch(d, d, r, P).to(device, dtype)
    nn.init.normal_(plain.B.weight, std=0.02)
    cera_layer = CeraLinear(base, r, dropout=P)
    with torch.no_grad():
        cera_layer.cera_A["default"].weight.copy_(plain.A.weight)
        cera_layer.cera_B["default"].weight.copy_(plain.B.weight)
    lora_layers = {}
    for p in (0.0, P):
        model = get_peft_model(
            nn.Sequential(base), LoraConfig(r=r, lora_alpha=r, lora_dropout=p, target_modules=["0"])
        )
        lora_layers[f"lora_p{p:g}"] = model.base_model.model[0].to(device, dtype)
    for module in (plain, cera_layer, *lora_layers.values()):
        module.train(train)
    return Setup(
        shape=shape,
        x=torch.randn(n, d, dtype=dtype, device=device, requires_grad=train),
        grad=torch.randn(n, d, dtype=dtype, device=device),
        base=base,
        a=cera_layer.cera_A["default"].weight,
        b=cera_layer.cera_B["default"].weight,
        plain=plain,
        cera_layer=cera_layer,
        lora_layers=lora_layers,
    )


def lora_branch(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """PEFT's LoRA branch exactly as its Linear.forward computes it."""
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    drop, scaling = layer.lora_dropout["default"], layer.scaling["default"]
    return lambda x: b(a(drop(x))) * scaling


def branch_forwards(s: Setup, compiled: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """The branch alone, each method's forward (backward is taken by the caller)."""
    cases = {
        "cera_rs": lambda: cera_delta(s.x, s.a, s.b, dropout=P, training=s.plain.training),
        "plain": lambda: s.plain(s.x),
    }
    if compiled:
        plain_compiled = torch.compile(s.plain)
        cases["plain_compiled"] = lambda: plain_compiled(s.x)
    for name, layer in s.lora_layers.items():
        branch = lora_branch(layer)
        cases[name] = lambda branch=branch: branch(s.x)
    return cases


def layer_forwards(s: Setup) -> dict[str, Callable[[], torch.Tensor]]:
    """The whole adapted layer (frozen base + branch), each method's forward."""
    plain_layer = PlainCeraLayer(s.base, s.plain)
    cases = {
        "base_only": lambda: s.base(s.x),
        "cera_rs": lambda: s.cera_layer(s.x),
        "plain": lambda: plain_layer(s.x),
    }
    for name, layer in s.lora_layers.items():
        cases[name] = lambda layer=layer: layer(s.x)
    return cases


def branch_floor(s: Setup, backward: bool) -> Callable[[], None]:
    """The branch's GEMMs alone: 2 forward, 4 backward (gB, dB, dA, dx)."""
    x, a, b, g = s.x.detach(), s.a.detach(), s.b.detach(), s.grad

    def run() -> None:
        with torch.no_grad():
            h = x @ a.T
            h @ b.T
            if backward:
                gb = g @ b
                g.T @ h, h.T @ x, gb @ a

    return run


def layer_floor(s: Setup) -> Callable[[], None]:
    """The whole layer's GEMMs: the base's forward and dx, plus the branch's six."""
    branch = branch_floor(s, backward=True)
    x, w, g = s.x.detach(), s.base.weight, s.grad

    def run() -> None:
        with torch.no_grad():
            torch.addmm(s.base.bias, x, w.T)
            g @ w
        branch()

    return run


def training_step(s: Setup, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """forward + backward with the shared upstream gradient; grads reset each time."""
    params = [p for p in s.params() if p.requires_grad]
    modules = (s.plain, s.cera_layer, *s.lora_layers.values())

    def run() -> None:
        for p in params:
            p.grad = None
        for m in modules:
            m.zero_grad(set_to_none=True)
        forward().backward(s.grad)

    return run


def inference(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            forward()

    return run
