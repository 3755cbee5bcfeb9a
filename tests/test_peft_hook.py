"""Loading a CeRA adapter without `import cera_rs`: the .pth hook the package installs
(python/cera_rs.data/purelib/) registers CeRA when a process imports peft, and does
nothing in a process that imports neither torch nor peft. Each case runs in a fresh
interpreter of the venv the package is installed in, as a serving script would."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from models import tiny_llama
from peft import get_peft_model

from cera_rs import CeraConfig

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))


def python(code: str, cwd) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base model folder, a trained-looking CeRA adapter on it, and its logits."""
    root = tmp_path_factory.mktemp("hook")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    base.name_or_path = str(root / "base")
    model = get_peft_model(base, CeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "cera_B" in name:
                param.normal_(0, 0.5)  # B starts at zero: make the adapter matter
        expected = model.eval()(input_ids=IDS).logits
    model.save_pretrained(root / "adapter")
    torch.save({"ids": IDS, "expected": expected}, root / "expected.pt")
    return root


def test_a_process_that_imports_neither_gets_neither(tmp_path):
    code = (
        "import sys, json\n"
        "print('_cera_rs_peft_hook' in sys.modules)\n"
        "print(sorted(m for m in ('torch', 'peft', 'cera_rs') if m in sys.modules))"
    )
    # the hook is installed and loaded, and has imported nothing heavy
    assert python(code, tmp_path).splitlines() == ["True", "[]"]


@pytest.mark.parametrize(
    "load",
    [
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "base = AutoModelForCausalLM.from_pretrained('base')\n"
        "model = PeftModel.from_pretrained(base, 'adapter')\n",
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained('adapter')\n",
    ],
    ids=["PeftModel.from_pretrained", "AutoModelForCausalLM.from_pretrained(adapter_dir)"],
)
def test_cera_adapter_loads_without_importing_cera_rs(saved, load):
    code = (
        "import sys, torch\n" + load + "data = torch.load('expected.pt')\n"
        "with torch.no_grad():\n"
        "    got = model.eval()(input_ids=data['ids']).logits\n"
        "torch.testing.assert_close(got, data['expected'])\n"
        "kinds = {type(m).__name__ for m in model.modules()}\n"
        "print('CeraLinear' in kinds, 'cera_rs' in sys.modules)"
    )
    assert python(code, saved).split() == ["True", "True"]
