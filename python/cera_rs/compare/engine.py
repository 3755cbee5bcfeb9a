"""The comparison itself: each method's learning rate chosen on the valid split (seed
0), then every seed at that rate (and, with ``resolve``, more seeds until the
intervals are narrow enough), each run written to disk the moment it finishes so
that a killed comparison, run again with the same arguments, picks up where it
stopped and reports the same scores. The runs go one after another in this process,
or side by side as Ray tasks (``cluster``) as soon as what they depend on is in."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from tqdm import tqdm

from cera_rs.atomic import atomic_file, atomic_folder, check_folder_writable, remove_temporaries
from cera_rs.compare import resolve
from cera_rs.compare.data import Problems
from cera_rs.compare.methods import SPECTRAL_METHODS, Method, distinct
from cera_rs.compare.runner import Runner, Stack, Suffix

if TYPE_CHECKING:
    from cera_rs.compare.cluster import Ray

RECORD_VERSION = 2  # 2: the fingerprint holds the device kind and precision


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
    resolve: float | None = None  # points: add seeds until every interval is within +-resolve
    max_seeds: int | None = None  # with resolve: the most seeds, the first ones included

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
        self._check_resolve()
        self.lrs, self.seeds = tuple(self.lrs), tuple(self.seeds)

    def _check_resolve(self) -> None:
        if self.resolve is None and self.max_seeds is None:
            return
        if self.resolve is None or self.max_seeds is None:
            raise ValueError("resolve (--resolve D) and max_seeds (--max-seeds S) go together: "
                             "the half-width to reach, in points, and the most seeds to run")
        if isinstance(self.resolve, bool) or not isinstance(self.resolve, (int, float)) \
                or not self.resolve > 0:  # fmt: skip
            raise ValueError(f"resolve (--resolve) must be a positive number of points, got "
                             f"{self.resolve!r}")  # fmt: skip
        if not isinstance(self.max_seeds, int) or self.max_seeds <= len(self.seeds):
            raise ValueError(f"max_seeds (--max-seeds) {self.max_seeds!r} is not above the "
                             f"{len(self.seeds)} first seeds (--seeds), so resolve could add "
                             "none")  # fmt: skip

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
    seeds: tuple[int, ...] = ()  # every seed run: the settings' first ones, then resolve's
    resolved: dict | None = None  # resolve's rounds and where it stopped (resolve.summary)

    def __post_init__(self) -> None:
        self.seeds = self.seeds or self.settings.seeds


def _key(lr: float, seed: int) -> str:
    return f"lr{lr:g}-seed{seed}"


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_digest(model: nn.Module) -> str:
    """The base model's weights, hashed byte for byte: a resumed comparison refuses runs
    of another model under the same name, and a Ray worker checks it loaded the
    driver's model. (A sum of each tensor would not do: its rounding depends on how
    many threads torch reduces with, which differs between the driver and a worker.)"""
    sha = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            sha.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            sha.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()[:16]


def precision(device: torch.device) -> str:
    """How the Runner computes on ``device`` (bf16 autocast on CUDA): part of a run's
    fingerprint, so that a CPU float32 run is not reused by a CUDA comparison."""
    return "bfloat16 autocast" if device.type == "cuda" else "float32"


def read_files(folder: Path) -> dict[str, bytes]:
    """A folder's files by relative path: a saved adapter as a Ray task returns it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


class Store:
    """One folder per method under ``out_dir/runs``: a record (JSON) and the saved
    adapter of each run, each written whole or not at all; what a killed comparison
    left half-written is removed when the next one starts."""

    def __init__(self, out_dir: Path) -> None:
        self.root = out_dir / "runs"
        if self.root.is_dir():
            for folder in (self.root, *(p for p in self.root.iterdir() if p.is_dir())):
                remove_temporaries(folder)

    def paths(self, method: Method, key: str) -> tuple[Path, Path]:
        folder = self.root / method.slug
        return folder / f"{key}.json", folder / key

    def load(self, method: Method, key: str, fingerprint: str) -> dict | None:
        path, adapter = self.paths(method, key)
        record = self._read(path)
        if record is None or record.get("fingerprint") != fingerprint or not adapter.is_dir():
            return None
        return record

    @staticmethod
    def _read(path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: the run is done again

    def save(self, method: Method, key: str, record: dict) -> None:
        path, _ = self.paths(method, key)
        with atomic_file(path) as f:
            json.dump(record, f, indent=1)

    def save_adapter(self, method: Method, key: str, files: dict[str, bytes]) -> None:
        """The adapter folder, fsynced and renamed into place (before its record, whose
        presence says the run is done)."""
        _, target = self.paths(method, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(target) as tmp:
            write_files(tmp, files)

    def base_hits(self, fingerprint: str) -> np.ndarray | None:
        """The base model's test answers (no adapter), kept beside the runs."""
        kept = self._read(self.root / "base.json")
        if kept is None or kept.get("fingerprint") != fingerprint:
            return None
        return np.array(kept["hits"], dtype=bool)

    def save_base_hits(self, fingerprint: str, hits: list[int]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.root / "base.json") as f:
            json.dump({"fingerprint": fingerprint, "hits": hits}, f)


def _lr_grid(method: Method, settings: Settings) -> list[float]:
    """The method's own grid if it has one, else the comparison's with the rate of the
    method's training options added."""
    if method.lrs is not None:
        return sorted(set(method.lrs))
    own = method.training.get("optimizer_kwargs", {}).get("lr")
    return sorted(set(settings.lrs) | ({float(own)} if own else set()))


def merit(score: str, valid: dict) -> tuple[float, ...]:
    """How a rate is chosen: by the comparison's score on the valid split. Bits stored
    fall as the completions' loss rises (the same problems), so where the task scores
    bits the lower loss wins; else exact match, the lower loss breaking ties."""
    if score == "bits":
        return (-valid["loss"],)
    return (valid["exact_match"], -valid["loss"])


@dataclass(frozen=True)
class Job:
    """One piece of a comparison: train a run (scored on the valid split), score a run
    on the test split, or both; with no method, the base model's test answers."""

    method: Method | None = None
    lr: float = 0.0
    seed: int = 0
    train: bool = False
    test: bool = False
    first: bool = False  # the first seed's scoring: spectra, linearity, extras

    def __str__(self) -> str:
        if self.method is None:
            return "the base model's test answers"
        return f"{self.method.name} (lr {self.lr:g}, seed {self.seed})"


def where(device: torch.device) -> dict[str, str]:
    """Where a job ran: the machine, and the GPU's name or the CPU threads."""
    if device.type == "cuda":
        return {"node": socket.gethostname(), "device": torch.cuda.get_device_name(device)}
    threads = torch.get_num_threads()
    return {"node": socket.gethostname(), "device": f"cpu, {threads} thread(s)"}


def execute(runner: Runner, job: Job, adapter: Path | None, extras: Extras | None,
            bar: tqdm | None = None) -> dict:  # fmt: skip
    """Does ``job`` (in this process, or on a Ray worker) and returns what the driver
    stores: the new run's record and adapter files, its test scores (of ``adapter``,
    the saved run, when the job does not train), or the base model's test answers."""
    here = where(runner.device)
    if job.method is None:
        return {"hits": runner.generated(runner.base).astype(int).tolist(), "ran_on": here}
    method, out = job.method, {}
    with tempfile.TemporaryDirectory(prefix="cera-rs-run-") as tmp:
        if job.train:
            model = runner.build(method, job.seed)
            stats = runner.train(model, method, job.lr, job.seed, bar)
            runner.check_base(method)
            model.save_pretrained(tmp)
            out["files"] = read_files(Path(tmp))
            hits, loss = runner.teacher_forced(model, "valid")
            trainable, total = model.get_nb_trainable_parameters()
            size = sum(len(b) for n, b in out["files"].items() if n.startswith("adapter_model."))
            out["record"] = {"method": method.name, "lr": job.lr, "seed": job.seed,
                             "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "device": runner.device.type, "ran_on": here,
                             "train": asdict(stats), "file_size": size,
                             "trainable_params": trainable, "total_params": total,
                             "valid": {"exact_match": float(hits.mean()),
                                       "loss": loss}}  # fmt: skip
            del model
            adapter = Path(tmp)
        if job.test:
            out["test"] = {**_score(runner, method, adapter, job.seed, job.first, extras),
                           "ran_on": here}  # fmt: skip
            runner.check_base(method)
    return out


class InProcess:
    """Runs the jobs one at a time in this process, in the order they were asked for."""

    counts_steps = True  # the Runner moves the bar step by step

    def __init__(self, runner: Runner, extras: Extras | None, bar: tqdm) -> None:
        self.runner, self.extras, self.bar = runner, extras, bar
        self.queue: deque[tuple[Job, Path | None]] = deque()

    def submit(self, job: Job, adapter: Path | None) -> None:
        self.queue.append((job, adapter))

    def __len__(self) -> int:
        return len(self.queue)

    def next(self) -> tuple[Job, dict]:
        job, adapter = self.queue.popleft()
        self.bar.set_postfix_str(f"{job}{'' if job.train else ': scoring'}")
        return job, execute(self.runner, job, adapter, self.extras, self.bar)

    def close(self) -> None:
        self.queue.clear()


def _last_layers(base: nn.Module, k: int | None) -> list[int] | None:
    """The layers ``adapted_layers`` adapts (the Runner's, without building one)."""
    if not k:
        return None
    stack = Stack(base, k)
    return list(range(stack.split, len(stack.inner.layers)))


def check(methods: list[Method], settings: Settings) -> None:
    """What can be refused before the model loads: a reference that is not one of the
    methods, resolve with no difference to resolve."""
    names = [m.name for m in methods]
    if settings.reference is not None and settings.reference not in names:
        raise ValueError(f"reference {settings.reference!r} is not one of the methods: "
                         f"{', '.join(names)}")  # fmt: skip
    if settings.resolve is not None and len(methods) < 2:
        raise ValueError("resolve (--resolve) narrows the intervals of methods against the "
                         "reference: give two methods or more")  # fmt: skip


def run(model_name: str, base: nn.Module, tokenizer, problems: Problems, methods: list[Method],
        settings: Settings, out_dir: Path, progress: bool = True,
        extras: Extras | None = None, ray: Ray | None = None,
        model_source: str | os.PathLike | None = None) -> Comparison:  # fmt: skip
    """Runs (or resumes) the comparison in ``out_dir``. With ``ray``, each job is a Ray
    task on a worker that loads ``model_source`` itself (the same model as ``base``:
    the worker checks), and this process keeps the store."""
    methods = distinct(list(methods))
    check(methods, settings)
    check_folder_writable(out_dir)
    if ray is not None and model_source is None:
        raise ValueError("ray: the workers load the model themselves; give its model_source")
    store = Store(out_dir)
    digest = model_digest(base)
    bar = tqdm(total=0, desc="compare", unit="step", disable=not progress)
    if ray is None:
        device = settings.torch_device()
        runner = Runner(base, tokenizer, problems, steps=settings.steps, batch=settings.batch,
                        adapted_layers=settings.adapted_layers, device=device,
                        max_seq_length=settings.max_seq_length)  # fmt: skip
        layers = runner.adapted_layers
        executor = InProcess(runner, extras, bar)
    else:
        from cera_rs.compare.cluster import RayExecutor

        layers = _last_layers(base, settings.adapted_layers)
        executor = RayExecutor(ray, settings, model_source, digest, problems, extras)
        device = executor.device
    try:
        for m in methods:  # a config that cannot be applied fails now, before any training
            m.config(layers)
        common = (RECORD_VERSION, model_name, digest, problems.digest, settings.shared(),
                  device.type, precision(device))  # fmt: skip
        plan = _Plan(methods, settings, store, common, executor, bar, progress, problems.score)
        plan.run()
    finally:
        executor.close()
        bar.close()
    records = {m.name: plan.records(m) for m in methods}
    return Comparison(model_name, problems, settings, methods, records, plan.chosen,
                      plan.base_hits, device.type, out_dir, tuple(plan.seeds),
                      resolve.summary(plan.rounds, settings.resolve, settings.max_seeds)
                      if plan.rounds else None)  # fmt: skip


class _Plan:
    """What is left to do, and what each finished job makes possible: a method's seeds
    once all its grid runs are in (its rate is chosen then), more seeds (resolve) once
    every method's current seeds are scored; everything else at once. Jobs whose
    results are on disk are not done again; the results depend only on the jobs, so
    neither the order they finish in nor the number of workers changes them."""

    def __init__(self, methods: list[Method], settings: Settings, store: Store,
                 common: tuple, executor, bar: tqdm, progress: bool,
                 score: str = "exact_match") -> None:  # fmt: skip
        self.methods, self.settings, self.store, self.common = methods, settings, store, common
        self.score = score
        self.executor, self.bar, self.progress = executor, bar, progress
        self.first = settings.seeds[0]
        self.grid = {m.name: dict.fromkeys(_lr_grid(m, settings)) for m in methods}
        self.seeds = list(settings.seeds)
        self.tested: dict[str, dict[int, dict]] = {m.name: {} for m in methods}
        self.chosen: dict[str, float] = {}
        self.rounds: list[resolve.Round] = []
        self.base_hits: np.ndarray | None = None
        self.ready: deque[tuple[Job, Any]] = deque()
        self.reference = settings.reference or methods[0].name
        bar.total = settings.steps * sum(len(g) + len(self.seeds) - 1 for g in self.grid.values())

    def fingerprint(self, job: Job) -> str:
        if job.method is None:
            return _fingerprint(*self.common)
        # a run is its method's config, rate and seed: not the grid it was chosen from
        method = replace(job.method, lrs=None)
        return _fingerprint(*self.common, method.describe(), job.lr, job.seed)

    def run(self) -> None:
        self.want(Job())
        for m in self.methods:
            for lr in self.grid[m.name]:
                self.want(Job(m, lr, self.first, train=True))
        while True:
            while self.ready:
                self.done(*self.ready.popleft())
            if not len(self.executor):
                break
            job, result = self.executor.next()
            self.ready.append((job, self.keep(job, result)))

    def want(self, job: Job) -> None:
        """Asks for ``job``, or for what of it is not on disk yet."""
        if job.method is None:
            hits = self.store.base_hits(self.fingerprint(job))
            if hits is None:
                self.executor.submit(job, None)
            else:
                self.ready.append((job, hits))
            return
        key = _key(job.lr, job.seed)
        record = self.store.load(job.method, key, self.fingerprint(job))
        if record is None:
            self.executor.submit(replace(job, train=True), None)
            return
        if job.train:  # done by an earlier call: its steps count once
            self.bar.update(self.settings.steps)
        if job.test and "test" not in record:  # trained, not yet scored
            self.executor.submit(replace(job, train=False), self.store.paths(job.method, key)[1])
        else:
            self.ready.append((job, record))

    def keep(self, job: Job, result: dict) -> Any:
        """Writes a finished job's results to the store; returns what ``done`` reads."""
        fingerprint = self.fingerprint(job)
        if job.method is None:
            self.store.save_base_hits(fingerprint, result["hits"])
            return np.array(result["hits"], dtype=bool)
        key = _key(job.lr, job.seed)
        if job.train:
            self.store.save_adapter(job.method, key, result["files"])
            record = {"fingerprint": fingerprint, **result["record"]}
            if not self.executor.counts_steps:
                self.bar.update(self.settings.steps)
        else:
            record = self.store.load(job.method, key, fingerprint)
        if job.test:
            record["test"] = result["test"]
        self.store.save(job.method, key, record)
        return record

    def done(self, job: Job, result: Any) -> None:
        if job.method is None:
            self.base_hits = result
            return
        name = job.method.name
        if not job.test:  # a grid run
            grid = self.grid[name]
            grid[job.lr] = result
            if all(r is not None for r in grid.values()):
                lr = max(grid, key=lambda x: merit(self.score, grid[x]["valid"]))
                self.chosen[name] = lr
                for seed in self.seeds:
                    self.want(Job(job.method, lr, seed, train=seed != self.first, test=True,
                                  first=seed == self.first))  # fmt: skip
            return
        self.tested[name][job.seed] = result
        if self.settings.resolve is not None and all(
                len(t) == len(self.seeds) for t in self.tested.values()):  # fmt: skip
            self.resolve()

    def resolve(self) -> None:
        """Every method has every seed so far: enough, or which seeds come next."""
        hits = {m.name: np.array([self.tested[m.name][s]["test"]["hits"] for s in self.seeds],
                                 dtype=bool) for m in self.methods}  # fmt: skip
        s = self.settings
        step = resolve.decide(hits, self.reference, s.resolve, s.max_seeds, s.seeds, s.resamples)
        self.rounds.append(step)
        if self.progress:
            self.bar.write(resolve.describe(step, self.reference, s.resolve, s.max_seeds,
                                            pilot=len(self.rounds) == 1))  # fmt: skip
        self.seeds += step.added
        self.bar.total += s.steps * len(step.added) * len(self.methods)
        self.bar.refresh()
        for m in self.methods:
            for seed in step.added:
                self.want(Job(m, self.chosen[m.name], seed, train=True, test=True))

    def records(self, method: Method) -> list[dict]:
        """The method's runs: its grid (the chosen rate's run with its test scores),
        then its other seeds in order."""
        grid = dict(self.grid[method.name])
        tested = [self.tested[method.name][s] for s in self.seeds]
        grid[self.chosen[method.name]] = tested[0]
        return list(grid.values()) + tested[1:]


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
