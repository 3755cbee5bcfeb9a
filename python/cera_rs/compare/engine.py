"""The comparison itself: where a method has something to choose (a rate grid, fields
given choices), every candidate trained on the selection seed and scored on the valid
split, the best chosen; then every reported seed at that choice (and, with
``resolve``, more seeds until the intervals are narrow enough). The selection runs are
never reported. Each run is written to disk the moment it finishes, so that a killed
comparison, run again with the same arguments, picks up where it stopped and reports
the same scores. The runs go one after another in this process, or side by side as
Ray tasks (``cluster``) as soon as what they depend on is in."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn
from tqdm import tqdm

from cera_rs.atomic import atomic_file, atomic_folder, remove_temporaries
from cera_rs.compare import resolve
from cera_rs.compare.data import Problems
from cera_rs.compare.jobs import Extras, Job, execute, model_digest, precision, write_files
from cera_rs.compare.methods import Method, product
from cera_rs.compare.runner import Runner, Stack
from cera_rs.compare.settings import Settings

if TYPE_CHECKING:
    from cera_rs.compare.cluster import Ray

RECORD_VERSION = 3  # 3: a run records its effective settings, loss curve and choice


@dataclass
class Comparison:
    """Everything the report is made from."""

    model: str
    problems: Problems
    settings: Settings
    methods: list[Method]
    selection: dict[str, list[dict]]  # method name: the runs that chose (none: no choice)
    tested: dict[str, list[dict]]  # method name: its reported runs, in seed order
    chosen: dict[str, tuple[float, dict]]  # method name: its rate and tuned fields' values
    base_hits: np.ndarray  # the base model's test answers, no adapter
    device: str
    out_dir: Path
    seeds: tuple[int, ...] = ()  # every reported seed: the settings' first ones, then resolve's
    resolved: dict | None = None  # resolve's rounds and where it stopped (resolve.summary)

    def __post_init__(self) -> None:
        self.seeds = self.seeds or self.settings.seeds


def _key(lr: float, seed: int, choice: dict) -> str:
    tuned = "".join(
        f"-{k}={v:g}" if isinstance(v, float) else f"-{k}={v}" for k, v in choice.items()
    )
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", f"lr{lr:g}{tuned}-seed{seed}")


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


def lr_grid(method: Method, settings: Settings) -> list[float]:
    """The method's own grid if it has one, else the comparison's with the rate of the
    method's training options added."""
    if method.lrs is not None:
        return sorted(set(method.lrs))
    own = method.training.get("optimizer_kwargs", {}).get("lr")  # read_folder checked it
    return sorted(set(settings.lrs) | ({float(own)} if own else set()))


def candidates(method: Method, settings: Settings) -> list[tuple[float, dict]]:
    """What a method chooses from: every rate of its grid with every combination of its
    tuned fields' choices (one candidate: nothing to choose, no selection runs)."""
    return [(lr, choice) for lr in lr_grid(method, settings) for choice in product(method.tune)]


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
        self.queue: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self.queue.append(job)

    def __len__(self) -> int:
        return len(self.queue)

    def next(self) -> tuple[Job, dict]:
        job = self.queue.popleft()
        self.bar.set_postfix_str(f"{job}{'' if job.method else ': scoring'}")
        return job, execute(self.runner, job, self.extras, self.bar)

    def close(self) -> None:
        self.queue.clear()


def last_layers(base: nn.Module, k: int | None) -> list[int] | None:
    """The layers ``adapted_layers`` adapts: the last ``k`` (the Runner's rule, through
    its ``Stack``, without building one)."""
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
    """Runs (or resumes) the comparison in ``out_dir``: wires the store, the executor
    and the plan (``api.compare`` has checked the methods, settings and folder). With
    ``ray``, each job is a Ray task on a worker that loads ``model_source`` itself (the
    same model as ``base``: the worker checks), and this process keeps the store."""
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

        layers = last_layers(base, settings.adapted_layers)
        executor = RayExecutor(ray, settings, model_source, digest, problems, extras)
        device = executor.device
    try:
        for m in methods:  # a config that cannot be applied fails now, before any training
            for choice in product(m.tune):
                m.chosen(choice).config(layers)
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
        with warnings.catch_warnings():  # a library's warning printed above the bar, not in it
            warnings.showwarning = lambda message, category, filename, lineno, *_: bar.write(
                warnings.formatwarning(message, category, filename, lineno).rstrip(), sys.stderr
            )
            plan.run()
    finally:
        executor.close()
        bar.close()
    return Comparison(
        model_name,
        problems,
        settings,
        methods,
        {m.name: [plan.picking[m.name][k] for k in plan.picking[m.name]] for m in methods},
        {m.name: [plan.tested[m.name][s] for s in plan.seeds] for m in methods},
        plan.chosen,
        plan.base_hits,
        device.type,
        out_dir,
        tuple(plan.seeds),
        resolve.summary(plan.rounds, settings.resolve, settings.max_seeds) if plan.rounds else None,
    )


class _Plan:
    """What is left to do, and what each finished job makes possible: a method's
    reported seeds once all its selection runs are in (its choice is made then), more
    seeds (resolve) once every method's current seeds are scored; everything else at
    once. Jobs whose results are on disk are not done again; the results depend only on
    the jobs, so neither the order they finish in nor the number of workers changes
    them."""

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
        self.candidates = {m.name: candidates(m, settings) for m in methods}
        self.picking: dict[str, dict[str, dict | None]] = {
            m.name: {_key(lr, settings.select_seed, c): None for lr, c in self.candidates[m.name]}
            if len(self.candidates[m.name]) > 1
            else {}
            for m in methods
        }
        self.seeds = list(settings.seeds)
        self.tested: dict[str, dict[int, dict]] = {m.name: {} for m in methods}
        self.chosen: dict[str, tuple[float, dict]] = {}
        self.rounds: list[resolve.Round] = []
        self.base_hits: np.ndarray | None = None
        self.ready: deque[tuple[Job, Any]] = deque()
        self.reference = settings.reference or methods[0].name
        runs = sum(len(p) + len(self.seeds) for p in self.picking.values())
        bar.total = settings.steps * runs

    def fingerprint(self, job: Job) -> str:
        if job.method is None:
            return _fingerprint(*self.common)
        # a run is its method's config, rate and seed: not the grid it was chosen from
        return _fingerprint(*self.common, job.method.describe(), job.lr, job.seed)

    def run(self) -> None:
        self.want(Job())
        for m in self.methods:
            if not self.picking[m.name]:
                self.choose(m, *self.candidates[m.name][0])
                continue
            for lr, choice in self.candidates[m.name]:
                seed = self.settings.select_seed
                self.want(Job(m.chosen(choice), lr, seed, choice=choice))
        while True:
            while self.ready:
                self.done(*self.ready.popleft())
            if not len(self.executor):
                break
            job, result = self.executor.next()
            self.ready.append((job, self.keep(job, result)))

    def choose(self, method: Method, lr: float, choice: dict) -> None:
        """The method's rate and tuned values: its reported seeds are asked for."""
        self.chosen[method.name] = (lr, choice)
        for seed in self.seeds:
            self.test(method, seed)

    def test(self, method: Method, seed: int) -> None:
        lr, choice = self.chosen[method.name]
        first = seed == self.seeds[0]
        self.want(Job(method.chosen(choice), lr, seed, True, first, choice))

    def want(self, job: Job) -> None:
        """Asks for ``job``, or for what of it is not on disk yet."""
        if job.method is None:
            hits = self.store.base_hits(self.fingerprint(job))
            if hits is None:
                self.executor.submit(job)
            else:
                self.ready.append((job, hits))
            return
        key = _key(job.lr, job.seed, job.choice)
        record = self.store.load(job.method, key, self.fingerprint(job))
        if record is None or (job.test and "test" not in record):
            self.executor.submit(job)
            return
        self.bar.update(self.settings.steps)  # done by an earlier call: its steps count once
        self.ready.append((job, record))

    def keep(self, job: Job, result: dict) -> Any:
        """Writes a finished job's results to the store; returns what ``done`` reads."""
        fingerprint = self.fingerprint(job)
        if job.method is None:
            self.store.save_base_hits(fingerprint, result["hits"])
            return np.array(result["hits"], dtype=bool)
        key = _key(job.lr, job.seed, job.choice)
        self.store.save_adapter(job.method, key, result["files"])
        record = {"fingerprint": fingerprint, **result["record"]}
        if not self.executor.counts_steps:
            self.bar.update(self.settings.steps)
        if job.test:
            record["test"] = result["test"]
        self.store.save(job.method, key, record)
        return record

    def done(self, job: Job, result: Any) -> None:
        if job.method is None:
            self.base_hits = result
            return
        name = job.method.name
        if not job.test:  # a selection run
            picking = self.picking[name]
            picking[_key(job.lr, job.seed, job.choice)] = result
            if all(r is not None for r in picking.values()):
                best = max(picking.values(), key=lambda r: merit(self.score, r["valid"]))
                method = next(m for m in self.methods if m.name == name)
                self.choose(method, best["lr"], best["choice"])
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
        step = resolve.decide(
            hits, self.reference, s.resolve, s.max_seeds, s.seeds, s.resamples, s.select_seed
        )
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
                self.test(m, seed)
