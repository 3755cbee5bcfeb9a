"""Inputs that could crash native code, run one by one in a child process.

``python tests/nasty_inputs.py NAME...`` runs the named cases in order. For each it
writes ``BEGIN NAME`` to stderr and stdout, then one JSON line to stdout:
``{"case": NAME, "outcome": "ok" | "raised", "type": ..., "message": ...}``. A case
that checks a result asserts it inside the case; a wrong result shows up as a raised
AssertionError. If the process dies (abort, segfault), the case begun last is the one
that killed it: ``run_cases`` in test_bad_input.py records that and goes on with the
rest in a new process.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from cera_rs import _native, cera_delta

KW = {"activation": "silu", "scaling": 1.0}


def inputs(n=5, d_in=8, r=3, d_out=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, d_in, generator=gen, dtype=dtype),
        torch.randn(r, d_in, generator=gen, dtype=dtype),
        torch.randn(d_out, r, generator=gen, dtype=dtype),
    )


def plain(x, a, b):
    return torch.nn.functional.silu(x @ a.T) @ b.T


def native_backward(grad, x, a, b, h, **kwargs):
    args = {**KW, "dropout": 0.0, "seed": 0, "needs_x": True, "needs_a": True, "needs_b": True}
    return _native.backward(grad, x, a, b, h, **{**args, **kwargs})


def nested_x():
    _, a, b = inputs()
    x = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
    cera_delta(x, a, b)


def nested_x_native():
    """The same straight into the extension (no Python-side check on the way)."""
    _, a, b = inputs()
    x = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
    _native.delta(x, a, b, **KW)


def sparse_x():
    x, a, b = inputs()
    _native.delta(x.to_sparse(), a, b, **KW)


def scalar_x():
    _, a, b = inputs()
    _native.delta(torch.tensor(1.0), a, b, **KW)


def bool_tensors():
    x, a, b = inputs()
    _native.delta(x.bool(), a.bool(), b.bool(), **KW)


def complex_tensors():
    x, a, b = inputs()
    _native.delta(x.cfloat(), a.cfloat(), b.cfloat(), **KW)


def quantized_x():
    x, a, b = inputs()
    _native.delta(torch.quantize_per_tensor(x, 0.1, 0, torch.qint8), a, b, **KW)


def huge_allocation():
    # 2^40 rows that share one row of storage: the output cannot be allocated.
    _, a, b = inputs()
    _native.delta(torch.randn(1, 8).expand(2**40, 8), a, b, **KW)


def meta_tensors():
    x, a, b = inputs()
    y = _native.delta(x.to("meta"), a.to("meta"), b.to("meta"), **KW)
    assert y.device.type == "meta" and y.shape == (5, 4), (y.device, y.shape)


def stride_zero_x_and_grad():
    _, a, b = inputs()
    x = torch.randn(1, 8).expand(5, 8)
    y, h, _ = _native.forward(x, a, b, dropout=0.0, seed=0, **KW)
    assert torch.allclose(y, plain(x, a, b), rtol=1e-5, atol=1e-6)
    grad = torch.ones(1, 1).expand(5, 4)
    dx, da, db = native_backward(grad, x, a, b, h)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    expected = torch.autograd.grad(plain(*leaves), leaves, grad)
    for got, want in zip((dx, da, db), expected):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def channels_last_4d():
    _, a, b = inputs()
    x = torch.randn(2, 3, 4, 8).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    y = _native.delta(x, a, b, **KW)
    assert torch.allclose(y, plain(x, a, b), rtol=1e-5, atol=1e-6)


def zero_width():
    _, _, b = inputs()
    y = _native.delta(torch.randn(5, 0), torch.randn(3, 0), b, **KW)
    # act(0) = 0 for SiLU, so an empty d_in gives a zero delta.
    assert y.shape == (5, 4) and torch.all(y == 0)
    x, a, _ = inputs()
    assert _native.delta(x, a, torch.randn(0, 3), **KW).shape == (5, 0)


def negative_seed():
    x, a, b = inputs()
    _native.forward(x, a, b, dropout=0.5, seed=-1, **KW)


def seed_too_large():
    x, a, b = inputs()
    _native.forward(x, a, b, dropout=0.5, seed=2**64, **KW)


def not_a_tensor():
    _, a, b = inputs()
    _native.delta(None, a, b, **KW)


def backward_grad_wrong_shape():
    x, a, b = inputs()
    native_backward(torch.randn(5, 5), x, a, b, torch.randn(5, 3))


def backward_hidden_wrong_shape():
    x, a, b = inputs()
    native_backward(torch.randn(5, 4), x, a, b, torch.randn(2, 2))


def backward_hidden_wrong_dtype():
    # h in float64 while x, A, B, grad are float32: must be refused before the
    # elementwise pass reads grad's float32 buffer as float64 (twice its size).
    x, a, b = inputs(n=4096)
    native_backward(torch.randn(4096, 4), x, a, b, torch.randn(4096, 3, dtype=torch.float64))


def backward_grad_wrong_dtype():
    x, a, b = inputs()
    _, h, _ = _native.forward(x, a, b, dropout=0.0, seed=0, **KW)
    native_backward(torch.randn(5, 4, dtype=torch.bfloat16), x, a, b, h)


def backward_grad_on_meta():
    x, a, b = inputs()
    _, h, _ = _native.forward(x, a, b, dropout=0.0, seed=0, **KW)
    native_backward(torch.randn(5, 4, device="meta"), x, a, b, h)


def backward_meta_inputs_cpu_grad():
    x, a, b = (t.to("meta") for t in inputs())
    _, h, _ = _native.forward(x, a, b, dropout=0.0, seed=0, **KW)
    native_backward(torch.randn(5, 4), x, a, b, h)


def forward_mixed_devices_native():
    x, a, b = inputs()
    _native.forward(x, a.to("meta"), b, dropout=0.0, seed=0, **KW)


def bad_dropout_position_native():
    x, a, b = inputs()
    _native.forward(x, a, b, dropout=0.5, seed=3, dropout_position="output", **KW)


def custom_op_bad_activation():
    x, a, b = inputs()
    seed = torch.zeros((), dtype=torch.int64)
    torch.ops.cera_rs.branch_forward(x, a, b, seed, "gelu", 1.0, 0.0)


def custom_op_backward_bad_grad():
    x, a, b = inputs()
    seed = torch.zeros((), dtype=torch.int64)
    _, h, keep = torch.ops.cera_rs.branch_forward(x, a, b, seed, "silu", 1.0, 0.0)
    grad = torch.randn(5, 7)
    torch.ops.cera_rs.branch_backward(grad, x, a, b, h, keep, seed, "silu", 1.0, 0.0, [True] * 3)


def nested_matrix_spectrum():
    from cera_rs.spectral import spectrum

    spectrum(torch.nested.nested_tensor([torch.randn(3), torch.randn(4)]))


def nested_rows_streaming():
    from cera_rs.spectral import StreamingSpectrum

    StreamingSpectrum(4).update(torch.nested.nested_tensor([torch.randn(2, 4)]))


def accumulator_survives_a_failed_update():
    """Hours of accumulated rows must not be lost to one bad batch."""
    from cera_rs.spectral import StreamingSpectrum

    stream = StreamingSpectrum(4)
    stream.update(torch.ones(3, 4))
    try:
        stream.update(torch.nested.nested_tensor([torch.randn(2, 4)]))
    except Exception:
        pass
    stream.update(torch.ones(2, 4))
    assert stream.tokens_seen == 5, stream.tokens_seen


def gram_dim_overflow():
    from cera_rs.spectral import StreamingSpectrum

    StreamingSpectrum(2**31)  # dim * dim * 8 bytes overflows 64 bits


def huge_matrix_spectrum():
    from cera_rs.spectral import spectrum

    spectrum(torch.ones(1, 1).expand(2**31, 2**20))


def abort_process():
    """Not an input: kills the process, to check that the harness reports a crash."""
    import os
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
    os.abort()


CASES = {
    f.__name__: f
    for f in (
        nested_x,
        nested_x_native,
        sparse_x,
        scalar_x,
        bool_tensors,
        complex_tensors,
        quantized_x,
        huge_allocation,
        meta_tensors,
        stride_zero_x_and_grad,
        channels_last_4d,
        zero_width,
        negative_seed,
        seed_too_large,
        not_a_tensor,
        backward_grad_wrong_shape,
        backward_grad_wrong_dtype,
        backward_grad_on_meta,
        backward_meta_inputs_cpu_grad,
        forward_mixed_devices_native,
        bad_dropout_position_native,
        backward_hidden_wrong_shape,
        backward_hidden_wrong_dtype,
        custom_op_bad_activation,
        custom_op_backward_bad_grad,
        nested_matrix_spectrum,
        nested_rows_streaming,
        accumulator_survives_a_failed_update,
        gram_dim_overflow,
        huge_matrix_spectrum,
        abort_process,
    )
}


def main(names: list[str]) -> None:
    warnings.simplefilter("ignore")
    for name in names:
        for stream in (sys.stdout, sys.stderr):
            print(f"BEGIN {name}", file=stream, flush=True)
        try:
            CASES[name]()
            result = {"outcome": "ok", "type": None, "message": ""}
        except Exception as err:  # the point: every failure must be a Python exception
            result = {"outcome": "raised", "type": type(err).__name__, "message": str(err)}
        print(json.dumps({"case": name, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
