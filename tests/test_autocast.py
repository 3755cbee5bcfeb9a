"""Mixed precision: the CeRA branch follows torch.autocast as PEFT LoRA's
``lora_B(lora_A(x))`` does (GEMMs in the autocast dtype, float32 master weights with
float32 gradients), eagerly and under torch.compile, and autocast training through
transformers' Trainer and accelerate matches float32 training within bf16 precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import tiny_llama
from torch import nn

from cera_rs import CeraConfig, CeraLinear, cera_delta
from cera_rs.functional import autocast_dtype
from conftest import dropped, max_rel, seed_after_manual_seed

LOW = [torch.bfloat16, torch.float16]
ACT = {"silu": F.silu, "relu": torch.relu, "identity": lambda t: t}


def lora_shaped(x, a, b, *, activation="silu", p=0.0, seed=0, scaling=1.0, position="hidden"):
    """The branch as PEFT LoRA composes its own: two F.linear calls (which autocast
    casts), the activation between them, the kernel's dropout mask on the hidden
    vector or (as LoRA's lora_dropout) on the input."""
    if p > 0 and position == "input":
        x = dropped(x, p, seed)
    out = ACT[activation](F.linear(x, a))
    if p > 0 and position == "hidden":
        out = dropped(out, p, seed)
    return scaling * F.linear(out, b)


def run(fn, x, a, b, device_type, dtype, **kwargs):
    """Output and (dx, dA, dB) of ``fn`` under autocast (off for ``dtype=None``);
    backward outside the region."""
    seed = seed_after_manual_seed(5)
    torch.manual_seed(5)
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        y = fn(x, a, b, **kwargs) if fn is cera_delta else fn(x, a, b, seed=seed, **kwargs)
    g = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    grads = torch.autograd.grad((y.float() * g).sum(), (x, a, b))
    return y, grads


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "activation, p, position",
    [
        ("silu", 0.0, "hidden"),
        ("silu", 0.2, "hidden"),
        ("silu", 0.2, "input"),
        ("relu", 0.0, "hidden"),
    ],
)
def test_matches_lora_shaped_composition_under_cpu_autocast(
    make_inputs, dtype, activation, p, position
):
    x, a, b = make_inputs()
    kwargs = {"activation": activation, "scaling": 0.5}
    y, grads = run(
        cera_delta, x, a, b, "cpu", dtype, dropout=p, dropout_position=position, **kwargs
    )
    y_ref, grads_ref = run(lora_shaped, x, a, b, "cpu", dtype, p=p, position=position, **kwargs)
    assert y.dtype == y_ref.dtype == dtype
    # The kernel's activation runs in float32, LoRA's composition in the low dtype:
    # they differ by a rounding or two of that dtype.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert max_rel(y, y_ref) < tol
    for g, g_ref, leaf in zip(grads, grads_ref, (x, a, b)):
        assert g.dtype == g_ref.dtype == leaf.dtype == torch.float32
        assert max_rel(g, g_ref) < tol
    # And both sit within the low dtype's precision of the float32 branch (ReLU's
    # gradient flips where h rounds across zero, for LoRA's composition as for CeRA).
    y32, grads32 = run(
        cera_delta, x, a, b, "cpu", None, dropout=p, dropout_position=position, **kwargs
    )
    assert max_rel(y, y32) < tol
    if activation != "relu":
        assert all(max_rel(g, g32) < tol for g, g32 in zip(grads, grads32))


def test_backward_inside_the_autocast_region_and_no_grad_path(make_inputs):
    x, a, b = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cera_delta(x, a, b)
        y.float().sum().backward()
        with torch.no_grad():
            y_nograd = cera_delta(x, a, b, training=False)
    assert a.grad.dtype == b.grad.dtype == x.grad.dtype == torch.float32
    assert y_nograd.dtype == torch.bfloat16
    torch.testing.assert_close(y_nograd, y.detach(), rtol=0, atol=0)


def test_autocast_leaves_float64_and_disabled_regions_alone(make_inputs):
    x, a, b = make_inputs(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cera_delta(x, a, b).dtype == F.linear(x, a).dtype == torch.float64
        assert autocast_dtype(x.device) == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype(x.device) is None
            assert cera_delta(x.float(), a.float(), b.float()).dtype == torch.float32
    assert autocast_dtype(torch.device("meta")) is None


def _cera_and_lora_shaped(dropout=0.0):
    torch.manual_seed(0)
    layer = CeraLinear(nn.Linear(32, 24), r=6, dropout=dropout)
    nn.init.normal_(layer.cera_B["default"].weight, std=0.2)
    a, b = layer.cera_A["default"], layer.cera_B["default"]

    def plain(x):  # PEFT LoRA's forward shape, with CeRA's activation between A and B
        result = layer.base_layer(x)
        return result + b(F.silu(a(x.to(a.weight.dtype)))).to(result.dtype)

    return layer, plain


@pytest.mark.parametrize("dtype", LOW)
def test_cera_linear_against_lora_shaped_layer_under_autocast(dtype):
    layer, plain = _cera_and_lora_shaped()
    x = torch.randn(4, 5, 32)
    outputs = []
    for fn in (layer, plain):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            y = fn(x)
        y.float().pow(2).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.requires_grad]
        outputs.append((y, grads))
    (y, grads), (y_ref, grads_ref) = outputs
    assert y.dtype == y_ref.dtype == dtype
    assert max_rel(y, y_ref) < 2e-2
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32
        assert max_rel(g, g_ref) < 3e-2


def test_torch_compile_under_autocast_matches_eager():
    # aot_eager traces what inductor would compile (Dynamo + AOTAutograd, the autocast
    # regions included) in a tenth of the time; test_training runs inductor itself.
    torch._dynamo.reset()
    layer, _ = _cera_and_lora_shaped()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 32, requires_grad=True)
    results = []
    for fn in (layer, compiled):
        layer.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        y.float().pow(2).sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        results.append((y.detach(), [g.clone() for g in grads]))
    (y, grads), (y_c, grads_c) = results
    assert y_c.dtype == y.dtype == torch.bfloat16
    torch.testing.assert_close(y_c, y, rtol=0, atol=0)
    for g, g_c in zip(grads, grads_c):
        assert g_c.dtype == torch.float32
        torch.testing.assert_close(g_c, g, rtol=0, atol=0)


# --- a tiny Llama trained with autocast against float32 training ---------------------


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 12) -> None:
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def cera_llama():
    from peft import get_peft_model

    config = CeraConfig(r=4, target_modules=["q_proj", "v_proj"], cera_dropout=0.1)
    return get_peft_model(tiny_llama(), config)


class Recorder:
    """Per step: every trainable gradient (before the optimizer step), and the dtype
    the first CeRA layer's output had in forward."""

    def __init__(self, model: nn.Module) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.out_dtypes: list[torch.dtype] = []
        layer = next(m for m in model.modules() if isinstance(m, CeraLinear))
        layer.register_forward_hook(lambda m, i, out: self.out_dtypes.append(out.dtype))
        self.model = model

    def record(self) -> None:
        self.grads.append(
            {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}
        )


def assert_matches_fp32(losses, rec, losses32, rec32):
    """Losses within bf16 precision at every step; the first step's gradients (same
    weights in both runs) too, and every gradient float32."""
    assert len(losses) == len(losses32) >= 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses32), rtol=2e-2, atol=0)
    assert rec.out_dtypes[0] == torch.bfloat16 and rec32.out_dtypes[0] == torch.float32
    first, first32 = rec.grads[0], rec32.grads[0]
    assert first.keys() == first32.keys() and len(first) == 8
    for name, g in first.items():
        assert g.dtype == torch.float32, name
        if ".cera_B." in name:  # B starts at zero, so A's first gradient is zero
            assert max_rel(g, first32[name]) < 3e-2, name
        else:
            assert torch.all(g == 0) and torch.all(first32[name] == 0), name


def train_with_trainer(tmp_path, bf16: bool):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = cera_llama()
    rec = Recorder(model)

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            rec.record()

    args = TrainingArguments(
        output_dir=str(tmp_path / f"bf16-{bf16}"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        bf16=bf16,
        use_cpu=True,
        logging_steps=1,
        seed=7,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[Grads()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, rec


def test_trainer_bf16_matches_fp32_training(tmp_path):
    losses, rec = train_with_trainer(tmp_path, bf16=True)
    losses32, rec32 = train_with_trainer(tmp_path, bf16=False)
    assert_matches_fp32(losses, rec, losses32, rec32)


def train_with_accelerate(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    torch.manual_seed(0)
    model = cera_llama()
    model.train()
    rec = Recorder(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = TokenData().ids
    losses = []
    torch.manual_seed(1)
    for step in range(4):
        batch = ids[(step % 2) * 4 : (step % 2) * 4 + 4]
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        rec.record()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    AcceleratorState._reset_state(reset_partial_state=True)
    return losses, rec


def test_accelerate_bf16_matches_fp32_training():
    losses, rec = train_with_accelerate("bf16")
    losses32, rec32 = train_with_accelerate("no")
    assert_matches_fp32(losses, rec, losses32, rec32)


# --- CUDA ------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", LOW)
def test_cuda_autocast_matches_lora_shaped_composition(make_inputs, dtype):
    x, a, b = (t.detach().cuda().requires_grad_() for t in make_inputs())
    y, grads = run(cera_delta, x, a, b, "cuda", dtype, activation="silu")
    y_ref, grads_ref = run(lora_shaped, x, a, b, "cuda", dtype, activation="silu")
    assert y.dtype == y_ref.dtype == dtype and y.device.type == "cuda"
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert max_rel(y, y_ref) < tol
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32
        assert max_rel(g, g_ref) < tol
    layer, _ = _cera_and_lora_shaped(dropout=0.1)
    layer.cuda()
    with torch.autocast("cuda", dtype=dtype):
        out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x[..., :32])
    out.float().sum().backward()
    assert out.dtype == dtype and layer.cera_A["default"].weight.grad.dtype == torch.float32
