"""The HF Trainer with gradient checkpointing, checkpoint and resume; torch.compile."""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from cera_rs import CeraConfig, CeraLinear, get_cera_model


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, length: int = 12) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(output_dir, max_steps: int) -> Trainer:
    model = get_cera_model(
        tiny_llama(),
        CeraConfig(
            r=4, target_modules=["q_proj", "v_proj"], cera_dropout=0.1, task_type="CAUSAL_LM"
        ),
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        activation_checkpointing=True,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        seed=7,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=TokenData())


def test_trainer_with_gradient_checkpointing_saves_and_resumes(tmp_path):
    full = trainer(tmp_path / "full", max_steps=4)
    full.train()
    assert full.model.base_model.model.is_gradient_checkpointing
    first, last = (full.state.log_history[i]["loss"] for i in (0, -2))
    assert last < first
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    final = load_file(str(tmp_path / "full" / "checkpoint-4" / "adapter_model.safetensors"))

    resumed = trainer(tmp_path / "resumed", max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    again = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "adapter_model.safetensors"))
    assert final.keys() == again.keys()
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=1e-5, atol=1e-6)


def _compiled_parity(backend: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    model[0] = CeraLinear(model[0], r=4, dropout=0.0)
    model[2] = CeraLinear(model[2], r=4, dropout=0.0, activation="relu")
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.cera_B["default"].weight, std=0.1)
    x = torch.randn(3, 5, 32, requires_grad=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    outputs = []
    for fn in (model, compiled):
        x.grad = None
        model.zero_grad()
        y = fn(x)
        y.pow(2).sum().backward()
        grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
        outputs.append((y.detach(), grads))
    (y_eager, g_eager), (y_comp, g_comp) = outputs
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_full_graph_matches_eager(backend):
    torch._dynamo.reset()
    _compiled_parity(backend)
