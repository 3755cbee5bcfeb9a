"""Importing checkpoints saved by the CeRA authors' reference code (tests/authors_format.py
writes them as their trainer does)."""

from __future__ import annotations

import copy

import authors_format as authors
import pytest
import torch
from models import tiny_llama
from safetensors.torch import save_file

from cera_rs import (
    CeraConfig,
    CeraLinear,
    get_cera_model,
    load_reference_checkpoint,
    load_reference_model,
    reference_config,
)
from conftest import plain_branch, seed_after_manual_seed

IDS = torch.tensor([[3, 17, 40, 2, 99, 5, 61]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("variant", ["legacy", "peft_aligned"])
@pytest.mark.parametrize("legacy_names", [False, True], ids=["A_B", "up_down"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "flat"])
def test_import_gives_the_authors_logits(tmp_path, variant, legacy_names, wrapped):
    settings = {
        "variant": variant,
        "act_fn": "silu",
        "alpha": 8,
        "dropout": 0.2,
        "targets": ("q_proj", "v_proj", "down_proj"),
    }
    theirs = authors.adapt(tiny_llama(), **settings).eval()
    path = tmp_path / "cera_ckpt_640.pt"
    authors.save(
        theirs,
        path,
        config=authors.config_of(**settings),
        legacy_names=legacy_names,
        wrapped=wrapped,
    )
    # A plain state dict carries no config: what it cannot say is passed in.
    peft_aligned = {"dropout_position": "input", "scaling": 2.0}
    overrides = {} if wrapped else {"activation": "silu"}
    if not wrapped and variant == "peft_aligned":
        overrides.update(peft_aligned)
    ours = load_reference_model(tiny_llama(), path, **overrides)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(ours), logits(tiny_llama()), atol=1e-3)
    config = ours.peft_config["default"]
    assert config.r == 4 and set(config.target_modules) == {"q_proj", "v_proj", "down_proj"}
    if wrapped:
        position = "input" if variant == "peft_aligned" else "hidden"
        assert (config.dropout_position, config.cera_dropout) == (position, 0.2)
        assert config.scaling == (2.0 if variant == "peft_aligned" else 1.0)
    assert not ours.training
    assert not any(p.requires_grad for p in ours.parameters())


def test_adapter_dtype_and_activation_come_from_the_file(tmp_path):
    settings = {"variant": "peft_aligned", "act_fn": "relu", "alpha": 4}
    theirs = authors.adapt(tiny_llama(), dtype=torch.bfloat16, **settings).eval()
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config=authors.config_of(dtype="bfloat16", **settings))
    ours = load_reference_model(tiny_llama(), path, is_trainable=True)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.cera_A["default"].weight.dtype == torch.bfloat16
    assert layer.activation["default"] == "relu"
    ours.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-4, atol=1e-4)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".cera_" in n for n in trainable)


def test_peft_aligned_adapters_train_with_input_dropout(tmp_path):
    """The imported peft_aligned adapter drops out the input, as the authors' module does:
    the training-mode output equals their module's with the mask cera_rs drew."""
    settings = {"variant": "peft_aligned", "act_fn": "silu", "dropout": 0.3, "alpha": 8}
    theirs = authors.adapt(tiny_llama(), **settings)
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config=authors.config_of(**settings))
    model = load_reference_model(tiny_llama(), path, is_trainable=True).train()
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 5, 64)
    seed = seed_after_manual_seed(6)
    torch.manual_seed(6)
    y = layer(x)
    a, b = layer.cera_A["default"].weight, layer.cera_B["default"].weight
    expected = layer.base_layer(x) + plain_branch(
        x, a, b, scaling=2.0, p=0.3, seed=seed, position="input"
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_reference_config_reads_the_files_own_settings(tmp_path):
    settings = {
        "variant": "peft_aligned",
        "act_fn": "identity",
        "dropout": 0.05,
        "alpha": 16,
        "targets": ("q_proj", "k_proj"),
    }
    theirs = authors.adapt(tiny_llama(), **settings)
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config=authors.config_of(**settings))
    config = reference_config(path, cera_dropout=0.0)
    assert isinstance(config, CeraConfig)
    assert (config.r, config.activation, config.scaling, config.dropout_position) == (
        4,
        "identity",
        4.0,
        "input",
    )
    assert config.cera_dropout == 0.0 and set(config.target_modules) == {"q_proj", "k_proj"}


# --------------------------------------------------------------------------------------
# Their train.py's checkpoints: no config in the file, the run's settings in the log beside
# --------------------------------------------------------------------------------------


def train_py_run(tmp_path, act_fn="relu", dropout=0.2, log=True):
    """A ReLU run of their train.py: ``cera_ckpt_640.pt`` without config, and (``log``)
    the run log ``CeRA_log.json`` beside it."""
    theirs = authors.adapt(tiny_llama(), act_fn=act_fn, dropout=dropout).eval()
    path = tmp_path / "cera_ckpt_640.pt"
    authors.save(theirs, path)
    if log:
        authors.write_run_log(tmp_path, authors.train_py_config(act_fn=act_fn, dropout=dropout))
    return theirs, path


def test_a_config_less_checkpoint_is_never_imported_as_silu(tmp_path):
    theirs, path = train_py_run(tmp_path, log=False)
    for load in (
        lambda **kw: load_reference_model(tiny_llama(), path, **kw),
        lambda **kw: reference_config(path, **kw),
    ):
        with pytest.raises(
            ValueError,
            match=r"cera_ckpt_640\.pt does not say which "
            r"activation.*CeRA_log\.json.*pass activation= one of",
        ):
            load()
    ours = load_reference_model(tiny_llama(), path, activation="relu")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    # What a silent SiLU default gave: logits off by the adapter's whole effect.
    silu = load_reference_model(tiny_llama(), path, activation="silu")
    assert not torch.allclose(logits(silu), logits(theirs), atol=1e-2)
    assert reference_config(path, activation="identity").activation == "identity"


def test_the_run_log_beside_the_checkpoint_gives_its_settings(tmp_path):
    theirs, path = train_py_run(tmp_path)
    ours = load_reference_model(tiny_llama(), path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    config = ours.peft_config["default"]
    assert (config.activation, config.cera_dropout, config.r) == ("relu", 0.2, 4)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.layers_to_transform is None
    assert reference_config(path, cera_dropout=0.0).cera_dropout == 0.0
    # Filling an existing adapter checks the activation the log names.
    with pytest.raises(ValueError, match=r"branch has activation='relu', the model's .*'silu'"):
        load_reference_checkpoint(cera_model(), path)


def test_an_unversioned_config_in_the_file_is_read_too(tmp_path):
    theirs = authors.adapt(tiny_llama(), act_fn="identity", dropout=0.0).eval()
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config=authors.train_py_config(act_fn="identity", dropout=0.0))
    ours = load_reference_model(tiny_llama(), path)
    assert ours.peft_config["default"].activation == "identity"
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "log,match",
    [
        ("{not json", r"CeRA_log\.json, the checkpoint's run log, cannot be read"),
        ('{"history": []}', r"CeRA_log\.json, the checkpoint's run log, holds no 'config'"),
        (
            {"target_modules": "q_proj,k_proj"},
            r"target_modules \['q_proj', 'k_proj'\] are not "
            r"the modules its weights adapt",
        ),
        ({"act_fn": "gelu"}, r"unknown activation 'gelu'"),
        ({"act_fn": 3}, r"act_fn=3 of the wrong type"),
        ({"model_type": "LoRA"}, r"CeRA_log\.json\): its model_type is 'LoRA', not 'CeRA'"),
        ({"cera_variant": "peft_aligned"}, r"unversioned config with cera_variant"),
    ],
)
def test_a_run_log_that_does_not_fit_is_refused(tmp_path, log, match):
    _, path = train_py_run(tmp_path, log=False)
    if isinstance(log, str):
        (tmp_path / "CeRA_log.json").write_text(log)
    else:
        authors.write_run_log(tmp_path, {**authors.train_py_config(act_fn="relu"), **log})
    with pytest.raises((ValueError, TypeError), match=match):
        load_reference_model(tiny_llama(), path)


# --------------------------------------------------------------------------------------
# Adapters on some layers only (their layer_indices)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [[1], [0]])
def test_a_partial_layer_checkpoint_loads_those_layers(tmp_path, layers):
    theirs = authors.adapt(tiny_llama(), layers=layers).eval()
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config=authors.config_of())
    ours = load_reference_model(tiny_llama(), path)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(ours), logits(tiny_llama()), atol=1e-3)
    assert ours.peft_config["default"].layers_to_transform == layers
    adapted = {n for n, m in ours.named_modules() if isinstance(m, CeraLinear)}
    assert len(adapted) == 2 and all(f"layers.{layers[0]}." in n for n in adapted)
    assert reference_config(path).layers_to_transform == layers
    with pytest.raises(
        ValueError,
        match=rf"holds adapters on layers \{layers} only: build "
        rf"the adapter with layers_to_transform=\{layers}",
    ):
        load_reference_checkpoint(cera_model(), path)


def test_different_targets_on_different_layers_are_refused(tmp_path):
    state = authors.save(authors.adapt(tiny_llama()), None, write=False)
    state = {k: v for k, v in state.items() if "layers.1.self_attn.v_proj" not in k}
    with pytest.raises(
        ValueError,
        match=r"different modules on different layers \(layer 0: "
        r"q_proj, v_proj; layer 1: q_proj\)",
    ):
        reference_config(state, activation="silu")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"recurrent_steps": 2}, r"recurrent CeRA \(recurrent_steps=2\).*does not implement"),
        ({"cera_format_version": 4}, r"cera_format_version 4 is not one cera_rs reads"),
        ({"cera_variant": "gated"}, r"unknown cera_variant 'gated'"),
        ({"scale": 0.5}, r"a legacy CeRA checkpoint has scale 1, this one says 0.5"),
        ({"dropout_position": "input"}, r"dropout_position 'input' contradicts .*'legacy'"),
        ({"rank_mode": "expansion"}, r"rank_mode 'expansion' is not supported"),
        ({"model_type": "LoRA"}, r"model_type is 'LoRA', not 'CeRA'"),
        ({"adapter_dtype": "float64"}, r"adapter_dtype 'float64' is not one of"),
        ({"act_fn": "gelu"}, r"unknown activation 'gelu'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"rank": 2**40}, r"config says rank 1099511627776, its A weights have rank \[4\]"),
    ],
)
def test_what_cera_rs_does_not_implement_is_refused(tmp_path, change, match):
    theirs = authors.adapt(tiny_llama())
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config={**authors.config_of(), **change})
    with pytest.raises(ValueError, match=match):
        load_reference_model(tiny_llama(), path)


def test_odd_config_values_raise_only_clean_errors():
    """A config comes out of a pickle: every field of any type gives a CeraConfig, a
    ValueError or a TypeError, never another exception."""
    state = authors.save(authors.adapt(tiny_llama()), None, wrapped=False, write=False)
    odd = [
        None,
        True,
        -1,
        0,
        2**2000,
        float("nan"),
        float("inf"),
        "",
        "q_proj",
        [],
        [1],
        {},
        torch.ones(3),
        b"\xff",
    ]
    valid = authors.config_of(variant="peft_aligned", alpha=8)
    outcomes = set()
    for key in valid:
        for value in odd:
            checkpoint = {"model_state_dict": state, "config": {**valid, key: value}}
            try:
                outcomes.add(type(reference_config(checkpoint)).__name__)
            except (ValueError, TypeError) as err:
                outcomes.add(type(err).__name__)
    for config in odd:
        with pytest.raises((ValueError, TypeError)):
            reference_config({"model_state_dict": state, "config": config, "model_type": config})
    assert outcomes == {"CeraConfig", "ValueError", "TypeError"}


def test_extension_parameters_and_other_methods_are_refused(tmp_path):
    theirs = authors.adapt(tiny_llama())
    state = authors.save(theirs, tmp_path / "a.pt")
    key = "model.layers.0.self_attn.q_proj.cera.recurrent_inner.weight"
    with pytest.raises(ValueError, match=r"extension cera_rs does not implement.*recurrent_inner"):
        load_reference_model(tiny_llama(), {**state, key: torch.zeros(4, 4)})
    lora = {"model_type": "LoRA", "model_state_dict": {}, "step": 1}
    with pytest.raises(ValueError, match=r"a 'LoRA' checkpoint of the reference, not a CeRA"):
        load_reference_model(tiny_llama(), lora)


def test_loading_into_an_existing_adapter_checks_the_branch(tmp_path):
    settings = {"variant": "peft_aligned", "alpha": 8}
    theirs = authors.adapt(tiny_llama(), **settings).eval()
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config=authors.config_of(**settings))
    model = cera_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"branch has scaling=2.0, the model's adapter 1.0"):
        load_reference_checkpoint(model, path)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    matching = get_cera_model(
        tiny_llama(),
        CeraConfig(r=4, target_modules=["q_proj", "v_proj"], scaling=2.0, dropout_position="input"),
    )
    assert len(load_reference_checkpoint(matching, path)) == 4
    torch.testing.assert_close(logits(matching.eval()), logits(theirs), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Loading into an existing model: plain state dicts, both key namings
# --------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("names", [("A", "B"), ("up_proj", "down_proj")])
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


def test_both_namings_of_one_module_are_refused():
    model = cera_model()
    state = reference_state(model)
    key = next(k for k in state if k.endswith(".cera.A.weight"))
    state[key.replace(".cera.A.", ".cera.up_proj.")] = state[key]
    with pytest.raises(ValueError, match=r"'s A twice, under both key namings"):
        load_reference_checkpoint(model, state)


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


def test_a_model_is_not_changed_by_a_failed_build(tmp_path):
    base = tiny_llama()
    pristine = copy.deepcopy(base.state_dict())
    theirs = authors.adapt(tiny_llama())
    path = tmp_path / "ckpt.pt"
    authors.save(theirs, path, config={**authors.config_of(), "recurrent_steps": 1})
    with pytest.raises(ValueError, match="recurrent"):
        load_reference_model(base, path)
    assert all(torch.equal(v, pristine[k]) for k, v in base.state_dict().items())
