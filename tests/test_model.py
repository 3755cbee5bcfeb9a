"""CeraModel (the BaseTuner) through PEFT's own entry points, as a drop-in for LoRA."""

from __future__ import annotations

import json

import huggingface_hub
import huggingface_hub.constants
import peft
import peft.utils.save_and_load
import pytest
import safetensors.torch
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from models import CASES, Case, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

import cera_rs.config
from cera_rs import CeraConfig, CeraLinear, CeraMergeError, CeraModel, get_cera_model

R = 4


def adapted(case: Case, seed: int = 0, **config) -> peft.PeftModel:
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
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "CERA"

    reloaded = peft.PeftModel.from_pretrained(case.build(0), tmp_path)
    assert isinstance(reloaded.base_model, CeraModel)
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


# --------------------------------------------------------------------------------------
# One entry path: PEFT's and transformers' loaders dispatch on PeftType.CERA
# --------------------------------------------------------------------------------------


def trained_llama(**config) -> peft.PeftModel:
    config = {"r": R, "target_modules": ["q_proj", "v_proj"], "init_weights": False, **config}
    return peft.get_peft_model(tiny_llama(), CeraConfig(**config)).eval()


def llama_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def test_transformers_and_auto_classes_load_a_cera_adapter(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        CeraConfig(
            r=R, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="CAUSAL_LM"
        ),
    ).eval()
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "CERA" and saved["base_model_name_or_path"] == str(base_dir)
    expected = llama_logits(model)
    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir
    )
    assert torch.equal(llama_logits(reference), expected)

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.load_adapter(str(adapter_dir))  # transformers' PEFT integration
    assert isinstance(base.model.layers[0].self_attn.q_proj, CeraLinear)
    assert torch.equal(llama_logits(base), expected)
    direct = AutoModelForCausalLM.from_pretrained(adapter_dir)  # finds the base model itself
    assert torch.equal(llama_logits(direct), expected)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert isinstance(auto.base_model, CeraModel)
    assert torch.equal(llama_logits(auto), expected)
    assert isinstance(peft.PeftConfig.from_pretrained(adapter_dir), CeraConfig)


def test_mixed_models_refuse_cera_cleanly():
    with pytest.raises(ValueError, match=r"'CERA' is not compatible with the `PeftMixedModel`"):
        peft.get_peft_model(tiny_llama(), CeraConfig(r=R), mixed=True)


def test_seq_cls_task_trains_and_saves_its_head(tmp_path):
    def classifier() -> LlamaForSequenceClassification:
        torch.manual_seed(0)
        return LlamaForSequenceClassification(
            LlamaConfig(
                vocab_size=128,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_labels=3,
                pad_token_id=0,
            )
        ).eval()

    config = CeraConfig(r=R, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = peft.get_peft_model(classifier(), config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("score.modules_to_save.default.weight") for n in trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    expected = llama_logits(model.eval())
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(classifier(), tmp_path)
    assert isinstance(reloaded, peft.PeftModelForSequenceClassification)
    assert torch.equal(llama_logits(reloaded), expected)


def test_adapter_dtype_follows_autocast_adapter_dtype():
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        model = peft.get_peft_model(
            tiny_llama().to(torch.bfloat16), CeraConfig(r=R), autocast_adapter_dtype=autocast
        )
        assert {p.dtype for n, p in model.named_parameters() if ".cera_" in n} == {dtype}
        assert llama_logits(model).dtype == torch.bfloat16


def test_low_cpu_mem_usage_creates_on_meta_then_loads(tmp_path):
    model = trained_llama()
    model.save_pretrained(tmp_path)
    empty = peft.get_peft_model(tiny_llama(), CeraConfig(r=R), low_cpu_mem_usage=True)
    assert {p.device.type for n, p in empty.named_parameters() if ".cera_" in n} == {"meta"}
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(llama_logits(loaded), llama_logits(model))


def test_from_pretrained_uses_the_config_passed(tmp_path):
    model = trained_llama()
    model.save_pretrained(tmp_path)
    config = CeraConfig(r=R, target_modules=["q_proj", "v_proj"], scaling=3.0, cera_dropout=0.0)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=config)
    layers = [m for m in loaded.modules() if isinstance(m, CeraLinear)]
    assert layers and all(m.scaling["default"] == 3.0 for m in layers)
    assert loaded.peft_config["default"] is config
    assert not torch.allclose(llama_logits(loaded), llama_logits(model))


def test_bin_format_saves_and_loads_and_is_checked_first(tmp_path):
    model = trained_llama()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert torch.equal(
        llama_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), llama_logits(model)
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 10**9}))
    with pytest.raises(ValueError, match=r"says r=1000000000, but .*model.bin holds rank-4"):
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_load_adapter_is_trainable_leaves_the_new_adapter_trainable(tmp_path):
    trained_llama().save_pretrained(tmp_path)
    model = trained_llama()
    model.load_adapter(tmp_path, "second", is_trainable=True)
    second = [p for n, p in model.named_parameters() if ".cera_" in n and ".second." in n]
    assert second and all(p.requires_grad for p in second)
    model.load_adapter(tmp_path, "frozen")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)


def test_unmerge_warns_and_weighted_adapters_are_refused():
    model = trained_llama()
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        model.unmerge_adapter()
    with pytest.raises(CeraMergeError, match=r"add_weighted_adapter is impossible.*non-linear"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    with pytest.raises(CeraMergeError, match=r"^merge_adapter is impossible.*non-linear"):
        model.merge_adapter()
    with pytest.raises(CeraMergeError, match=r"^merge_and_unload is impossible.*non-linear"):
        model.merge_and_unload()
    assert "mix" not in model.peft_config


def test_the_model_card_is_tagged_cera(tmp_path):
    """As PEFT tags a LoRA adapter's card ``lora``; a model unloaded is untagged again."""
    model = trained_llama()
    model.save_pretrained(tmp_path)
    card = huggingface_hub.ModelCard.load(tmp_path / "README.md")
    assert "cera" in card.data.tags and card.data.library_name == "peft"
    assert model.get_base_model().model_tags == ["cera"]
    assert model.unload().model_tags is None


def test_inject_adapter_in_model_path_refuses_incomplete_weights():
    """peft.inject_adapter_in_model + set_peft_model_state_dict (transformers'
    load_adapter path, with no tuner kept): every load must hold all of an adapter."""
    model = peft.inject_adapter_in_model(
        CeraConfig(r=R, target_modules=["q_proj", "v_proj"]), tiny_llama()
    )
    trained = trained_llama()
    state = peft.get_peft_model_state_dict(trained)
    assert len(state) == 8
    before = {k: v.clone() for k, v in model.state_dict().items()}
    some = {k: v for k, v in state.items() if "layers.0.self_attn.q_proj" not in k}
    with pytest.raises(ValueError, match=r"'default' lack 2 of its 8 adapter tensors.*q_proj"):
        peft.set_peft_model_state_dict(model, some)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    peft.set_peft_model_state_dict(model, state)
    torch.testing.assert_close(llama_logits(model.eval()), llama_logits(trained), rtol=0, atol=0)


def test_transformers_load_adapter_reports_missing_weights_it_does_not_refuse(tmp_path):
    """Where the completeness check does not hold, as the README says: transformers' own
    loader assigns adapter weights past load_state_dict and only reports what is missing."""
    trained_llama().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = safetensors.torch.load_file(weights)
    safetensors.torch.save_file(
        {k: v for k, v in state.items() if "layers.0.self_attn.q_proj" not in k}, weights
    )
    info = tiny_llama().load_adapter(str(tmp_path))
    assert sorted(info.missing_keys) == [
        f"model.layers.0.self_attn.q_proj.cera_{p}.default.weight" for p in "AB"
    ]


def test_get_cera_model_is_get_peft_model_for_cera_configs():
    model = get_cera_model(tiny_llama(), CeraConfig(r=R, task_type="CAUSAL_LM"))
    assert isinstance(model, peft.PeftModelForCausalLM) and isinstance(model.base_model, CeraModel)
    with pytest.raises(TypeError, match="needs a CeraConfig, got LoraConfig"):
        get_cera_model(tiny_llama(), peft.LoraConfig())


def test_hub_adapter_is_checked_then_loaded_from_the_cache(tmp_path, monkeypatch):
    """A name that is not a local folder is a Hub repository. A stand-in for the Hub
    (a local folder served through hf_hub_download, in offline mode) serves a saved
    adapter: it loads, and a corrupted rank is refused from the cached header."""
    hub, cache = tmp_path / "hub", tmp_path / "cache"
    model = trained_llama()
    model.save_pretrained(hub / "user" / "cera-adapter")

    def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
        source = hub / repo_id / (subfolder or "") / filename
        if not source.is_file():
            raise LocalEntryNotFoundError(f"{repo_id}/{filename}")
        target = cache / repo_id / (subfolder or "") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        return str(target)

    for module in (peft.config, peft.utils.save_and_load, cera_rs.config):
        monkeypatch.setattr(module, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), "user/cera-adapter")
    assert torch.equal(llama_logits(loaded), llama_logits(model))
    with pytest.raises(FileNotFoundError, match=r"no Hub repository 'user/other' with an adapter"):
        CeraConfig.from_pretrained("user/other")
    config = hub / "user" / "cera-adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 10**9}))
    with pytest.raises(ValueError, match=r"cache/user/cera-adapter/adapter_config.json says r=10"):
        peft.PeftModel.from_pretrained(tiny_llama(), "user/cera-adapter")
