"""The real-model part: SmolLM2-135M-Instruct (4-bit-quantised (Q4_1) weights, offline)
fine-tuned on arithmetic in two tiers, a preset of ``cera_rs.compare`` (the engine
``cera-rs compare`` runs), trained and scored the way the CeRA paper does.

- ``easy`` (the GSM8K analogue): ``a+b=``, a two-digit plus a one-digit number.
- ``hard`` (the MATH analogue): ``a+b=``, two two-digit numbers (two carries to learn).
The base model does neither zero-shot in this format. The answer is the completion,
followed by the end-of-sequence token; the loss is on those tokens only, and exact
match is by greedy ``generate``. Adapters sit on ``q_proj``/``v_proj`` of the last
``k`` layers; the frozen first layers' hidden states are computed once per problem.
Beyond the comparison, each CeRA adapter (seed 0) is exported to the best LoRA of
its rank, merged and scored, and run by llama.cpp when llama-cpp-python is there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from cera_rs.compare import data, engine
from cera_rs.compare import report as compare_report
from cera_rs.compare.methods import Method as CompareMethod
from cera_rs.compare.runner import Runner, Suffix
from cera_rs.compare.stats import wilson
from cera_rs.demo import linearity, llama_cpp, smollm2

TIERS = tuple(data.TIERS)
TIER_TASKS = data.TIERS
TARGETS = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "lora", "dora" or "cera"
    r: int
    activation: str = "silu"
    dropout: float | None = None  # None: the method's default (CeRA 0.1, LoRA/DoRA 0)

    def spec(self, s: Settings, lrs: tuple[float, ...] | None = None) -> CompareMethod:
        """The engine's method; ``lrs`` replaces the comparison's rate grid."""
        if self.kind == "cera":
            dropout = s.cera_dropout if self.dropout is None else self.dropout
            fields = {"r": self.r, "target_modules": TARGETS, "cera_dropout": dropout,
                      "activation": self.activation}  # fmt: skip
            return CompareMethod(self.name, "CERA", fields, lrs=lrs)
        fields = {"r": self.r, "lora_alpha": s.lora_alpha, "target_modules": TARGETS,
                  "lora_dropout": 0.0, "use_dora": self.kind == "dora"}  # fmt: skip
        return CompareMethod(self.name, "LORA", fields, lrs=lrs)


METHODS = (
    Method("LoRA r=8", "lora", 8),
    Method("LoRA r=64", "lora", 64),
    Method("LoRA r=192", "lora", 192),
    Method("DoRA r=8", "dora", 8),
    Method("CeRA r=8", "cera", 8),
    Method("CeRA r=64", "cera", 64),
    Method("CeRA r=8, identity, no dropout", "cera", 8, activation="identity", dropout=0.0),
)


EASY = ("LoRA r=8", "LoRA r=64", "LoRA r=192", "CeRA r=8", "CeRA r=64")
"""Methods also run on the easy tier: the rank ladders the spectra picture needs."""


@dataclass
class Settings:
    """Sized for about 15 minutes on 2 cores (exports included). The rate is chosen per
    method on the hard tier's valid split; the easy tier reuses it with the first
    seed. With adapters on fewer than about 10 layers nothing was learnt in this many
    steps."""

    adapted_layers: int = 10
    steps: int = 60
    batch: int = 16
    n_train: int = 960
    n_val: int = 150
    n_test: int = 150
    lrs: tuple[float, ...] = (2e-3, 6e-3)
    hard_seeds: tuple[int, ...] = (0, 1)
    easy: tuple[str, ...] = EASY
    methods: tuple[Method, ...] = METHODS
    lora_alpha: int = 32  # the paper's LoRA setting; CeRA has no alpha
    cera_dropout: float = 0.1

    @classmethod
    def quick(cls) -> Settings:
        return cls(adapted_layers=2, steps=6, batch=8, n_train=64, n_val=24, n_test=24,
                   lrs=(3e-3,), hard_seeds=(0,), methods=(METHODS[0], METHODS[4]))  # fmt: skip

    def tier_methods(self, tier: str) -> list[Method]:
        return [m for m in self.methods if tier == "hard" or m.name in self.easy]


def exported_lora(method: CompareMethod, model: nn.Module, runner: Runner,
                  hits: np.ndarray) -> dict:  # fmt: skip
    """For a CeRA run: the best rank-``r`` linear map of its adapters, fitted on the
    training tokens (its linearity measured on the test tokens too), exported as a
    PEFT LoRA, merged into the base model and scored by greedy ``generate`` on the
    test problems beside the CeRA adapter's own answers ``hits``; and, when
    llama-cpp-python is importable, written as a GGUF adapter and scored by llama.cpp
    on the SmolLM2 GGUF (otherwise the row says why not)."""
    if method.peft_type != "CERA":
        return {}
    skipped = llama_cpp.unavailable()
    calibration, test = runner.splits["train"], runner.splits["test"]
    with tempfile.TemporaryDirectory(prefix="cera-rs-gguf-") as folder:
        gguf = None if skipped else Path(folder) / "adapter.gguf"
        merged, report = linearity.export_and_merge(
            Suffix(runner.stack_of(model)), runner.base, calibration.batches(), method.rank,
            held_out=test.batches(), gguf=gguf, base_gguf=smollm2.gguf_path())  # fmt: skip
        lora_hits = runner.generated(merged)
        row = {"linearity": linearity.summary(report),
               "exported_lora_test_exact_match": float(lora_hits.mean()),
               "exported_lora_wilson95": list(wilson(int(lora_hits.sum()), len(lora_hits))),
               "exported_lora_same_verdict": float((lora_hits == hits).mean())}  # fmt: skip
        if gguf is None:
            row["llama_cpp_skipped"] = skipped
        else:  # the LoRA as llama.cpp runs it: its adapter file on the GGUF base
            served = llama_cpp.exact_match(smollm2.gguf_path(), gguf, runner.tokenizer, test.data)
            row["llama_cpp_exact_match"] = float(served.mean())
            row["llama_cpp_same_verdict"] = float((served == lora_hits).mean())
    return row


def _row(method: Method, s: Settings, summary: dict) -> dict:
    """The engine's summary of a method, in the shape the demo's report reads."""
    em = summary["test_exact_match"]
    row = {"kind": method.kind, "r": method.r, "activation": method.activation,
           "dropout": s.cera_dropout if method.kind == "cera" and method.dropout is None
           else (method.dropout or 0.0),
           "lr": summary["lr"], "trainable_params": summary["trainable_params"],
           "seeds": summary["seeds"],
           "val_exact_match_by_lr": {lr: v["exact_match"]
                                     for lr, v in summary["valid_by_lr"].items()},
           "test_exact_match": em, "test_exact_match_mean": summary["test_exact_match_mean"],
           "test_exact_match_spread": float(max(em) - min(em)), "wilson95": summary["wilson95"],
           "scorer_agreement": summary["teacher_forced_agreement"],
           "spectra": summary["spectra"]}  # fmt: skip
    row.update(summary.get("extras", {}))
    return row


def run(s: Settings, progress: bool = True) -> dict:
    """Hard tier first: each method's learning rate chosen by valid exact match (seed
    0), then every seed at that rate; the easy tier reuses each method's rate with the
    first seed. Each tier is one ``cera_rs.compare`` comparison (reference: the first
    method), in a temporary folder."""
    base, tokenizer = smollm2.load()
    results: dict = {"model": f"SmolLM2-135M-Instruct, {smollm2.WEIGHTS}",
                     "settings": {"adapted_layers": s.adapted_layers, "steps": s.steps,
                                  "batch": s.batch, "n_train": s.n_train, "n_val": s.n_val,
                                  "n_test": s.n_test, "lrs": list(s.lrs),
                                  "hard_seeds": list(s.hard_seeds), "easy": list(s.easy),
                                  "lora_alpha": s.lora_alpha, "cera_dropout": s.cera_dropout},
                     "tiers": {}}  # fmt: skip
    chosen: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cera-rs-demo-") as work:
        for tier in ("hard", "easy"):
            methods = s.tier_methods(tier)
            specs = [m.spec(s, None if tier == "hard" else (chosen[m.name],)) for m in methods]
            settings = engine.Settings(steps=s.steps, batch=s.batch, lrs=s.lrs,
                                       seeds=s.hard_seeds if tier == "hard" else s.hard_seeds[:1],
                                       adapted_layers=s.adapted_layers)  # fmt: skip
            problems = data.tier(tier, s.n_train, s.n_val, s.n_test)
            comparison = engine.run(results["model"], base, tokenizer, problems, specs, settings,
                                    Path(work) / tier, progress=progress,
                                    extras=exported_lora)  # fmt: skip
            summary = compare_report.summarise(comparison)
            rows = {m.name: _row(m, s, summary["methods"][m.name]) for m in methods}
            chosen.update({name: row["lr"] for name, row in rows.items()})
            results["tiers"][tier] = {"task": TIER_TASKS[tier],
                                      "zero_shot_exact_match": summary["base_exact_match"],
                                      "methods": rows,
                                      "differences": summary["differences"]}  # fmt: skip
    results["tiers"] = {t: results["tiers"][t] for t in TIERS}
    return results
