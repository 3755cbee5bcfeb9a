"""``cera-rs bench --layers`` and ``--model``: what CeRA costs on the layer types besides
Linear, and in a whole training step.

``--layers``: Conv2d at UNet shapes and an Embedding at SmolLM2's (vocab 49,152, d 576,
4096 tokens), forward+backward in training (dropout 0.1), of the branch alone and of
the whole adapted layer, for ``cera_rs`` (``CeraConv`` / ``CeraEmbedding``), ``plain``
(the same formula composed of torch modules: conv or lookup, SiLU, Dropout, conv or
linear) and PEFT's LoRA at the same rank (``lora_p0``, and for convolutions
``lora_p0.1``, whose dropout drops the layer's input); interleaved medians, the bytes
each keeps for backward, and the ratios the targets are read on (``cera_rs`` at or
below ``plain``; within 1.2x of the fastest LoRA).

``--model``: one training step (forward, backward, AdamW) of SmolLM2-135M with adapters
on q/v of its last 10 layers, batch 16 of short sequences: CeRA r=8 SiLU p=0.1, CeRA r=8
identity p=0 and LoRA r=8, on the whole model and on compare's split path (the frozen
first layers' hidden states computed once, ``--adapted-layers``); target: CeRA within
1.05x of LoRA on both.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from cera_rs.atomic import atomic_file
from cera_rs.layer import CeraConv, CeraEmbedding
from cera_rs.measure import describe_machine, median_times, saved_bytes, synchronizer

P = 0.1
LORA_BOUND = 1.2
PLAIN_BOUND = 1.0
MODEL_BOUND = 1.05


@dataclass(frozen=True)
class LayerCase:
    """A Conv2d ``channels -> channels``, 3x3, on ``n`` maps of ``size x size``, or an
    Embedding of ``vocab x channels`` on ``n`` tokens; adapters of rank ``r``."""

    kind: str
    n: int
    channels: int
    r: int
    size: int = 0
    vocab: int = 0

    def label(self) -> str:
        if self.kind == "conv":
            return f"Conv2d {self.channels}ch 3x3 {self.size}x{self.size} batch {self.n} r={self.r}"
        return f"Embedding {self.vocab}x{self.channels} {self.n} tokens r={self.r}"


FULL = (
    LayerCase("conv", 2, 320, 32, size=64),
    LayerCase("conv", 2, 640, 32, size=32),
    LayerCase("conv", 4, 320, 32, size=32),
    LayerCase("embedding", 4096, 576, 32, vocab=49152),
)
"""UNet shapes (SD 1.5's first two levels) and SmolLM2's embedding."""
QUICK = (LayerCase("conv", 2, 8, 4, size=6), LayerCase("embedding", 64, 16, 4, vocab=50))
"""Tiny shapes: checks that the benchmark runs (no timing asserted)."""


class PlainBranch(nn.Module):
    """The formula composed of torch modules, the reference implementation's way: the
    A map, SiLU, Dropout, the B map."""

    def __init__(self, a: Callable, b: Callable) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.act, self.drop = nn.SiLU(), nn.Dropout(P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(self.act(self.a(x))))


@dataclass
class Built:
    x: torch.Tensor
    grad: torch.Tensor
    base: nn.Module
    cera: nn.Module
    plain: PlainBranch
    loras: dict[str, nn.Module]
    keep: tuple[torch.Tensor, ...]


def build(case: LayerCase, device: str = "cpu") -> Built:
    """The frozen base, CeRA on it, the plain composition with CeRA's weights and PEFT's
    LoRA layers, with a shared input and upstream gradient."""
    torch.manual_seed(0)
    if case.kind == "conv":
        base = nn.Conv2d(case.channels, case.channels, 3, padding=1)
        x = torch.randn(case.n, case.channels, case.size, case.size, requires_grad=True)
        cera = CeraConv(base.requires_grad_(False), case.r, dropout=P, init_weights=False)
        a, b = cera.cera_A["default"], cera.cera_B["default"]
        plain_a = nn.Conv2d(case.channels, case.r, 3, padding=1, bias=False)
        plain_b = nn.Conv2d(case.r, case.channels, 1, bias=False)
        plain_a.weight, plain_b.weight = (nn.Parameter(w.weight.detach().clone()) for w in (a, b))
        plain = PlainBranch(plain_a, plain_b)
        drops = (0.0, P)
    else:
        base = nn.Embedding(case.vocab, case.channels)
        x = torch.randint(0, case.vocab, (case.n,))
        cera = CeraEmbedding(base.requires_grad_(False), case.r, dropout=P, init_weights=False)
        a = nn.Parameter(cera.cera_A["default"].weight.detach().clone())
        b = nn.Linear(case.r, case.channels, bias=False)
        b.weight = nn.Parameter(cera.cera_B["default"].weight.detach().clone())
        plain = PlainBranch(lambda ids: F.embedding(ids, a.T), b)
        plain.register_parameter("a_weight", a)
        drops = (0.0,)  # PEFT's LoRA embedding has no dropout
    loras = {}
    for p in drops:
        config = LoraConfig(r=case.r, lora_alpha=case.r, lora_dropout=p, target_modules=["0"])
        loras[f"lora_p{p:g}"] = get_peft_model(nn.Sequential(base), config).base_model.model[0]
    modules = [base, cera, plain, *loras.values()]
    for m in modules:
        m.to(device).train()
    x = x.detach().to(device).requires_grad_(x.is_floating_point())
    with torch.no_grad():
        grad = torch.randn_like(base(x))
    keep = (x, *(p for m in modules for p in m.parameters()))
    return Built(x, grad, base, cera, plain, loras, keep)


def _lora_branch(layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """PEFT's LoRA branch as its layer's forward computes it."""
    scaling = layer.scaling["default"]
    if isinstance(layer.base_layer, nn.Embedding):
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        return lambda x: layer._embed(x, a.T) @ b.T * scaling
    a, b, drop = layer.lora_A["default"], layer.lora_B["default"], layer.lora_dropout["default"]
    return lambda x: b(a(drop(x))) * scaling


def forwards(s: Built, scope: str) -> dict[str, Callable[[], torch.Tensor]]:
    """Each method's forward: of the branch alone, or of the whole adapted layer."""
    if scope == "branch":
        cases = {"cera_rs": lambda: s.cera.delta("default", s.x), "plain": lambda: s.plain(s.x)}
        for name, layer in s.loras.items():
            branch = _lora_branch(layer)
            cases[name] = lambda branch=branch: branch(s.x)
        return cases
    # the frozen base alone has a backward only where its input wants a gradient
    cases = {"base_only": lambda: s.base(s.x)} if s.x.requires_grad else {}
    cases |= {"cera_rs": lambda: s.cera(s.x), "plain": lambda: s.base(s.x) + s.plain(s.x)}
    for name, layer in s.loras.items():
        cases[name] = lambda layer=layer: layer(s.x)
    return cases


def _step(s: Built, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    params = [p for p in s.keep if p.requires_grad]

    def run() -> None:
        for p in params:
            p.grad = None
        forward().backward(s.grad)

    return run


def ratios(ms: dict[str, float]) -> dict[str, float]:
    """``cera_rs`` against ``plain`` and against the fastest LoRA."""
    lora = min(v for k, v in ms.items() if k.startswith("lora"))
    return {"vs_plain": ms["cera_rs"] / ms["plain"], "vs_lora": ms["cera_rs"] / lora}


def run_layers(
    cases: tuple[LayerCase, ...] = FULL,
    repeats: int = 7,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Every case, one at a time: the branch's and the layer's times, bytes kept."""
    sync = synchronizer(torch.device(device))
    rows = []
    for case in tqdm(cases, desc="bench --layers", disable=not progress):
        s = build(case, device)
        for scope in ("branch", "layer"):
            fwd = forwards(s, scope)
            samples: dict[str, list[float]] = {}
            times = median_times(
                {k: _step(s, f) for k, f in fwd.items()},
                warmup=1,
                repeats=repeats,
                sync=sync,
                samples=samples,
            )
            ms = {k: 1e3 * v for k, v in times.items()}
            saved = {k: saved_bytes(f, s.keep) for k, f in fwd.items() if k != "base_only"}
            rows.append(
                {
                    **asdict(case),
                    "label": case.label(),
                    "scope": scope,
                    "ms": ms,
                    "min_ms": {k: 1e3 * min(v) for k, v in samples.items()},
                    "saved_bytes": saved,
                    **ratios(ms),
                }
            )
        del s
    return {
        "machine": describe_machine(),
        "date": date.today().isoformat(),
        "device": device,
        "rows": rows,
        "targets": layer_targets(rows),
    }


def layer_targets(rows: list[dict]) -> list[dict]:
    checks = []
    for row in rows:
        where = f"{row['label']}, {row['scope']}"
        checks += [
            _check(f"{where}: cera_rs vs plain", row["vs_plain"], PLAIN_BOUND),
            _check(f"{where}: cera_rs vs fastest LoRA", row["vs_lora"], LORA_BOUND),
        ]
    return checks


def _check(name: str, ratio: float, bound: float) -> dict:
    return {"target": name, "ratio": ratio, "bound": bound, "met": ratio <= bound}


def format_layers(results: dict[str, Any]) -> str:
    lines = [
        f"machine: {results['machine']}; device: {results['device']}; date: {results['date']}",
        "forward+backward, train, dropout 0.1 (LoRA p0: none); ms (median, interleaved) "
        "and MiB saved for backward",
    ]
    for row in results["rows"]:
        cells = "  ".join(
            f"{k} {v:.2f}"
            + (f" ({row['saved_bytes'][k] / 2**20:.1f} MiB)" if k in row["saved_bytes"] else "")
            for k, v in row["ms"].items()
        )
        lines.append(
            f"{row['label']}, {row['scope']}: {cells}; cera_rs/plain "
            f"{row['vs_plain']:.3f}, cera_rs/LoRA {row['vs_lora']:.3f}"
        )
    return "\n".join(lines + _format_targets(results["targets"]))


def _format_targets(checks: list[dict]) -> list[str]:
    return ["", "targets"] + [
        f"  {'met ' if c['met'] else 'MISS'} {c['target']}: {c['ratio']:.3f} (<= {c['bound']})"
        for c in checks
    ]


# --- the whole-model case ------------------------------------------------------------


@dataclass(frozen=True)
class ModelCase:
    layers: int = 10
    batch: int = 16
    seq: int = 32
    r: int = 8
    repeats: int = 5


MODEL_QUICK = ModelCase(layers=2, batch=2, seq=8, r=2, repeats=1)


def _methods(r: int, targets: str) -> dict[str, Any]:
    from cera_rs import CeraConfig

    return {
        "cera_silu_p0.1": CeraConfig(r=r, target_modules=targets, cera_dropout=0.1),
        "cera_identity_p0": CeraConfig(
            r=r, target_modules=targets, activation="identity", cera_dropout=0.0
        ),
        "lora": LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets),
    }


def run_model(
    base: nn.Module | None = None,
    case: ModelCase = ModelCase(),
    progress: bool = True,
    paths: tuple[str, ...] = ("whole", "split"),
) -> dict[str, Any]:
    """One AdamW step of ``base`` (default: the built-in SmolLM2-135M) per method, on
    the whole model and (or, ``paths``) the split path; each method's copy shares the
    frozen weights; interleaved medians."""
    from cera_rs import get_cera_model
    from cera_rs.compare.runner import Stack

    if base is None:
        from cera_rs import smollm2

        base, _ = smollm2.load()
    n = base.config.num_hidden_layers
    first = n - case.layers
    targets = rf".*\.layers\.({'|'.join(str(i) for i in range(first, n))})\.self_attn\.(q|v)_proj"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (case.batch, case.seq), generator=gen)
    steps: dict[str, dict[str, Callable[[], None]]] = {"whole": {}, "split": {}}
    hidden = None
    for name, config in _methods(case.r, targets).items():
        torch.manual_seed(0)
        copied = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
        model = (
            get_peft_model(copied, config)
            if isinstance(config, LoraConfig)
            else get_cera_model(copied, config)
        ).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        stack = Stack(model.get_base_model(), case.layers)
        if hidden is None:  # the frozen first layers are the same for every method
            hidden = stack.prefix(ids)
        steps["whole"][name] = _train_step(optimizer, lambda m=model: m(input_ids=ids).logits, ids)
        steps["split"][name] = _train_step(
            optimizer, lambda s=stack, h=hidden: _split_logits(s, h), ids
        )
    rows = []
    for path in tqdm(paths, desc="bench --model", disable=not progress):
        samples: dict[str, list[float]] = {}
        times = median_times(steps[path], warmup=1, repeats=case.repeats, samples=samples)
        ms = {k: 1e3 * v for k, v in times.items()}
        low = {k: 1e3 * min(v) for k, v in samples.items()}
        rows.append(
            {
                "path": path,
                "ms": ms,
                "min_ms": low,
                "min_vs_lora": {k: v / low["lora"] for k, v in low.items()},
                "vs_lora": {k: v / ms["lora"] for k, v in ms.items()},
                "tokens_per_s": {k: case.batch * case.seq / (v / 1e3) for k, v in ms.items()},
            }
        )
    checks = [
        _check(f"{row['path']} step: {k} vs LoRA r={case.r}", row["vs_lora"][k], MODEL_BOUND)
        for row in rows
        for k in row["ms"]
        if k != "lora"
    ]
    return {
        "machine": describe_machine(),
        "date": date.today().isoformat(),
        "case": asdict(case),
        "layers_total": n,
        "rows": rows,
        "targets": checks,
    }


def _split_logits(stack: Any, hidden: torch.Tensor) -> torch.Tensor:
    return stack.model.lm_head(stack.inner.norm(stack.suffix(hidden)))


def _train_step(
    optimizer: torch.optim.Optimizer, logits: Callable[[], torch.Tensor], ids: torch.Tensor
) -> Callable[[], None]:
    """Forward, next-token cross-entropy on every position, backward, AdamW."""

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = logits()
        loss = F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    return run


def format_model(results: dict[str, Any]) -> str:
    c = results["case"]
    lines = [
        f"machine: {results['machine']}; date: {results['date']}",
        f"one training step (forward, backward, AdamW): adapters on q/v of the last "
        f"{c['layers']} of {results['layers_total']} layers, batch {c['batch']} x "
        f"{c['seq']} tokens, r={c['r']}; median of {c['repeats']}, interleaved",
    ]
    for row in results["rows"]:
        path = "whole model" if row["path"] == "whole" else "split path (--adapted-layers)"
        cells = "  ".join(
            f"{k} {v:.1f} ms ({row['vs_lora'][k]:.3f}x, "
            f"{row['tokens_per_s'][k]:.0f} tok/s; fastest {row['min_ms'][k]:.1f} "
            f"ms, {row['min_vs_lora'][k]:.3f}x)"
            for k, v in row["ms"].items()
        )
        lines.append(f"{path}: {cells}")
    return "\n".join(lines + _format_targets(results["targets"]))


def write_json(results: dict[str, Any], path: Path) -> None:
    with atomic_file(path) as f:
        json.dump(results, f, indent=2)
