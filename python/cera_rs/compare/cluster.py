"""``--ray``: a comparison's jobs as Ray tasks, side by side on the cores or GPUs of one
machine or on the nodes of a cluster. A worker loads the model itself (from a path
every node sees, or a hub id; it checks that the weights are the driver's), builds
the Runner once and keeps it for its next job. A task returns the run's record and
its adapter files as bytes and this process, the driver, writes the store, so the
results need no shared filesystem. A task that raises fails the comparison naming
its run; a worker that dies (killed, out of memory, its node lost) is retried once;
Ctrl-C cancels what is still running."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cera_rs.compare.data import Problems
from cera_rs.compare.jobs import Extras, Job, execute, model_digest
from cera_rs.compare.runner import Runner
from cera_rs.compare.settings import Settings
from cera_rs.extras import Needs, require

RAY = Needs(("ray",), 'pip install "cera_rs[ray]"')
_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9._-]+:\d+")


class RunFailed(RuntimeError):
    """A job failed on Ray for a reason other than bad input: a bug, or its worker died
    on the retry too."""


@dataclass(frozen=True)
class Ray:
    """Where the runs go: ``address`` "local" (the Ray this process already runs, else
    one started on this machine for the comparison), "auto" (the cluster ``ray start``
    joined this machine to) or ``ray://HOST:PORT`` / ``HOST:PORT``; each run's GPUs
    (default: 1 on a cluster with GPUs, unless the device is cpu; 0.5 puts two runs on
    a GPU) and CPUs (torch's threads in the run)."""

    address: str = "local"
    gpus_per_run: float | None = None
    cpus_per_run: int = 1

    def __post_init__(self) -> None:
        if self.address not in ("local", "auto") and not _ADDRESS.fullmatch(self.address):
            raise ValueError(
                f"--ray {self.address!r}: not a Ray address (auto, ray://HOST:PORT "
                "or HOST:PORT); give --ray after the METHODs"
            )
        if (
            isinstance(self.cpus_per_run, bool)
            or not isinstance(self.cpus_per_run, int)
            or self.cpus_per_run < 1
        ):
            raise ValueError(
                f"--cpus-per-run must be a positive integer, got {self.cpus_per_run!r}"
            )
        if self.gpus_per_run is not None and not (
            isinstance(self.gpus_per_run, (int, float)) and self.gpus_per_run >= 0
        ):
            raise ValueError(f"--gpus-per-run must be 0 or more, got {self.gpus_per_run!r}")


def options(ray: Ray | str | bool | None) -> Ray | None:
    """``compare``'s ``ray=``: None or False (in this process), True (a local Ray), an
    address, or a ``Ray``. Refuses, before any work, a Python without Ray."""
    if ray is None or ray is False:
        return None
    require("--ray", [RAY])
    if ray is True:
        return Ray()
    return ray if isinstance(ray, Ray) else Ray(address=str(ray))


@dataclass(frozen=True)
class _Context:
    """What every worker builds its Runner from, sent once through the object store."""

    model: str
    digest: str
    problems: Problems
    runner: dict[str, Any]
    device: str
    threads: int
    extras: Extras | None

    @property
    def key(self) -> str:
        return repr(
            (
                self.model,
                self.digest,
                self.problems.digest,
                sorted(self.runner.items()),
                self.device,
            )
        )


_kept: dict[str, Runner] = {}  # a worker's Runner, kept for its next job of the comparison


def _runner(context: _Context) -> Runner:
    key = context.key
    if key not in _kept:
        _kept.clear()  # another comparison's model goes before this one's loads
        from cera_rs.compare import load_model

        _, base, tokenizer = load_model(context.model)
        if model_digest(base) != context.digest:
            raise ValueError(
                f"the model {context.model} on {socket.gethostname()} is not the "
                "driver's (its weights differ): every node must see the same "
                "model"
            )
        _kept[key] = Runner(
            base, tokenizer, context.problems, device=torch.device(context.device), **context.runner
        )
    return _kept[key]


def _task(context: _Context, job: Job) -> dict:
    """One job on a worker."""
    torch.set_num_threads(context.threads)
    runner = _runner(context)
    try:
        return execute(runner, job, context.extras)
    except BaseException:
        _kept.clear()  # a job that failed may have left the Runner's base changed
        raise


def _connect(options: Ray) -> bool:
    """Joins the Ray this process runs, or starts/joins one; True if this call did."""
    import ray

    if ray.is_initialized():
        return False
    if options.address == "local":  # a new one, never another Ray found running here
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=options.address, log_to_driver=False)
    return True


def _device(settings: Settings, options: Ray) -> tuple[torch.device, float]:
    """The runs' device kind (the same for every run: it is part of their fingerprint)
    and each run's GPUs."""
    import ray

    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    gpus = options.gpus_per_run
    if settings.device == "cpu" or (settings.device == "auto" and (gpus == 0 or not has_gpus)):
        if gpus:
            raise ValueError(
                f"--gpus-per-run {gpus:g}: "
                + (
                    "the runs are on --device cpu"
                    if settings.device == "cpu"
                    else "the Ray cluster has no GPU"
                )
            )
        return torch.device("cpu"), 0
    if not has_gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPU")
    if gpus == 0:
        raise ValueError("--gpus-per-run 0 with --device cuda: a run would see no GPU")
    return torch.device("cuda"), 1 if gpus is None else gpus


def _check_fits(cpus: int, gpus: float) -> None:
    """A run no node can hold would wait forever: refused (on a cluster that adds
    nodes as work waits, give the nodes first)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        most = max((r.get("CPU", 0) for r in nodes), default=0)
        raise ValueError(
            f"--cpus-per-run {cpus} / --gpus-per-run {gpus:g}: no node of the Ray "
            f"cluster has that much (the most CPUs on one: {most:g})"
        )


class RayExecutor:
    """Runs the jobs as Ray tasks, all that are asked for at once; ``next`` returns
    whichever finishes first."""

    counts_steps = False  # the driver moves the bar by a whole run when one comes in

    def __init__(
        self,
        options: Ray,
        settings: Settings,
        model: str | Path,
        digest: str,
        problems: Problems,
        extras: Extras | None,
    ) -> None:
        require("--ray", [RAY])
        import ray

        self.started = _connect(options)
        self.pending: dict[Any, Job] = {}
        try:
            self.device, gpus = _device(settings, options)
            _check_fits(options.cpus_per_run, gpus)
            runner = {
                "steps": settings.steps,
                "batch": settings.batch,
                "adapted_layers": settings.adapted_layers,
                "max_seq_length": settings.max_seq_length,
            }
            self.context = ray.put(
                _Context(
                    str(model),
                    digest,
                    problems,
                    runner,
                    self.device.type,
                    options.cpus_per_run,
                    extras,
                )
            )
        except BaseException:
            self.close()
            raise
        self.remote = ray.remote(_task)
        self.task_options = {
            "num_cpus": options.cpus_per_run,
            "num_gpus": gpus,
            "max_retries": 1,
            "retry_exceptions": False,
        }

    def submit(self, job: Job) -> None:
        ref = self.remote.options(name=f"cera-rs {job}", **self.task_options).remote(
            self.context, job
        )
        self.pending[ref] = job

    def __len__(self) -> int:
        return len(self.pending)

    def next(self) -> tuple[Job, dict]:
        import ray
        from ray import exceptions

        ready: list = []
        while not ready:  # in steps, so that Ctrl-C is seen
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
        job = self.pending.pop(ready[0])
        try:
            return job, ray.get(ready[0])
        except exceptions.RayTaskError as err:
            cause = err.cause if isinstance(err.cause, BaseException) else err
            node = getattr(err, "ip", None) or "a worker"  # not every RayTaskError has it
            text = f"{job}, on {node}: {' '.join(str(cause).split())}"
            if isinstance(cause, ValueError):  # bad input: one line, as in this process
                raise ValueError(text) from err
            if isinstance(cause, OSError):
                raise OSError(text) from err
            raise RunFailed(f"{text} ({type(cause).__name__})") from err
        except (
            exceptions.WorkerCrashedError,
            exceptions.NodeDiedError,
            exceptions.OutOfMemoryError,
        ) as err:
            raise RunFailed(
                f"{job}: its worker died (killed, out of memory or its node lost), "
                "and again on its one retry"
            ) from err

    def close(self) -> None:
        """Cancels what is still running (a failure elsewhere, Ctrl-C); leaves a Ray
        this comparison started."""
        import ray

        for ref in self.pending:  # a KeyboardInterrupt in the task: its worker lives on
            ray.cancel(ref)
        self.pending.clear()
        if self.started:
            ray.shutdown()
