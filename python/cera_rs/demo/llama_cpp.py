"""SmolLM2 in llama.cpp itself, through llama-cpp-python (a development tool, not a
dependency: it builds llama.cpp from source): the GGUF model, with or without a LoRA
adapter file, fed the same token ids as PyTorch, decoded greedily token by token, its
logits at every position, and its speed. What ``scripts/llama-cpp-check.sh`` and
part 2 of the demo compare with PyTorch."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch

from cera_rs.compare.data import Encoded, end_token
from cera_rs.compare.runner import answered

INSTALL = (
    "pip install --no-deps --target DIR llama-cpp-python==0.3.36 and put DIR on "
    "PYTHONPATH (it compiles llama.cpp: about 25 minutes on 2 cores)"
)


def unavailable() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed ({INSTALL})"
    try:
        import llama_cpp  # noqa: F401
    except Exception as err:  # its shared library may fail to load
        return f"llama_cpp does not import: {' '.join(str(err).split())}"
    return None


class LlamaCpp:
    """One llama.cpp context on ``model`` (a GGUF file) with the LoRA adapter file
    ``lora`` applied at scale 1. Logits are kept for every position, so the logits
    of any prefix are read after one ``eval``."""

    def __init__(
        self,
        model: str | os.PathLike,
        lora: str | os.PathLike | None = None,
        n_ctx: int = 128,
        threads: int | None = None,
    ) -> None:
        from llama_cpp import Llama

        threads = threads or torch.get_num_threads()
        self.llm = Llama(
            model_path=str(model),
            lora_path=None if lora is None else str(lora),
            n_ctx=n_ctx,
            logits_all=True,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ``ids`` (fed as they are: no BOS is added),
        ``(len(ids), vocab)``."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: self.llm.n_tokens])

    def greedy(self, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
        """The greedy continuation of ``ids``: ``max_new_tokens`` tokens or up to ``eos``,
        as ``generate(do_sample=False)`` decodes."""
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token == eos:
                break
            self.llm.eval([token])
        return out

    def tokens_per_second(self, ids: list[int], new_tokens: int, repeats: int = 3) -> float:
        """Greedy decoding speed at batch 1 (the prompt's evaluation excluded), best of
        ``repeats``."""
        best = 0.0
        for _ in range(repeats):
            self.llm.reset()
            self.llm.eval(ids)
            start = time.perf_counter()
            for _ in range(new_tokens):
                self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
            best = max(best, new_tokens / (time.perf_counter() - start))
        return best

    def close(self) -> None:
        self.llm.close()


def exact_match(model: Path, lora: Path, tokenizer, data: Encoded) -> np.ndarray:
    """Exact match of ``model`` with ``lora`` in llama.cpp on the problems of ``data``,
    scored as ``cera_rs.compare`` scores PyTorch's ``generate`` (the same token
    budget, ``answered``)."""
    eos = end_token(tokenizer)
    runner = LlamaCpp(model, lora)
    try:
        rows = [runner.greedy(ids, data.completion_tokens() + 4, eos) for ids in data.prompts()]
    finally:
        runner.close()
    return np.array(
        [
            answered(tokenizer, row, completion, eos)
            for row, (_, completion) in zip(rows, data.items)
        ],
        dtype=bool,
    )
