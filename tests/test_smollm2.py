"""smollm2.cached_dir() is the float32 transformers folder the README calls it: no
quantization config left from the GGUF, `from_pretrained` loads it as any checkpoint,
and transformers' Trainer and TRL's SFTTrainer (which refuse a model whose config says
it is quantized) train a CeRA adapter on it."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import trl
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from cera_rs import CeraConfig, smollm2

LAST = [29]  # one layer: the test is about the folder, not the training


@pytest.fixture(scope="module")
def folder():
    return smollm2.cached_dir()


def config() -> CeraConfig:
    return CeraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=LAST, task_type="CAUSAL_LM"
    )


def texts() -> list[str]:
    return [f"{a}+{b}={a + b}" for a, b in [(12, 34), (25, 51), (40, 17), (63, 22)]]


def cera_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "cera_" in n}


def test_the_folder_is_a_plain_float32_checkpoint(folder):
    saved = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == "float32"
    assert saved["architectures"] == ["LlamaForCausalLM"]
    assert folder.name.endswith(smollm2.FORMAT)  # older folders (quantization_config) unused
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    loaded, _ = smollm2.load()  # the project's own loader: the same weights
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


def test_transformers_trainer_trains_a_cera_adapter_on_it(folder, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config())
    before = cera_weights(model)
    rows = [dict(tokenizer(t), labels=tokenizer(t)["input_ids"]) for t in texts()]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = cera_weights(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_trl_sft_trainer_trains_a_cera_adapter_on_it(folder, tmp_path):
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=32,
    )
    data = datasets.Dataset.from_dict({"text": texts()})
    # the model by name, as TRL's own examples pass it: TRL loads it with from_pretrained
    trainer = trl.SFTTrainer(model=str(folder), args=args, peft_config=config(), train_dataset=data)
    before = cera_weights(trainer.model)
    assert before and trainer.model.peft_config["default"].peft_type.value == "CERA"
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    after = cera_weights(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
