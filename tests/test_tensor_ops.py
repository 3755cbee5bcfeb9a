"""The tensor-op path (CUDA's and every non-CPU device's), forced on CPU with
``_native``'s ``tensor_ops=True``: the same numbers and mask bits as the fused CPU
loops, and few tensor ops per pass, counted with torch.profiler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from cera_rs import _native, functional
from conftest import mask_keep, max_rel

ACTIVATIONS = ["silu", "relu", "identity"]
# Per dtype: the tolerance between the two paths. Half types round once in the fused
# loop and after each tensor op (as the plain composition does) on the other path.
DTYPES = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}
# Ops that only make views or read metadata: no kernel, no memory traffic.
VIEWS = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::t",
    "aten::transpose",
    "aten::as_strided",
    "aten::alias",
    "aten::_unsafe_view",
    "aten::expand",
}


def inputs(dtype, n=300, d_in=40, r=24, d_out=32):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    a = 0.3 * torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    b = 0.3 * torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    g = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, a, b, g))


def both_paths(x, a, b, g, *, tensor_ops, **config):
    y, h, keep = _native.forward(x, a, b, **config, tensor_ops=tensor_ops)
    grads = _native.backward(
        g,
        x,
        a,
        b,
        h,
        **config,
        needs_x=True,
        needs_a=True,
        needs_b=True,
        keep=keep,
        tensor_ops=tensor_ops,
    )
    return (y, *grads), keep


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tensor_ops_match_the_fused_loops(dtype, activation, p):
    x, a, b, g = inputs(dtype)
    config = {"activation": activation, "scaling": 0.7, "dropout": p, "seed": 2**40 + 17}
    loops, no_keep = both_paths(x, a, b, g, tensor_ops=False, **config)
    ops, keep = both_paths(x, a, b, g, tensor_ops=True, **config)
    assert no_keep is None
    if p == 0:
        assert keep is None
    else:
        # the documented hash, bit for bit
        assert keep.dtype == torch.bool and keep.shape == (300, 24)
        assert np.array_equal(keep.flatten().numpy(), mask_keep(config["seed"], keep.numel(), p))
    for name, o, f in zip(["y", "dx", "dA", "dB"], ops, loops):
        assert o.dtype == dtype and o.shape == f.shape, name
        assert max_rel(o, f) < DTYPES[dtype], f"{name}: {max_rel(o, f)}"


def test_backward_without_the_kept_mask_builds_the_same_one():
    x, a, b, g = inputs(torch.float32)
    config = {"activation": "silu", "scaling": 1.0, "dropout": 0.5, "seed": 99}
    y, h, keep = _native.forward(x, a, b, **config, tensor_ops=True)
    needs = {"needs_x": True, "needs_a": True, "needs_b": True}
    kept = _native.backward(g, x, a, b, h, **config, **needs, keep=keep, tensor_ops=True)
    rebuilt = _native.backward(g, x, a, b, h, **config, **needs, tensor_ops=True)
    for k, r in zip(kept, rebuilt):
        assert torch.equal(k, r)
    with pytest.raises(TypeError, match="mask"):
        _native.backward(g, x, a, b, h, **config, **needs, keep=keep.float())
    with pytest.raises(ValueError, match="mask"):
        _native.backward(g, x, a, b, h, **config, **needs, keep=keep[:10])


@pytest.mark.parametrize("tensor_ops", [False, True])
def test_custom_ops_fake_implementations_match_the_kernel(monkeypatch, tensor_ops):
    """torch.compile plans with the fake implementations: their shapes (the mask's, kept
    only on the tensor-op path) must be the kernel's."""
    monkeypatch.setattr(functional, "_TENSOR_OPS", tensor_ops)
    x, a, b, g = inputs(torch.float32, n=16)
    seed = torch.tensor(7)
    config = ("silu", 1.0, 0.3)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(functional._branch_forward, (x, a, b, seed, *config), test_utils=checks)
    _, h, keep = functional._branch_forward(x, a, b, seed, *config)
    assert keep.shape == ((16, 24) if tensor_ops else (0,))
    args = (g, x, a, b, h, keep, seed, *config, [True, True, True])
    torch.library.opcheck(functional._branch_backward, args, test_utils=checks)


def aten_ops(fn) -> Counter:
    """The aten ops ``fn`` launches itself (not those they call inside), by name."""
    with profile(activities=[ProfilerActivity.CPU], acc_events=True) as prof:
        fn()

    def launched_by_caller(e) -> bool:
        return e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")

    return Counter(
        e.name for e in prof.events() if e.name.startswith("aten::") and launched_by_caller(e)
    )


def compute_ops(counts: Counter) -> Counter:
    return Counter({name: n for name, n in counts.items() if name not in VIEWS})


def test_op_count_budget_of_each_pass():
    """Tensor ops the Rust kernel launches per pass (ops from Rust go through
    libtorch's dispatcher, so the profiler records them as aten:: ops: the mask's
    bitwise ops showing up below proves it). Budget, with dropout on:

    - forward 18: 2 GEMMs; the mask, built once (arange, 3 xorshifts of which the
      first needs no mask since indices are non-negative: 2 + 3 + 3 ops, the key xor,
      2 multiplies, the sign flip for the unsigned comparison, the comparison: 14);
      the activation and one masked scale (torch's fused dropout backward): 2;
    - backward 8: 4 GEMMs (gB, dB, dA, dx); the activation, the masked scale of act(h)
      and of gB, and the activation's own backward (silu_backward): 4. The mask is
      the one forward kept, 1 byte an element, instead of 14 ops over 4-byte ints.

    Before this budget the path took 57 ops forward and 69 backward in bfloat16
    (counted from that code: the mask built twice from 49 int64 ops, float32
    conversions around every pass, SiLU's slope from 6 ops)."""
    x, a, b, g = inputs(torch.bfloat16, n=64)
    config = {"activation": "silu", "scaling": 1.0, "dropout": 0.1, "seed": 5}
    _native.forward(x, a, b, **config, tensor_ops=True)  # lazy initialisations
    out = {}

    def run_forward():
        out["y"], out["h"], out["keep"] = _native.forward(x, a, b, **config, tensor_ops=True)

    forward = aten_ops(run_forward)
    needs = {"needs_x": True, "needs_a": True, "needs_b": True}
    backward = aten_ops(
        lambda: _native.backward(
            g, x, a, b, out["h"], **config, **needs, keep=out["keep"], tensor_ops=True
        )
    )
    assert forward["aten::bitwise_xor_"] >= 3 and forward["aten::mm"] == 2, forward
    assert "aten::bitwise_xor_" not in backward, "backward rebuilt the mask"
    fwd, bwd = compute_ops(forward), compute_ops(backward)
    assert sum(fwd.values()) <= 18, fwd
    assert sum(bwd.values()) <= 8, bwd
    assert backward["aten::mm"] == 4, backward
    # the views around them (reshape, transpose) are bounded too
    assert sum(forward.values()) <= 24 and sum(backward.values()) <= 14, (forward, backward)


def test_no_dropout_and_inference_take_the_fewest_ops():
    """Without dropout: GEMMs and the activation alone (scaling 1 costs no op)."""
    x, a, b, _ = inputs(torch.float32)
    delta = compute_ops(
        aten_ops(lambda: _native.delta(x, a, b, activation="silu", scaling=1.0, tensor_ops=True))
    )
    assert delta == Counter({"aten::mm": 2, "aten::silu": 1}), delta
