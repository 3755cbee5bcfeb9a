"""The Axolotl plugin's config translation (cera_rs.integrations.axolotl_config), without
Axolotl: the YAML's keys as Axolotl hands them to a plugin, in and out. The plugin itself
runs inside Axolotl in scripts/axolotl-check.sh (not part of `make test`: a 7.6 GB
install)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft import get_peft_model

from cera_rs import CeraConfig, CeraLinear
from cera_rs.integrations import axolotl_config as ax
from tests.models import tiny_llama

BASE = {
    "base_model": "/models/tiny",
    "plugins": [ax.PLUGIN],
    "adapter": "cera",
    "lora_target_modules": ["q_proj", "v_proj"],
}


def cfg(**changes):
    return {**BASE, **changes}


def test_the_translation_imports_nothing_of_axolotl():
    code = (
        "import sys, cera_rs.integrations.axolotl_config as m; "
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'axolotl'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_block_in_ceras_words_becomes_the_cera_config():
    config = ax.cera_config(
        cfg(
            cera={
                "r": 4,
                "dropout": 0.05,
                "dropout_position": "input",
                "activation": "relu",
                "scaling": 2.0,
                "rank_pattern": {"v_proj": 2},
                "init_weights": True,
            },
            peft_layers_to_transform=[1],
            lora_modules_to_save=["lm_head"],
        )
    )
    assert isinstance(config, CeraConfig)
    assert (config.r, config.cera_dropout, config.dropout_position) == (4, 0.05, "input")
    assert (config.activation, config.scaling, config.rank_pattern) == ("relu", 2.0, {"v_proj": 2})
    assert config.target_modules == {"q_proj", "v_proj"}
    assert config.layers_to_transform == [1] and config.modules_to_save == ["lm_head"]
    assert config.task_type == "CAUSAL_LM"


def test_without_a_block_the_defaults_are_ceras_and_lora_r_is_the_rank():
    config = ax.cera_config(cfg(lora_r=16))
    assert (config.r, config.cera_dropout, config.activation, config.scaling) == (
        16,
        0.1,
        "silu",
        1.0,
    )


def test_lora_target_linear_adds_the_models_linear_layers_as_axolotl_does():
    names = ["q_proj", "k_proj", "o_proj", "gate_proj"]
    config = ax.cera_config(cfg(lora_target_linear=True), linear_names=names)
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"}
    # Before the model exists (the check at register time), PEFT's all-linear stands in.
    alone = {k: v for k, v in cfg(lora_target_linear=True).items() if k != "lora_target_modules"}
    assert ax.cera_config(alone).target_modules == "all-linear"


def test_the_translated_config_puts_cera_layers_on_the_targets():
    model = get_peft_model(tiny_llama(), ax.cera_config(cfg(cera={"r": 2})))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, CeraLinear)}
    assert wrapped == {"q_proj", "v_proj"}


def test_a_lora_yaml_is_refused_naming_every_lora_setting_and_what_to_write():
    lora_yaml = cfg(
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        peft_use_rslora=True,
        loraplus_lr_ratio=16,
        lora_mlp_kernel=True,
    )
    with pytest.raises(ValueError) as err:
        ax.check(lora_yaml)
    said = str(err.value)
    for key in ("lora_alpha", "lora_dropout", "peft_use_rslora", "loraplus_lr_ratio"):
        assert f"- {key}: " in said
    assert "cera.scaling" in said and "cera.dropout" in said and "kernel" in said
    assert "- lora_r" not in said  # lora_r means the rank: carried, not refused


def test_an_explicit_zero_lora_dropout_is_refused_too():
    # CeRA's default dropout is 0.1: lora_dropout 0.0 must not pass as "no dropout".
    with pytest.raises(ValueError, match="lora_dropout: use cera.dropout"):
        ax.check(cfg(lora_dropout=0.0))


@pytest.mark.parametrize(
    "key", ["load_in_4bit", "load_in_8bit", "gptq", "relora", "peft_use_dora", "lora_on_cpu"]
)
def test_switched_on_lora_only_options_are_refused_and_switched_off_ones_pass(key):
    with pytest.raises(ValueError, match=f"- {key}: "):
        ax.check(cfg(**{key: True}))
    ax.check(cfg(**{key: False}))


def test_a_quantized_base_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="prepare_model_for_kbit_training only"):
        ax.check(cfg(load_in_4bit=True))


@pytest.mark.parametrize(
    ("block", "said"),
    [
        ({"alpha": 16}, "cera.alpha is not a CeRA setting: CeRA has no alpha/r factor"),
        ({"lora_dropout": 0.1}, "cera.lora_dropout is not a CeRA setting: write dropout"),
        ({"activaton": "silu"}, "did you mean 'activation'"),
        ({"target_modules": ["q_proj"]}, "lora_target_modules or lora_target_linear"),
        ({"activation": "gelu"}, "unknown activation 'gelu'"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
        ({"r": 0}, "r must be >= 1"),
        ({"r": "8"}, "r must be an int"),
    ],
)
def test_a_bad_block_is_refused_naming_the_key(block, said):
    with pytest.raises(ValueError, match=said):
        ax.check(cfg(cera=block))


def test_a_setting_given_both_ways_differently_is_refused():
    with pytest.raises(ValueError, match=r"lora_r: 8 and cera.r: 4 disagree"):
        ax.check(cfg(lora_r=8, cera={"r": 4}))
    ax.check(cfg(lora_r=4, cera={"r": 4}))


def test_no_targets_is_refused():
    bare = {k: v for k, v in cfg().items() if k != "lora_target_modules"}
    with pytest.raises(ValueError, match="needs targets: lora_target_modules"):
        ax.check(bare)


def test_a_cera_block_under_another_adapter_is_refused():
    with pytest.raises(ValueError, match="set adapter: cera"):
        ax.check(cfg(adapter="lora", cera={"r": 4}))


def _saved(folder, peft_type):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    return folder


def test_merging_a_cera_adapter_is_refused_naming_export_lora(tmp_path):
    # axolotl merge-lora loads the YAML with merge_lora: true (on both merge paths).
    with pytest.raises(ValueError) as err:
        ax.check(cfg(merge_lora=True, output_dir=str(tmp_path)))
    assert "cannot be merged" in str(err.value)
    assert "cera-rs export-lora" in str(err.value)
    assert "Nothing was written" in str(err.value)


def test_merging_is_refused_when_the_folder_holds_a_cera_adapter_whatever_the_adapter_key(
    tmp_path,
):
    cera_dir = _saved(tmp_path / "cera", "CERA")
    lora_dir = _saved(tmp_path / "lora", "LORA")
    with pytest.raises(ValueError, match="cera-rs export-lora"):
        ax.check(cfg(adapter="lora", merge_lora=True, lora_model_dir=str(cera_dir)))
    with pytest.raises(ValueError, match="cera-rs export-lora"):
        ax.check(cfg(adapter="lora", merge_lora=True, output_dir=str(cera_dir)))
    ax.check(cfg(adapter="lora", merge_lora=True, lora_model_dir=str(lora_dir)))
    assert ax.saved_adapter_type(tmp_path / "none") is None
