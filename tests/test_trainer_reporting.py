"""The probe callbacks' figures reach the Trainer's reporting integrations: a tiny Llama
trained with ``report_to=["tensorboard"]`` and ``SpectralCallback`` and
``LinearityCallback`` passed the ordinary way (``callbacks=[...]``, after the
integrations the Trainer puts first), then TensorBoard's own event reader finds every
figure at the steps it was measured, with the values ``log_history`` holds."""

from __future__ import annotations

import subprocess
import sys

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
