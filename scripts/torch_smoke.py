"""The smoke set scripts/torch-matrix.sh runs in a fresh venv per supported torch, with
the wheel installed as a user would: what must hold under every torch the wheel claims.
Prints one line per check and exits non-zero at the first that fails."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def check(name: str):
    def wrap(fn):
        fn.check_name = name
        return fn

    return wrap


@check("import: the build for this torch minor")
def imports() -> str:
    import torch

    import cera_rs

    minor = ".".join(torch.__version__.split(".")[:2])
    assert f"_native_builds/torch-{minor}/" in cera_rs._native.__file__, cera_rs._native.__file__
    return cera_rs._native.TORCH_VERSION


@check("gradcheck of cera_delta in float64")
def gradcheck() -> str:
    import torch

    from cera_rs import cera_delta

    gen = torch.Generator().manual_seed(0)
    x, a, b = (
        torch.randn(*s, dtype=torch.float64, generator=gen, requires_grad=True)
        for s in ((6, 5), (3, 5), (4, 3))
    )
    for activation in ("silu", "relu", "identity"):

        def fn(x, a, b, activation=activation):
            return cera_delta(x, a, b, activation=activation)

        assert torch.autograd.gradcheck(fn, (x, a, b)), activation
        expected = {"silu": torch.nn.functional.silu, "relu": torch.relu, "identity": lambda t: t}[
            activation
        ]
        torch.testing.assert_close(fn(x, a, b), expected(x @ a.T) @ b.T)
    return "silu, relu, identity"


@check("README quick start, as written (save, PeftModel.from_pretrained, load_adapter)")
def quick_start() -> str:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    with tempfile.TemporaryDirectory() as folder:
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=600
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "step 2: loss" in run.stdout, run.stdout
        # and a process that never imports cera_rs loads the adapter through PEFT alone
        load = (
            "import sys\nfrom peft import PeftConfig\n"
            "config = PeftConfig.from_pretrained('cera-adapter')\n"
            "print(type(config).__name__)"
        )
        run = subprocess.run(
            [sys.executable, "-c", load], cwd=folder, capture_output=True, text=True, timeout=300
        )
        assert run.stdout.strip() == "CeraConfig", run.stderr[-3000:]
    return "ok"


@check("a training step under torch.autocast bfloat16")
def autocast_step() -> str:
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from cera_rs import CeraConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    model = get_peft_model(
        LlamaForCausalLM(config), CeraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "cera_A" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    return " -> ".join(f"{x:.3f}" for x in losses)


@check("cera-rs --version names the torch it runs with")
def version() -> str:
    import torch

    cli = Path(sys.executable).with_name("cera-rs")
    out = subprocess.run([str(cli), "--version"], capture_output=True, text=True).stdout
    assert f"torch {torch.__version__}" in out, out
    return out.strip()


def main() -> int:
    for fn in (imports, gradcheck, quick_start, autocast_step, version):
        try:
            detail = fn()
        except Exception as err:  # one line per check, then stop
            print(f"FAIL {fn.check_name}: {type(err).__name__}: {err}")
            return 1
        print(f"ok   {fn.check_name}: {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
