"""One CeraLinear layer against a PEFT LoRA layer of the same rank on a generated
regression task: a frozen base plus a non-linear residual only CeRA can express."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from cera_rs import CeraLinear


def make_task(d: int, k: int, n: int, seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A frozen base layer and targets base(x) + a SiLU-gated residual of width k."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
        base.bias.zero_()
    u = torch.randn(k, d, generator=gen) / d**0.5
    v = torch.randn(d, k, generator=gen) / k**0.5
    x = torch.randn(n, d, generator=gen)
    with torch.no_grad():
        residual = nn.functional.silu(3 * x @ u.T) @ v.T
        y = base(x) + residual / residual.std()
    return base, x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run(d: int = 128, k: int = 32, r: int = 8, n: int = 2048, steps: int = 200) -> dict:
    torch.manual_seed(0)
    base, x, y = make_task(d, k, n, seed=0)
    cera = CeraLinear(_copy(base), r=r, dropout=0.0)
    cera_losses = train(cera, x, y, steps, lr=1e-2)
    lora = get_peft_model(
        nn.Sequential(_copy(base)), LoraConfig(r=r, lora_alpha=r, target_modules=["0"])
    )
    lora_losses = train(lora, x, y, steps, lr=1e-2)
    for step in range(0, steps, max(1, steps // 20)):
        cera_loss, lora_loss = cera_losses[step], lora_losses[step]
        print(f"step {step:4d}   CeRA loss {cera_loss:.4f}   LoRA loss {lora_loss:.4f}")
    print(f"final loss after {steps} steps, rank {r}: "
          f"CeRA {cera_losses[-1]:.4f}   LoRA {lora_losses[-1]:.4f}   "
          f"(residual variance 1.0; lower is better)")  # fmt: skip
    return {"cera": cera_losses[-1], "lora": lora_losses[-1]}


def _copy(base: nn.Linear) -> nn.Linear:
    clone = nn.Linear(base.in_features, base.out_features)
    clone.load_state_dict(base.state_dict())
    return clone
