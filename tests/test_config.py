"""CeraConfig: PEFT's PeftType member, validation, LoRA parity (patterns, init_weights,
LoRA-only keywords, from_lora_config)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from models import tiny_llama
from peft import LoraConfig, PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from cera_rs import CeraConfig, CeraLinear, CeraModel, registration
from cera_rs.config import _cera_peft_type

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def test_peft_type_is_a_real_enum_member_registered_once():
    member = PeftType.CERA
    assert PeftType("CERA") is member and PeftType["CERA"] is member
    assert member.value == "CERA" and member == "CERA" and member in PeftType
    assert "CERA" in list(PeftType) and list(PeftType).count(member) == 1
    assert CeraConfig().peft_type is member
    assert _cera_peft_type() is member  # idempotent: the same member again
    registration.register()  # idempotent: PEFT's register_peft_method would refuse twice
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is CeraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is CeraModel
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING[member] == "cera_"


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": 0}, ValueError, "r must be >= 1"),
        ({"cera_dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"activation": "gelu"}, ValueError, "unknown activation"),
        ({"bias": "lora_only"}, ValueError, "bias must be one of"),
        ({"target_modules": [1, 2]}, TypeError, "target_modules must hold strings"),
        ({"rank_pattern": {"q_proj": 2.5}}, TypeError, r"rank_pattern\['q_proj'\] must be an int"),
        ({"rank_pattern": ["q_proj"]}, TypeError, "rank_pattern must be a dict"),
        ({"scaling_pattern": {"q": float("inf")}}, ValueError, r"scaling_pattern\['q'\] must be"),
        ({"scaling_pattern": {"((": 1.0}}, ValueError, r"scaling_pattern: '\(\(' is not a valid"),
        ({"init_weights": "gaussian"}, TypeError, "init_weights must be a bool"),
        ({"dropout_position": "output"}, ValueError, "unknown dropout_position 'output'"),
    ],
)
def test_config_validates_on_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CeraConfig(**kwargs)


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("lora_alpha", 16, r"no alpha/r factor: the branch is multiplied by `scaling`"),
        ("lora_dropout", 0.1, r"use cera_dropout"),
        ("alpha_pattern", {"q": 8}, r"use scaling_pattern"),
        ("init_lora_weights", False, r"use init_weights"),
        ("use_rslora", True, r"no alpha/r factor to rescale"),
        ("use_dora", True, r"no DoRA variant"),
        ("target_parameters", ["w"], r"no weight delta equals it; target the Linear layers"),
    ],
)
def test_lora_only_keywords_name_the_cera_equivalent(name, value, match):
    with pytest.raises(TypeError, match=rf"CeraConfig does not take '{name}': .*{match}"):
        CeraConfig(r=4, **{name: value})


def test_a_misspelt_keyword_names_the_field_meant():
    with pytest.raises(
        TypeError,
        match=r"unexpected keyword argument 'cera_dropot'; "
        r"did you mean 'cera_dropout'\?$",
    ):
        CeraConfig(r=4, cera_dropot=0.1)
    with pytest.raises(TypeError, match=r"'target_module'; did you mean 'target_modules'\?$"):
        CeraConfig(target_module=["q_proj"])
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'$"):  # nothing close
        CeraConfig(zzz=1)


def test_from_lora_config_carries_what_it_can_and_says_what_not():
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["k_proj"],
        lora_dropout=0.05,
        modules_to_save=["lm_head"],
        layers_to_transform=[1],
        layers_pattern="layers",
        rank_pattern={"q_proj": 4},
        task_type="CAUSAL_LM",
        bias="lora_only",
        use_dora=True,
    )
    with pytest.warns(UserWarning, match=r"could not carry over lora_alpha=32, .*use_dora=True"):
        config = CeraConfig.from_lora_config(lora, scaling=2.0)
    assert (config.r, config.cera_dropout, config.scaling) == (16, 0.05, 2.0)
    assert config.bias == "cera_only"
    assert config.target_modules == {"q_proj", "v_proj"} and config.exclude_modules == {"k_proj"}
    assert config.modules_to_save == ["lm_head"] and config.rank_pattern == {"q_proj": 4}
    assert (config.layers_to_transform, config.layers_pattern) == ([1], "layers")
    assert config.task_type == "CAUSAL_LM" and config.peft_type is PeftType.CERA
    with pytest.raises(TypeError, match="needs a LoraConfig, got CeraConfig"):
        CeraConfig.from_lora_config(config)


def test_rank_and_scaling_patterns_per_module(tmp_path):
    config = CeraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        scaling_pattern={r"layers\.1\.self_attn\.q_proj": 0.5},
        init_weights=False,
    )
    model = get_peft_model(tiny_llama(), config).eval()
    layers = {
        n.removeprefix("base_model.model.model."): m
        for n, m in model.named_modules()
        if isinstance(m, CeraLinear)
    }
    assert {n: m.cera_A["default"].weight.shape[0] for n, m in layers.items()} == {
        "layers.0.self_attn.q_proj": 4,
        "layers.0.self_attn.v_proj": 2,
        "layers.1.self_attn.q_proj": 4,
        "layers.1.self_attn.v_proj": 2,
    }
    assert {n: m.scaling["default"] for n, m in layers.items()} == {
        "layers.0.self_attn.q_proj": 1.0,
        "layers.0.self_attn.v_proj": 1.0,
        "layers.1.self_attn.q_proj": 0.5,
        "layers.1.self_attn.v_proj": 1.0,
    }
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_init_weights_true_is_the_identity_false_acts_at_once():
    base = tiny_llama()
    with torch.no_grad():
        reference = base(input_ids=IDS).logits
    for init_weights, changes in ((True, False), (False, True)):
        config = CeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=init_weights)
        model = get_peft_model(tiny_llama(), config).eval()
        b = [m.cera_B["default"].weight for m in model.modules() if isinstance(m, CeraLinear)]
        assert all(bool(w.any()) == changes for w in b)
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, reference) != changes


def test_config_round_trips_through_json(tmp_path):
    config = CeraConfig(
        r=16,
        target_modules=["q_proj"],
        cera_dropout=0.2,
        activation="relu",
        scaling=0.5,
        task_type="CAUSAL_LM",
        rank_pattern={"q_proj": 2},
        scaling_pattern={"q_proj": 3.0},
        init_weights=False,
        dropout_position="input",
    )
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "CERA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, CeraConfig) and loaded.to_dict() == config.to_dict()
    assert loaded.peft_type is PeftType.CERA
