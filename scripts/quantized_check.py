"""CeRA (and PEFT LoRA, the control) on quantized base layers, one backend at a time, on CPU.

Not part of `make test`: the backends are not in the dev extra. Install them apart
(they leave the venv's torch alone with --no-deps) and run:

    pip install --target /tmp/qpkgs --no-deps hqq==0.2.8.post1 torchao==0.18.0 \
        bitsandbytes==0.50.2 optimum-quanto==0.2.7 termcolor einops ninja
    PYTHONPATH=/tmp/qpkgs .venv/bin/python scripts/quantized_check.py

For each backend: a two-layer MLP's Linear layers are quantized, the adapter is added
with get_peft_model, three training steps run (only adapter weights may change, the
loss must fall), the adapter is saved, and loaded into a freshly quantized copy, whose
outputs must equal the trained model's. One line per backend and method.
"""

from __future__ import annotations

import sys
import tempfile
import traceback

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import cera_rs
from cera_rs import CeraConfig

TARGETS = ["lin0", "lin1"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.head = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def torchao(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name in TARGETS)
    return model


def hqq(model: nn.Module) -> nn.Module:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=4, group_size=16)
    for name in TARGETS:
        layer = HQQLinear(
            getattr(model, name), quant_config=config, compute_dtype=torch.float32, device="cpu"
        )
        setattr(model, name, layer)
    return model


def bnb_4bit(model: nn.Module) -> nn.Module:
    import bitsandbytes as bnb

    for name in TARGETS:
        old = getattr(model, name)
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(
            old.weight.data.clone(), requires_grad=False, quant_type="nf4"
        )
        layer.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        setattr(model, name, layer.to("cpu"))
    return model


def bnb_8bit(model: nn.Module) -> nn.Module:
    import bitsandbytes as bnb

    for name in TARGETS:
        old = getattr(model, name)
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(
            old.weight.data.clone(), requires_grad=False, has_fp16_weights=False
        )
        layer.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        setattr(model, name, layer.to("cpu"))
    return model


def quanto(model: nn.Module) -> nn.Module:
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8, exclude=["head"])
    freeze(model)
    return model


BACKENDS = {
    "torchao int8 weight-only": torchao,
    "HQQ 4-bit": hqq,
    "bitsandbytes 4-bit": bnb_4bit,
    "bitsandbytes 8-bit": bnb_8bit,
    "optimum-quanto int8": quanto,
}


def quantized(quantize) -> nn.Module:
    torch.manual_seed(0)
    return quantize(MLP()).eval()


def check(quantize, config) -> str:
    model = get_peft_model(quantized(quantize), config)
    kinds = sorted(
        {
            type(m.base_layer).__name__
            for n, m in model.named_modules()
            if n.endswith(tuple(TARGETS)) and hasattr(m, "base_layer")
        }
    )
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 64, generator=gen), torch.randn(32, 8, generator=gen)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # quantized weights are tensor subclasses (torchao, quanto) without torch.equal: the
    # plain float parameters are compared, and the quantized ones must not require grad
    plain = {
        n: p
        for n, p in model.named_parameters()
        if type(p.data) is torch.Tensor and p.dtype.is_floating_point
    }
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in plain)
    before = {n: p.detach().clone() for n, p in plain.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = {
        n
        for n, p in model.named_parameters()
        if n in before and not torch.equal(p.detach(), before[n])
    }
    assert changed == trainable and trainable, f"changed {sorted(changed - trainable)}"
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(quantized(quantize), folder).eval()
        with torch.no_grad():
            got = loaded(x)
    assert torch.equal(got, expected), f"reloaded differs by {(got - expected).abs().max()}"
    return f"ok: wraps {', '.join(kinds)}; loss {losses[0]:.4f} -> {losses[-1]:.4f}; reload exact"


def main() -> int:
    print(f"torch {torch.__version__}, cera_rs {cera_rs.__version__}")
    failures = 0
    for name, quantize in BACKENDS.items():
        configs = (
            ("CeRA", CeraConfig(r=8, target_modules=TARGETS, init_weights=False)),
            ("LoRA", LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False)),
        )
        for method, config in configs:
            try:
                result = check(quantize, config)
            except Exception as err:  # report and go on: one line per backend and method
                failures += method == "CeRA"
                last = traceback.extract_tb(err.__traceback__)[-1]
                where = f"{last.filename}:{last.lineno}"
                result = f"FAILED: {type(err).__name__}: {str(err)[:200]} ({where})"
            print(f"{name:26s} {method}: {result}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
