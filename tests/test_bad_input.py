"""Issue 7's bad-input table: one test per row for each API.

Rows already covered elsewhere, not repeated here: cera_delta's wrong last dimension,
rank mismatch, mixed dtypes, mixed devices, integer x, bad dropout / activation /
scaling (no-autograd path), empty batch with autograd, non-contiguous forward, NaN in x
(test_functional.py); CeraLinear's r = 0 / negative / float, dropout, activation
(test_layer.py); CeraConfig's r = 0, dropout 1.0, activation, bias, target_modules
types, a target that matches nothing (test_model.py); reference checkpoints with
foreign keys or wrong shapes (test_reference.py).

Every row checks the exception type and that the message names the problem. Inputs
that could crash native code run in a child process (``nasty_inputs.py``), which
must stay alive and print no Rust panic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from cera_rs import (
    CeraConfig,
    CeraLinear,
    DeviceError,
    cera_delta,
    get_cera_model,
    load_reference_checkpoint,
)
from cera_rs.spectral import StreamingSpectrum, lowrank_spectra, lowrank_spectrum, spectrum
from conftest import max_rel, plain_branch

TESTS = Path(__file__).parent
TARGETS = ["q_proj", "v_proj"]
# tch's names for dtypes and devices; cera_rs's own messages use torch's.
TCH_NAMES = re.compile(
    r"\b(Float|Double|Half|BFloat16|Int|Int64|Bool|ComplexFloat|QInt8|Cpu|Cuda|Mps)\b"
)

# --------------------------------------------------------------------------------------
# Nasty inputs, in a child process
# --------------------------------------------------------------------------------------

# case -> (expected exception type(s) ("A|B") or "ok", regex the message must match)
NASTY = {
    "nested_x": ("TypeError|ValueError", r"(?i)nested"),
    "nested_x_native": ("TypeError|ValueError", r"(?i)nested"),
    "sparse_x": ("RuntimeError", r"sparse"),
    "scalar_x": ("ValueError", r"at least one dimension"),
    "bool_tensors": ("TypeError", r"^dtype error: x has dtype torch\.bool: expected torch\.f"),
    "complex_tensors": ("TypeError", r"^dtype error: x has dtype torch\.complex64"),
    "quantized_x": ("TypeError", r"^dtype error: x has dtype torch\.qint8"),
    "huge_allocation": ("RuntimeError", r"can't allocate memory"),
    "meta_tensors": ("ok", ""),
    "stride_zero_x_and_grad": ("ok", ""),
    "channels_last_4d": ("ok", ""),
    "zero_width": ("ok", ""),
    "negative_seed": ("OverflowError", r"negative"),
    "seed_too_large": ("OverflowError", r"too big"),
    "not_a_tensor": ("TypeError", r"expected a torch.Tensor, got NoneType"),
    "backward_grad_wrong_shape": ("ValueError", r"grad_output has shape \[5, 5\]"),
    "backward_hidden_wrong_shape": ("ValueError", r"saved hidden state has shape \[2, 2\]"),
    "backward_hidden_wrong_dtype": (
        "TypeError",
        r"^dtype error: the saved hidden state is torch\.float64, "
        r"the branch's inputs torch\.float32$",
    ),
    "backward_grad_wrong_dtype": (
        "TypeError",
        r"^dtype error: grad_output is torch\.bfloat16, the branch's inputs torch\.float32$",
    ),
    "backward_grad_on_meta": (
        "DeviceError",
        r"^device error: grad_output is on meta, the branch's inputs on cpu$",
    ),
    "backward_meta_inputs_cpu_grad": (
        "DeviceError",
        r"^device error: grad_output is on cpu, the branch's inputs on meta$",
    ),
    "forward_mixed_devices_native": (
        "DeviceError",
        r"^device error: mixed devices: x is on cpu, A on meta, B on cpu$",
    ),
    "bad_dropout_position_native": ("ValueError", r"unknown dropout position \"output\""),
    "custom_op_bad_activation": ("ValueError", r"unknown activation \"gelu\""),
    "custom_op_backward_bad_grad": ("ValueError", r"grad_output has shape \[5, 7\]"),
    "nested_matrix_spectrum": ("TypeError", r"(?i)nested"),
    "nested_rows_streaming": ("TypeError|ValueError", r"(?i)nested"),
    "accumulator_survives_a_failed_update": ("ok", ""),
    "gram_dim_overflow": ("RuntimeError", r"overflow"),
    "huge_matrix_spectrum": ("RuntimeError", r"can't allocate memory"),
}


def run_cases(names: list[str]) -> dict[str, dict]:
    """Runs the cases in child processes; a case that kills its process is recorded
    with the exit status and the rest run in a fresh one."""
    results: dict[str, dict] = {}
    pending = list(names)
    while pending:
        proc = subprocess.run(
            [sys.executable, str(TESTS / "nasty_inputs.py"), *pending],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=TESTS,
            env={**os.environ, "RUST_BACKTRACE": "0"},
        )
        stderr_by_case = dict(
            re.findall(r"BEGIN (\w+)\n(.*?)(?=BEGIN \w+\n|\Z)", proc.stderr, re.S)
        )
        begun = re.findall(r"^BEGIN (\w+)$", proc.stdout, re.M)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                result["stderr"] = stderr_by_case.get(result["case"], "")
                results[result["case"]] = result
        if proc.returncode != 0:
            dead = begun[-1] if begun else pending[0]
            if dead not in results:
                results[dead] = {
                    "outcome": "crashed",
                    "type": f"exit {proc.returncode}",
                    "message": proc.stderr[-2000:],
                    "stderr": proc.stderr,
                }
        pending = [n for n in pending if n not in results]
    return results


@pytest.fixture(scope="module")
def nasty_results():
    # abort_process last: it checks the crash detection without a second child process.
    return run_cases([*NASTY, "abort_process"])


def test_a_killed_child_is_reported_as_a_crash(nasty_results):
    result = nasty_results["abort_process"]
    assert (result["outcome"], result["type"]) == ("crashed", "exit -6")  # SIGABRT


@pytest.mark.parametrize("case", list(NASTY))
def test_nasty_input_raises_cleanly_in_a_child_process(case, nasty_results):
    result = nasty_results[case]
    expected_type, pattern = NASTY[case]
    assert result["outcome"] != "crashed", f"{case} killed the process: {result['type']}"
    summary = f"{case}: {result['type']}: {result['message'][:600]}"
    if expected_type == "ok":
        assert result["outcome"] == "ok", summary
    else:
        assert result["outcome"] == "raised", summary
        assert result["type"] in expected_type.split("|"), summary
        assert re.search(pattern, result["message"]), summary
        if not result["message"].startswith("libtorch error"):
            assert not TCH_NAMES.search(result["message"]), summary
    assert not result["message"].startswith("cera_rs internal error"), summary
    assert "panicked" not in result["stderr"], f"{case}: Rust panicked:\n{result['stderr'][:600]}"


# --------------------------------------------------------------------------------------
# cera_delta (functional API)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda x, a, b: (x[..., :-1], a, b), ValueError, r"last dimension 31"),
        (lambda x, a, b: (x, a, b[:, :-1]), ValueError, r"rank mismatch"),
        (lambda x, a, b: (x, a, b.double()), TypeError, r"mixed dtypes"),
        (lambda x, a, b: (x, a.to("meta"), b), DeviceError, r"mixed devices.*A on meta"),
    ],
    ids=["last_dim", "rank", "dtypes", "devices"],
)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_functional_bad_tensors_on_the_autograd_path(make_inputs, change, error, match, p):
    """The rows of test_functional.py through the other entry point: with autograd
    (custom op, training forward) and with dropout (no-grad training forward)."""
    x, a, b = change(*make_inputs(requires_grad=True))
    with pytest.raises(error, match=match):
        cera_delta(x, a, b, dropout=p)
    with torch.no_grad(), pytest.raises(error, match=match):
        cera_delta(x, a, b, dropout=0.2)


def test_functional_integer_tensors_everywhere(make_inputs):
    x, a, b = (t.detach().round().to(torch.int32) for t in make_inputs())
    with pytest.raises(TypeError, match=r"x has dtype torch\.int32: expected torch\.float32"):
        cera_delta(x, a, b)
    with pytest.raises(TypeError, match=r"mixed dtypes"):
        cera_delta(x.float(), a, b.float())


def test_functional_rank_zero_gives_zero_delta_and_gradients(make_inputs):
    x, _, _ = make_inputs(shape=(4, 32))
    a = torch.zeros(0, 32, requires_grad=True)
    b = torch.zeros(24, 0, requires_grad=True)
    y = cera_delta(x, a, b, dropout=0.3)
    assert y.shape == (4, 24) and torch.all(y == 0)
    y.pow(2).sum().backward()
    assert x.grad.shape == x.shape and torch.all(x.grad == 0)
    assert a.grad.shape == (0, 32) and b.grad.shape == (24, 0)


@pytest.mark.parametrize("shape", [(0, 32), (3, 0, 32)])
def test_functional_empty_batch_without_autograd(make_inputs, shape):
    _, a, b = make_inputs(requires_grad=False)
    for kwargs in ({"training": False}, {"dropout": 0.3}):
        y = cera_delta(torch.zeros(shape), a, b, **kwargs)
        assert y.shape == (*shape[:-1], 24)


def test_functional_gradients_of_non_contiguous_and_transposed_inputs(make_inputs):
    x, a, b = make_inputs(shape=(32, 40), r=8, d_out=24)
    views = [t.detach().T.contiguous().T.requires_grad_(True) for t in (x, a, b)]
    assert not any(v.is_contiguous() for v in views)
    y = cera_delta(*views)
    grad = torch.randn(24, 32).T  # transposed gradient
    got = torch.autograd.grad(y, views, grad)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    want = torch.autograd.grad(plain_branch(*leaves), leaves, grad)
    for g, w in zip(got, want):
        assert max_rel(g, w) < 1e-5


@pytest.mark.parametrize("where", ["x", "A", "grad"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_functional_non_finite_values_propagate_like_pytorch(make_inputs, where, value):
    """No hidden clamping: NaN/Inf land where the plain composition puts them, in the
    output and in all three gradients."""
    x, a, b = make_inputs(shape=(6, 32), r=8, d_out=24)
    with torch.no_grad():
        if where == "x":
            x[1, 3] = value
        elif where == "A":
            a[2, 5] = value
    grad = torch.ones(6, 24)
    if where == "grad":
        grad[4, 7] = value
    y = cera_delta(x, a, b)
    got = (y, *torch.autograd.grad(y, (x, a, b), grad))
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    y_ref = plain_branch(*leaves)
    want = (y_ref, *torch.autograd.grad(y_ref, leaves, grad))
    assert any(not torch.isfinite(w).all() for w in want)
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))
        assert torch.equal(torch.isinf(g), torch.isinf(w))
        finite = torch.isfinite(w)
        if finite.any():
            assert max_rel(g[finite], w[finite]) < 1e-5


# --------------------------------------------------------------------------------------
# CeraLinear
# --------------------------------------------------------------------------------------


def layer(**kwargs) -> CeraLinear:
    torch.manual_seed(0)
    out = CeraLinear(nn.Linear(16, 12), r=4, **kwargs)
    nn.init.normal_(out.cera_B["default"].weight)
    return out


def test_layer_wrong_last_dimension():
    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied \(3x15 and 16x12\)"):
        layer()(torch.randn(3, 15))


def test_layer_rank_mismatch():
    bad = layer()
    with pytest.raises(RuntimeError, match=r"size mismatch for cera_B.default.weight"):
        bad.load_state_dict({**bad.state_dict(), "cera_B.default.weight": torch.zeros(12, 5)})
    bad.cera_B["default"].weight = nn.Parameter(torch.zeros(12, 5))
    with pytest.raises(ValueError, match=r"rank mismatch: A is \[4, 16\].*B is \[12, 5\]"):
        bad(torch.randn(3, 16))


def test_layer_mixed_dtypes():
    with pytest.raises(RuntimeError, match=r"same dtype.*Double and Float"):
        layer()(torch.randn(3, 16, dtype=torch.float64))
    bad = layer()
    bad.cera_A.to(torch.bfloat16)
    with pytest.raises(
        TypeError,
        match=r"mixed dtypes: x is torch\.bfloat16, A is torch\.bfloat16, B is torch\.float32$",
    ):
        bad(torch.randn(3, 16))


def test_layer_mixed_devices():
    bad = layer()
    bad.cera_B.to("meta")
    with pytest.raises(DeviceError, match=r"mixed devices: x is on cpu, A on cpu, B on meta$"):
        bad(torch.randn(3, 16))


def test_layer_integer_input():
    with pytest.raises(RuntimeError, match=r"same dtype.*Long and Float"):
        layer()(torch.ones(3, 16, dtype=torch.long))


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_layer_empty_batch(shape):
    model = layer(dropout=0.2).train()
    x = torch.zeros(shape, requires_grad=True)
    y = model(x)
    assert y.shape == (*shape[:-1], 12)
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.all(model.cera_A["default"].weight.grad == 0)


def test_layer_non_contiguous_and_transposed_input():
    model = layer(dropout=0.0)
    x = torch.randn(16, 10).T
    assert not x.is_contiguous()
    results = []
    for inp in (x, x.contiguous()):
        model.zero_grad()
        y = model(inp)
        y.pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((y.detach(), grads))
    (y1, g1), (y2, g2) = results
    assert max_rel(y1, y2) < 1e-6
    assert all(max_rel(a, b) < 1e-5 for a, b in zip(g1, g2))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": -1}, ValueError, r"r must be >= 1, got -1"),
        ({"r": 0}, ValueError, r"r must be >= 1, got 0"),
        ({"r": 2, "dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        ({"r": 2, "activation": "gelu"}, ValueError, r"unknown activation 'gelu'"),
    ],
)
def test_layer_update_with_bad_arguments_keeps_the_layer_intact(kwargs, error, match):
    model = layer().eval()
    x = torch.randn(3, 16)
    before = model(x)
    with pytest.raises(error, match=match):
        model.update_layer("default", **kwargs)
    with pytest.raises(error, match=match):
        model.update_layer("other", **kwargs)
    assert set(model.cera_A) == {"default"} and model.r == {"default": 4}
    assert torch.equal(model(x), before)


def test_layer_non_finite_input_propagates():
    model = layer(dropout=0.0).eval()
    x = torch.randn(4, 16)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    a, b = model.cera_A["default"].weight, model.cera_B["default"].weight
    expected = model.base_layer(x) + plain_branch(x, a, b)
    got = model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2]]).all()


# --------------------------------------------------------------------------------------
# CeraConfig
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r": -4}, ValueError, r"r must be >= 1, got -4"),
        ({"r": True}, TypeError, r"r must be an int, got bool"),
        ({"r": "8"}, TypeError, r"r must be an int, got str"),
        ({"cera_dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        ({"cera_dropout": float("nan")}, ValueError, r"got nan"),
        ({"cera_dropout": "0.1"}, TypeError, r"dropout must be a float, got str"),
        ({"activation": None}, ValueError, r"unknown activation None"),
        ({"scaling": float("inf")}, ValueError, r"scaling must be finite"),
        ({"target_modules": 3}, TypeError, r"target_modules must be a list of names"),
        ({"modules_to_save": 3}, TypeError, r"modules_to_save must be None or a str"),
        ({"modules_to_save": ["a", 1]}, TypeError, r"modules_to_save"),
        ({"layers_to_transform": "0"}, TypeError, r"layers_to_transform must be None or a int"),
        ({"layers_to_transform": [True]}, TypeError, r"layers_to_transform"),
        ({"layers_pattern": 5, "layers_to_transform": 0}, TypeError, r"layers_pattern"),
        ({"target_modules": "(q|v_proj"}, ValueError, r"target_modules: .* not a valid pattern"),
        ({"exclude_modules": "[a-"}, ValueError, r"exclude_modules: .* not a valid pattern"),
        ({"modules_to_save": ["(("]}, ValueError, r"modules_to_save: .* not a valid pattern"),
    ],
)
def test_config_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        CeraConfig(**kwargs)


def test_config_target_that_cera_cannot_wrap():
    with pytest.raises(
        TypeError,
        match=r"target module 'model.norm'.*got LlamaRMSNorm; "
        r"register a CeRA layer for it",
    ):
        get_cera_model(tiny_llama(), CeraConfig(r=2, target_modules=["norm"]))


# --------------------------------------------------------------------------------------
# save_pretrained / from_pretrained / load_adapter
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A valid adapter folder (tiny Llama, r=4, q/v projections)."""
    folder = tmp_path_factory.mktemp("adapter")
    model = get_cera_model(tiny_llama(), CeraConfig(r=4, target_modules=TARGETS))
    model.save_pretrained(folder)
    return folder


def copy_of(saved: Path, tmp_path: Path, *, config=None, weights=None, name="adapter") -> Path:
    """A copy of the saved adapter with its config (bytes, or a dict of changed keys) or
    weights (bytes, or a state dict) replaced."""
    folder = tmp_path / name
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((saved / name).read_bytes())
    if isinstance(config, dict):
        config = json.dumps(
            {**json.loads((saved / "adapter_config.json").read_text()), **config}
        ).encode()
    if config is not None:
        (folder / "adapter_config.json").write_bytes(config)
    if isinstance(weights, dict):
        save_file(weights, str(folder / "adapter_model.safetensors"))
    elif weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def load(folder) -> PeftModel:
    """PEFT's own entry point: it reads peft_type, then calls CeraConfig.from_pretrained."""
    return PeftModel.from_pretrained(tiny_llama(), folder)


def test_load_a_valid_copy_works(saved, tmp_path):
    """The baseline the other load rows mutate."""
    model = load(copy_of(saved, tmp_path))
    assert sum(isinstance(m, CeraLinear) for m in model.modules()) == 4


# PEFT reads adapter_config.json itself (for peft_type) before CeRA's checks run, and
# raises its own ValueError when the file is absent.
@pytest.mark.parametrize(
    "missing,error,match",
    [
        ("adapter_config.json", ValueError, r"Can't find 'adapter_config.json' at '{folder}'"),
        (
            "adapter_model.safetensors",
            FileNotFoundError,
            r"{folder} has no adapter_model.safetensors \(or adapter_model.bin\)",
        ),
    ],
)
def test_load_folder_missing_a_file(saved, tmp_path, missing, error, match):
    folder = copy_of(saved, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(error, match=match.format(folder=folder)):
        load(folder)
    model = get_cera_model(tiny_llama(), CeraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(error, match=match.format(folder=folder)):
        model.load_adapter(folder, "second")
    assert "second" not in model.peft_config


def test_load_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at '.*nowhere'"):
        load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"adapter folder .*nowhere does not exist"):
        CeraConfig.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "content,match",
    [
        (b"{not json", r"is not valid JSON: Expecting property name"),
        (b"", r"is not valid JSON"),
        (b"\xff\xfe\x00{", r"is not valid JSON"),
        (b"[" * 100_000, r"is not valid JSON"),
        (b"[1, 2]", r"must hold a JSON object, got list"),
        (b"null", r"must hold a JSON object, got NoneType"),
    ],
    ids=["syntax", "empty", "bad_utf", "deep_nesting", "list", "null"],
)
def test_load_config_that_is_not_json(saved, tmp_path, content, match):
    """CeraConfig.from_pretrained names the file; PEFT's own peft_type lookup, which
    reads the file first in PeftModel.from_pretrained, raises json's bare errors."""
    folder = copy_of(saved, tmp_path, config=content)
    with pytest.raises(ValueError, match=rf"adapter_config.json {match}"):
        CeraConfig.from_pretrained(folder)
    if content in (b"{not json", b""):
        with pytest.raises(ValueError, match=r"Expecting"):
            load(folder)


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"r": "4"}, TypeError, r"r must be an int, got str"),
        ({"r": 4.0}, TypeError, r"r must be an int, got float"),
        ({"r": -4}, ValueError, r"r must be >= 1, got -4"),
        ({"cera_dropout": "0.1"}, TypeError, r"dropout must be a float"),
        ({"cera_dropout": 1.5}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"activation": "gelu"}, ValueError, r"unknown activation 'gelu'"),
        ({"activation": ["silu"]}, ValueError, r"unknown activation \['silu'\]"),
        ({"scaling": "big"}, TypeError, r"scaling must be a float"),
        ({"target_modules": 7}, TypeError, r"target_modules must be a list"),
        ({"modules_to_save": 7}, TypeError, r"modules_to_save must be None"),
        ({"layers_to_transform": "x"}, TypeError, r"layers_to_transform"),
        ({"bias": 3}, ValueError, r"bias must be one of"),
        ({"task_type": "NOPE"}, ValueError, r"Invalid task type: 'NOPE'"),
        ({"rank_pattern": {"q_proj": 0}}, ValueError, r"rank_pattern\['q_proj'\] must be >= 1"),
        ({"lora_alpha": 16}, TypeError, r"does not take 'lora_alpha'.*scaling"),
    ],
)
def test_load_config_with_wrong_types(saved, tmp_path, change, error, match):
    folder = copy_of(saved, tmp_path, config=change)
    with pytest.raises(error, match=rf"adapter_config.json.*{match}"):
        load(folder)


@pytest.mark.parametrize(
    "peft_type,match",
    [
        ("LORA", r"describes a 'LORA' adapter, not a CeRA one"),
        ("NOPE", r"describes a 'NOPE' adapter"),
        (["CERA"], r"describes a \['CERA'\] adapter"),
    ],
)
def test_load_config_of_another_method(saved, tmp_path, peft_type, match):
    """PeftModel.from_pretrained dispatches on peft_type (a LORA file loads as LoRA);
    CeRA's own config refuses another method's file."""
    folder = copy_of(saved, tmp_path, config={"peft_type": peft_type})
    with pytest.raises(ValueError, match=rf"adapter_config.json {match}"):
        CeraConfig.from_pretrained(folder)


def test_load_config_asking_for_weights_the_file_lacks(saved, tmp_path):
    folder = copy_of(saved, tmp_path, config={"modules_to_save": ["lm_head"]})
    with pytest.raises(ValueError, match=r"safetensors lacks weights for lm_head, which its adapt"):
        load(folder)


def test_load_config_whose_targets_are_not_in_the_model(saved, tmp_path):
    folder = copy_of(saved, tmp_path, config={"target_modules": ["qkv"]})
    with pytest.raises(ValueError, match=r"\{'qkv'\} not found in the base model.*q_proj"):
        load(folder)


def test_load_config_rank_that_disagrees_with_the_weights(saved, tmp_path):
    # r=10^9 would allocate 10^9 x 64 floats per layer: refused from the file header.
    for r in (3, 10**9):
        folder = copy_of(saved, tmp_path, config={"r": r}, name=str(r))
        with pytest.raises(ValueError, match=rf"says r={r}, but .* holds rank-4 weights"):
            load(folder)
    folder = copy_of(saved, tmp_path, config={"rank_pattern": {"v_proj": 10**9}}, name="pattern")
    with pytest.raises(ValueError, match=r"says r=1000000000, but .* rank-4 .*v_proj"):
        load(folder)


@pytest.mark.parametrize(
    "cut",
    [lambda b: b[: len(b) // 2], lambda b: b[:5], lambda b: b"", lambda b: b[:8] + b"{}x" * 9],
    ids=["half", "header", "empty", "garbage"],
)
def test_load_truncated_safetensors(saved, tmp_path, cut):
    data = (saved / "adapter_model.safetensors").read_bytes()
    folder = copy_of(saved, tmp_path, weights=cut(data))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a valid safetensors"):
        load(folder)


@pytest.mark.parametrize("part", ["A", "B"])
def test_load_safetensors_with_wrong_shapes(saved, tmp_path, part):
    state = load_file(str(saved / "adapter_model.safetensors"))
    key = f"base_model.model.model.layers.1.self_attn.v_proj.cera_{part}.weight"
    state[key] = torch.zeros(4, 65) if part == "A" else torch.zeros(65, 4)
    folder = copy_of(saved, tmp_path, weights=state)
    with pytest.raises(ValueError, match=r"do not fit the model: size mismatch for .*v_proj"):
        load(folder)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_load_safetensors_with_non_float_weights(saved, tmp_path, dtype):
    state = load_file(str(saved / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.v_proj.cera_B.weight"
    state[key] = state[key].to(dtype)
    folder = copy_of(saved, tmp_path, weights=state)
    with pytest.raises(ValueError, match=rf"holds {dtype} adapter weights \(.*v_proj.cera_B"):
        load(folder)


def test_load_safetensors_without_some_or_any_adapter_weights(saved, tmp_path):
    state = load_file(str(saved / "adapter_model.safetensors"))
    some = {k: v for k, v in state.items() if "layers.0.self_attn.q_proj" not in k}
    with pytest.raises(ValueError, match=r"'default' lack 2 of its 8 adapter tensors.*q_proj"):
        load(copy_of(saved, tmp_path, weights=some, name="some"))
    foreign = {"lm_head.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"holds no CeRA adapter weights"):
        load(copy_of(saved, tmp_path, weights=foreign, name="none"))


def test_failed_load_leaves_the_base_model_untouched(saved, tmp_path):
    folder = copy_of(saved, tmp_path, config=b"{")
    base = tiny_llama()
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(base, folder)
    assert not any(isinstance(m, CeraLinear) for m in base.modules())


# --------------------------------------------------------------------------------------
# Reference checkpoints (load_reference_checkpoint)
# --------------------------------------------------------------------------------------


@pytest.fixture
def cera_llama():
    return get_cera_model(tiny_llama(), CeraConfig(r=4, target_modules=TARGETS))


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("trunc.safetensors", b"\x10" + bytes(7) + b'{"a":', r"not a valid safetensors"),
        ("garbage.pt", b"garbage bytes", r"not a state dict that torch.load\(weights_only=True\)"),
        ("empty.pt", b"", r"not a state dict"),
    ],
)
def test_reference_checkpoint_file_that_is_broken(cera_llama, tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name} .*{match}"):
        load_reference_checkpoint(cera_llama, path)


def test_reference_checkpoint_with_code_instead_of_tensors(cera_llama, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": nn.Linear(2, 2)}, path)  # a pickled module, refused by weights_only
    with pytest.raises(ValueError, match=r"evil.pt is not a state dict"):
        load_reference_checkpoint(cera_llama, path)


def test_reference_checkpoint_with_non_tensor_values(cera_llama):
    state = {"model.layers.0.self_attn.q_proj.cera.A.weight": [[0.0] * 64] * 4}
    with pytest.raises(TypeError, match=r"map str keys to tensors.*q_proj.cera.A.weight.*list"):
        load_reference_checkpoint(cera_llama, state)


def test_reference_checkpoint_with_integer_weights(cera_llama):
    before = [p.detach().clone() for p in cera_llama.parameters()]
    state = {}
    for name, module in cera_llama.named_modules():
        if isinstance(module, CeraLinear):
            path = name.removeprefix("base_model.model.")
            state[f"{path}.cera.A.weight"] = torch.ones(4, 64, dtype=torch.int64)
            state[f"{path}.cera.B.weight"] = torch.ones(64, 4)
    with pytest.raises(ValueError, match=r"checkpoint's A holds torch.int64, not floating"):
        load_reference_checkpoint(cera_llama, state)
    assert all(torch.equal(p, b) for p, b in zip(cera_llama.parameters(), before))


def test_reference_checkpoint_path_that_is_a_folder(cera_llama, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a file"):
        load_reference_checkpoint(cera_llama, tmp_path)


# --------------------------------------------------------------------------------------
# Spectral API (spectrum, lowrank_spectrum, StreamingSpectrum). test_spectral.py covers:
# NaN/Inf in spectrum, lowrank and update; update's wrong last dimension; non-2-D
# matrices; B/A rank mismatch; complex dtype; lists; tau; dim 0; merge of other dims.
# --------------------------------------------------------------------------------------


def rows(n=40, d=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=gen, dtype=torch.float64)
        * torch.linspace(3, 0.1, d, dtype=torch.float64)
    ).to(dtype)


def values(s) -> torch.Tensor:
    return torch.from_numpy(s.singular_values.copy())


def test_spectral_wrong_shape_of_a_loaded_state():
    stream = StreamingSpectrum(6)
    with pytest.raises(ValueError, match=r"gram must be \(6, 6\), got \(5, 5\)"):
        stream.load_state({"gram": torch.eye(5).double(), "tokens_seen": torch.tensor(1)})
    with pytest.raises(ValueError, match=r"tokens_seen must be >= 0"):
        stream.load_state({"gram": torch.eye(6).double(), "tokens_seen": torch.tensor(-1)})


def test_spectral_rank_mismatch_in_a_parallel_batch_of_factors():
    good = (torch.randn(5, 2), torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"B is \(5, 2\) and A is \(3, 7\)"):
        lowrank_spectra([good, (torch.randn(5, 2), torch.randn(3, 7)), good])


def test_spectral_mixed_dtypes_are_computed_in_float64():
    x = rows()
    want = values(spectrum(x))
    b, a = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    mixed = values(lowrank_spectrum(b.float(), a))
    assert max_rel(mixed, values(lowrank_spectrum(b.float().double(), a))) < 1e-9
    stream = StreamingSpectrum(6)
    stream.update(x[:20].float())
    stream.update(x[20:])
    exact = torch.cat([x[:20].float().double(), x[20:]])
    assert max_rel(values(stream.spectrum()), values(spectrum(exact))) < 1e-9
    assert max_rel(values(stream.spectrum()), want) < 1e-6


def test_spectral_mixed_devices():
    stream = StreamingSpectrum(6)
    stream.update(rows(n=3))
    with pytest.raises(RuntimeError, match=r"meta"):
        stream.update(rows(n=3).to("meta"))
    with pytest.raises(ValueError, match=r"unsupported device \"meta\""):
        StreamingSpectrum(6, device="meta")
    assert stream.tokens_seen == 3


def test_spectral_integer_and_bool_tensors():
    m = torch.arange(24).reshape(4, 6) % 5
    assert max_rel(values(spectrum(m)), values(spectrum(m.double()))) < 1e-12
    stream = StreamingSpectrum(6)
    stream.update(m.to(torch.int32))
    streamed = values(stream.spectrum())  # dim = 6 values, the last two zero
    assert max_rel(streamed[:4], values(spectrum(m.double()))) < 1e-9
    assert streamed[4:].abs().max() < 1e-6 * streamed[0]
    with pytest.raises(TypeError, match=r"matrix must hold real numbers, got torch\.bool$"):
        spectrum(m.bool())
    with pytest.raises(TypeError, match=r"update must hold real numbers, got torch\.bool$"):
        stream.update(m.bool())


def test_spectral_empty_input():
    empty = spectrum(torch.zeros(0, 6), rank=2)
    assert len(empty) == 0
    assert empty.effective_rank == empty.stable_rank == empty.tail_energy() == 0.0
    stream = StreamingSpectrum(6)
    stream.update(torch.zeros(3, 0, 6))
    assert stream.tokens_seen == 0 and not values(stream.spectrum()).any()


def test_spectral_non_contiguous_and_transposed_input():
    x = rows()
    want = values(spectrum(x))
    assert max_rel(values(spectrum(x.T)), want) < 1e-12
    strided = torch.cat([x, x], 1)[:, ::2]
    assert max_rel(values(spectrum(strided)), values(spectrum(strided.contiguous()))) < 1e-12
    stream = StreamingSpectrum(6)
    stream.update(x.T.contiguous().T[:25])  # column-major rows
    stream.update(x[25:].expand(2, 15, 6)[0])
    assert max_rel(values(stream.spectrum()), want) < 1e-9


def test_spectral_rank_zero_or_negative():
    with pytest.raises(ValueError, match=r"rank must be a non-negative int or None, got -1"):
        spectrum(rows(), rank=-1)
    with pytest.raises(ValueError, match=r"got -2"):
        spectrum(rows()).tail_energy(-2)
    with pytest.raises(ValueError, match=r"dim must be >= 1, got -3"):
        StreamingSpectrum(-3)
    zero = lowrank_spectrum(torch.ones(5, 0), torch.ones(0, 7), rank=0)
    assert not values(zero).any() and zero.tail_energy() == 0.0


def test_spectral_non_finite_states_are_rejected_and_updates_leave_no_trace():
    stream = StreamingSpectrum(6)
    stream.update(rows(n=10))
    before = stream.state()
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = rows(n=4)
        x[2, 3] = bad
        with pytest.raises(ValueError, match=r"non-finite values: update contains NaN or inf"):
            stream.update(x)
        gram = torch.eye(6, dtype=torch.float64)
        gram[1, 1] = bad
        with pytest.raises(ValueError, match=r"Gram matrix contains NaN or infinite"):
            StreamingSpectrum(6).load_state({"gram": gram, "tokens_seen": torch.tensor(1)})
    after = stream.state()
    assert torch.equal(after["gram"], before["gram"]) and stream.tokens_seen == 10
    with pytest.raises(ValueError, match=r"non-finite"):
        lowrank_spectrum(torch.ones(5, 2), torch.full((2, 7), -float("inf")))
    big = StreamingSpectrum(6)
    big.update(torch.full((2, 6), 1e200, dtype=torch.float64))  # finite rows, Gram overflows
    with pytest.raises(ValueError, match=r"overflowed float64"):
        big.spectrum()
