"""One job of a comparison and how it is done, the same in this process and on a Ray
worker: train a run and score it on the valid split and, for a reported seed, its
saved adapter loaded back on the test split (exact match, loss, bits stored, and for
the first reported seed its spectra and linearity); or the base model's test answers.
What a job returns is what the driver stores."""

from __future__ import annotations

import hashlib
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from tqdm import tqdm

from cera_rs.compare import effective
from cera_rs.compare.methods import SPECTRAL_METHODS, Method
from cera_rs.compare.runner import Runner, Suffix, peft_quietly

Extras = Callable[[Method, nn.Module, Runner, np.ndarray], dict]
"""Called on each method's first-seed run at its chosen rate, after scoring, with the
trained model and its test answers (right/wrong); what it returns is kept in that
run's record under ``extras`` (the demo's LoRA export)."""


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
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@dataclass(frozen=True)
class Job:
    """One piece of a comparison: train a run and score it on the valid split (and, for
    a reported seed, on the test split); with no method, the base model's test answers.
    A run's method has its tuned fields set (``Method.chosen``), ``choice`` says to what."""

    method: Method | None = None
    lr: float = 0.0
    seed: int = 0
    test: bool = False  # a reported seed's run: scored on the test split too
    first: bool = False  # the first reported seed's scoring: spectra, linearity, extras
    choice: dict = field(default_factory=dict)  # the tuned fields' values

    def __str__(self) -> str:
        if self.method is None:
            return "the base model's test answers"
        chosen = "".join(f", {k} {v}" for k, v in self.choice.items())
        return f"{self.method.name} (lr {self.lr:g}{chosen}, seed {self.seed})"


def where(device: torch.device) -> dict[str, str]:
    """Where a job ran: the machine (on Ray also the node's id and address: two nodes
    may share a host name), and the GPU's name or the CPU threads."""
    if device.type == "cuda":
        here = {"node": socket.gethostname(), "device": torch.cuda.get_device_name(device)}
    else:
        here = {"node": socket.gethostname(), "device": f"cpu, {torch.get_num_threads()} thread(s)"}
    ray = sys.modules.get("ray")  # imported by a Ray worker, never by this module
    if ray is not None and ray.is_initialized():
        here["ray_node"] = ray.get_runtime_context().get_node_id()
        here["address"] = ray.util.get_node_ip_address()
    return here


def execute(runner: Runner, job: Job, extras: Extras | None, bar: tqdm | None = None) -> dict:
    """Does ``job`` (in this process, or on a Ray worker) and returns what the driver
    stores: the new run's record and adapter files and, for a reported seed, its test
    scores (of the saved adapter, loaded back); or the base model's test answers."""
    here = where(runner.device)
    if job.method is None:
        return {"hits": runner.generated(runner.base).astype(int).tolist(), "ran_on": here}
    method, out = job.method, {}
    with tempfile.TemporaryDirectory(prefix="cera-rs-run-") as tmp:
        model = runner.build(method, job.seed)
        branch = effective.of_model(model)  # as built, before training moves it
        stats = runner.train(model, method, job.lr, job.seed, bar)
        runner.check_base(method)
        model.save_pretrained(tmp)
        out["files"] = read_files(Path(tmp))
        trainable, total = model.get_nb_trainable_parameters()
        size = sum(len(b) for n, b in out["files"].items() if n.startswith("adapter_model."))
        out["record"] = {
            "method": method.name,
            "lr": job.lr,
            "choice": job.choice,
            "seed": job.seed,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": runner.device.type,
            "ran_on": here,
            "train": asdict(stats),
            "file_size": size,
            "trainable_params": trainable,
            "total_params": total,
            "precision": precision(runner.device),
            "effective": {**branch, "trainable_params": trainable, **stats.optimizer},
            "valid": {  # the training's last quarter point: the trained adapter's
                "exact_match": stats.curve[-1]["valid_exact_match"],
                "loss": stats.curve[-1]["valid_loss"],
            },
        }
        del model
        if job.test:
            if bar is not None:  # scoring moves no step: say what the bar waits on
                bar.set_postfix_str(f"{job}: scoring (greedy decoding, spectra)")
            out["test"] = {
                **_score(runner, method, Path(tmp), job.seed, job.first, extras),
                "ran_on": here,
            }
            runner.check_base(method)
    return out


def _score(
    runner: Runner, method: Method, adapter: Path, seed: int, first: bool, extras: Extras | None
) -> dict:
    """The test scores of a saved run, loaded back as a user would load it: exact
    match by greedy decoding (and how often the teacher-forced check agrees), test
    loss; for the first seed the spectra of the adapters' output deltas and, for
    CeRA, how much of each adapter a linear map of its rank reproduces on held-out
    tokens."""
    start = time.perf_counter()
    with peft_quietly():
        model = PeftModel.from_pretrained(runner.copy_base(), adapter)
    model = model.to(runner.device).eval()
    hits = runner.generated(model)
    forced, nats, tokens = runner.forced_scores(model, "test")
    out: dict[str, Any] = {
        "hits": hits.astype(int).tolist(),
        "exact_match": float(hits.mean()),
        "loss": float(nats.sum() / tokens),
        "teacher_forced_agreement": float((forced == hits).mean()),
        "bits": _bits(runner.base_nats("test") - nats),
    }
    for name in runner.problems.extra_tests:  # e.g. phonebook's reworded prompts
        extra = runner.generated(model, name)
        out[name] = {
            "hits": extra.astype(int).tolist(),
            "exact_match": float(extra.mean()),
            "bits": _bits(runner.base_nats(name) - runner.forced_scores(model, name)[1]),
        }
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
    return {
        "effective_rank": float(np.mean(ranks)),
        "dim90": float(np.mean(dims)),
        "layers": len(ranks),
    }


def linearity(runner: Runner, model: PeftModel) -> dict:
    """Each CeRA adapter's linearity at its rank (the share of its output energy the
    best rank-r linear map reproduces), fitted on the training tokens and measured on
    the test tokens, averaged over layers."""
    from cera_rs.export import measure_linearity

    target = _analysed(runner, model)
    splits = runner.splits
    report = measure_linearity(
        target, splits["train"].batches(), held_out=splits["test"].batches(), progress=False
    )
    return {
        "linearity_at_r": report.mean("linearity_at_adapter_rank"),
        "held_out_linearity_at_r": report.mean("held_out_linearity_at_adapter_rank"),
        "layers": len(report),
    }
