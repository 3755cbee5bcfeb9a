"""The comparison itself: each method's learning rate chosen on the valid split (seed
0), then every seed at that rate, each run written to disk the moment it finishes so
that a killed comparison, run again with the same arguments, picks up where it
stopped and reports the same scores."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from tqdm import tqdm

from cera_rs.atomic import atomic_file, check_folder_writable
from cera_rs.compare.data import Problems
from cera_rs.compare.methods import SPECTRAL_METHODS, Method, distinct
from cera_rs.compare.runner import Runner, Suffix

RECORD_VERSION = 1


@dataclass
class Settings:
    """What every method shares. The rate grid is per method (a method folder's own
    rate joins it); a grid wide enough that no chosen rate sits at its edge is part of
    a fair comparison, and the report says where one does."""

    steps: int = 200
    batch: int = 16
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    adapted_layers: int | None = None
    max_seq_length: int | None = None
    reference: str | None = None  # default: the first method
    device: str = "auto"
    resamples: int = 10_000

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "resamples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lrs or not all(isinstance(x, (int, float)) and x > 0 for x in self.lrs):
            raise ValueError(f"lrs must be positive learning rates, got {self.lrs!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct integers, got {self.seeds!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        self.lrs, self.seeds = tuple(self.lrs), tuple(self.seeds)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda: torch sees no CUDA device")
        return torch.device(self.device)

    def shared(self) -> dict[str, Any]:
        """What a run's result depends on (not the grid, seeds or reference: a run is a
        rate and a seed of its own)."""
        return {"steps": self.steps, "batch": self.batch, "adapted_layers": self.adapted_layers,
                "max_seq_length": self.max_seq_length}  # fmt: skip


Extras = Callable[[Method, nn.Module, Runner, np.ndarray], dict]
"""Called on each method's first-seed run at its chosen rate, after scoring, with the
trained model and its test answers (right/wrong); what it returns is kept in that
run's record under ``extras`` (the demo's LoRA export)."""


@dataclass
class Comparison:
    """Everything the report is made from."""

    model: str
    problems: Problems
    settings: Settings
    methods: list[Method]
    records: dict[str, list[dict]]  # method name: its runs (grid and seeds)
    chosen_lr: dict[str, float]
    base_hits: np.ndarray  # the base model's test answers, no adapter
    device: str
    out_dir: Path


def _key(lr: float, seed: int) -> str:
    return f"lr{lr:g}-seed{seed}"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_digest(model: nn.Module) -> str:
    """The base model's weights, summarised: a resumed comparison refuses runs of
    another model under the same name."""
    sha = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            sha.update(f"{name}{tuple(p.shape)}{float(p.float().sum()):.6e}".encode())
    return sha.hexdigest()[:16]


class Store:
    """One folder per method under ``out_dir/runs``: a record (JSON) and the saved
    adapter of each run."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir / "runs"

    def paths(self, method: Method, key: str) -> tuple[Path, Path]:
        folder = self.root / method.slug
        return folder / f"{key}.json", folder / key

    def load(self, method: Method, key: str, fingerprint: str) -> dict | None:
        path, adapter = self.paths(method, key)
        if not path.is_file():
            return None
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: the run is done again
        if record.get("fingerprint") != fingerprint or not adapter.is_dir():
            return None
        return record

    def save(self, method: Method, key: str, record: dict) -> None:
        path, _ = self.paths(method, key)
        with atomic_file(path) as f:
            json.dump(record, f, indent=1)

    def save_adapter(self, method: Method, key: str, model: PeftModel) -> int:
        """The adapter folder, written beside its final name and renamed into place;
        returns the weights file's size in bytes."""
        _, target = self.paths(method, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}."))
        try:
            model.save_pretrained(tmp)
            size = sum(p.stat().st_size for p in tmp.glob("adapter_model.*"))
            if target.exists():
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return size


def _lr_grid(method: Method, settings: Settings) -> list[float]:
    """The method's own grid if it has one, else the comparison's with the rate of the
    method's training options added."""
    if method.lrs is not None:
        return sorted(set(method.lrs))
    own = method.training.get("optimizer_kwargs", {}).get("lr")
    return sorted(set(settings.lrs) | ({float(own)} if own else set()))


def run(model_name: str, base: nn.Module, tokenizer, problems: Problems, methods: list[Method],
        settings: Settings, out_dir: Path, progress: bool = True,
        extras: Extras | None = None) -> Comparison:  # fmt: skip
    methods = distinct(list(methods))
    names = [m.name for m in methods]
    if settings.reference is not None and settings.reference not in names:
        raise ValueError(f"reference {settings.reference!r} is not one of the methods: "
                         f"{', '.join(names)}")  # fmt: skip
    check_folder_writable(out_dir)
    device = settings.torch_device()
    runner = Runner(base, tokenizer, problems, steps=settings.steps, batch=settings.batch,
                    adapted_layers=settings.adapted_layers, device=device,
                    max_seq_length=settings.max_seq_length)  # fmt: skip
    for m in methods:  # a config that cannot be applied fails now, before any training
        m.config(runner.adapted_layers)
    store = Store(out_dir)
    common = (RECORD_VERSION, model_name, model_digest(base), problems.digest, settings.shared())
    todo = {m.name: len(_lr_grid(m, settings)) + len(settings.seeds) - 1 for m in methods}
    bar = tqdm(total=sum(todo.values()) * settings.steps, desc="compare", unit="step",
               disable=not progress)  # fmt: skip
    records: dict[str, list[dict]] = {}
    chosen: dict[str, float] = {}
    counted: set[str] = set()  # runs whose steps the bar has counted

    def ensure(method: Method, lr: float, seed: int, test: bool) -> dict:
        key = _key(lr, seed)
        counted_key = f"{method.slug}/{key}"
        fingerprint = _fingerprint(*common, method.describe(), lr, seed)
        record = store.load(method, key, fingerprint)
        if record is None:
            bar.set_postfix_str(f"{method.name}, lr {lr:g}, seed {seed}")
            model = runner.build(method, seed)
            stats = runner.train(model, method, lr, seed, bar)
            runner.check_base(method)
            size = store.save_adapter(method, key, model)
            hits, loss = runner.teacher_forced(model, "valid")
            trainable, total = model.get_nb_trainable_parameters()
            record = {"fingerprint": fingerprint, "method": method.name, "lr": lr, "seed": seed,
                      "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "device": runner.device.type,
                      "train": asdict(stats), "file_size": size,
                      "trainable_params": trainable, "total_params": total,
                      "valid": {"exact_match": float(hits.mean()), "loss": loss}}  # fmt: skip
            store.save(method, key, record)
            del model
        elif counted_key not in counted:  # done by an earlier call: its steps count once
            bar.update(settings.steps)
        counted.add(counted_key)
        if test and "test" not in record:
            bar.set_postfix_str(f"{method.name}, seed {seed}: scoring")
            record["test"] = _score(runner, method, store.paths(method, key)[1], seed,
                                    seed == settings.seeds[0], extras)  # fmt: skip
            runner.check_base(method)
            store.save(method, key, record)
        return record

    base_hits = _base_hits(runner, store, _fingerprint(*common))
    for method in methods:
        first = settings.seeds[0]
        grid = {lr: ensure(method, lr, first, test=False) for lr in _lr_grid(method, settings)}
        lr = max(grid, key=lambda x: (grid[x]["valid"]["exact_match"], -grid[x]["valid"]["loss"]))
        chosen[method.name] = lr
        tested = [ensure(method, lr, seed, test=True) for seed in settings.seeds]
        grid[lr] = tested[0]
        records[method.name] = list(grid.values()) + tested[1:]
    bar.close()
    return Comparison(model_name, problems, settings, methods, records, chosen, base_hits,
                      device.type, out_dir)  # fmt: skip


def _base_hits(runner: Runner, store: Store, fingerprint: str) -> np.ndarray:
    """The base model's test answers (no adapter), kept beside the runs."""
    path = store.root / "base.json"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            kept = json.load(f)
        if kept.get("fingerprint") == fingerprint:
            return np.array(kept["hits"], dtype=bool)
    hits = runner.generated(runner.base)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        json.dump({"fingerprint": fingerprint, "hits": hits.astype(int).tolist()}, f)
    return hits


def _score(runner: Runner, method: Method, adapter: Path, seed: int, first: bool,
           extras: Extras | None) -> dict:  # fmt: skip
    """The test scores of a saved run, loaded back as a user would load it: exact
    match by greedy decoding (and how often the teacher-forced check agrees), test
    loss; for the first seed the spectra of the adapters' output deltas and, for
    CeRA, how much of each adapter a linear map of its rank reproduces on held-out
    tokens."""
    start = time.perf_counter()
    model = PeftModel.from_pretrained(runner.copy_base(), adapter).to(runner.device).eval()
    hits = runner.generated(model)
    forced, nats, tokens = runner.forced_scores(model, "test")
    out: dict[str, Any] = {"hits": hits.astype(int).tolist(), "exact_match": float(hits.mean()),
                           "loss": float(nats.sum() / tokens),
                           "teacher_forced_agreement": float((forced == hits).mean()),
                           "bits": _bits(runner.base_nats("test") - nats)}  # fmt: skip
    for name in runner.problems.extra_tests:  # e.g. phonebook's reworded prompts
        extra = runner.generated(model, name)
        out[name] = {"hits": extra.astype(int).tolist(), "exact_match": float(extra.mean()),
                     "bits": _bits(runner.base_nats(name) - runner.forced_scores(model, name)[1])}
    if first and method.peft_type in SPECTRAL_METHODS:
        out["spectra"] = spectra(runner, model)
        if method.peft_type == "CERA":
            out["linearity"] = linearity(runner, model)
    if first and extras is not None:
        out["extras"] = extras(method, model, runner, hits)
    out["score_time"] = time.perf_counter() - start
    return out


def _bits(nats_saved: np.ndarray) -> list[float]:
    """Per problem, the information the adapter stored about its completion: the base
    model's cross-entropy on it minus the adapted model's, in bits."""
    return (nats_saved / np.log(2)).round(4).tolist()


def _analysed(runner: Runner, model: PeftModel) -> nn.Module:
    """What the analyses stream through: the adapted layers on the cached prefix
    states when the stack is used, else the whole model on token ids."""
    if runner.stack is not None:
        return Suffix(runner.stack_of(model))
    return model


def spectra(runner: Runner, model: PeftModel) -> dict:
    """The paper's recipe: each adapter's output delta over the test tokens (padding
    left out), columns centred; effective rank and 90 %-energy dimension, averaged
    over the adapted layers."""
    from cera_rs.spectral import analyze

    target = _analysed(runner, model)
    report = analyze(target, runner.splits["test"].batches(), progress=False, center=True)
    ranks = [m.spectrum.effective_rank for m in report.modules]
    dims = [m.spectrum.energy_rank(0.9) for m in report.modules]
    return {"effective_rank": float(np.mean(ranks)), "dim90": float(np.mean(dims)),
            "layers": len(ranks)}  # fmt: skip


def linearity(runner: Runner, model: PeftModel) -> dict:
    """Each CeRA adapter's linearity at its rank (the share of its output energy the
    best rank-r linear map reproduces), fitted on the training tokens and measured on
    the test tokens, averaged over layers."""
    from cera_rs.export import measure_linearity

    target = _analysed(runner, model)
    splits = runner.splits
    report = measure_linearity(target, splits["train"].batches(),
                               held_out=splits["test"].batches(), progress=False)
    return {"linearity_at_r": report.mean("linearity_at_adapter_rank"),
            "held_out_linearity_at_r": report.mean("held_out_linearity_at_adapter_rank"),
            "layers": len(report)}  # fmt: skip
