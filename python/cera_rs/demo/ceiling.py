"""Part 1: the linear ceiling on a controlled task.

A frozen base layer (d = 256) and targets ``base(x) + residual``, the residual from one
of three families, each scaled to unit variance:
- ``linear``: a rank-k linear map (LoRA's home ground: both should fit it);
- ``gated``: a SiLU-gated width-k map, like an LLM's gated FFN;
- ``quadratic``: a width-k even function ``(U x)^2 - 1``; its best linear fit is zero,
  so every linear update, at any rank, leaves all of it unexplained.
Each method is trained with the same optimiser, steps and data; a small learning-rate
sweep picks each method's rate on a validation split, then three seeds are run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm import tqdm

from cera_rs import CeraConfig, get_cera_model
from cera_rs.demo import linearity
from cera_rs.spectral import spectrum

FAMILIES = ("linear", "gated", "quadratic")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "lora", "dora" or "cera"
    r: int


@dataclass
class Settings:
    d: int = 256
    k: int = 16
    n_train: int = 8192
    n_eval: int = 2048
    steps: int = 600
    batch: int = 512
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    seeds: tuple[int, ...] = (0, 1, 2)
    spectrum_rank: int = 16

    @classmethod
    def quick(cls) -> Settings:
        return cls(n_train=4096, n_eval=1024, steps=150, lrs=(3e-3,), seeds=(0,))

    def methods(self) -> list[Method]:
        lora = [Method(f"LoRA r={r}", "lora", r) for r in (4, 16, 64)]
        full = [Method(f"LoRA r={self.d} (full rank)", "lora", self.d)]
        dora = [Method("DoRA r=16", "dora", 16)]
        cera = [Method(f"CeRA r={r}", "cera", r) for r in (4, 16, 64)]
        return lora + full + dora + cera


@dataclass
class Task:
    family: str
    base: nn.Linear
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # train, val, test: (x, y)


def make_task(family: str, s: Settings, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(1000 + FAMILIES.index(family))
    d, k = s.d, s.k
    base = nn.Linear(d, d)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
        base.bias.zero_()
    base.requires_grad_(False)
    u = torch.randn(k, d, generator=gen) / d**0.5
    w = torch.randn(k, d, generator=gen) / d**0.5
    v = torch.randn(d, k, generator=gen) / k**0.5

    def residual(x: torch.Tensor) -> torch.Tensor:
        if family == "linear":
            return x @ u.T @ v.T
        if family == "gated":
            return (nn.functional.silu(2 * x @ u.T) * (x @ w.T)) @ v.T
        return ((x @ u.T) ** 2 - (u**2).sum(1)) @ v.T

    data_gen = torch.Generator().manual_seed(seed)
    sizes = {"train": s.n_train, "val": s.n_eval, "test": s.n_eval}
    xs = {name: torch.randn(n, d, generator=data_gen) for name, n in sizes.items()}
    scale = residual(xs["train"]).var(0).mean().sqrt()
    with torch.no_grad():
        splits = {name: (x, base(x) + residual(x) / scale) for name, x in xs.items()}
    return Task(family, base, splits)


def build(method: Method, base: nn.Linear) -> nn.Module:
    model = nn.Sequential(copy.deepcopy(base))
    if method.kind == "cera":
        return get_cera_model(model, CeraConfig(r=method.r, target_modules=["0"], cera_dropout=0.0))
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.r,
        target_modules=["0"],
        lora_dropout=0.0,
        use_dora=method.kind == "dora",
    )
    return get_peft_model(model, config)


def unexplained(model: nn.Module, task: Task, split: str) -> float:
    """Held-out squared error as a fraction of the residual's variance (1.0 = nothing learnt)."""
    x, y = task.splits[split]
    with torch.no_grad():
        residual = y - task.base(x)
        return float(((model(x) - y) ** 2).mean() / residual.var(0).mean())


def train(method: Method, task: Task, s: Settings, lr: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build(method, task.base).train()
    x, y = task.splits["train"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(s.steps):
        idx = torch.randint(0, len(x), (s.batch,), generator=order)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def least_squares_ceiling(task: Task) -> float:
    """The best any linear update (with bias) can do, in closed form: the ceiling itself."""
    x, y = task.splits["train"]
    ones = torch.ones(len(x), 1)
    target = (y - task.base(x)).double()
    solution = torch.linalg.lstsq(torch.cat([x, ones], 1).double(), target).solution
    xt, yt = task.splits["test"]
    pred = torch.cat([xt, torch.ones(len(xt), 1)], 1).double() @ solution
    residual = (yt - task.base(xt)).double()
    return float(((pred - residual) ** 2).mean() / residual.var(0).mean())


def delta_spectrum(model: nn.Module, task: Task, rank: int, own_rank: int) -> dict:
    """Spectrum of the adapter's output delta over the test tokens; tail energy beyond
    the shared ``rank`` and beyond the adapter's own rank."""
    x, _ = task.splits["test"]
    with torch.no_grad():
        delta = model(x) - task.base(x)
    spec = spectrum(delta, rank=rank)
    return {
        "effective_rank": spec.effective_rank,
        "tail_energy": spec.tail_energy(rank),
        "tail_beyond_r": spec.tail_energy(own_rank),
        "singular_values": spec.singular_values.tolist(),
    }


def run(s: Settings, progress: bool = True) -> dict:
    """Every family x method: the chosen learning rate, held-out error per seed, the
    trainable parameters and the spectrum of the adapter's output delta."""
    methods = s.methods()
    results: dict = {
        "settings": {
            "d": s.d,
            "k": s.k,
            "steps": s.steps,
            "batch": s.batch,
            "lrs": list(s.lrs),
            "seeds": list(s.seeds),
            "n_train": s.n_train,
            "n_eval": s.n_eval,
        },
        "families": {},
    }
    total = len(FAMILIES) * len(methods) * (len(s.lrs) + len(s.seeds) - 1)
    bar = tqdm(total=total, desc="part 1: linear ceiling", disable=not progress)
    for family in FAMILIES:
        task = make_task(family, s)
        rows = {}
        for method in methods:
            val, chosen_on = {}, {}
            for lr in s.lrs:
                bar.set_postfix_str(f"{family}, {method.name}, lr {lr:g}")
                chosen_on[lr] = train(method, task, s, lr, s.seeds[0])
                val[lr] = unexplained(chosen_on[lr], task, "val")
                bar.update()
            lr = min(val, key=val.get)
            errors, spectra, exported, lin = [], [], [], []
            for seed in s.seeds:
                if seed == s.seeds[0]:  # the run that chose the rate: the same training
                    model = chosen_on[lr]
                else:
                    model = train(method, task, s, lr, seed)
                    bar.update()
                errors.append(unexplained(model, task, "test"))
                spectra.append(delta_spectrum(model, task, s.spectrum_rank, method.r))
                if method.kind == "cera":
                    merged, report = linearity.export_and_merge(
                        model,
                        nn.Sequential(task.base),
                        task.splits["train"][0].split(2048),
                        method.r,
                        held_out=task.splits["test"][0].split(2048),
                    )
                    exported.append(unexplained(merged, task, "test"))
                    lin.append(linearity.summary(report))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows[method.name] = {
                "kind": method.kind,
                "r": method.r,
                "lr": lr,
                "trainable_params": trainable,
                "val_error_by_lr": {f"{k:g}": v for k, v in val.items()},
                "test_error": errors,
                "test_error_mean": float(np.mean(errors)),
                "test_error_std": float(np.std(errors)),
                "effective_rank": float(np.mean([sp["effective_rank"] for sp in spectra])),
                "tail_energy": float(np.mean([sp["tail_energy"] for sp in spectra])),
                "tail_energy_beyond_own_r": float(np.mean([sp["tail_beyond_r"] for sp in spectra])),
                "singular_values": spectra[0]["singular_values"],
            }
            if lin:  # CeRA: its linearity and its best same-rank LoRA, merged
                rows[method.name].update(
                    {
                        "linearity": linearity.mean_over_seeds(lin),
                        "exported_lora_test_error": exported,
                        "exported_lora_test_error_mean": float(np.mean(exported)),
                    }
                )
        results["families"][family] = {
            "least_squares_ceiling": least_squares_ceiling(task),
            "methods": rows,
        }
    bar.close()
    return results
