"""``cera-rs export-lora``: a saved CeRA adapter folder plus calibration data in (token
ids for a transformers model, input tensors for a diffusers one), a PEFT LoRA adapter
folder out. The base model comes from the adapter config's ``base_model_name_or_path``
(or ``base=``), a local folder (transformers', or diffusers' with ``_class_name`` in its
``config.json``): nothing is downloaded."""

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
        raise ValueError(
            f"token ids must be in [0, {vocab_size}) for this model, got ids from {low} to {high}"
        )


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


INPUT_FORMATS = (".pt", ".safetensors", ".npy")
"""Files of model inputs (a diffusers model's, e.g. a UNet's), or a folder of them."""


def load_inputs(path: str | os.PathLike, batch_size: int) -> list[Any]:
    """Batches of a model's inputs from ``path``: a ``.pt`` / ``.safetensors`` file of a
    dict of tensors (keyword arguments; a UNet's ``sample``, ``timestep``,
    ``encoder_hidden_states``) or of one tensor (the only positional argument; ``.npy``
    too), or a folder of such files, joined along the first dimension in name order.
    Tensors are cut into ``batch_size`` rows; 0-d ones (a shared timestep) go whole to
    every batch. A wrong file or mismatched lengths is a ValueError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    files = (
        sorted(p for p in path.iterdir() if p.suffix in INPUT_FORMATS) if path.is_dir() else [path]
    )
    if not files:
        raise ValueError(f"{path} holds no input files ({', '.join(INPUT_FORMATS)})")
    parts = [_read_inputs(f) for f in files]
    if any(
        isinstance(p, Tensor) != isinstance(parts[0], Tensor)
        or (isinstance(p, dict) and p.keys() != parts[0].keys())
        for p in parts
    ):
        raise ValueError(
            f"{path}: every input file must hold the same kind (one tensor, or "
            "a dict with the same keys)"
        )
    if isinstance(parts[0], Tensor):
        return list(torch.cat(parts).split(batch_size))
    joined = {
        k: torch.cat([p[k] for p in parts]) if parts[0][k].dim() else parts[0][k] for k in parts[0]
    }
    lengths = {k: len(v) for k, v in joined.items() if v.dim()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: the inputs' first dimensions differ: {lengths}")
    rows = next(iter(lengths.values()), 1)
    return [
        {k: v[start : start + batch_size] if v.dim() else v for k, v in joined.items()}
        for start in range(0, rows, batch_size)
    ]


def _read_inputs(path: Path) -> Tensor | dict[str, Tensor]:
    if path.suffix not in INPUT_FORMATS:
        raise ValueError(f"{path}: inputs must be one of {INPUT_FORMATS}, got {path.suffix!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(path)
        elif path.suffix == ".pt":
            data = torch.load(path, weights_only=True)
        else:
            data = torch.as_tensor(np.load(path))
    except Exception as err:  # safetensors, pickle, zip and numpy each raise their own kinds
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} cannot be read as model inputs: {first}") from None
    if isinstance(data, dict) and data and all(isinstance(v, Tensor) for v in data.values()):
        return data
    if isinstance(data, Tensor) and data.dim():
        return data
    raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(data).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _base_source(adapter_dir: Path, base: str | os.PathLike | None) -> tuple[Path, Any]:
    """The base model's folder and what loads it (a transformers auto class, or the
    diffusers class its config names), checked without loading anything."""
    from transformers import AutoModel, AutoModelForCausalLM

    config_path = adapter_dir / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter folder: {CONFIG_NAME} is missing")
    config = _read_json(config_path)
    base = base if base is not None else config.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(
            f"the base model {base!r} of {config_path} is not a local folder; pass its folder "
            "with --base (nothing is downloaded)"
        )
    diffusers_class = _diffusers_class(Path(base))
    if diffusers_class is not None:
        return Path(base), diffusers_class
    auto = AutoModelForCausalLM if config.get("task_type") in (None, "CAUSAL_LM") else AutoModel
    return Path(base), auto


def _diffusers_class(base: Path) -> Any:
    """The diffusers model class a base folder's ``config.json`` names (``_class_name``),
    or None for a transformers folder."""
    config = base / "config.json"
    name = _read_json(config).get("_class_name") if config.is_file() else None
    if name is None:
        return None
    import diffusers

    found = getattr(diffusers, str(name), None)
    if found is None:
        raise ValueError(f"{config}: diffusers has no model class {name!r}")
    return found


def _is_diffusers(loader: Any) -> bool:
    return loader.__module__.startswith("diffusers")


def _diffusers_base(adapter_dir: Path, base: str | os.PathLike | None) -> bool:
    """Whether the base resolves to a diffusers model (False where it does not resolve:
    ``_base_source`` says why once the data is checked)."""
    try:
        return _is_diffusers(_base_source(adapter_dir, base)[1])
    except (OSError, ValueError):
        return False


def _vocab_size(base: Path) -> int | None:
    """The base model's vocabulary size from its config alone (None if it names none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base, local_files_only=True).get_text_config()
    vocab = getattr(config, "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def _base_model(base: Path, auto: Any) -> Any:
    return auto.from_pretrained(base, local_files_only=True)


def _cera_model(adapter_dir: Path, source: tuple[Path, Any]) -> Any:
    """The base model with the CeRA adapter of ``adapter_dir`` on it: ``PeftModel`` for
    transformers, ``cera_rs.diffusion.load_adapter`` for diffusers."""
    model = _base_model(*source)
    if not _is_diffusers(source[1]):
        return PeftModel.from_pretrained(model, str(adapter_dir))
    from cera_rs.diffusion import load_adapter

    load_adapter(model, adapter_dir)
    return model.eval()


def export_adapter_dir(
    adapter_dir: str | os.PathLike,
    data: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    ridge: float = 0.0,
    bias: bool = False,
    base: str | os.PathLike | None = None,
    batch_size: int = 8,
    seq_len: int = 512,
    held_out: str | os.PathLike | None = None,
    progress: bool = True,
) -> LoraExport:
    """Loads the CeRA adapter in ``adapter_dir`` onto its base model, fits the LoRA
    (``to_lora``) on ``data`` and saves it to ``out_dir``. ``data`` is token ids
    (``load_token_ids``) for a transformers model, model inputs (``load_inputs``) for a
    diffusers one; ``None`` only when every adapted layer is an embedding (all ids
    weighted alike). ``held_out``, another such file, measures the linearity on its
    inputs too."""
    check_target(rank, energy)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_folder_writable(out_dir, parents=False)  # before the fit; a mistyped parent too
    adapter_dir = Path(adapter_dir)
    paths = [p for p in (data, held_out) if p is not None]
    if held_out is not None and data is None:
        raise ValueError("held_out needs data: the held-out inputs score the maps fitted on it")
    if _diffusers_base(adapter_dir, base):
        batches = [load_inputs(p, batch_size) for p in paths]
        model = _cera_model(adapter_dir, _base_source(adapter_dir, base))
    else:  # token ids are checked first: a wrong file fails before anything loads
        files = [load_token_ids(p, seq_len) for p in paths]
        source = _base_source(adapter_dir, base)
        # Token ids against the vocabulary before the model loads (its config says the
        # size), and again against the loaded embeddings.
        vocab = _vocab_size(source[0])
        if vocab is not None:
            for sequences in files:
                check_token_range(sequences, vocab)
        model = _cera_model(adapter_dir, source)
        embeddings = model.get_input_embeddings()  # a CeraEmbedding when adapted
        vocab = getattr(embeddings, "base_layer", embeddings).num_embeddings
        batches = [batches_of(sequences, batch_size, vocab) for sequences in files]
    export = to_lora(
        model,
        batches[0] if batches else None,
        rank=rank,
        energy=energy,
        ridge=ridge,
        bias=bias,
        progress=progress,
        held_out=batches[1] if held_out else None,
    )
    save_lora(export, out_dir)
    return export
