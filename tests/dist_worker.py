"""Run by ``torchrun --nproc_per_node=2`` from test_distributed.py (CPU, gloo).

Each rank runs three scenarios and saves what it saw to ``OUT/rank{rank}.pt``; the
test compares. Every rank also computes the single-process reference itself (the
whole batch in one model, no process group involved), so the test can compare each
rank with one process.

- ddp: DistributedDataParallel on a CeraModel (tiny Llama, dropout 0), one backward
  on this rank's half of the batch; the adapter gradients.
- fsdp: FSDP2 (``fully_shard`` on each decoder layer and the root) trains a tiny
  Llama with CeRA adapters for a few AdamW steps on this rank's half of each batch;
  the mean loss over ranks at each step and the final adapter weights.
- spectral: a StreamingSpectrum per rank over its own rows, summed with all_reduce.
- regression: the same for a StreamingRegression (the linear export's moments).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from models import tiny_llama
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from cera_rs import CeraConfig, get_cera_model
from cera_rs.export import StreamingRegression
from cera_rs.spectral import StreamingSpectrum

BATCH, LENGTH, FSDP_STEPS = 4, 12, 4


def cera_llama() -> torch.nn.Module:
    model = get_cera_model(
        tiny_llama(0), CeraConfig(r=4, target_modules=["q_proj", "v_proj"], cera_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 would make A's gradient zero
        for name, p in model.named_parameters():
            if ".cera_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.train()


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (BATCH, LENGTH), generator=gen) for _ in range(n)]


def my_half(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = BATCH // world
    return ids[rank * per : (rank + 1) * per]


def adapter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("module."): p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def ddp(rank: int, world: int) -> dict:
    model = cera_llama()
    reference = copy.deepcopy(model)
    ids = batches(1)[0]
    reference(input_ids=ids, labels=ids).loss.backward()
    wrapped = DistributedDataParallel(model)
    mine = my_half(ids, rank, world)
    wrapped(input_ids=mine, labels=mine).loss.backward()
    return {"grads": adapter_grads(wrapped), "reference": adapter_grads(reference)}


def train(model: torch.nn.Module, steps: list[torch.Tensor], rank: int, world: int):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in steps:
        mine = ids if world == 1 else my_half(ids, rank, world)
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / world)
    weights = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            weights[name] = full.detach().clone()
    return losses, weights


def fsdp(rank: int, world: int) -> dict:
    steps = batches(FSDP_STEPS)
    ref_losses, ref_weights = train(cera_llama(), steps, rank, world=1)
    model = cera_llama()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
    losses, weights = train(model, steps, rank, world)
    return {
        "losses": losses,
        "reference_losses": ref_losses,
        "weights": weights,
        "reference_weights": ref_weights,
        "sharded_params": len(sharded),
    }


def rows_of(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(30 + 7 * rank, 16, generator=gen, dtype=torch.float64)


def spectral(rank: int, world: int) -> dict:
    stream = StreamingSpectrum(16)
    stream.update(rows_of(rank))
    stream.all_reduce()
    one_process = StreamingSpectrum(16)
    for r in range(world):
        one_process.update(rows_of(r))
    return {
        "tokens_seen": stream.tokens_seen,
        "reference_tokens": one_process.tokens_seen,
        "values": torch.from_numpy(stream.spectrum().singular_values.copy()),
        "reference_values": torch.from_numpy(one_process.spectrum().singular_values.copy()),
    }


def regression(rank: int, world: int) -> dict:
    def pairs(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = rows_of(r)
        return x, torch.nn.functional.silu(x[:, :3]) + x[:, 5:8]

    stream = StreamingRegression(16, 3)
    stream.update(*pairs(rank))
    stream.all_reduce()
    one_process = StreamingRegression(16, 3)
    for r in range(world):
        one_process.update(*pairs(r))
    return {
        "tokens_seen": stream.tokens_seen,
        "reference_tokens": one_process.tokens_seen,
        "linearity": torch.from_numpy(stream.solve().linearity.copy()),
        "reference_linearity": torch.from_numpy(one_process.solve().linearity.copy()),
    }


def main(out: Path) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {"world": world}
    for name, scenario in (
        ("ddp", ddp),
        ("fsdp", fsdp),
        ("spectral", spectral),
        ("regression", regression),
    ):
        results[name] = scenario(rank, world)
        dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
