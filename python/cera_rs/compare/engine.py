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
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn
from tqdm import tqdm

from cera_rs.atomic import atomic_file, atomic_folder, check_folder_writable, remove_temporaries
from cera_rs.compare import resolve
from cera_rs.compare.data import Problems
from cera_rs.compare.jobs import Extras, Job, execute, model_digest, precision, write_files
from cera_rs.compare.methods import Method, distinct
from cera_rs.compare.runner import Runner, Stack
from cera_rs.compare.settings import Settings

if TYPE_CHECKING:
    from cera_rs.compare.cluster import Ray

RECORD_VERSION = 2  # 2: the fingerprint holds the device kind and precision


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
        raise ValueError(
            f"reference {settings.reference!r} is not one of the methods: {', '.join(names)}"
        )
    if settings.resolve is not None and len(methods) < 2:
        raise ValueError(
            "resolve (--resolve) narrows the intervals of methods against the "
            "reference: give two methods or more"
        )


def run(
    model_name: str,
    base: nn.Module,
    tokenizer,
    problems: Problems,
    methods: list[Method],
    settings: Settings,
    out_dir: Path,
    progress: bool = True,
    extras: Extras | None = None,
    ray: Ray | None = None,
    model_source: str | os.PathLike | None = None,
) -> Comparison:
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
        runner = Runner(
            base,
            tokenizer,
            problems,
            steps=settings.steps,
            batch=settings.batch,
            adapted_layers=settings.adapted_layers,
            device=device,
            max_seq_length=settings.max_seq_length,
        )
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
        common = (
            RECORD_VERSION,
            model_name,
            digest,
            problems.digest,
            settings.shared(),
            device.type,
            precision(device),
        )
        plan = _Plan(methods, settings, store, common, executor, bar, progress, problems.score)
        plan.run()
    finally:
        executor.close()
        bar.close()
    records = {m.name: plan.records(m) for m in methods}
    return Comparison(
        model_name,
        problems,
        settings,
        methods,
        records,
        plan.chosen,
        plan.base_hits,
        device.type,
        out_dir,
        tuple(plan.seeds),
        resolve.summary(plan.rounds, settings.resolve, settings.max_seeds) if plan.rounds else None,
    )


class _Plan:
    """What is left to do, and what each finished job makes possible: a method's seeds
    once all its grid runs are in (its rate is chosen then), more seeds (resolve) once
    every method's current seeds are scored; everything else at once. Jobs whose
    results are on disk are not done again; the results depend only on the jobs, so
    neither the order they finish in nor the number of workers changes them."""

    def __init__(
        self,
        methods: list[Method],
        settings: Settings,
        store: Store,
        common: tuple,
        executor,
        bar: tqdm,
        progress: bool,
        score: str = "exact_match",
    ) -> None:
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
                    self.want(
                        Job(
                            job.method,
                            lr,
                            seed,
                            train=seed != self.first,
                            test=True,
                            first=seed == self.first,
                        )
                    )
            return
        self.tested[name][job.seed] = result
        if self.settings.resolve is not None and all(
            len(t) == len(self.seeds) for t in self.tested.values()
        ):
            self.resolve()

    def resolve(self) -> None:
        """Every method has every seed so far: enough, or which seeds come next."""
        hits = {
            m.name: np.array(
                [self.tested[m.name][s]["test"]["hits"] for s in self.seeds], dtype=bool
            )
            for m in self.methods
        }
        s = self.settings
        step = resolve.decide(hits, self.reference, s.resolve, s.max_seeds, s.seeds, s.resamples)
        self.rounds.append(step)
        if self.progress:
            self.bar.write(
                resolve.describe(
                    step, self.reference, s.resolve, s.max_seeds, pilot=len(self.rounds) == 1
                )
            )
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
