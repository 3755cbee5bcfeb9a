"""The problems a comparison trains and scores on: JSONL files in TRL's
prompt-completion format (``{"prompt": ..., "completion": ...}`` per line), or the
built-in arithmetic tiers. Each problem is tokenised as the prompt, then the
completion followed by the tokenizer's end-of-sequence token (TRL's convention): the
loss is on the completion and its end, and exact match asks greedy decoding to write
the completion and stop."""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

TIERS = {
    "easy": "a+b=, two-digit plus one-digit (the GSM8K analogue)",
    "hard": "a+b=, two-digit plus two-digit (the MATH analogue)",
}
"""The built-in tiers (``tiers:easy``, ``tiers:hard``): the base model does neither in
this format zero-shot."""

Item = tuple[str, str]
"""A prompt and its completion."""


@dataclass(frozen=True)
class Problems:
    """Train, valid and test problems, and where they came from (for the report)."""

    train: list[Item]
    valid: list[Item]
    test: list[Item]
    source: str
    digest: str  # of the contents: a resumed comparison checks it sees the same data
    notes: tuple[str, ...] = ()  # what the report should say about them (overlaps)
    extra_tests: dict[str, list[Item]] = field(default_factory=dict)  # scored like test
    score: str = "exact_match"  # what the curves read: "exact_match", or "bits" (stored)

    def split(self, name: str) -> list[Item]:
        if name in self.extra_tests:
            return self.extra_tests[name]
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "valid", "test", *self.extra_tests)


def _digest(*splits: list[Item]) -> str:
    sha = hashlib.sha256()
    for items in splits:
        sha.update(json.dumps(items, ensure_ascii=False).encode())
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def read_jsonl(path: str | os.PathLike) -> list[Item]:
    """Prompt-completion pairs from a JSONL file; a line that is not such an object is
    refused with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (JSONL with prompt and completion)")
    items = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}, line {number}: not UTF-8 (byte {raw[err.start]:#04x} "
                    f"at column {err.start + 1}); JSONL files are UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("prompt", "completion")
            ):
                raise ValueError(
                    f"{path}, line {number}: expected an object with string fields 'prompt' "
                    "and 'completion' (TRL's prompt-completion format; conversational "
                    "rows are not supported)"
                )
            if not row["completion"].strip():
                raise ValueError(f"{path}, line {number}: the completion is empty")
            items.append((row["prompt"], row["completion"]))
    if not items:
        raise ValueError(f"{path}: no problems in the file")
    return items


def from_jsonl(
    train: str | os.PathLike,
    test: str | os.PathLike,
    valid: str | os.PathLike | None = None,
    n_valid: int = 100,
) -> Problems:
    """Problems from JSONL files. Without a valid file, ``n_valid`` training problems (at
    most a fifth of them), drawn with a fixed seed, are held out as the valid split,
    which chooses each method's learning rate. Prompts of the valid or test split that
    also occur in training are counted for the report."""
    train_items, test_items = read_jsonl(train), read_jsonl(test)
    if valid is not None:
        valid_items = read_jsonl(valid)
        source = f"{train} / {valid} / {test}"
    else:
        k = min(n_valid, len(train_items) // 5)
        if k == 0:
            raise ValueError(f"{train}: too few problems to hold out a valid split; pass one")
        held = set(random.Random(0).sample(range(len(train_items)), k))
        valid_items = [x for i, x in enumerate(train_items) if i in held]
        train_items = [x for i, x in enumerate(train_items) if i not in held]
        source = f"{train} ({k} held out as valid) / {test}"
    seen = {prompt for prompt, _ in train_items}
    notes = tuple(
        f"{n} of the {len(items)} {name} prompts also occur in training"
        for name, items in (("valid", valid_items), ("test", test_items))
        if (n := sum(prompt in seen for prompt, _ in items))
    )
    return Problems(
        train_items,
        valid_items,
        test_items,
        source,
        _digest(train_items, valid_items, test_items),
        notes,
    )


def tier_problem(tier: str, rng: random.Random) -> Item:
    if tier == "easy":
        a, b = rng.randrange(10, 100), rng.randrange(1, 10)
    elif tier == "hard":
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    else:
        raise ValueError(f"unknown tier {tier!r}; expected one of {tuple(TIERS)}")
    return f"{a}+{b}=", str(a + b)


def tier(name: str, n_train: int, n_valid: int, n_test: int) -> Problems:
    """A built-in tier: valid and test problems distinct from each other and from
    training (training problems may repeat). The same sizes give the same problems,
    and a larger test set extends a smaller one."""
    rng = random.Random(f"lm-math-{name}")
    held: dict[str, str] = {}
    limit = 8100 if name == "hard" else 810
    if n_valid + n_test > limit // 2:
        raise ValueError(
            f"tier {name!r} has {limit} distinct problems; ask for at most "
            f"{limit // 2} valid and test problems together"
        )
    while len(held) < n_valid + n_test:
        prompt, answer = tier_problem(name, rng)
        held.setdefault(prompt, answer)
    items = list(held.items())
    train: list[Item] = []
    while len(train) < n_train:
        prompt, answer = tier_problem(name, rng)
        if prompt not in held:
            train.append((prompt, answer))
    valid, test = items[:n_valid], items[n_valid:]
    return Problems(
        train, valid, test, f"tiers:{name} ({TIERS[name]})", _digest(train, valid, test)
    )


@dataclass
class Encoded:
    """Problems as right-padded token ids, and where their completion tokens are."""

    ids: Tensor  # (n, T)
    lengths: Tensor  # (n,) real tokens per problem
    prompt_lengths: Tensor  # (n,)
    items: list[Item]

    def __len__(self) -> int:
        return len(self.items)

    def answer_positions(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the problems ``rows``: (problem index within ``rows``, position whose
        logits predict a completion token, that token, problem index) per completion
        token (the end-of-sequence token included)."""
        owners, positions = [], []
        for i, row in enumerate(rows.tolist()):
            start, end = int(self.prompt_lengths[row]), int(self.lengths[row])
            owners += [i] * (end - start)
            positions += range(start - 1, end - 1)
        owners_t, positions_t = torch.tensor(owners), torch.tensor(positions)
        targets = self.ids[rows][owners_t, positions_t + 1]
        return owners_t, positions_t, targets, rows[owners_t]

    def attention_mask(self, rows: Tensor, width: int) -> Tensor:
        return (torch.arange(width) < self.lengths[rows, None]).long()

    def prompts(self) -> list[list[int]]:
        return [self.ids[i, : int(p)].tolist() for i, p in enumerate(self.prompt_lengths)]

    def completion_tokens(self) -> int:
        return int((self.lengths - self.prompt_lengths).max())


def end_token(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no end-of-sequence token (eos_token_id), which ends every completion"
        )
    return int(tokenizer.eos_token_id)


def encode(tokenizer, items: list[Item], max_length: int | None = None) -> Encoded:
    """Prompt tokens (with the tokenizer's special tokens, a BOS where the model has
    one), then completion tokens (without) and the end-of-sequence token; with
    ``max_length``, a problem longer than that is refused (a cut completion could
    not be scored)."""
    eos = end_token(tokenizer)
    seqs, prompt_lengths = [], []
    for prompt, completion in items:
        p = tokenizer(prompt)["input_ids"]  # with the model's BOS, if it has one
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        if not p:
            raise ValueError(f"the prompt {prompt!r} has no tokens: nothing to condition on")
        if max_length is not None and len(p) + len(c) > max_length:
            raise ValueError(
                f"a problem of {len(p) + len(c)} tokens exceeds max_seq_length "
                f"{max_length}: {prompt[:40]!r}..."
            )
        seqs.append(p + c)
        prompt_lengths.append(len(p))
    width = max(len(x) for x in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x)
    return Encoded(ids, torch.tensor([len(x) for x in seqs]), torch.tensor(prompt_lengths), items)


PHONEBOOK_DIGITS = 5
"""Digits of a phonebook number: enough that guessing never scores (1 in 10^5)."""
_ONSETS = (
    "b",
    "br",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "v",
    "w",
    "z",
    "ch",
    "sh",
    "tr",
    "gr",
    "cl",
    "pl",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x")


def _made_up_name(rng: random.Random) -> str:
    """A pronounceable name that is no one's: two or three syllables, twice."""

    def word() -> str:
        syllables = rng.choice((2, 2, 3))
        text = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        return (text + rng.choice(_CODAS)).capitalize()

    return f"{word()} {word()}"


def phonebook_facts(n: int, digits: int = PHONEBOOK_DIGITS, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` made-up facts, a unique name -> a ``digits``-digit number; the same ``n``
    and seed give the same facts, and a larger ``n`` extends a smaller one."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"phonebook: the number of facts must be a positive integer, got {n!r}")
    rng = random.Random(f"phonebook-{seed}")
    facts: dict[str, str] = {}
    while len(facts) < n:
        name = _made_up_name(rng)
        number = "".join(rng.choice("0123456789") for _ in range(digits))
        facts.setdefault(name, number)
    return list(facts.items())


def recall_prompt(name: str) -> str:
    return f"Phone book. {name}:"


def reworded_prompt(name: str) -> str:
    return f"What is the phone number of {name}? It is"


def phonebook(n: int, digits: int = PHONEBOOK_DIGITS) -> Problems:
    """The PhoneBook task ("Understanding LoRA as Knowledge Memory", arXiv 2603.01097):
    train on all ``n`` facts; valid and test ask for the same facts in the same words
    (what the adapter stored: capacity, not generalisation), and ``transfer`` asks for
    them reworded (whether the stored fact is used beyond its training prompt)."""
    facts = phonebook_facts(n, digits)
    train = [(recall_prompt(name), number) for name, number in facts]
    transfer = [(reworded_prompt(name), number) for name, number in facts]
    notes = (
        "memorisation: valid and test are the training facts themselves (recall of "
        "what was stored); the transfer split asks for them in other words",
    )
    return Problems(
        train,
        list(train),
        list(train),
        f"phonebook:{n} ({n} made-up names -> {digits}-digit numbers)",
        _digest(train, transfer),
        notes,
        {"transfer": transfer},
        "bits",
    )
