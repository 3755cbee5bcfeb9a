"""Faults during save: a save that fails midway leaves the previous adapter intact.

``cera_rs.save_pretrained`` writes into a staging folder beside the target and moves
the files into place; these tests make each step fail (the safetensors write, the
config write, the first or second move, a KeyboardInterrupt) and check that the
folder holds the previous files byte for byte, that they load and give the previous
outputs, that no staging folder is left behind, and that a retry succeeds.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import peft.peft_model
import pytest
import torch
from models import tiny_llama
from peft import PeftModel

from cera_rs import CeraConfig, get_cera_model, save_pretrained

TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def trained(r: int, seed: int) -> PeftModel:
    model = get_cera_model(tiny_llama(), CeraConfig(r=r, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cera_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.fixture
def previous(tmp_path):
    """An adapter saved once (r=4); the next save (r=8) is the one that fails."""
    folder = tmp_path / "adapter"
    model = trained(4, seed=1)
    save_pretrained(model, folder)
    return folder, snapshot(folder), logits(model)


def fail_weights_write(monkeypatch):
    real = peft.peft_model.safe_save_file

    def half_written(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written)
    return OSError


def fail_config_write(monkeypatch):
    def broken(self, save_directory, **kwargs):
        (Path(save_directory) / "adapter_config.json").write_text('{"r": ')
        raise OSError(errno.EIO, "I/O error (simulated)")

    monkeypatch.setattr(CeraConfig, "save_pretrained", broken)
    return OSError


def fail_move(name: str, error: BaseException):
    """Fails the first move of the file ``name`` into place (README.md moves first, then
    the weights, then the config)."""

    def install(monkeypatch):
        real, failed = os.replace, []

        def replace(src, dst, **kwargs):
            if Path(dst).name == name and not failed:
                failed.append(dst)
                raise error
            return real(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        return type(error)

    return install


FAULTS = {
    "weights_write": fail_weights_write,
    "config_write": fail_config_write,
    "move_weights": fail_move("adapter_model.safetensors", OSError(errno.EXDEV, "simulated")),
    "move_config": fail_move("adapter_config.json", OSError(errno.EACCES, "simulated")),
    "interrupt_before_config": fail_move("adapter_config.json", KeyboardInterrupt()),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_failed_save_leaves_the_previous_adapter_intact_and_loadable(previous, monkeypatch, fault):
    folder, before, before_logits = previous
    newer = trained(8, seed=2)
    with monkeypatch.context() as patch:
        error = FAULTS[fault](patch)
        with pytest.raises(error):
            save_pretrained(newer, folder)
    assert snapshot(folder) == before
    assert leftovers(folder) == []
    reloaded = PeftModel.from_pretrained(tiny_llama(), folder)
    assert torch.equal(logits(reloaded), before_logits)

    save_pretrained(newer, folder)  # the retry succeeds and replaces everything
    assert snapshot(folder) != before
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), folder)), logits(newer))


@pytest.mark.parametrize("fault", ["weights_write", "move_config"])
def test_failed_first_save_leaves_no_adapter_behind(tmp_path, monkeypatch, fault):
    folder = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        error = FAULTS[fault](patch)
        with pytest.raises(error):
            save_pretrained(trained(4, seed=3), folder)
    assert not folder.exists() or snapshot(folder) == {}
    assert leftovers(folder) == []
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(tiny_llama(), folder)


def test_a_save_keeps_the_folders_other_adapters(tmp_path):
    """The save updates the files it writes and leaves the others: PEFT puts an adapter
    not named "default" in a subfolder, and saving it alone must not drop the default
    one beside (why save_pretrained uses atomic_update, not atomic_folder)."""
    folder = tmp_path / "adapters"
    first = trained(4, seed=1)
    save_pretrained(first, folder)
    before = snapshot(folder)
    second = trained(4, seed=2)
    second.add_adapter("other", CeraConfig(r=2, target_modules=TARGETS))
    save_pretrained(second, folder, selected_adapters=["other"])
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if not k.startswith("other/")} == before
    assert "other/adapter_model.safetensors" in after
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), folder)), logits(first))
    assert leftovers(folder) == []
