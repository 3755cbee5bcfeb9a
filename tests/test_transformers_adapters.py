"""transformers' own adapter methods (its PEFT integration, not PEFT's PeftModel) with a
CeRA adapter: add_adapter, training, save_pretrained, load_adapter, set_adapter,
active_adapters, disable/enable_adapters, get_adapter_state_dict, delete_adapter.

transformers checks the installed peft's version in each of these methods (5.24+ asks
for a peft that is not released), so this file is also what proves that the
transformers/peft ranges in pyproject.toml work together: scripts/torch-matrix.sh runs it
in fresh venvs with the versions pip resolves for the wheel.
"""

from __future__ import annotations

import torch
from models import tiny_llama

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


def test_transformers_adapter_methods_with_a_cera_adapter(tmp_path):
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
    model = tiny_llama()
    model.add_adapter(config(activation="relu"), adapter_name="default")
    train(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)

    plain = tiny_llama()
    plain.load_adapter(str(tmp_path))
    torch.testing.assert_close(logits(plain), expected)
