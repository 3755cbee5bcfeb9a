"""Every PEFT behaviour a tuner is held to, for one row per CeRA config over small
custom models (an MLP, transformers' Conv1D, an embedding feeding linear layers,
nn.Conv1d, nn.Conv2d with and without groups, nn.Conv3d),
shaped like PEFT's own custom-model matrix. Merging is the one behaviour CeRA
refuses by design; that refusal is tested here too."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

from cera_rs import CeraConfig, CeraLayer, CeraMergeError
from conftest import max_rel


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 4)

    def forward(self, X):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(X)))))


class Conv1DNet(nn.Module):
    """GPT-2's layer type: transformers' Conv1D(nf=d_out, nx=d_in), weight (d_in, d_out)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = Conv1D(20, 10), Conv1D(4, 20)

    def forward(self, X):
        return self.conv1(torch.relu(self.conv0(X)))


class EmbLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin0, self.lin1 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(self.emb(X)))).mean(1)


class ConvNet(nn.Module):
    """PEFT's Conv1d/Conv2d/Conv2dGroups/Conv3d models' shape: a conv, then a linear head."""

    def __init__(self, dims: int, groups: int = 1) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.dims = dims
        self.conv = conv(4, 8, 3, padding=1, groups=groups)
        self.lin0 = nn.Linear(8 * 4**dims, 4)

    def forward(self, X):
        X = X.reshape(len(X), 4, *([4] * self.dims))
        return self.lin0(torch.relu(self.conv(X)).flatten(1))


MODELS = {
    "mlp": MLP,
    "conv1d": Conv1DNet,
    "emb": EmbLinear,
    "nn.conv1d": lambda: ConvNet(1),
    "conv2d": lambda: ConvNet(2),
    "conv2d groups": lambda: ConvNet(2, groups=2),
    "conv3d": lambda: ConvNet(3),
}

ROWS = [
    ("mlp one target", "mlp", {"target_modules": ["lin0"]}),
    ("mlp all targets r4", "mlp", {"target_modules": ["lin0", "lin1", "lin2"], "r": 4}),
    (
        "mlp regex relu",
        "mlp",
        {"target_modules": r".*lin[01]", "activation": "relu", "cera_dropout": 0.0},
    ),
    (
        "mlp identity dropout",
        "mlp",
        {"target_modules": ["lin1"], "activation": "identity", "cera_dropout": 0.3},
    ),
    ("mlp modules_to_save", "mlp", {"target_modules": ["lin0"], "modules_to_save": ["lin2"]}),
    ("mlp bias all", "mlp", {"target_modules": ["lin0", "lin1"], "bias": "all"}),
    (
        "mlp bias cera_only scaled",
        "mlp",
        {"target_modules": ["lin1"], "bias": "cera_only", "scaling": 0.5},
    ),
    ("mlp exclude", "mlp", {"target_modules": r"lin\d", "exclude_modules": ["lin2"], "r": 2}),
    (
        "mlp rank and scaling patterns",
        "mlp",
        {
            "target_modules": ["lin0", "lin1", "lin2"],
            "r": 6,
            "rank_pattern": {"lin1": 2, "lin2": 3},
            "scaling_pattern": {"lin0": 0.25},
        },
    ),
    ("mlp init_weights False", "mlp", {"target_modules": ["lin1"], "init_weights": False}),
    (
        "mlp input dropout",
        "mlp",
        {"target_modules": ["lin0", "lin1"], "cera_dropout": 0.2, "dropout_position": "input"},
    ),
    ("conv1d one target", "conv1d", {"target_modules": ["conv0"]}),
    (
        "conv1d both relu",
        "conv1d",
        {"target_modules": ["conv0", "conv1"], "activation": "relu", "cera_dropout": 0.0, "r": 3},
    ),
    ("emb+linear", "emb", {"target_modules": ["lin0"]}),
    (
        "emb+linear save emb",
        "emb",
        {"target_modules": ["lin0", "lin1"], "modules_to_save": ["emb"]},
    ),
    ("embedding", "emb", {"target_modules": ["emb"]}),
    (
        "embedding and linear relu",
        "emb",
        {"target_modules": ["emb", "lin0"], "r": 4, "activation": "relu"},
    ),
    ("nn.Conv1d", "nn.conv1d", {"target_modules": ["conv"]}),
    ("Conv2d", "conv2d", {"target_modules": ["conv"]}),
    (
        "Conv2d and linear input dropout",
        "conv2d",
        {"target_modules": ["conv", "lin0"], "dropout_position": "input"},
    ),
    ("Conv2d groups", "conv2d groups", {"target_modules": ["conv"], "r": 4}),
    ("Conv3d", "conv3d", {"target_modules": ["conv", "lin0"]}),
]

pytestmark = pytest.mark.parametrize(
    "model_id, config_kwargs", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)


def base(model_id: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[model_id]().eval()


def inputs(model_id: str, n: int = 9) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if model_id == "emb":
        return torch.randint(0, 50, (n, 5), generator=gen)
    if model_id in ("nn.conv1d", "conv2d", "conv2d groups", "conv3d"):
        dims = MODELS[model_id]().dims
        return torch.randn(n, 4 * 4**dims, generator=gen)
    return torch.randn(n, 10, generator=gen)


def adapted(model_id, config_kwargs, adapter_name="default", seed=0, **kwargs) -> PeftModel:
    """The base model with a CeRA adapter whose B is not zero (so it changes outputs)."""
    model = get_peft_model(base(model_id), CeraConfig(**config_kwargs), adapter_name, **kwargs)
    randomize(model, adapter_name, seed)
    return model.eval()


def second_config(config_kwargs) -> CeraConfig:
    """The row's config for a second adapter: PEFT allows trained biases (``bias`` other
    than "none") on one adapter only, as for LoRA."""
    return CeraConfig(**{**config_kwargs, "bias": "none"})


def randomize(model: nn.Module, adapter_name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CeraLayer) and adapter_name in module.cera_B:
                weight = module.cera_B[adapter_name].weight
                weight.copy_(0.5 * torch.randn(weight.shape, generator=gen))


@torch.no_grad()
def output(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(x, **kwargs) if not kwargs else model(X=x, **kwargs)


def test_new_adapter_leaves_outputs_unchanged(model_id, config_kwargs):
    """Unless ``init_weights=False``, as LoRA's ``init_lora_weights=False``."""
    x = inputs(model_id)
    expected = output(base(model_id), x)
    model = get_peft_model(base(model_id), CeraConfig(**config_kwargs)).eval()
    if not config_kwargs.get("init_weights", True):
        assert max_rel(output(model, x), expected) > 1e-3
        return
    torch.testing.assert_close(output(model, x), expected, rtol=0, atol=0)
    randomize(model, "default", 0)
    assert max_rel(output(model, x), expected) > 1e-3


def test_training_updates_only_adapter_parameters(model_id, config_kwargs):
    model = get_peft_model(base(model_id), CeraConfig(**config_kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    bias = config_kwargs.get("bias", "none")
    for name in trainable:
        is_bias = name.endswith(".bias") and bias != "none"
        assert ".cera_" in name or ".modules_to_save." in name or is_bias, name
    assert any(".cera_A." in n for n in trainable) and any(".cera_B." in n for n in trainable)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = inputs(model_id, n=16)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_save_and_load(model_id, config_kwargs, safe, tmp_path):
    model = adapted(model_id, config_kwargs)
    x = inputs(model_id)
    expected = output(model, x)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert {"adapter_config.json", weights} <= {p.name for p in tmp_path.iterdir()}
    loaded = PeftModel.from_pretrained(base(model_id), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], CeraConfig)
    torch.testing.assert_close(output(loaded, x), expected, rtol=0, atol=0)
    saved, reloaded = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".cera_" in n)
    trainable = PeftModel.from_pretrained(base(model_id), tmp_path, is_trainable=True)
    assert any(".cera_A." in n for n, p in trainable.named_parameters() if p.requires_grad)


def test_pickle_and_deepcopy(model_id, config_kwargs):
    model = adapted(model_id, config_kwargs)
    x = inputs(model_id)
    expected = output(model, x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert isinstance(clone, PeftModel)
        torch.testing.assert_close(output(clone, x), expected, rtol=0, atol=0)


def test_low_cpu_mem_usage(model_id, config_kwargs, tmp_path):
    model = adapted(model_id, config_kwargs)
    x = inputs(model_id)
    expected = output(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(model_id), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(output(loaded.eval(), x), expected, rtol=0, atol=0)
    # get_peft_model puts new adapters on the meta device; loading fills them in.
    empty = get_peft_model(base(model_id), CeraConfig(**config_kwargs), low_cpu_mem_usage=True)
    assert any(p.is_meta for n, p in empty.named_parameters() if ".cera_" in n)
    state = get_peft_model_state_dict(model)
    set_peft_model_state_dict(empty, state, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in empty.parameters())
    torch.testing.assert_close(output(empty.eval(), x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_on_bf16_base(model_id, config_kwargs, autocast, tmp_path):
    """autocast_adapter_dtype=True (PEFT's default) keeps adapter weights float32 on a
    bfloat16 base, False leaves them bfloat16; forward gives the base's dtype."""
    want = torch.float32 if autocast else torch.bfloat16
    x = inputs(model_id)
    x = x if model_id == "emb" else x.bfloat16()
    config = CeraConfig(**config_kwargs)
    model = get_peft_model(base(model_id).bfloat16(), config, autocast_adapter_dtype=autocast)
    cera = {n: p.dtype for n, p in model.named_parameters() if ".cera_" in n}
    assert cera and set(cera.values()) == {want}
    randomize(model, "default", 0)
    assert output(model.eval(), x).dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        base(model_id).bfloat16(), tmp_path, autocast_adapter_dtype=autocast
    )
    assert {p.dtype for n, p in loaded.named_parameters() if ".cera_" in n} == {want}
    torch.testing.assert_close(output(loaded.eval(), x), output(model, x), rtol=0, atol=0)


def test_disable_adapter(model_id, config_kwargs):
    model = adapted(model_id, config_kwargs)
    x = inputs(model_id)
    with_adapter, without = output(model, x), output(base(model_id), x)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, x), without, rtol=0, atol=0)
    torch.testing.assert_close(output(model, x), with_adapter, rtol=0, atol=0)


def test_multiple_adapters_switch_and_delete(model_id, config_kwargs):
    x = inputs(model_id)
    model = adapted(model_id, config_kwargs)
    first = output(model, x)
    model.add_adapter("other", second_config(config_kwargs))
    randomize(model, "other", seed=1)
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(output(model, x), first, rtol=0, atol=0)
    model.set_adapter("other")
    second = output(model, x)
    alone = get_peft_model(base(model_id), second_config(config_kwargs), "other").eval()
    set_peft_model_state_dict(
        alone, get_peft_model_state_dict(model, adapter_name="other"), adapter_name="other"
    )
    torch.testing.assert_close(second, output(alone, x), rtol=0, atol=0)
    assert max_rel(second, first) > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" not in n for n in trainable)
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert not any(".other" in k for k in model.state_dict())
    torch.testing.assert_close(output(model, x), first, rtol=0, atol=0)


def test_mixed_adapter_batch(model_id, config_kwargs):
    x = inputs(model_id)
    model = adapted(model_id, config_kwargs)
    model.add_adapter("other", second_config(config_kwargs))
    randomize(model, "other", seed=1)
    model.eval()
    alone = {"default": output(model, x), "__base__": output(base(model_id), x)}
    model.set_adapter("other")
    alone["other"] = output(model, x)
    names = [["__base__", "default", "other"][i % 3] for i in range(len(x))]
    mixed = output(model, x, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        output(model, x, adapter_names=names[:-1])
    with pytest.raises(ValueError, match="non-existing adapter\\(s\\): nope"):
        output(model, x, adapter_names=["nope"] * len(x))
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        output(model, x, adapter_names=names)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_forward(model_id, config_kwargs, dtype):
    model = adapted(model_id, config_kwargs)
    x = inputs(model_id)
    expected = output(model, x)
    half = copy.deepcopy(model).to(dtype)
    got = output(half, x if model_id == "emb" else x.to(dtype))
    assert got.dtype == dtype
    assert max_rel(got, expected) < 3e-2
    with torch.autocast("cpu", dtype=dtype):
        got = output(model, x)
    assert got.dtype == dtype
    assert max_rel(got, expected) < 3e-2


def test_merge_is_refused(model_id, config_kwargs):
    model = adapted(model_id, config_kwargs)
    x = inputs(model_id)
    expected = output(model, x)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(CeraMergeError, match="non-linear"):
            merge()
    torch.testing.assert_close(output(model, x), expected, rtol=0, atol=0)
    plain = model.unload()
    assert not any(isinstance(m, CeraLayer) for m in plain.modules())
    torch.testing.assert_close(output(plain, x), output(base(model_id), x), rtol=0, atol=0)
