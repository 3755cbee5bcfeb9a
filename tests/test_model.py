"""CeraConfig / get_cera_model / CeraModel as a drop-in for PEFT's LoRA."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from models import CASES, Case, tiny_llama
from torch import nn

from cera_rs import CeraConfig, CeraLinear, CeraMergeError, CeraModel, get_cera_model

R = 4


def adapted(case: Case, seed: int = 0, **config) -> CeraModel:
    config = {"r": R, "target_modules": case.targets, "cera_dropout": 0.0, **config}
    return get_cera_model(case.build(seed), CeraConfig(**config))


def randomize_adapters(model: nn.Module) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cera_B." in name:
                p.normal_(std=0.05)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_trainable_parameter_count_is_exact(case):
    model = adapted(case)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == R * case.per_rank
    assert total == trainable + sum(p.numel() for p in case.build(0).parameters())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_training_step_changes_only_adapter_weights(case):
    model = adapted(case).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B starts at zero, so A first moves on the second step
        case.output(model).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".cera_A." in n or ".cera_B." in n for n in changed)
    assert any(".cera_A." in n for n in changed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_save_reload_disable_generate_unload(case, tmp_path):
    reference = case.output(case.build(0))
    model = adapted(case)
    randomize_adapters(model)
    logits = case.output(model)
    assert not torch.allclose(logits, reference)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors",
    ]  # fmt: skip
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "CERA"

    reloaded = CeraModel.from_pretrained(case.build(0), tmp_path)
    assert torch.equal(case.output(reloaded), logits)
    with reloaded.disable_adapter():
        assert torch.equal(case.output(reloaded), reference)
    if case.generates:
        out = reloaded.generate(**case.inputs(), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (2, 13)

    base = reloaded.unload()
    original_types = {n: type(m) for n, m in case.build(0).named_modules()}
    assert {n: type(m) for n, m in base.named_modules()} == original_types
    assert torch.equal(case.output(base), reference)


def test_merge_and_unload_is_refused_and_leaves_the_model_intact():
    case = CASES[0]
    model = adapted(case)
    with pytest.raises(CeraMergeError, match="non-linear"):
        model.merge_and_unload()
    assert any(isinstance(m, CeraLinear) for m in model.modules())


def test_peft_itself_accepts_cera_config(tmp_path):
    case = CASES[0]
    model = peft.get_peft_model(case.build(0), CeraConfig(r=R, target_modules=case.targets))
    assert model.get_nb_trainable_parameters()[0] == R * case.per_rank
    randomize_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(case.build(0), tmp_path)
    assert torch.equal(case.output(reloaded), case.output(model))


def test_two_adapters_switch_with_set_adapter(tmp_path):
    case = CASES[0]
    model = adapted(case)
    model.add_adapter("other", CeraConfig(r=2, target_modules=case.targets, activation="relu"))
    randomize_adapters(model)
    model.eval()
    first = case.output(model)
    model.set_adapter("other")
    second = case.output(model)
    assert not torch.allclose(first, second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    model.delete_adapter("other")
    model.set_adapter("default")
    assert torch.equal(case.output(model), first)


def test_target_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match=r"named: .*down_proj.*q_proj"):
        get_cera_model(tiny_llama(), CeraConfig(r=2, target_modules=["qproj"]))


def test_all_linear_and_layers_to_transform():
    every = get_cera_model(tiny_llama(), CeraConfig(r=2, target_modules="all-linear"))
    # 7 linear layers per decoder layer; the output head is left alone, as PEFT does
    assert sum(isinstance(m, CeraLinear) for m in every.modules()) == 14
    first = get_cera_model(
        tiny_llama(), CeraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1])
    )
    names = [n for n, m in first.named_modules() if isinstance(m, CeraLinear)]
    assert len(names) == 1 and ".layers.1." in names[0]


def test_modules_to_save_and_bias():
    model = get_cera_model(
        tiny_llama(), CeraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in trainable)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": 0}, ValueError, "r must be >= 1"),
        ({"cera_dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"activation": "gelu"}, ValueError, "unknown activation"),
        ({"bias": "lora_only"}, ValueError, "bias must be one of"),
        ({"target_modules": [1, 2]}, TypeError, "target_modules must hold strings"),
    ],
)
def test_config_validates_on_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CeraConfig(**kwargs)


def test_config_round_trips_through_json(tmp_path):
    config = CeraConfig(r=16, target_modules=["q_proj"], cera_dropout=0.2, activation="relu",
                        scaling=0.5, task_type="CAUSAL_LM")  # fmt: skip
    config.save_pretrained(tmp_path)
    loaded = CeraConfig.from_pretrained(str(tmp_path))
    assert loaded.to_dict() == config.to_dict()
    assert loaded.peft_type == "CERA"
