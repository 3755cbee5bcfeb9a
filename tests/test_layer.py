"""CeraLinear: init, freezing, forward against the formula, training, adapters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from cera_rs import CeraLinear
from cera_rs.layer import CeraMergeError
from conftest import max_rel, plain_branch, seed_after_manual_seed


def make_layer(**kwargs):
    torch.manual_seed(0)
    return CeraLinear(nn.Linear(64, 48), r=8, **kwargs)


def test_new_adapter_leaves_output_unchanged_and_base_is_frozen():
    layer = make_layer()
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert all(not p.requires_grad for p in layer.base_layer.parameters())
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"cera_A.default.weight", "cera_B.default.weight"}


def test_init_follows_the_reference():
    torch.manual_seed(0)
    layer = CeraLinear(nn.Linear(2048, 16), r=64)
    a = layer.cera_A["default"].weight
    assert a.shape == (64, 2048) and layer.cera_B["default"].weight.shape == (16, 64)
    assert abs(a.std().item() - math.sqrt(2 / 2048)) < 0.02 * math.sqrt(2 / 2048)
    assert torch.all(layer.cera_B["default"].weight == 0)


def test_forward_equals_formula_in_eval_mode():
    layer = make_layer(activation="relu", scaling=0.5)
    nn.init.normal_(layer.cera_B["default"].weight)
    layer.eval()
    x = torch.randn(2, 7, 64)
    a, b = layer.cera_A["default"].weight, layer.cera_B["default"].weight
    expected = layer.base_layer(x) + plain_branch(x, a, b, activation="relu", scaling=0.5)
    assert max_rel(layer(x), expected) < 1e-5


def test_input_dropout_position_in_training_mode():
    layer = make_layer(dropout=0.4, dropout_position="input", scaling=1.5)
    nn.init.normal_(layer.cera_B["default"].weight)
    x = torch.randn(2, 7, 64)
    seed = seed_after_manual_seed(2)
    torch.manual_seed(2)
    a, b = layer.cera_A["default"].weight, layer.cera_B["default"].weight
    branch = plain_branch(x, a, b, scaling=1.5, p=0.4, seed=seed, position="input")
    assert max_rel(layer(x), layer.base_layer(x) + branch) < 1e-5


def test_training_reduces_loss_and_moves_only_adapter_weights():
    layer = make_layer(dropout=0.0)
    base_before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    target = nn.Linear(64, 48)
    x = torch.randn(256, 64)
    with torch.no_grad():
        y = target(x) + torch.tanh(x[:, :48]) * 0.5
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    for k, v in layer.base_layer.state_dict().items():
        assert torch.equal(v, base_before[k])


def test_two_adapters_switch_and_disable():
    layer = make_layer()
    layer.update_layer("other", 4, dropout=0.0, activation="identity")
    for name in ("default", "other"):
        nn.init.normal_(layer.cera_B[name].weight)
    layer.eval()
    x = torch.randn(3, 64)
    out_default = layer(x)
    layer.set_adapter("other")
    out_other = layer(x)
    assert not torch.allclose(out_default, out_other)
    assert layer.cera_A["other"].weight.requires_grad
    assert not layer.cera_A["default"].weight.requires_grad
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_conv1d_base_layer():
    torch.manual_seed(0)
    base = Conv1D(48, 64)  # nf=48 outputs, nx=64 inputs
    layer = CeraLinear(base, r=4, dropout=0.0)
    nn.init.normal_(layer.cera_B["default"].weight)
    x = torch.randn(3, 64)
    a, b = layer.cera_A["default"].weight, layer.cera_B["default"].weight
    assert max_rel(layer(x), base(x) + plain_branch(x, a, b)) < 1e-5


def test_bfloat16_layer_runs():
    torch.manual_seed(0)
    layer = CeraLinear(nn.Linear(64, 48).to(torch.bfloat16), r=8)
    assert layer.cera_A["default"].weight.dtype == torch.bfloat16
    out = layer(torch.randn(4, 64, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert layer.cera_A["default"].weight.grad is not None


def test_merge_is_refused():
    with pytest.raises(CeraMergeError, match="non-linear"):
        make_layer().merge()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": 0}, ValueError, r"r must be >= 1, got 0"),
        ({"r": -3}, ValueError, r"got -3"),
        ({"r": 2.5}, TypeError, r"r must be an int"),
        ({"dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\), got 1.5"),
        ({"activation": "tanh"}, ValueError, r"unknown activation 'tanh'"),
        ({"scaling": float("nan")}, ValueError, r"scaling must be finite"),
        ({"dropout_position": "output"}, ValueError, r"unknown dropout_position 'output'"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    args = {"r": 4, **kwargs}
    with pytest.raises(error, match=match):
        CeraLinear(nn.Linear(8, 8), **args)


def test_wrong_base_layer_type():
    with pytest.raises(TypeError, match="got Conv2d"):
        CeraLinear(nn.Conv2d(3, 3, 1), r=2)
