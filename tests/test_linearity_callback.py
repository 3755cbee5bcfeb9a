"""``LinearityCallback``: each CeRA module's linearity logged during Trainer training,
checked against ``to_lora``'s report on the same tokens for the model at that step."""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from transformers import Trainer, TrainerCallback, TrainingArguments

from cera_rs import CeraConfig, get_cera_model
from cera_rs.export import LinearityCallback, measure_linearity, to_lora

ADAPTED = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]


def ids(seed, n=8):
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(seed))


def probe(seed):
    """512 tokens: eight times the layers' width, so that the fitted map is not noise."""
    return [{"input_ids": ids(seed, n=16)}, {"input_ids": ids(seed + 100, n=16)}]


def cera(seed=0):
    torch.manual_seed(seed)
    return get_cera_model(
        tiny_llama(0), CeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    )


class Snapshots(TrainerCallback):
    """What to_lora reports for the model at each step the linearity callback
    measures (registered after it, so at the same point of the same step)."""

    def __init__(self, every):
        self.every, self.reports = every, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.reports[state.global_step] = to_lora(
                model, probe(1), rank=4, held_out=probe(2), progress=False
            ).report


def train(tmp_path, callbacks, steps=4):
    model = cera()
    data = [{"input_ids": row, "labels": row} for row in ids(9, n=16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        learning_rate=3e-2,
        per_device_train_batch_size=4,
        logging_steps=100,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return model, trainer


def test_logs_to_loras_linearity_of_each_module_every_n_steps(tmp_path):
    callback = LinearityCallback(probe(1), held_out=probe(2), every_n_steps=2)
    snapshots = Snapshots(2)
    _, trainer = train(tmp_path, [callback, snapshots])
    logged = {
        h["step"]: h
        for h in trainer.state.log_history
        if any(k.startswith("linearity/") for k in h)
    }
    assert sorted(logged) == [2, 4] == sorted(snapshots.reports)
    for step, record in logged.items():
        rows = {row["module"]: row for row in snapshots.reports[step].rows()}
        assert sorted(rows) == sorted(ADAPTED)
        for name, row in rows.items():
            assert record[f"linearity/{name}/at_r"] == pytest.approx(
                row["linearity_at_adapter_rank"], rel=1e-12, abs=1e-12
            )
            assert record[f"linearity/{name}/held_out_at_r"] == pytest.approx(
                row["held_out_linearity_at_adapter_rank"], rel=1e-12, abs=1e-12
            )
        held_out = [record[f"linearity/{name}/held_out_at_r"] for name in ADAPTED]
        assert record["linearity/mean_held_out_at_r"] == pytest.approx(sum(held_out) / 4)
        # A non-linear adapter: its rank-4 map keeps much of the output, not all of
        # it, and less on tokens it was not fitted on.
        assert all(0 < v < 1 for v in held_out)
        assert record["linearity/mean_held_out_at_r"] < record["linearity/mean_at_r"]
    assert logged[2]["linearity/mean_at_r"] != logged[4]["linearity/mean_at_r"]  # it trained


def test_measuring_leaves_training_alone(tmp_path):
    """The probes run in eval mode without gradients and draw no random numbers: the
    trained weights are those of a run without the callback."""
    with_callback, _ = train(tmp_path / "a", [LinearityCallback(probe(1), every_n_steps=1)])
    without, _ = train(tmp_path / "b", [])
    for (name, p), q in zip(with_callback.named_parameters(), without.parameters()):
        assert torch.equal(p, q), name
    assert with_callback.training  # the Trainer's mode, restored after each probe


def test_measure_linearity_is_to_loras_report_without_the_export():
    model = cera().eval()
    report = measure_linearity(model, probe(1), held_out=probe(2), progress=False)
    exported = to_lora(model, probe(1), rank=4, held_out=probe(2), progress=False).report
    assert report.rows() == exported.rows()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        LinearityCallback(probe(1), every_n_steps=0)
    with pytest.raises(TypeError, match="every_n_steps must be an int"):
        LinearityCallback(probe(1), every_n_steps=2.0)
    with pytest.raises(
        ValueError, match="LinearityCallback needs at least one probe batch in held_out"
    ):
        LinearityCallback(probe(1), held_out=[])
    with pytest.raises(ValueError, match="needs at least one probe batch in batches"):
        LinearityCallback(iter([]))
