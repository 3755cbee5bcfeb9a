"""Atheris fuzz target: loading adapter folders and reference checkpoints.

An input is one mode byte, then bytes for the files that mode fuzzes (the other
files are valid ones, from a fixed tiny model):

- 0: ``adapter_config.json`` (valid weights) -> ``PeftModel.from_pretrained``
- 1: ``adapter_model.safetensors`` (valid config) -> ``PeftModel.from_pretrained``
- 2: both, split at the first ``SPLIT`` -> ``PeftModel.from_pretrained``
- 3: a reference checkpoint ``.safetensors`` -> ``load_reference_checkpoint``
- 4: the valid config with fields set to values of any JSON type (built from the
  bytes with ``FuzzedDataProvider``: byte-level mutation rarely keeps JSON valid)

Loading may fail only with a "clean" exception: ValueError (malformed or inconsistent
content: bad JSON, bad UTF-8, a broken safetensors header, shapes or ranks that do not
fit), TypeError (a config field of the wrong type) or FileNotFoundError. Any other
exception (KeyError, AttributeError, RuntimeError, ...), a native crash or a hang is a
finding. A successful load must give a model whose forward pass runs.

``PeftModel.from_pretrained`` first reads ``peft_type`` from the JSON itself
(``PeftConfig._get_peft_type``, PEFT's code, which raises KeyError or RecursionError on
some malformed files) and, for ``"CERA"``, calls ``CeraConfig.from_pretrained``; the
target makes that call itself and passes the config on, so the fuzzing covers CeRA's
checks and the rest of PEFT's load, not PEFT's own dispatch.

Run: ``python fuzz/fuzz_adapter.py -runs=2000 -seed=1 NEW_DIR fuzz/corpus`` (libFuzzer
flags; it writes new inputs to the first folder, so keep fuzz/corpus second).
``python fuzz/fuzz_adapter.py --make-corpus`` rewrites the hand-made seeds; the
``found-*`` entries of fuzz/corpus are inputs earlier runs discovered (kept so a run
starts from their coverage; add new ones by copying from NEW_DIR).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import atheris
from peft import PeftModel

with atheris.instrument_imports(include=["cera_rs", "peft.config"]):
    import torch
    from safetensors.torch import save
    from torch import nn

    from cera_rs import CeraConfig, get_cera_model, load_reference_checkpoint

ALLOWED = (ValueError, TypeError, FileNotFoundError)
SPLIT = b"\n--weights--\n"
CORPUS = Path(__file__).parent / "corpus"


class Tiny(nn.Module):
    """Two attention-like projections: what CeRA adapts, at fuzzing speed."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.relu(self.q_proj(x)))


def valid_files() -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a saved r=2 adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = get_cera_model(Tiny(), CeraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        model.save_pretrained(tmp)
        return (
            (Path(tmp) / "adapter_config.json").read_bytes(),
            (Path(tmp) / "adapter_model.safetensors").read_bytes(),
        )


def reference_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        f"{name}.cera.{part}.weight": torch.randn(shape, generator=gen)
        for name in ("q_proj", "v_proj")
        for part, shape in (("A", (2, 8)), ("B", (8, 2)))
    }


VALID_CONFIG, VALID_WEIGHTS = valid_files()
WORK = Path(tempfile.mkdtemp(prefix="cera-fuzz-"))
X = torch.randn(3, 8)


def load_adapter(config: bytes, weights: bytes) -> None:
    (WORK / "adapter_config.json").write_bytes(config)
    (WORK / "adapter_model.safetensors").write_bytes(weights)
    model = PeftModel.from_pretrained(Tiny(), WORK, config=CeraConfig.from_pretrained(WORK))
    with torch.no_grad():
        model(X)


def load_reference(data: bytes) -> None:
    path = WORK / "reference.safetensors"
    path.write_bytes(data)
    model = get_cera_model(Tiny(), CeraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    load_reference_checkpoint(model, path)
    with torch.no_grad():
        model(X)


TOKENS = [
    "q_proj",
    "v_proj",
    "all-linear",
    "CERA",
    "LORA",
    "silu",
    "relu",
    "identity",
    "none",
    "all",
    "cera_only",
    "CAUSAL_LM",
    "((",
    ".*",
    "",
    "layers",
    "default",
]


def fuzz_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    kind = fdp.ConsumeIntInRange(0, 8 if depth < 2 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-3, 70) if fdp.ConsumeBool() else fdp.ConsumeInt(8)
    if kind == 3:
        return fdp.ConsumeFloat()  # NaN, infinities and extremes included
    if kind == 4:
        return fdp.ConsumeUnicodeNoSurrogates(12)
    if kind == 5:
        return fdp.PickValueInList(TOKENS)
    if kind in (6, 7):
        return [fuzz_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    return {
        fdp.PickValueInList(TOKENS): fuzz_value(fdp, depth + 1)
        for _ in range(fdp.ConsumeIntInRange(0, 3))
    }


def structured_config(body: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(body)
    config = json.loads(VALID_CONFIG)
    fields = sorted(config) + ["layers_pattern", "unknown_field"]
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        key = fdp.PickValueInList(fields)
        if fdp.ConsumeIntInRange(0, 5) == 0:
            config.pop(key, None)
        else:
            config[key] = fuzz_value(fdp)
    return json.dumps(config).encode()


def fuzz_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 5, data[1:]
    try:
        if mode == 0:
            load_adapter(body, VALID_WEIGHTS)
        elif mode == 1:
            load_adapter(VALID_CONFIG, body)
        elif mode == 2:
            config, _, weights = body.partition(SPLIT)
            load_adapter(config, weights)
        elif mode == 3:
            load_reference(body)
        else:
            load_adapter(structured_config(body), VALID_WEIGHTS)
    except ALLOWED:
        pass


def make_corpus() -> None:
    """Valid inputs for each mode plus a few near misses."""
    config = json.loads(VALID_CONFIG)
    reference = save(reference_state())
    seeds = {
        "config_valid": b"\x00" + VALID_CONFIG,
        "config_rank3": b"\x00" + json.dumps({**config, "r": 3}).encode(),
        "config_relu_list_targets": b"\x00"
        + json.dumps({**config, "activation": "relu", "target_modules": ["v_proj"]}).encode(),
        "config_minimal": b"\x00" + json.dumps({"peft_type": "CERA", "r": 2}).encode(),
        "weights_valid": b"\x01" + VALID_WEIGHTS,
        "weights_truncated": b"\x01" + VALID_WEIGHTS[: len(VALID_WEIGHTS) // 2],
        "both_valid": b"\x02" + VALID_CONFIG + SPLIT + VALID_WEIGHTS,
        "reference_valid": b"\x03" + reference,
        "structured_config": b"\x04" + bytes(range(64)),
    }
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (CORPUS / name).write_bytes(data)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if sys.argv[1:] == ["--make-corpus"]:
        make_corpus()
    else:
        torch.set_num_threads(1)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        atheris.Setup(sys.argv, fuzz_one_input)
        atheris.Fuzz()
