"""The probe callbacks' figures reach the Trainer's reporting integrations: a tiny Llama
trained with ``report_to=["tensorboard"]`` and ``SpectralCallback`` and
``LinearityCallback`` passed the ordinary way (``callbacks=[...]``, after the
integrations the Trainer puts first), then TensorBoard's own event reader finds every
figure at the steps it was measured, with the values ``log_history`` holds; and W&B in
offline mode writes them into its run file at those steps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from cera_rs import CeraConfig, LinearityCallback, SpectralCallback, get_cera_model

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is a dev dependency (pyproject.toml)",
)

ADAPTED = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
STEPS = 6


def ids(seed, n):
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


def probe(seed):
    return [{"input_ids": ids(seed, 16)}]


class Seen(TrainerCallback):
    """The keys of every ``logs`` this callback is handed, by step (a user callback
    listed before the probes)."""

    def __init__(self):
        self.keys: dict[int, set[str]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.setdefault(state.global_step, set()).update(logs)


def train(out, callbacks, added=(), report_to=("tensorboard",)):
    torch.manual_seed(0)
    config = CeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = get_cera_model(tiny_llama(0), config)
    data = [{"input_ids": row, "labels": row} for row in ids(9, 24)]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        learning_rate=3e-2,
        per_device_train_batch_size=4,
        logging_steps=100,  # only the measured steps (and none else) are logged
        report_to=list(report_to),
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    for callback in added:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def scalars(out) -> dict[str, dict[int, float]]:
    """Every scalar of the run's TensorBoard event files: tag -> step -> value."""
    (folder,) = {path.parent for path in out.rglob("events.out.tfevents.*")}
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def measured(trainer, prefix) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for record in trainer.state.log_history:
        figures = {k: v for k, v in record.items() if k.startswith(prefix)}
        if figures:
            assert record["step"] not in out, f"two records of step {record['step']}"
            out[record["step"]] = figures
    return out


def test_tensorboard_holds_the_figures_at_the_measured_steps(tmp_path):
    seen = Seen()
    spectral = SpectralCallback(probe(1), every_n_steps=2)
    linearity = LinearityCallback(probe(1), held_out=probe(2), every_n_steps=3)
    trainer = train(tmp_path, [seen, spectral, linearity])
    board = scalars(tmp_path)

    spectra = measured(trainer, "spectral/")
    lin = measured(trainer, "linearity/")
    assert sorted(spectra) == [2, 4, 6] and sorted(lin) == [3, 6]
    names = {name for step in spectra.values() for name in step}
    assert names == {
        f"spectral/{m}/{what}" for m in ADAPTED for what in ("effective_rank", "tail_energy")
    }
    assert {"linearity/mean_at_r", "linearity/mean_held_out_at_r"} <= set(lin[3])
    for history in (spectra, lin):
        for step, figures in history.items():
            for name, value in figures.items():
                # TensorBoard's integration prefixes train/, as it does the loss
                logged = board[f"train/{name}"]
                assert sorted(logged) == sorted(s for s in history if name in history[s])
                assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, step)
    assert spectra[2] != spectra[6]  # measured again, on a model that trained
    # a user callback listed before the probes is handed the figures too
    for step in (2, 3, 4, 6):
        assert any(k.startswith(("spectral/", "linearity/")) for k in seen.keys[step]), step
    assert "train/loss" in board and sorted(board["train/loss"]) == [2, 3, 4, 6]


def wandb_records(run_file: Path) -> list:
    """The protobuf ``Record`` messages of an offline W&B run file: W&B's header
    (``:W&B``, magic, version), then the records in LevelDB's log format (32 KiB blocks;
    each chunk a CRC, a length, and full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_file: Path, timeout: float = 60) -> list[dict]:
    """The history rows (``wandb.log`` calls) of the run, once W&B's service has
    written the run's exit record (it writes after ``wandb.finish()`` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    rows = []
    for record in records:
        if record.HasField("history"):
            row = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            rows.append({k: json.loads(v) for k, v in row.items()})
    return rows


def test_wandb_offline_holds_the_figures_at_the_measured_steps(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is a dev dependency (pyproject.toml)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    for where in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(where, str(tmp_path / "wandb-home"))
    (tmp_path / "wandb-home").mkdir()
    spectral = SpectralCallback(probe(1), every_n_steps=2)
    linearity = LinearityCallback(probe(1), every_n_steps=3)
    trainer = train(tmp_path / "out", [spectral, linearity], report_to=["wandb"])
    wandb.finish()
    (run_file,) = (tmp_path / "wandb-home").rglob("run-*.wandb")
    rows = {}
    for row in wandb_history(run_file):
        rows.setdefault(row["train/global_step"], {}).update(row)
    for prefix, steps in (("spectral/", [2, 4, 6]), ("linearity/", [3, 6])):
        history = measured(trainer, prefix)
        assert sorted(history) == steps
        for step, figures in history.items():
            for name, value in figures.items():
                assert rows[step][f"train/{name}"] == pytest.approx(value, rel=1e-12), name


def test_a_callback_added_after_the_trainer_is_built_reaches_tensorboard(tmp_path):
    trainer = train(tmp_path, [], added=[SpectralCallback(probe(1), every_n_steps=3)])
    board = scalars(tmp_path)
    spectra = measured(trainer, "spectral/")
    assert sorted(spectra) == [3, 6]
    for m in ADAPTED:
        rank = board[f"train/spectral/{m}/effective_rank"]
        assert sorted(rank) == [3, 6]
        assert rank[6] == pytest.approx(spectra[6][f"spectral/{m}/effective_rank"], rel=1e-6)


def test_a_loop_without_a_trainer_is_warned(tmp_path):
    """Called outside a Trainer's CallbackHandler, the callback cannot move ahead of
    the integrations, and says so."""
    callback = SpectralCallback(probe(1), every_n_steps=1)
    with pytest.warns(UserWarning, match="reach only the callbacks after it"):
        callback.on_train_begin(None, None, None)


def test_the_callbacks_import_from_cera_rs_without_a_cycle():
    """transformers' Trainer utilities import peft, and importing peft imports cera_rs
    (the hook that registers CeRA): the callbacks, which import the Trainer machinery,
    load on first use, so that CeRA is still registered in that order."""
    script = (
        "import warnings; warnings.simplefilter('error')\n"
        "import transformers.trainer_utils, peft\n"
        "assert 'CERA' in peft.PeftType.__members__\n"
        "from cera_rs import LinearityCallback, SpectralCallback\n"
        "import cera_rs\n"
        "assert {'LinearityCallback', 'SpectralCallback'} <= set(dir(cera_rs))\n"
        "print(SpectralCallback.__module__, LinearityCallback.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cera_rs.spectral.callback", "cera_rs.export.callback"]
