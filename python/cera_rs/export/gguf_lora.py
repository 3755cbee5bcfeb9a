"""``save_gguf_lora``: an exported LoRA as a llama.cpp LoRA adapter (GGUF), for the
GGUF base model it was trained on.

What llama.cpp's adapter loader (``src/llama-adapter.cpp``) requires, and so what is
written: ``general.type = "adapter"``, ``general.architecture`` equal to the base
model's, ``adapter.type = "lora"`` and ``adapter.lora.alpha``; per adapted weight two
tensors named as the base file names that weight plus ``.lora_a`` / ``.lora_b``, with
ggml shapes ``lora_a = [d_in, r]`` and ``lora_b = [r, d_out]`` (numpy's ``(r, d_in)``
and ``(d_out, r)``: PEFT's ``lora_A`` / ``lora_B`` as they are). llama.cpp adds
``alpha / r · B (A x)`` to the base layer's output, ``r`` read from each ``lora_b``.

Names and layout come from the base GGUF: its architecture picks ``gguf``'s tensor
name map (``model.layers.3.self_attn.q_proj`` is ``blk.3.attn_q.weight`` for
``llama``), and every tensor written is checked against the base file's tensor of that
name. For ``llama`` the converter reorders the rows of the query and key weights
(llama.cpp rotates adjacent pairs of a head's dimensions, Hugging Face its two
halves); a LoRA of those layers gets the same reordering of ``B``'s rows.

A LoRA embedding of the token embedding is written as llama.cpp reads it there
(``_token_embd``: ``lora_a`` transposed), when the base file has its own
``output.weight``. Refused, with the reason: bias (llama.cpp's adapters hold none),
DoRA, convolutions, embeddings other than ``token_embd``, ``token_embd`` of a base
whose output is tied to it, weights the base file lacks, architectures whose layout is
not known here, non-finite values.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cera_rs.atomic import atomic_path
from cera_rs.export.lora import LoraExport
from cera_rs.extras import GGUF, require

QK_ROWS_PERMUTED = {"llama": True, "qwen2": False, "qwen3": False}
"""Architectures whose layout is known here: whether llama.cpp's converter reorders
the rows of the query and key weights (``llama``: rope on adjacent pairs) or keeps
Hugging Face's order (``qwen2``, ``qwen3``: rope on halves, as in transformers)."""

SUFFIXES = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_embedding_A": "lora_a",
    ".lora_embedding_B": "lora_b",
}
"""PEFT's saved names of the two factors (linear layers, embeddings), and llama.cpp's."""


@dataclass(frozen=True)
class BaseGGUF:
    """What the adapter must agree with in the base model's GGUF file: its
    architecture, block and head counts, and each tensor's ggml shape by name."""

    path: Path
    arch: str
    blocks: int
    heads: int
    kv_heads: int
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def read(cls, path: str | os.PathLike) -> BaseGGUF:
        """Reads the header (the tensors are memory-mapped, not loaded). A missing
        file, a file that is not GGUF, an adapter instead of a model or an
        architecture whose layout is not known here is an error naming the file."""
        require("save_gguf_lora", [GGUF])
        import gguf

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"base GGUF {path} does not exist or is not a file")
        try:
            reader = gguf.GGUFReader(path)
        except Exception as err:  # the reader raises ValueError, struct and numpy errors
            raise ValueError(f"{path} is not a GGUF file gguf can read: {err}") from None
        fields = {
            name: field.contents()
            for name, field in reader.fields.items()
            if name.startswith(("general.", "adapter."))
            or ".attention.head_count" in name
            or name.endswith(".block_count")
        }
        kind, arch = fields.get("general.type", "model"), fields.get("general.architecture")
        if kind != "model":
            raise ValueError(f"{path} is a GGUF {kind}, not a model: pass the base model's file")
        if arch not in QK_ROWS_PERMUTED:
            raise ValueError(
                f"{path}: architecture {arch!r} is not supported (its tensor "
                f"layout is not known here); supported: "
                f"{sorted(QK_ROWS_PERMUTED)}"
            )
        heads = fields.get(f"{arch}.attention.head_count")
        blocks = fields.get(f"{arch}.block_count")
        if not isinstance(heads, int) or not isinstance(blocks, int):
            raise ValueError(
                f"{path}: {arch}.attention.head_count or {arch}.block_count is "
                "missing or not one number"
            )
        kv_heads = fields.get(f"{arch}.attention.head_count_kv", heads)
        shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
        return cls(path, arch, blocks, heads, int(kv_heads), shapes)


def _rope_rows(rows: int, heads: int) -> Tensor:
    """Row order of a llama query/key weight in GGUF: within each head, dimension
    ``j`` of the first half and ``j`` of the second half become neighbours."""
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _scaling(export: LoraExport, module: str, rank: int) -> float:
    """PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) for ``module``."""
    from peft.utils.other import get_pattern_key

    config = export.config
    alpha = config.alpha_pattern.get(
        get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
    )
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def _pairs(export: LoraExport) -> dict[str, dict[str, Tensor]]:
    """``{module: {"lora_a": A, "lora_b": B}}``; what llama.cpp cannot hold is refused."""
    from cera_rs.spectral.adapters import PEFT_PREFIX

    if getattr(export.config, "use_dora", False):
        raise ValueError("a DoRA adapter cannot be a llama.cpp LoRA (it has no magnitude vector)")
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in export.state_dict.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            what = (
                "a LoRA bias (export without bias=True / --bias)"
                if key.endswith(".bias")
                else "not a lora_A / lora_B weight"
            )
            raise ValueError(
                f"llama.cpp LoRA adapters hold only lora_A/lora_B pairs; {key} is {what}"
            )
        module = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} holds NaN or Inf values")
        if value.dim() != 2:
            raise ValueError(
                f"{module} is a convolution ({key} has {value.dim()} dimensions): "
                "llama.cpp applies LoRA adapters to matrix multiplications and "
                "the token embedding only"
            )
        pair = pairs.setdefault(module, {})
        pair[SUFFIXES[suffix]] = value.detach().to("cpu", torch.float32)
        pair["embedding"] = "_embedding_" in suffix
    for module, pair in pairs.items():
        if len(pair) != 3:
            raise ValueError(f"{module} has only one of lora_A / lora_B: a LoRA needs both factors")
    if not pairs:
        raise ValueError("the export holds no LoRA weights")
    return pairs


def gguf_lora_tensors(export: LoraExport, base: BaseGGUF) -> tuple[float, dict[str, np.ndarray]]:
    """llama.cpp's ``adapter.lora.alpha`` and tensors (name: float32 array in numpy's
    row-major shape) for ``export`` on ``base``.

    Alpha is the most common rank; a layer's PEFT scaling and rank are folded into its
    ``B`` so that llama.cpp's ``alpha / r`` gives each layer PEFT's scale (for
    ``to_lora``'s exports, scaling 1 at one rank, ``B`` is written as it is)."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == base.arch)
    names = gguf.get_tensor_name_map(arch, base.blocks)
    pairs = _pairs(export)
    alpha = Counter(int(p["lora_a"].shape[0]) for p in pairs.values()).most_common(1)[0][0]
    tensors: dict[str, np.ndarray] = {}
    for module, pair in pairs.items():
        a, b = pair["lora_a"], pair["lora_b"]
        rank = int(a.shape[0])
        found = names.get_type_and_name(module + ".weight", try_suffixes=(".weight",))
        if found is None:
            raise ValueError(
                f"{module} has no llama.cpp tensor name for architecture {base.arch!r}"
            )
        kind, name = found
        if name not in base.shapes:
            raise ValueError(
                f"the base GGUF {base.path} has no tensor {name} for {module} (another base model?)"
            )
        if pair["embedding"] or kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            tensors.update(
                _token_embd(
                    module, kind, name, a, b, base, rank, alpha, _scaling(export, module, rank)
                )
            )
            continue
        d_in, d_out = base.shapes[name][:2]
        if b.shape[1] != rank or (a.shape[1], b.shape[0]) != (d_in, d_out):
            raise ValueError(
                f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                f"not fit the base tensor {name} of ggml shape [{d_in}, {d_out}] "
                "(another base model?)"
            )
        factor = _scaling(export, module, rank) * rank / alpha
        b = b * factor if factor != 1.0 else b
        if QK_ROWS_PERMUTED[base.arch] and kind in (
            gguf.MODEL_TENSOR.ATTN_Q,
            gguf.MODEL_TENSOR.ATTN_K,
        ):
            heads = base.heads if kind == gguf.MODEL_TENSOR.ATTN_Q else base.kv_heads
            b = b[_rope_rows(d_out, heads)]
        tensors[name + ".lora_a"] = a.contiguous().numpy()
        tensors[name + ".lora_b"] = b.contiguous().numpy()
    return float(alpha), tensors


def _token_embd(
    module: str,
    kind,
    name: str,
    a: Tensor,
    b: Tensor,
    base: BaseGGUF,
    rank: int,
    alpha: float,
    scaling: float,
) -> dict[str, np.ndarray]:
    """llama.cpp's tensors of a LoRA embedding on ``token_embd``: it looks the tokens'
    rows up in ``lora_a`` and multiplies by ``lora_b`` unflipped (``build_inp_embd``), so
    ``lora_a`` is PEFT's ``lora_embedding_A`` transposed (numpy ``(vocab, r)``) and
    ``lora_b`` its ``lora_embedding_B`` ``(d, r)``, as llama.cpp's loader checks.

    Refused: another embedding (llama.cpp adds an adapter to ``token_embd`` alone), a
    LoRA of a linear layer on ``token_embd``, and a base GGUF without ``output.weight``:
    its output reuses the tensor named ``token_embd.weight``, and llama.cpp finds
    adapters by tensor name, so the output projection would get the embedding's
    flipped factors too."""
    import gguf

    if kind != gguf.MODEL_TENSOR.TOKEN_EMBD:
        raise ValueError(
            f"{module} is an embedding mapped to {name}: llama.cpp applies a LoRA "
            "to the token embedding (token_embd) only among embeddings"
        )
    if a.dim() != 2 or b.shape[1] != a.shape[0] or a.shape[1] * b.shape[0] == 0:
        raise ValueError(f"{module}: not a LoRA embedding's factors")
    tied = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    if tied not in base.shapes:
        raise ValueError(
            f"{module}: the base GGUF {base.path} ties its output to token_embd "
            f"(it has no {tied}); llama.cpp finds adapters by tensor name, so it "
            "would apply the embedding's LoRA to the output projection too, with "
            "its factors flipped"
        )
    d_embd, vocab = base.shapes[name][:2]
    if (a.shape[1], b.shape[0]) != (vocab, d_embd):
        raise ValueError(
            f"{module}: lora_embedding_A {tuple(a.shape)} and lora_embedding_B "
            f"{tuple(b.shape)} do not fit the base tensor {name} of ggml shape "
            f"[{d_embd}, {vocab}] (another base model?)"
        )
    factor = scaling * rank / alpha
    b = b * factor if factor != 1.0 else b
    return {name + ".lora_a": a.T.contiguous().numpy(), name + ".lora_b": b.contiguous().numpy()}


def save_gguf_lora(
    export: LoraExport, path: str | os.PathLike, base_gguf: str | os.PathLike
) -> None:
    """Writes ``export`` (what ``to_lora`` returns) as a llama.cpp LoRA adapter file for
    the base model in ``base_gguf``, atomically: ``llama-cli -m BASE.gguf --lora
    path``, or ``Llama(BASE.gguf, lora_path=path)`` in llama-cpp-python.

    The names, shapes and architecture are checked against ``base_gguf`` first, so a
    file written here is one llama.cpp's loader accepts for that base. What it cannot
    hold (a bias, DoRA, convolutions, embeddings other than an untied token_embd,
    weights the base lacks) is a ValueError naming the layer and why."""
    if not isinstance(export, LoraExport):
        raise TypeError(f"save_gguf_lora takes what to_lora returns, got {type(export).__name__}")
    base = BaseGGUF.read(base_gguf)
    alpha, tensors = gguf_lora_tensors(export, base)
    import gguf

    writer = gguf.GGUFWriter(None, base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    with atomic_path(path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
