"""The real-model part: SmolLM2-135M-Instruct (4-bit-quantised (Q4_1) weights, offline)
fine-tuned on arithmetic in two tiers, trained and scored the way the CeRA paper does.

- ``easy`` (the GSM8K analogue): ``a+b=``, a two-digit plus a one-digit number.
- ``hard`` (the MATH analogue): ``a+b=``, two two-digit numbers (two carries to learn).
The base model does neither zero-shot in this format (it writes ``47+38=127+38``).
The answer follows the ``=`` and ends with a newline; the loss is on the answer tokens
only, and exact match is by greedy ``generate`` (the text up to the newline equals the
answer). Adapters sit on ``q_proj``/``v_proj`` of the last ``k`` layers; the frozen first
layers' hidden states are computed once per problem and reused by every run.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask

from cera_rs import CeraConfig, get_cera_model
from cera_rs.demo import linearity, llama_cpp, smollm2
from cera_rs.spectral import analyze

TIERS = ("easy", "hard")
TIER_TASKS = {"easy": "a+b=, two-digit plus one-digit (the GSM8K analogue)",
              "hard": "a+b=, two-digit plus two-digit (the MATH analogue)"}  # fmt: skip


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "lora", "dora" or "cera"
    r: int
    activation: str = "silu"
    dropout: float | None = None  # None: the method's default (CeRA 0.1, LoRA/DoRA 0)


METHODS = (
    Method("LoRA r=8", "lora", 8),
    Method("LoRA r=64", "lora", 64),
    Method("LoRA r=192", "lora", 192),
    Method("DoRA r=8", "dora", 8),
    Method("CeRA r=8", "cera", 8),
    Method("CeRA r=64", "cera", 64),
    Method("CeRA r=8, identity, no dropout", "cera", 8, activation="identity", dropout=0.0),
)


HEADLINE = ("LoRA r=8", "LoRA r=64", "CeRA r=8")
"""Rows that get every seed on the hard tier: CeRA against LoRA at its rank and at 8x."""
EASY = ("LoRA r=8", "LoRA r=64", "LoRA r=192", "CeRA r=8", "CeRA r=64")
"""Methods also run on the easy tier: the rank ladders the spectra picture needs."""


@dataclass
class Settings:
    """Sized for about 13 minutes on 2 cores (exports included). The rate is chosen per
    method on the hard tier's validation split; the easy tier reuses it. With
    adapters on fewer than about 10 layers nothing was learnt in this many steps."""

    adapted_layers: int = 10
    steps: int = 60
    batch: int = 16
    n_train: int = 960
    n_val: int = 150
    n_test: int = 150
    lrs: tuple[float, ...] = (2e-3, 6e-3)
    hard_seeds: tuple[int, ...] = (0, 1)
    headline: tuple[str, ...] = HEADLINE
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

    def seeds(self, tier: str, method: Method) -> tuple[int, ...]:
        if tier == "hard" and method.name in self.headline:
            return self.hard_seeds
        return self.hard_seeds[:1]


def problem(tier: str, rng: random.Random) -> tuple[str, str]:
    """A prompt and its answer text (without the closing newline)."""
    if tier == "easy":
        a, b = rng.randrange(10, 100), rng.randrange(1, 10)
        return f"{a}+{b}=", str(a + b)
    if tier == "hard":
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        return f"{a}+{b}=", str(a + b)
    raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


def dataset(tier: str, s: Settings) -> dict[str, list[tuple[str, str]]]:
    """Train, validation and test problems; validation and test are distinct from
    each other and from training (for the hard tier the training set may repeat)."""
    rng = random.Random(f"lm-math-{tier}")
    held: dict[str, str] = {}
    while len(held) < s.n_val + s.n_test:
        prompt, answer = problem(tier, rng)
        held.setdefault(prompt, answer)
    items = list(held.items())
    train = []
    while len(train) < s.n_train:
        prompt, answer = problem(tier, rng)
        if prompt not in held:
            train.append((prompt, answer))
    return {"train": train, "val": items[: s.n_val], "test": items[s.n_val :]}


@dataclass
class Encoded:
    """Problems as right-padded token ids, and where their answer tokens are."""

    ids: Tensor  # (n, T)
    lengths: Tensor  # (n,) real tokens per problem
    prompt_lengths: Tensor  # (n,)
    items: list[tuple[str, str]]

    def answer_positions(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the problems ``rows``: (problem index within ``rows``, position whose
        logits predict an answer token, that token, problem index) per answer token."""
        owners, positions = [], []
        for i, row in enumerate(rows.tolist()):
            start, end = int(self.prompt_lengths[row]), int(self.lengths[row])
            owners += [i] * (end - start)
            positions += range(start - 1, end - 1)
        owners_t, positions_t = torch.tensor(owners), torch.tensor(positions)
        targets = self.ids[rows][owners_t, positions_t + 1]
        return owners_t, positions_t, targets, rows[owners_t]


def encode(tokenizer, items: list[tuple[str, str]]) -> Encoded:
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    seqs, prompt_lengths = [], []
    for prompt, answer in items:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + newline
        seqs.append(p + a)
        prompt_lengths.append(len(p))
    width = max(len(x) for x in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
    return Encoded(ids, torch.tensor([len(x) for x in seqs]), torch.tensor(prompt_lengths), items)


class Stack:
    """The decoder split in two: the frozen first layers, run once per problem
    (``prefix``), and the last ``k`` layers with the norm and the head (``logits``),
    run by every training step. Right padding needs no mask: attention is causal, so
    a real token never sees the padding after it."""

    def __init__(self, model: nn.Module, k: int) -> None:
        self.model = model
        self.inner = model.model
        self.split = len(self.inner.layers) - k

    def _layers(self, h: Tensor, layers) -> Tensor:
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        rotary = self.inner.rotary_emb(h, positions)
        # The cache positionally: transformers 5.24 renamed the argument (past_key_values).
        mask = create_causal_mask(self.inner.config, h, None, None,
                                  position_ids=positions)  # fmt: skip
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
        return h

    @torch.no_grad()
    def prefix(self, ids: Tensor, batch: int = 256) -> Tensor:
        """Hidden states after the first ``split`` layers, (n, T, d)."""
        out = []
        for i in range(0, len(ids), batch):
            h = self.inner.embed_tokens(ids[i : i + batch])
            out.append(self._layers(h, self.inner.layers[: self.split]))
        return torch.cat(out)

    def logits(self, hidden: Tensor, owners: Tensor, positions: Tensor) -> Tensor:
        """Logits at ``(owners, positions)`` from prefix states: the head runs on those
        positions only."""
        h = self._layers(hidden, self.inner.layers[self.split :])
        return self.model.lm_head(self.inner.norm(h[owners, positions]))


@dataclass
class Split:
    data: Encoded
    hidden: Tensor

    def batches(self, batch: int = 128) -> list[dict]:
        """The prefix states as ``Suffix`` inputs, with the ``attention_mask`` that
        ``cera_rs.export`` reads to leave the padding out."""
        out = []
        for i in range(0, len(self.data.ids), batch):
            lengths = self.data.lengths[i : i + batch]
            width = int(lengths.max())
            mask = torch.arange(width) < lengths[:, None]
            out.append({"hidden": self.hidden[i : i + batch, :width],
                        "attention_mask": mask.long()})  # fmt: skip
        return out


class Suffix(nn.Module):
    """The adapted last layers as a model of their own, run on cached prefix states:
    what the export streams through, at a third of the full model's cost. The decoder
    is held as ``model``, as in the causal LM, so the adapted layers keep their names
    (``model.layers.N.self_attn.q_proj``) and the exported LoRA loads onto the base."""

    def __init__(self, stack: Stack) -> None:
        super().__init__()
        self.model = stack.inner
        self.stack = stack

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        # Right padding needs no mask (see Stack); the export drops padded tokens.
        return self.stack._layers(hidden, self.model.layers[self.stack.split :])


def target_regex(n_layers: int, k: int) -> str:
    layers = "|".join(str(i) for i in range(n_layers - k, n_layers))
    return rf".*\.layers\.({layers})\.self_attn\.(q_proj|v_proj)"


def build(base: nn.Module, method: Method, s: Settings) -> nn.Module:
    """Adapters on a copy of ``base`` that shares its frozen weights (no copy of them)."""
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    targets = target_regex(len(base.model.layers), s.adapted_layers)
    if method.kind == "cera":
        dropout = s.cera_dropout if method.dropout is None else method.dropout
        config = CeraConfig(r=method.r, target_modules=targets, cera_dropout=dropout,
                            activation=method.activation)  # fmt: skip
        return get_cera_model(model, config)
    config = LoraConfig(r=method.r, lora_alpha=s.lora_alpha, target_modules=targets,
                        lora_dropout=0.0, use_dora=method.kind == "dora")  # fmt: skip
    return get_peft_model(model, config)


def train(model: nn.Module, stack: Stack, split: Split, s: Settings, lr: float, seed: int,
          bar=None) -> None:  # fmt: skip
    """AdamW at a constant rate, gradient clipping 1.0, cross-entropy on answer tokens."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(s.steps):
        rows = torch.randint(0, len(split.data.ids), (s.batch,), generator=order)
        width = int(split.data.lengths[rows].max())
        owners, positions, targets, _ = split.data.answer_positions(rows)
        logits = stack.logits(split.hidden[rows, :width], owners, positions)
        loss = nn.functional.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if bar is not None:
            bar.update()
    model.eval()


@torch.no_grad()
def scored(stack: Stack, split: Split, batch: int = 128) -> np.ndarray:
    """Teacher-forced exact match per problem: every answer token (the newline
    included) is the argmax given the ones before it. Greedy decoding then writes
    exactly the answer, so this agrees with ``generated`` (a test checks it)."""
    correct = np.zeros(len(split.data.ids), dtype=bool)
    for i in range(0, len(split.data.ids), batch):
        rows = torch.arange(i, min(i + batch, len(split.data.ids)))
        owners, positions, targets, problem_ids = split.data.answer_positions(rows)
        width = int(split.data.lengths[rows].max())
        hits = stack.logits(split.hidden[rows, :width], owners, positions).argmax(-1) == targets
        wrong = problem_ids[~hits].unique().numpy()
        ok = np.ones(len(rows), dtype=bool)
        ok[wrong - i] = False
        correct[i : i + len(rows)] = ok
    return correct


def answered(text: str, answer: str) -> bool:
    """The exact-match verdict on a continuation: the text before its first newline
    is the answer (and a newline was written)."""
    return text.split("\n")[0] == answer and "\n" in text


def prompt_ids(tokenizer, items: list[tuple[str, str]]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p, _ in items]


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                  eos: int | None) -> list[list[int]]:  # fmt: skip
    """Each prompt's greedy continuation by ``generate`` (``max_new_tokens``, or up
    to ``eos``). Prompts of equal length are batched together (no padding)."""
    model.eval()
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        ids = torch.tensor([prompts[i] for i in indices])
        rows = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=eos)  # fmt: skip
        for i, row in zip(indices, rows[:, ids.shape[1] :].tolist()):
            out[i] = row[: row.index(eos) + 1] if eos in row else row
    return out


def generated(model: nn.Module, tokenizer, items: list[tuple[str, str]],
              max_new_tokens: int = 6) -> np.ndarray:  # fmt: skip
    """Exact match by greedy ``generate`` (``answered``)."""
    rows = greedy_tokens(model, prompt_ids(tokenizer, items), max_new_tokens,
                         tokenizer.eos_token_id)  # fmt: skip
    return np.array([answered(tokenizer.decode(row, skip_special_tokens=True), answer)
                     for row, (_, answer) in zip(rows, items)], dtype=bool)  # fmt: skip


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def token_batches(data: Encoded, batch: int = 128) -> list[dict]:
    """``data`` as model inputs whose ``attention_mask`` marks the padding, which
    ``cera_rs.spectral`` and ``cera_rs.export`` leave out (what ``Split.batches`` is
    for the suffix)."""
    batches = []
    for i in range(0, len(data.ids), batch):
        ids = data.ids[i : i + batch]
        mask = torch.arange(ids.shape[1]) < data.lengths[i : i + batch, None]
        batches.append({"input_ids": ids, "attention_mask": mask.long()})
    return batches


def delta_spectra(model: nn.Module, data: Encoded) -> dict:
    """The paper's recipe: each adapter's output delta over the test tokens (padding
    excluded), columns centred; effective rank and 90 %-energy dimension, averaged
    over the adapted q/v layers."""
    report = analyze(model, token_batches(data), progress=False, center=True)
    per_module = {m.name: {"effective_rank": m.spectrum.effective_rank,
                           "dim90": m.spectrum.energy_rank(0.9)}
                  for m in report.modules}  # fmt: skip
    out = {"effective_rank": float(np.mean([v["effective_rank"] for v in per_module.values()])),
           "dim90": float(np.mean([v["dim90"] for v in per_module.values()]))}  # fmt: skip
    for proj in ("q_proj", "v_proj"):
        rows = [v for name, v in per_module.items() if name.endswith(proj)]
        out[proj] = {key: float(np.mean([v[key] for v in rows])) for key in ("effective_rank",
                                                                             "dim90")}  # fmt: skip
    return out


def exported_lora(base: nn.Module, stack: Stack, calibration: Split, test: Split, r: int,
                  tokenizer, cera_hits: np.ndarray) -> dict:  # fmt: skip
    """The best rank-``r`` linear map of the CeRA adapters in ``stack``, fitted on the
    training tokens (its linearity measured on the test tokens too), exported as a
    PEFT LoRA, merged into the base model and scored by greedy ``generate`` on the
    test problems beside the CeRA adapter's own answers; and, when llama-cpp-python
    is importable, written as a GGUF adapter and scored by llama.cpp on the SmolLM2
    GGUF (otherwise the row says why not)."""
    skipped = llama_cpp.unavailable()
    with tempfile.TemporaryDirectory(prefix="cera-rs-gguf-") as folder:
        gguf = None if skipped else Path(folder) / "adapter.gguf"
        merged, report = linearity.export_and_merge(
            Suffix(stack), base, calibration.batches(), r, held_out=test.batches(), gguf=gguf,
            base_gguf=smollm2.gguf_path())  # fmt: skip
        hits = generated(merged, tokenizer, test.data.items)
        row = {"linearity": linearity.summary(report),
               "exported_lora_test_exact_match": float(hits.mean()),
               "exported_lora_wilson95": list(wilson(int(hits.sum()), len(hits))),
               "exported_lora_same_verdict": float((hits == cera_hits).mean())}  # fmt: skip
        if gguf is None:
            row["llama_cpp_skipped"] = skipped
        else:  # the LoRA as llama.cpp runs it: its adapter file on the GGUF base
            served, _ = llama_cpp.exact_match(smollm2.gguf_path(), gguf, tokenizer, test.data.items)
            row["llama_cpp_exact_match"] = float(served.mean())
            row["llama_cpp_same_verdict"] = float((served == hits).mean())
    return row


def _fit(base, method: Method, s: Settings, train_split: Split, lr: float, seed: int, bar):
    """One run: its adapters initialised from ``seed`` (not from whatever state earlier
    runs, exports and loads left the global generator in), then trained."""
    torch.manual_seed(seed)
    model = build(base, method, s)
    stack = Stack(model.get_base_model(), s.adapted_layers)
    train(model, stack, train_split, s, lr, seed, bar)
    return model, stack


def run(s: Settings, progress: bool = True) -> dict:
    """Hard tier first: each method's learning rate chosen by validation exact match
    (teacher-forced, seed 0), then the headline rows' other seeds; the easy tier
    reuses each method's rate. Test exact match by greedy ``generate`` for every
    trained model (with the scorer's agreement), spectra of the seed-0 adapters, and
    for CeRA (seed 0) its linearity and its exported, merged LoRA's exact match."""
    base, tokenizer = smollm2.load()
    prefix = Stack(base, s.adapted_layers)
    runs = sum(len(s.lrs) + len(s.seeds("hard", m)) - 1 for m in s.methods)
    runs += len(s.tier_methods("easy"))
    bar = tqdm(total=runs * s.steps, desc="part 2: SmolLM2 arithmetic", disable=not progress)
    results: dict = {"model": f"SmolLM2-135M-Instruct, {smollm2.WEIGHTS}",
                     "settings": {"adapted_layers": s.adapted_layers, "steps": s.steps,
                                  "batch": s.batch, "n_train": s.n_train, "n_val": s.n_val,
                                  "n_test": s.n_test, "lrs": list(s.lrs),
                                  "hard_seeds": list(s.hard_seeds), "headline": list(s.headline),
                                  "easy": list(s.easy),
                                  "lora_alpha": s.lora_alpha, "cera_dropout": s.cera_dropout},
                     "tiers": {}}  # fmt: skip
    chosen: dict[str, float] = {}
    for tier in ("hard", "easy"):
        data = dataset(tier, s)
        splits = {}
        for name in ("train", "val", "test"):
            encoded = encode(tokenizer, data[name])
            splits[name] = Split(encoded, prefix.prefix(encoded.ids))
        zero_shot = generated(base, tokenizer, data["test"])
        rows = {}
        for method in s.tier_methods(tier):
            val: dict[float, float] = {}
            seeds = s.seeds(tier, method)
            if tier == "hard":
                fits = {}
                for lr in s.lrs:
                    bar.set_postfix_str(f"{tier}, {method.name}, lr {lr:g}")
                    fits[lr] = _fit(base, method, s, splits["train"], lr, seeds[0], bar)
                    val[lr] = float(scored(fits[lr][1], splits["val"]).mean())
                chosen[method.name] = max(val, key=val.get)
                first = fits[chosen[method.name]]
                del fits
            lr = chosen[method.name]
            hits, agree, spectra, export = [], [], None, None
            for seed in seeds:
                if tier == "easy" or seed != seeds[0]:
                    bar.set_postfix_str(f"{tier}, {method.name}, seed {seed}")
                    first = _fit(base, method, s, splits["train"], lr, seed, bar)
                model, stack = first
                hits.append(generated(model, tokenizer, data["test"]))
                agree.append(float((scored(stack, splits["test"]) == hits[-1]).mean()))
                if spectra is None:
                    spectra = delta_spectra(model, splits["test"].data)
                    trainable, _ = model.get_nb_trainable_parameters()
                    if method.kind == "cera":
                        bar.set_postfix_str(f"{tier}, {method.name}, export to LoRA")
                        export = exported_lora(base, stack, splits["train"], splits["test"],
                                               method.r, tokenizer, hits[-1])  # fmt: skip
            em = np.stack(hits).mean(1)
            rows[method.name] = {
                "kind": method.kind, "r": method.r, "activation": method.activation,
                "dropout": s.cera_dropout if method.kind == "cera" and method.dropout is None
                else (method.dropout or 0.0),
                "lr": lr, "trainable_params": trainable, "seeds": list(seeds),
                "val_exact_match_by_lr": {f"{k:g}": v for k, v in val.items()},
                "test_exact_match": em.tolist(), "test_exact_match_mean": float(em.mean()),
                "test_exact_match_spread": float(em.max() - em.min()),
                "wilson95": list(wilson(int(np.sum(hits)), int(np.size(hits)))),
                "scorer_agreement": float(np.mean(agree)), "spectra": spectra,
            }  # fmt: skip
            if export is not None:
                rows[method.name].update(export)
        results["tiers"][tier] = {"task": TIER_TASKS[tier],
                                  "zero_shot_exact_match": float(zero_shot.mean()),
                                  "methods": rows}  # fmt: skip
    results["tiers"] = {t: results["tiers"][t] for t in TIERS}
    bar.close()
    return results
