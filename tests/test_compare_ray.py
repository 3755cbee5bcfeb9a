"""``cera-rs compare --ray``, on one local Ray of 2 CPUs shared by the module and the
tiny model and JSONL of tests/test_compare.py: the same scores as in this process,
run for run (added --resolve seeds included); a driver stopped by Ctrl-C once its
first run is on disk cancels its tasks and, started again, does not redo that run
(tests/test_compare.py kills a driver for real; here a killed driver would cost a
second process and its workers half a minute to start); a worker killed mid-run is
retried once, then reported; a failing method is named; without Ray, one line; adapter
folders are written whole, what a kill left half-written is removed, and a run is not
reused at another precision."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
from test_compare import _scores, _tiny, compare_argv

from cera_rs.atomic import atomic_folder
from cera_rs.cli import main
from cera_rs.compare import Settings, compare
from cera_rs.compare.cluster import RunFailed
from cera_rs.compare.engine import Store


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; its address, for a second driver to join."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny"))


def _args(tiny: Path, out: Path, *more: str) -> list[str]:
    """Two methods, two rates chosen on selection seed 9, seeds 0 and 1, and --resolve
    narrow enough that a third seed (2) is always added (up to --max-seeds 3)."""
    seeds = ("--seeds", "0,1", "--select-seed", "9")
    flags = ("--steps", "6", "--batch", "8", "--lrs", "0.01,0.03", *seeds)
    resolve = ("--resolve", "0.01", "--max-seeds", "3")
    return compare_argv(
        tiny, "lora:r=4", "cera:r=4", flags=(*flags, *resolve, "--out", str(out), *more)
    )


def _quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def _runs(out: Path) -> dict[str, dict]:
    """Each run's scores: what it learned, not when, where or how fast."""
    runs = {}
    for path in sorted((out / "runs").glob("*/*.json")):
        r = json.loads(path.read_text())
        test = {k: v for k, v in r.get("test", {}).items() if k not in ("score_time", "ran_on")}
        runs[f"{path.parent.name}/{path.name}"] = (r["valid"], r["train"]["train_loss"], test)
    return runs


@pytest.fixture(scope="module")
def in_process(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("in_process")
    assert _quiet(_args(tiny, out)) == 0
    return out


def _busy_workers() -> list[psutil.Process]:
    """This process's Ray workers that run a task (Ray names them after it)."""
    busy = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::cera-rs "):
                busy.append(p)
    return busy


@pytest.fixture(scope="module")
def on_ray(local_ray, tiny, tmp_path_factory):
    """The same comparison on Ray, stopped by Ctrl-C the moment its first run is on
    disk (its other tasks are running then), then run again."""
    out = tmp_path_factory.mktemp("on_ray")
    save, saved = Store.save, []

    def save_then_interrupt(store, method, key, record):
        save(store, method, key, record)
        saved.append(key)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Store, "save", save_then_interrupt)
        assert _quiet(_args(tiny, out, "--ray")) == 130  # the CLI's exit status for Ctrl-C
    kept = {p: p.read_text() for p in (out / "runs").glob("*/*.json")}
    assert len(saved) == len(kept) == 1 and not (out / "report.md").exists()
    deadline = time.monotonic() + 30
    while _busy_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    cancelled = not _busy_workers()
    assert _quiet(_args(tiny, out, "--ray")) == 0
    return out, kept, cancelled


def test_ray_gives_the_in_process_scores_run_for_run(in_process, on_ray):
    out, _, _ = on_ray
    assert _scores(out) == _scores(in_process)
    # per method: two selection runs (seed 9, apart from the reported ones), seeds 0, 1, 2
    assert _runs(out) == _runs(in_process) and len(_runs(out)) == 2 * (2 + 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["seeds"] == [0, 1, 2]  # the added seed ran on Ray too
    assert summary["resolve"]["stopped"] == "max-seeds"
    for path in (out / "runs").glob("*/*.json"):
        assert json.loads(path.read_text())["ran_on"]["device"] == "cpu, 1 thread(s)"
    assert "Trained on: " in (out / "report.md").read_text()


def test_ctrl_c_cancels_and_a_resumed_driver_does_not_redo_a_finished_run(on_ray):
    out, kept, cancelled = on_ray
    assert cancelled  # no worker kept running a task of the interrupted comparison
    for path, text in kept.items():
        before, after = json.loads(text), json.loads(path.read_text())
        after.pop("test", None)  # scored later, if its rate was chosen
        assert after == before  # not trained again
    assert not [p for p in (out / "runs").rglob("*") if p.name.endswith(".tmp")]


def test_a_failing_method_is_named_and_finished_runs_kept(local_ray, tmp_path, capsys):
    """bias="all" trains the base's biases, which every run shares: refused on the
    worker, and reported as in this process, in one line naming the method."""
    tiny = _tiny(tmp_path / "biased", attention_bias=True)
    out = tmp_path / "out"
    flags = ("--steps", "4", "--batch", "8", "--lrs", "0.01", "--seeds", "0")
    args = compare_argv(
        tiny, "lora:r=4", "lora:r=4,bias=all", flags=(*flags, "--out", str(out), "--ray")
    )
    assert _quiet(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith("cera-rs: error: lora:r=4,bias=all (lr 0.01, seed 0), on ")
    assert "writes to or trains the base model's own weights" in err
    for path in (out / "runs").glob("*/*.json"):  # what finished is whole
        assert path.with_suffix("").is_dir() and json.loads(path.read_text())["valid"]
    assert not [p for p in (out / "runs").rglob("*") if p.name.endswith(".tmp")]


class _Killer(threading.Thread):
    """Kills, with SIGKILL, the Ray worker that runs a task of the given name, up to
    ``times`` times (Ray names a worker's process after the task it runs)."""

    def __init__(self, name: str, times: int) -> None:
        super().__init__(daemon=True)
        self.title, self.times, self.killed = f"ray::cera-rs {name}", times, []
        self.stop = threading.Event()

    def run(self) -> None:
        while len(self.killed) < self.times and not self.stop.is_set():
            for p in _busy_workers():
                with contextlib.suppress(psutil.Error):
                    if p.pid not in self.killed and p.cmdline()[:1] == [self.title]:
                        os.kill(p.pid, signal.SIGKILL)
                        self.killed.append(p.pid)
            time.sleep(0.02)


def _one_run(tiny: Path, out: Path) -> dict:
    settings = Settings(steps=40, batch=8, lrs=(0.01,), seeds=(0,))
    return compare(
        ["cera:r=4"],
        model=tiny / "model",
        train=tiny / "train.jsonl",
        test=tiny / "test.jsonl",
        out_dir=out,
        settings=settings,
        progress=False,
        ray=True,
    )


def test_a_killed_worker_is_retried_once_then_reported(local_ray, tiny, tmp_path):
    killer = _Killer("cera:r=4 (lr 0.01, seed 0)", times=1)
    killer.start()
    summary = _one_run(tiny, tmp_path / "once")
    killer.stop.set()
    assert len(killer.killed) == 1  # killed mid-run, and the retry finished it
    assert summary["methods"]["cera:r=4"]["test_exact_match"]

    killer = _Killer("cera:r=4 (lr 0.01, seed 0)", times=2)
    killer.start()
    with pytest.raises(RunFailed, match=r"cera:r=4 \(lr 0.01, seed 0\): its worker died"):
        _one_run(tiny, tmp_path / "twice")
    killer.stop.set()
    assert len(killer.killed) == 2


def test_ray_flags_are_checked_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "never"
    base = compare_argv(tiny, "lora:r=4", flags=("--out", str(out)))
    assert main([*base, "--cpus-per-run", "2"]) == 2
    assert "--gpus-per-run and --cpus-per-run are for --ray" in capsys.readouterr().err
    assert main([*base, "--ray", "head-node"]) == 2
    assert "--ray 'head-node': not a Ray address" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main([*base, "--ray"]) == 2
    assert capsys.readouterr().err == (
        "cera-rs: error: --ray needs ray (not installed); "
        'install with: pip install "cera_rs[ray]"\n'
    )
    assert not out.exists()


def test_adapter_folders_are_written_whole_and_stale_temporaries_removed(tmp_path):
    """The store, hardened: an adapter folder is replaced whole or not at all, and
    what a kill left half-written is removed when the next comparison starts."""
    target = tmp_path / "runs" / "m" / "lr0.01-seed0"
    target.parent.mkdir(parents=True)
    with atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("mid-write")
    assert (target / "a.bin").read_bytes() == b"old" and os.listdir(target.parent) == [target.name]
    with atomic_folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"new")
    assert sorted(p.name for p in target.rglob("*")) == ["b.bin", "sub"]  # the old one gone
    stale = [
        target.parent / ".lr0.01-seed1.0123abcd.tmp",  # a kill's adapter folder
        target.parent / ".lr0.01-seed1.json.89abcdef.tmp",  # and record
        tmp_path / "runs" / ".base.json.00ff00ff.tmp",
    ]
    stale[0].mkdir()
    (stale[0] / "adapter_model.safetensors").write_bytes(b"")
    stale[1].write_text("{")
    stale[2].write_text("{")
    hidden = target.parent / ".notes"  # not a temporary's name
    hidden.write_text("")
    Store(tmp_path)
    assert not any(p.exists() for p in stale) and hidden.exists() and target.is_dir()


def test_a_run_is_not_reused_at_another_precision(tiny, tmp_path, monkeypatch):
    """A run's fingerprint holds its device kind and precision: a CPU float32 run is
    not taken for a CUDA bf16 comparison's (the precision is what a GPU would change)."""
    from cera_rs.compare import engine

    def run() -> dict:
        compare(
            ["lora:r=4"],
            model=tiny / "model",
            train=tiny / "train.jsonl",
            test=tiny / "test.jsonl",
            out_dir=tmp_path,
            progress=False,
            settings=Settings(steps=2, batch=4, lrs=(0.01,), seeds=(0,)),
        )
        return json.loads((tmp_path / "runs" / "lora_r=4" / "lr0.01-seed0.json").read_text())

    first = run()
    assert run() == first  # the same device and precision: kept
    monkeypatch.setattr(engine, "precision", lambda device: "bfloat16 autocast")
    again = run()
    assert again["fingerprint"] != first["fingerprint"]  # trained again, not reused
