"""transformers' own adapter methods (its PEFT integration, not PEFT's PeftModel) with a
CeRA adapter: add_adapter, training, save_pretrained, load_adapter, set_adapter,
active_adapters, disable/enable_adapters, get_adapter_state_dict, delete_adapter.

transformers checks the installed peft's version in most of these methods: 5.24+ asks
for peft >= 0.22, which is not released, and refuses them for LoRA as for CeRA. So the
parity test holds CeRA to LoRA method by method (both work, or both raise the same
error), and the workflow test runs where transformers accepts the installed peft:
this file is what lets pyproject.toml leave a user's transformers 5.x as it is.
scripts/torch-matrix.sh runs it in fresh venvs with the versions pip resolves.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from cera_rs import CeraConfig, CeraLinear

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def config(**kwargs) -> CeraConfig:
    return CeraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs)


def train(model, steps: int = 3) -> None:
    params = [p for n, p in model.named_parameters() if "cera_" in n]
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def refusal_for_lora() -> str | None:
    """transformers' message when its adapter methods refuse the installed peft
    (5.24+ with peft 0.21 refuses LoRA's add_adapter too), else None."""
    try:
        tiny_llama().add_adapter(_lora(), adapter_name="probe")
    except ValueError as err:
        return str(err)
    return None


def test_transformers_adapter_methods_with_a_cera_adapter(tmp_path):
    refused = refusal_for_lora()
    if refused is not None:  # as for LoRA: each method's own case is in the parity test
        with pytest.raises(ValueError) as err:
            tiny_llama().add_adapter(config(), adapter_name="first")
        assert str(err.value) == refused
        return
    base_logits = logits(tiny_llama())
    model = tiny_llama()
    model.add_adapter(config(), adapter_name="first")
    assert model.active_adapters() == ["first"]
    assert any(isinstance(m, CeraLinear) for m in model.modules())
    train(model)
    first_logits = logits(model)
    assert not torch.allclose(first_logits, base_logits, atol=1e-4)  # training moved it

    model.save_pretrained(tmp_path)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    assert '"peft_type": "CERA"' in (tmp_path / "adapter_config.json").read_text()

    # a second copy of the same adapter, loaded from the folder
    model.load_adapter(str(tmp_path), adapter_name="second")
    model.set_adapter("second")
    assert model.active_adapters() == ["second"]
    torch.testing.assert_close(logits(model), first_logits)

    model.disable_adapters()
    torch.testing.assert_close(logits(model), base_logits)
    model.enable_adapters()
    torch.testing.assert_close(logits(model), first_logits)

    state = model.get_adapter_state_dict("second")
    first_state = model.get_adapter_state_dict("first")
    assert state and state.keys() == first_state.keys()
    assert all(".cera_A." in k or ".cera_B." in k for k in state)
    for key in state:
        torch.testing.assert_close(state[key], first_state[key])

    model.delete_adapter("second")
    assert not any("second" in name for name, _ in model.named_parameters())
    model.set_adapter("first")
    torch.testing.assert_close(logits(model), first_logits)


def test_a_fresh_model_loads_the_saved_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), config(activation="relu"))  # PEFT's: any transformers
    train(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)

    plain = tiny_llama()
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(plain), expected)


# CeRA against LoRA, method by method, under whatever transformers and peft are
# installed: each method either works for both (and gives a CeRA adapter the outputs it
# was saved with) or refuses both with the same error. transformers 5.24+ refuses most of
# its adapter methods with peft 0.21 (they ask for an unreleased peft 0.22), LoRA's too;
# this is what lets cera_rs leave a user's transformers as it is (pyproject.toml).
def _lora() -> LoraConfig:
    return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _cera() -> CeraConfig:
    return CeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)


def _saved(kind, folder):
    """A tiny Llama saved to folder/base and an adapter of ``kind`` on it saved to
    folder/adapter (non-zero B: it changes the outputs); returns its logits."""
    base = tiny_llama()
    base.save_pretrained(folder / "base")
    model = get_peft_model(tiny_llama(), kind())
    model.peft_config["default"].base_model_name_or_path = str(folder / "base")
    model.save_pretrained(folder / "adapter")
    return logits(model.eval())  # dropout off, as in the loaded copies


def _loaded(folder, name="default"):
    model = tiny_llama()
    model.load_adapter(str(folder / "adapter"), adapter_name=name)
    return model


METHODS = {
    "PeftModel.from_pretrained": lambda f: logits(
        PeftModel.from_pretrained(tiny_llama(), str(f / "adapter"))
    ),
    "load_adapter": lambda f: logits(_loaded(f)),
    "AutoModelForCausalLM.from_pretrained(adapter_dir)": lambda f: logits(
        AutoModelForCausalLM.from_pretrained(str(f / "adapter")).eval()
    ),
    "add_adapter": lambda f: tiny_llama().add_adapter(_cera_or_lora(f)(), "added"),
    "set_adapter": lambda f: _loaded(f).set_adapter("default"),
    "active_adapters": lambda f: _loaded(f).active_adapters(),
    "disable_adapters": lambda f: _loaded(f).disable_adapters(),
    "enable_adapters": lambda f: _loaded(f).enable_adapters(),
    "get_adapter_state_dict": lambda f: sorted(_loaded(f).get_adapter_state_dict()),
    "delete_adapter": lambda f: _loaded(f).delete_adapter("default"),
}


def _cera_or_lora(folder):
    return _cera if "cera" in folder.name else _lora


def _outcome(method, kind, folder):
    """("ok", result) or ("raises", type, message) of one method for one kind."""
    expected = _saved(kind, folder)
    try:
        result = METHODS[method](folder)
    except Exception as err:  # what transformers raises is what is compared
        return ("raises", type(err).__name__, str(err))
    if isinstance(result, torch.Tensor):  # loaded adapters give the saved outputs
        torch.testing.assert_close(result, expected)
        return ("ok", "outputs as saved")
    if isinstance(result, list):  # names: CeRA's parameters where LoRA's are
        return ("ok", [str(x).replace("cera_", "lora_") for x in result])
    return ("ok", None)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cera_behaves_as_lora_in_transformers_adapter_methods(method, tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "cera").mkdir()
    lora = _outcome(method, _lora, tmp_path / "lora")
    cera = _outcome(method, _cera, tmp_path / "cera")
    assert cera == lora, f"{method}: LoRA {lora}, CeRA {cera}"
