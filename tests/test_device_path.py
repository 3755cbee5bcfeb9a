"""The tensor-op path every non-CPU device takes, tested on two routes with the same
code: on CPU, forced through ``functional._TENSOR_OPS`` (runs in ``make test``), and on
CUDA (``pytest -m cuda``, run by scripts/gpu-check.sh; skipped without a GPU).

CUDA-only checks (multi-stream safety, no hidden synchronisation, kernel counts) are
marked ``cuda`` alone. The op-count budget on CPU is in test_tensor_ops.py.
"""

from __future__ import annotations

import pytest
import torch
from models import tiny_llama

from cera_rs import CeraConfig, CeraLinear, cera_delta, functional, get_cera_model
from cera_rs.spectral import StreamingSpectrum
from conftest import max_rel, plain_branch, seed_after_manual_seed

ACTIVATIONS = ["silu", "relu", "identity"]
ROUTES = [
    pytest.param("cpu", id="cpu-tensor-ops"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


@pytest.fixture(params=ROUTES)
def device(request, monkeypatch) -> torch.device:
    """The device under test; on CPU the tensor-op path is forced."""
    if request.param == "cpu":
        monkeypatch.setattr(functional, "_TENSOR_OPS", True)
    return torch.device(request.param)


def on(device, *tensors, requires_grad=True):
    return tuple(t.detach().to(device).requires_grad_(requires_grad) for t in tensors)


def run_against_plain(device, inputs, *, activation, p, scaling=0.7):
    """cera_delta on ``device`` and the plain composition in float64 on CPU, with the
    documented mask of the same seed: ``(ours, reference)`` as (y, dx, dA, dB)."""
    x, a, b = on(device, *inputs)
    seed = seed_after_manual_seed(5)
    torch.manual_seed(5)
    y = cera_delta(x, a, b, dropout=p, activation=activation, scaling=scaling)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, a, b), g.to(device, y.dtype))
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    y_ref = plain_branch(*leaves, activation=activation, scaling=scaling, p=p, seed=seed)
    return (y, *grads), (y_ref, *torch.autograd.grad(y_ref, leaves, g))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_float32_matches_plain_composition(device, make_inputs, activation, p):
    ours, ref = run_against_plain(device, make_inputs(), activation=activation, p=p)
    for name, o, r in zip(["y", "dx", "dA", "dB"], ours, ref):
        assert o.device.type == device.type and o.dtype == torch.float32, name
        # TF32 is off by default for matmuls in torch, so float32 stays float32-exact.
        assert max_rel(o.cpu(), r) < 1e-5, f"{name}: {max_rel(o.cpu(), r)}"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_half_types_match_plain_composition(device, make_inputs, dtype, tol, p):
    ours, ref = run_against_plain(device, make_inputs(dtype=dtype), activation="silu", p=p)
    for name, o, r in zip(["y", "dx", "dA", "dB"], ours, ref):
        assert o.dtype == dtype, name
        assert max_rel(o.cpu(), r) < tol, f"{name}: {max_rel(o.cpu(), r)}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(device, make_inputs, activation):
    inputs = on(device, *make_inputs(shape=(2, 5, 6), r=3, d_out=4, dtype=torch.float64))

    def fn(x, a, b):
        torch.manual_seed(3)
        return cera_delta(x, a, b, dropout=0.25, activation=activation, scaling=1.3)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_same_mask_bits_as_the_fused_cpu_loop(device, make_inputs, monkeypatch):
    """One seed, the same dropped elements on the device and in the CPU loop."""
    x, a, b = make_inputs(shape=(64, 32), r=48, requires_grad=False)
    b = torch.eye(48, dtype=x.dtype)  # delta = the masked hidden state itself
    torch.manual_seed(21)
    on_device = cera_delta(
        *on(device, x, a, b, requires_grad=False), dropout=0.4, activation="identity"
    )
    monkeypatch.setattr(functional, "_TENSOR_OPS", False)
    torch.manual_seed(21)
    on_cpu_loop = cera_delta(x, a, b, dropout=0.4, activation="identity")
    dropped = on_device.cpu() == 0
    assert 0.3 < dropped.float().mean() < 0.5
    assert torch.equal(dropped, on_cpu_loop == 0)
    torch.testing.assert_close(on_device.cpu(), on_cpu_loop)


def test_autocast(device, make_inputs):
    """Under autocast, the adapted layer trains like its plain composition does."""
    dtype = torch.bfloat16
    base = torch.nn.Linear(32, 24).to(device)
    layer = CeraLinear(base, r=8, dropout=0.0)
    torch.nn.init.normal_(layer.cera_B["default"].weight, std=0.2)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
        a, b = layer.cera_A["default"].weight, layer.cera_B["default"].weight
        expected = base(x) + torch.nn.functional.silu(x @ a.T) @ b.T
    y.float().pow(2).sum().backward()
    assert torch.isfinite(y).all() and y.device.type == device.type
    assert max_rel(y.float(), expected.float()) < 4e-2
    for weight in (a, b):
        assert weight.grad is not None and weight.grad.dtype == torch.float32
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_torch_compile_with_dropout_matches_eager(device, make_inputs):
    """The custom ops inside a compiled graph, forward and backward. Inductor on CUDA
    (its generated code asserts the custom ops' output sizes against their fake
    implementations); aot_eager on CPU, where inductor's C++ build takes most of a
    minute (test_tensor_ops.py checks the fake shapes there with opcheck). Eager RNG
    in the graph, so both draw the same seed."""
    torch._dynamo.reset()
    x, a, b = on(device, *make_inputs(shape=(16, 32)))

    def step(x, a, b):
        return cera_delta(x, a, b, dropout=0.3, scaling=0.5).pow(2).sum()

    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (step, compiled):
            torch.manual_seed(8)
            loss = fn(x, a, b)
            results.append((loss.detach(), torch.autograd.grad(loss, (x, a, b))))
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-6)


def test_tiny_llama_training_step_and_generate(device):
    config = CeraConfig(
        r=4, target_modules=["q_proj", "v_proj"], cera_dropout=0.1, task_type="CAUSAL_LM"
    )
    model = get_cera_model(tiny_llama(), config).to(device)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 9) and out.device.type == device.type


def test_streaming_spectrum_of_device_tensors(device):
    rows = torch.randn(300, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    stream = StreamingSpectrum(16, device=device)
    for chunk in rows.to(device).split(64):
        stream.update(chunk)
    assert stream.tokens_seen == 300
    expected = torch.linalg.svdvals(rows).numpy()
    got = stream.spectrum().singular_values
    assert max(abs(got - expected)) < 1e-9 * expected[0]


@pytest.mark.cuda
def test_work_queued_on_a_side_stream_is_ordered_and_never_synchronised(make_inputs):
    """Rust's tch ops run on torch's current stream: the kernel reads ``x`` only after
    the side stream has written it (a sleep delays the write), and nothing in forward
    or backward synchronises with the host (sync debug mode raises if it does)."""
    device = torch.device("cuda")
    src, a, b = on(device, *make_inputs(shape=(512, 32), r=8))
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        x = torch.zeros_like(src).requires_grad_(True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the write
            with torch.no_grad():
                x.copy_(src)
            torch.manual_seed(1)
            y = cera_delta(x, a, b, dropout=0.2)
            grads = torch.autograd.grad(y.sum(), (x, a, b))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    side.synchronize()
    torch.manual_seed(1)
    y_ref = cera_delta(src, a, b, dropout=0.2)
    grads_ref = torch.autograd.grad(y_ref.sum(), (src, a, b))
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.cuda
def test_cuda_kernel_launches_stay_within_budget(make_inputs):
    """Kernels launched per pass on CUDA: forward 2 GEMMs + 14 mask + 2 elementwise,
    backward 4 GEMMs + 4 elementwise. A GEMM may take up to 2 kernels (split-K
    reduction), hence 22 and 12."""
    from torch.profiler import ProfilerActivity, profile

    x, a, b = on(torch.device("cuda"), *make_inputs(shape=(4096, 256), r=64, d_out=256))
    cera_delta(x, a, b, dropout=0.1).sum().backward()  # warm-up: cuBLAS handles, JIT
    torch.cuda.synchronize()
    counts = []
    for backward in (False, True):
        y = cera_delta(x, a, b, dropout=0.1)
        grad = torch.ones_like(y)
        x.grad = a.grad = b.grad = None  # no accumulation kernels in the count
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            if backward:
                y.backward(grad)
            else:
                cera_delta(x, a, b, dropout=0.1)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        counts.append(len(kernels))
    assert counts[0] <= 22 and counts[1] <= 12, counts


@pytest.mark.parametrize("position", ["hidden", "input"])
def test_meta_tensors_give_shapes_through_forward_and_backward(position):
    """Meta tensors (shapes without data: a model built under ``torch.device("meta")``)
    go through the op's fake implementation, dropout included, as torch's own ops do."""
    x = torch.empty(3, 5, 16, device="meta", requires_grad=True)
    a = torch.empty(4, 16, device="meta", requires_grad=True)
    b = torch.empty(8, 4, device="meta", requires_grad=True)
    y = cera_delta(x, a, b, dropout=0.1, dropout_position=position)
    assert y.device.type == "meta" and y.shape == (3, 5, 8)
    y.sum().backward()
    assert (x.grad.shape, a.grad.shape, b.grad.shape) == (x.shape, a.shape, b.shape)
    with torch.device("meta"):
        model = get_cera_model(
            tiny_llama(0), CeraConfig(r=4, target_modules=["q_proj"], cera_dropout=0.1)
        )
    logits = model(input_ids=torch.zeros(2, 6, dtype=torch.long, device="meta")).logits
    assert logits.device.type == "meta" and logits.shape[:2] == (2, 6)
