"""``cera-rs export-lora``: a saved CeRA adapter folder plus a file of token ids in,
a PEFT LoRA adapter folder out. The base model comes from the adapter config's
``base_model_name_or_path`` (or ``base=``), a local folder: nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.utils.constants import CONFIG_NAME
from torch import Tensor

from cera_rs.atomic import check_folder_writable
from cera_rs.export.lora import LoraExport, check_target, save_lora, to_lora

TOKEN_FORMATS = (".npy", ".pt", ".txt")


def load_token_ids(path: str | os.PathLike, seq_len: int) -> list[Tensor]:
    """Sequences of token ids from ``path``: ``.npy`` / ``.pt`` (an integer array,
    2-D one sequence per row, or 1-D a stream cut into ``seq_len`` pieces) or
    ``.txt`` (one sequence per line, ids separated by spaces). Whatever is wrong with
    the file (not there, unreadable, not integers) is a ValueError or an OSError that
    names it."""
    path = Path(path)
    if path.suffix not in TOKEN_FORMATS:
        raise ValueError(f"{path}: token ids must be one of {TOKEN_FORMATS}, got {path.suffix!r}")
    if not path.exists():
        raise FileNotFoundError(f"token id file {path} does not exist")
    if not path.is_file():
        raise IsADirectoryError(f"token id file {path} is a folder")
    if path.suffix == ".txt":
        try:
            lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
            return [torch.tensor([int(t) for t in line], dtype=torch.long) for line in lines]
        except (ValueError, OverflowError) as err:  # UnicodeDecodeError is a ValueError
            raise ValueError(f"{path}: every token id must be an integer ({err})") from None
    ids = _read_array(path)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{path}: token ids must be integers, got {ids.dtype}")
    if ids.dim() == 1:
        return list(ids.long().split(seq_len))
    if ids.dim() == 2:
        return list(ids.long())
    raise ValueError(f"{path}: token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")


def _read_array(path: Path) -> Tensor:
    """The array in a ``.npy`` (no pickles) or ``.pt`` (``weights_only``) file; each
    reader's own errors (a text file, a truncated one, a dict) become one ValueError
    that names the file."""
    reader = "torch.load" if path.suffix == ".pt" else "numpy.load"
    try:
        data = torch.load(path, weights_only=True) if path.suffix == ".pt" else np.load(path)
        return torch.as_tensor(data)
    except Exception as err:  # pickle, zip, numpy and torch each raise their own kinds
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path} is not an array of token ids {reader} can read: {first}"
        ) from None


def check_token_range(sequences: list[Tensor], vocab_size: int) -> None:
    """Some tokens, every id in ``[0, vocab_size)``."""
    sequences = [s for s in sequences if len(s)]
    if not sequences:
        raise ValueError("the token id file holds no tokens")
    low = min(int(s.min()) for s in sequences)
    high = max(int(s.max()) for s in sequences)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}) for this model, "
                         f"got ids from {low} to {high}")  # fmt: skip


def batches_of(
    sequences: list[Tensor], batch_size: int, vocab_size: int
) -> list[dict[str, Tensor]]:
    """Right-padded batches with an ``attention_mask`` that drops the padding."""
    sequences = [s for s in sequences if len(s)]
    check_token_range(sequences, vocab_size)
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, s in enumerate(chunk):
            ids[row, : len(s)], mask[row, : len(s)] = s, 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _base_source(adapter_dir: Path, base: str | os.PathLike | None) -> tuple[Path, Any]:
    """The base model's folder and the auto class that loads it, checked without
    loading anything."""
    from transformers import AutoModel, AutoModelForCausalLM

    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter folder: {CONFIG_NAME} is missing")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a {type(config).__name__}, not a JSON object")
    base = base if base is not None else config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(
            f"the base model {base!r} of {config_path} is not a local folder; pass its folder "
            "with --base (nothing is downloaded)"
        )
    auto = AutoModelForCausalLM if config.get("task_type") in (None, "CAUSAL_LM") else AutoModel
    return Path(base), auto


def _vocab_size(base: Path) -> int | None:
    """The base model's vocabulary size from its config alone (None if it names none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, local_files_only=True).get_text_config()
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def _base_model(base: Path, auto: Any) -> Any:
    return auto.from_pretrained(base, local_files_only=True)


def export_adapter_dir(
    adapter_dir: str | os.PathLike, data: str | os.PathLike, out_dir: str | os.PathLike,
    rank: int | None = None, energy: float | None = None, ridge: float = 0.0,
    bias: bool = False, base: str | os.PathLike | None = None, batch_size: int = 8,
    seq_len: int = 512, held_out: str | os.PathLike | None = None, progress: bool = True,
) -> LoraExport:  # fmt: skip
    """Loads the CeRA adapter in ``adapter_dir`` onto its base model, fits the LoRA
    on the token ids in ``data`` (``to_lora``; ``held_out``, another token id file,
    measures the linearity on its tokens too) and saves it to ``out_dir``."""
    check_target(rank, energy)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_folder_writable(out_dir, parents=False)  # before the fit; a mistyped parent too
    adapter_dir = Path(adapter_dir)
    files = [load_token_ids(data, seq_len)]
    if held_out is not None:
        files.append(load_token_ids(held_out, seq_len))
    source = _base_source(adapter_dir, base)
    # Token ids against the vocabulary before the model loads (its config says the
    # size), and again against the loaded embeddings.
    vocab = _vocab_size(source[0])
    if vocab is not None:
        for sequences in files:
            check_token_range(sequences, vocab)
    model = PeftModel.from_pretrained(_base_model(*source), str(adapter_dir))
    vocab = model.get_input_embeddings().num_embeddings
    batches = [batches_of(sequences, batch_size, vocab) for sequences in files]
    export = to_lora(model, batches[0], rank=rank, energy=energy, ridge=ridge, bias=bias,
                     progress=progress, held_out=batches[1] if held_out else None)  # fmt: skip
    save_lora(export, out_dir)
    return export
