"""cera_delta against the plain-PyTorch composition, gradcheck, dtypes, bad input."""

from __future__ import annotations

import pytest
import torch

from cera_rs import DeviceError, cera_delta
from conftest import max_rel, plain_branch, seed_after_manual_seed

ACTIVATIONS = ["silu", "relu", "identity"]


def run_both(x, a, b, *, activation, p, scaling=0.7, seed_value=5, position="hidden"):
    seed = seed_after_manual_seed(seed_value)
    torch.manual_seed(seed_value)
    y = cera_delta(
        x, a, b, dropout=p, activation=activation, scaling=scaling, dropout_position=position
    )
    gen = torch.Generator().manual_seed(99)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, (x, a, b), g)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, b)]
    y_ref = plain_branch(
        *leaves, activation=activation, scaling=scaling, p=p, seed=seed, position=position
    )
    grads_ref = torch.autograd.grad(y_ref, leaves, g)
    return (y, *grads), (y_ref, *grads_ref)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(50, 32), (3, 40, 32)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_matches_plain_composition(make_inputs, activation, p, shape, dtype, tol):
    ours, ref = run_both(*make_inputs(shape=shape, dtype=dtype), activation=activation, p=p)
    for name, o, r in zip(["y", "dx", "dA", "dB"], ours, ref):
        assert o.shape == r.shape and o.dtype == dtype, name
        assert max_rel(o, r) < tol, f"{name}: {max_rel(o, r)}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradcheck_float64(make_inputs, activation, p):
    x, a, b = make_inputs(shape=(2, 5, 6), r=3, d_out=4, dtype=torch.float64)

    def fn(x, a, b):
        torch.manual_seed(3)
        return cera_delta(x, a, b, dropout=p, activation=activation, scaling=1.3)

    assert torch.autograd.gradcheck(fn, (x, a, b), eps=1e-6, atol=1e-7)


def test_same_seed_same_mask_and_different_seed_differs(make_inputs):
    x, a, b = make_inputs(requires_grad=True)
    torch.manual_seed(11)
    y1 = cera_delta(x, a, b, dropout=0.5)
    torch.manual_seed(11)
    y2 = cera_delta(x, a, b, dropout=0.5)
    torch.manual_seed(12)
    y3 = cera_delta(x, a, b, dropout=0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_successive_calls_draw_fresh_masks(make_inputs):
    x, a, b = make_inputs()
    torch.manual_seed(0)
    assert not torch.equal(cera_delta(x, a, b, dropout=0.5), cera_delta(x, a, b, dropout=0.5))


def test_eval_and_no_grad_paths_are_deterministic_and_agree(make_inputs):
    x, a, b = make_inputs()
    with_graph = cera_delta(x, a, b, dropout=0.5, training=False)
    with torch.no_grad():
        no_graph = cera_delta(x, a, b, dropout=0.5, training=False)
        again = cera_delta(x, a, b, dropout=0.5, training=False)
    assert torch.equal(no_graph, again)
    assert torch.equal(with_graph.detach(), no_graph)
    assert max_rel(no_graph, plain_branch(x.detach(), a.detach(), b.detach())) < 1e-5


def test_no_grad_training_still_drops_out(make_inputs):
    x, a, b = make_inputs()
    torch.manual_seed(4)
    with_graph = cera_delta(x, a, b, dropout=0.4)
    torch.manual_seed(4)
    with torch.no_grad():
        no_graph = cera_delta(x, a, b, dropout=0.4)
    assert torch.equal(with_graph.detach(), no_graph)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_half_types_stay_within_their_precision(make_inputs, dtype, p):
    ours, _ = run_both(*make_inputs(dtype=dtype), activation="silu", p=p)
    full, _ = run_both(*make_inputs(dtype=torch.float32), activation="silu", p=p)
    tol = 4e-2 if dtype == torch.bfloat16 else 5e-3
    for name, o, f in zip(["y", "dx", "dA", "dB"], ours, full):
        assert o.dtype == dtype, name
        assert max_rel(o, f) < tol, f"{name}: {max_rel(o, f)}"


def test_only_requested_gradients_are_computed(make_inputs):
    x, a, b = make_inputs()
    x.requires_grad_(False)
    y = cera_delta(x, a, b)
    y.sum().backward()
    assert x.grad is None and a.grad is not None and b.grad is not None


def test_non_contiguous_and_transposed_inputs(make_inputs):
    x, a, b = make_inputs(shape=(32, 40), r=8, d_out=24, requires_grad=False)
    xt = x.T.contiguous().T  # same values, column-major strides
    at = a.T.contiguous().T
    assert not xt.is_contiguous() and not at.is_contiguous()
    expected = plain_branch(x, a, b)
    assert max_rel(cera_delta(xt, at, b), expected) < 1e-5
    assert max_rel(cera_delta(x[:, ::1], a, b[:, :]), expected) < 1e-5
    strided = torch.cat([x, x], 1)[:, ::2]
    assert max_rel(cera_delta(strided, a, b), plain_branch(strided, a, b)) < 1e-5


def test_empty_batch(make_inputs):
    _, a, b = make_inputs()
    x = torch.zeros(0, 32, requires_grad=True)
    y = cera_delta(x, a, b, dropout=0.1)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 32) and torch.all(a.grad == 0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda x, a, b: (x[..., :-1], a, b), ValueError, r"last dimension 31"),
        (lambda x, a, b: (x, a, b[:, :-1]), ValueError, r"rank mismatch"),
        (lambda x, a, b: (x, a.double(), b), TypeError, r"mixed dtypes"),
        (lambda x, a, b: (x.long(), a, b), TypeError, r"x has dtype torch\.int64"),
        (lambda x, a, b: (x, a.to("meta"), b), DeviceError, r"mixed devices.*A on meta"),
        (lambda x, a, b: (x, a[None], b), ValueError, r"A must be \(r, d_in\)"),
        (lambda x, a, b: (x.numpy(), a, b), TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_bad_tensors_raise_clear_errors(make_inputs, change, error, match):
    x, a, b = change(*make_inputs(requires_grad=False))
    with pytest.raises(error, match=match):
        cera_delta(x, a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"got -0.1"),
        ({"dropout": float("nan")}, r"got nan"),
        ({"activation": "gelu"}, r"unknown activation 'gelu'"),
        ({"scaling": float("inf")}, r"scaling must be finite"),
        ({"dropout_position": "output"}, r"unknown dropout_position 'output'"),
    ],
)
def test_bad_arguments_raise_clear_errors(make_inputs, kwargs, match):
    x, a, b = make_inputs(requires_grad=False)
    with pytest.raises(ValueError, match=match):
        cera_delta(x, a, b, **kwargs)


def test_nan_propagates_like_pytorch(make_inputs):
    x, a, b = make_inputs(requires_grad=False)
    x[0, 0, 0] = float("nan")
    ours = cera_delta(x, a, b)
    ref = plain_branch(x, a, b)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.isnan(ours).any()


# --------------------------------------------------------------------------------------
# dropout_position="input": the mask on x before A, regenerated from the seed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(50, 32), (3, 40, 32)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_input_dropout_matches_plain_composition(make_inputs, activation, shape, dtype, tol):
    inputs = make_inputs(shape=shape, dtype=dtype)
    ours, ref = run_both(*inputs, activation=activation, p=0.3, position="input")
    for name, o, r in zip(["y", "dx", "dA", "dB"], ours, ref):
        assert o.shape == r.shape and o.dtype == dtype, name
        assert max_rel(o, r) < tol, f"{name}: {max_rel(o, r)}"
    hidden, _ = run_both(*inputs, activation=activation, p=0.3, position="hidden")
    assert not torch.equal(ours[0], hidden[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_input_dropout_half_types(make_inputs, dtype):
    ours, _ = run_both(*make_inputs(dtype=dtype), activation="silu", p=0.3, position="input")
    full, _ = run_both(*make_inputs(), activation="silu", p=0.3, position="input")
    tol = 4e-2 if dtype == torch.bfloat16 else 5e-3
    for name, o, f in zip(["y", "dx", "dA", "dB"], ours, full):
        assert o.dtype == dtype and max_rel(o, f) < tol, f"{name}: {max_rel(o, f)}"


def test_input_dropout_no_grad_and_eval_paths(make_inputs):
    x, a, b = make_inputs()
    torch.manual_seed(4)
    with_graph = cera_delta(x, a, b, dropout=0.4, dropout_position="input")
    torch.manual_seed(4)
    with torch.no_grad():
        no_graph = cera_delta(x, a, b, dropout=0.4, dropout_position="input")
        evaluated = cera_delta(x, a, b, dropout=0.4, dropout_position="input", training=False)
    assert torch.equal(with_graph.detach(), no_graph)
    assert max_rel(evaluated, plain_branch(x.detach(), a.detach(), b.detach())) < 1e-5


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_input_dropout_gradcheck_float64(make_inputs, activation):
    x, a, b = make_inputs(shape=(2, 5, 6), r=3, d_out=4, dtype=torch.float64)

    def fn(x, a, b):
        torch.manual_seed(3)
        return cera_delta(
            x, a, b, dropout=0.25, activation=activation, scaling=1.3, dropout_position="input"
        )

    assert torch.autograd.gradcheck(fn, (x, a, b), eps=1e-6, atol=1e-7)


def test_input_dropout_under_torch_compile(make_inputs):
    """fullgraph: the custom ops (and their fake implementations) carry the position; the
    aot_eager backend draws the seed from torch's generator as eager does."""
    torch._dynamo.reset()
    x, a, b = make_inputs(shape=(4, 7, 32))

    def fn(x, a, b):
        return cera_delta(x, a, b, dropout=0.3, dropout_position="input")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        torch.manual_seed(8)
        y = f(x, a, b)
        results.append((y, *torch.autograd.grad(y.pow(2).sum(), (x, a, b))))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    seed = seed_after_manual_seed(8)
    ref = plain_branch(*(t.detach() for t in (x, a, b)), p=0.3, seed=seed, position="input")
    assert max_rel(results[1][0], ref) < 1e-5
