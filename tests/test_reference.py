"""Loading checkpoints saved by the paper's plain-PyTorch reference modules."""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama
from safetensors.torch import save_file

from cera_rs import CeraConfig, CeraLinear, get_cera_model, load_reference_checkpoint


def reference_state(model, names=("A", "B"), r=4, shape_fix=0):
    """What the reference's modules would save for the same q/v projections."""
    gen = torch.Generator().manual_seed(3)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, CeraLinear):
            path = name.removeprefix("base_model.model.")
            base = module.base_layer
            state[f"{path}.original_layer.weight"] = base.weight.detach().clone()
            d_in, d_out = base.in_features, base.out_features
            a = torch.randn(r, d_in + shape_fix, generator=gen)
            state[f"{path}.cera.{names[0]}.weight"] = a
            state[f"{path}.cera.{names[1]}.weight"] = torch.randn(d_out, r, generator=gen)
    return state


def cera_model():
    return get_cera_model(tiny_llama(), CeraConfig(r=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("names", [("A", "B"), ("down_proj", "up_proj")])
def test_loads_current_and_older_key_names(names, tmp_path):
    model = cera_model()
    state = reference_state(model, names)
    path = tmp_path / "reference.safetensors"
    save_file(state, str(path))
    loaded = load_reference_checkpoint(model, path)
    assert len(loaded) == 4
    for name, module in model.named_modules():
        if isinstance(module, CeraLinear):
            key = name.removeprefix("base_model.model.")
            a, b = (state[f"{key}.cera.{n}.weight"] for n in names)
            assert torch.equal(module.cera_A["default"].weight, a)
            assert torch.equal(module.cera_B["default"].weight, b)


def test_torch_save_file(tmp_path):
    model = cera_model()
    path = tmp_path / "reference.pt"
    torch.save(reference_state(model), path)
    assert len(load_reference_checkpoint(model, path)) == 4


def test_wrong_shapes_are_refused_and_nothing_is_copied():
    model = cera_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"checkpoint's A has shape \(4, 65\).*expects \(4, 64\)"):
        load_reference_checkpoint(model, reference_state(model, shape_fix=1))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_foreign_keys_are_refused():
    model = cera_model()
    state = reference_state(model)
    state["model.layers.0.mlp.up_proj.cera.A.weight"] = torch.zeros(4, 64)
    with pytest.raises(ValueError, match=r"match no adapted module.*mlp\.up_proj"):
        load_reference_checkpoint(model, state)


def test_missing_modules_are_refused():
    model = cera_model()
    dropped = "layers.1.self_attn.v_proj"
    state = {k: v for k, v in reference_state(model).items() if dropped not in k}
    with pytest.raises(ValueError, match=r"lacks A and B weights for 1 adapted modules"):
        load_reference_checkpoint(model, state)
