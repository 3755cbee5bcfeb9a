"""What ``to_lora`` fits for each kind of adapted layer, and the LoRA tensors it writes.

- Linear: the reduced-rank regression of the branch output on the layer input
  (``StreamingRegression``).
- Convolution: the same regression on the input patches PEFT's LoRA conv ``A`` reads
  (the input zero-padded by the base's padding, cut by its kernel and stride), so the
  rank-``k`` map is a LoRA conv: ``A`` with the base's kernel, stride and padding into
  ``k`` channels, ``B`` 1x1.
- Embedding: no regression. The branch is a fixed table, column ``v`` the branch's
  output for token id ``v``, so a LoRA embedding (its ``A`` a table of its own) can
  hold any rank-``k`` table: the best one is the truncated SVD of the ``d_out x vocab``
  table with each column weighted by how often its id occurs in the calibration
  batches (all ids alike without them), and its linearity is exact.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cera_rs.export.regression import LinearFit, StreamingRegression, solve_all
from cera_rs.spectral.adapters import Adapter

TABLE_CHUNK = 8192
"""Token ids per pass over an embedding's branch table (memory ``d_out x`` this)."""


def check_exportable(adapter: Adapter, bias: bool) -> None:
    """What PEFT's LoRA layer of this kind cannot hold is a ValueError naming the layer."""
    base = adapter.module.base_layer
    if adapter.kind == "embedding" and bias:
        raise ValueError(
            f"{adapter.name} is an embedding: PEFT's LoRA embedding holds no "
            "bias (lora_bias); export without bias=True / --bias"
        )
    if adapter.kind != "conv":
        return
    if any(d != 1 for d in base.dilation):
        raise ValueError(
            f"{adapter.name}: a dilated convolution (dilation={base.dilation}) has "
            "no PEFT LoRA: PEFT's LoRA conv A leaves the dilation out, so its "
            "output would not match the base layer's"
        )
    if base.groups != 1:
        raise ValueError(
            f"{adapter.name}: a grouped convolution (groups={base.groups}) is not "
            "exported: PEFT's LoRA conv A reads every input channel while its B "
            "is grouped, a structure other than the base's groups"
        )


def conv_patches(base: nn.Module, x: Tensor) -> Tensor:
    """The rows ``(N, *out, C_in * K)`` (unbatched: ``(*out, C_in * K)``) PEFT's LoRA
    conv ``A`` reads from the base layer's input ``x``: zero-padded as the base pads
    (padding modes other than zeros are not LoRA's), cut by its kernel and stride,
    flattened channel-major as ``weight.reshape(r, -1)``; with the base's dilation, for
    measuring (an export refuses dilated convolutions)."""
    nd = len(base.kernel_size)
    unbatched = x.dim() == nd + 1
    x = x.unsqueeze(0) if unbatched else x
    x = F.pad(x, base._reversed_padding_repeated_twice)
    for dim, (k, s, d) in enumerate(zip(base.kernel_size, base.stride, base.dilation)):
        x = x.unfold(2 + dim, (k - 1) * d + 1, s)
        x = x[..., ::d] if d > 1 else x
    spatial = range(2, 2 + nd)
    x = x.permute(0, *spatial, 1, *(i + nd for i in spatial))  # (N, *out, C, *kernel)
    rows = x.reshape(*x.shape[: nd + 1], -1)
    return rows.squeeze(0) if unbatched else rows


def patch_features(adapter: Adapter) -> int:
    base = adapter.module.base_layer
    return base.in_channels * int(np.prod(base.kernel_size))


class TokenCounts:
    """How often each token id reached an embedding, in float64 on its device."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.counts = torch.zeros(vocab, dtype=torch.float64, device=device)

    @property
    def tokens_seen(self) -> int:
        return int(self.counts.sum())

    def update(self, ids: Tensor) -> None:
        ids = ids.reshape(-1).to(self.counts.device)
        self.counts += torch.bincount(ids, minlength=len(self.counts)).double()


def accumulator(adapter: Adapter) -> StreamingRegression | TokenCounts:
    if adapter.kind == "embedding":
        return TokenCounts(adapter.module.in_features, adapter.device)
    d_in = patch_features(adapter) if adapter.kind == "conv" else adapter.module.in_features
    return StreamingRegression(d_in, adapter.out_features, adapter.device)


def feed(
    adapter: Adapter, acc: StreamingRegression | TokenCounts, x: Tensor, delta: Tensor
) -> None:
    """Adds one batch's ``(x, delta)`` (as ``stream_deltas`` hands them) to ``acc``."""
    if adapter.kind == "embedding":
        acc.update(x)
    elif adapter.kind == "conv":
        acc.update(conv_patches(adapter.module.base_layer, x.to(delta.dtype)), delta)
    else:
        acc.update(x, delta)


def table_chunks(adapter: Adapter):
    """The embedding's branch table, ``(d_out, ids)`` float64 pieces of ``TABLE_CHUNK``
    ids, eval mode (dropout off; the module's mode is restored)."""
    module = adapter.module
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, module.in_features, TABLE_CHUNK):
                ids = torch.arange(
                    start, min(start + TABLE_CHUNK, module.in_features), device=adapter.device
                )
                output = module(ids) if adapter.method == "dora" else None
                yield adapter.delta(ids, output).double().T
    finally:
        module.train(was)


def _weighted_gram(adapter: Adapter, counts: Tensor) -> Tensor:
    gram = torch.zeros(
        adapter.out_features, adapter.out_features, dtype=torch.float64, device=adapter.device
    )
    start = 0
    for table in table_chunks(adapter):
        weight = counts[start : start + table.shape[1]]
        gram += (table * weight) @ table.T
        start += table.shape[1]
    return gram


class TableFit:
    """An embedding's best rank-``k`` LoRA tables for every ``k``: the top ``k`` left
    singular vectors ``U_k`` of the count-weighted branch table ``T C^(1/2)``, the LoRA
    table ``U_k U_k^T T``; the same interface as ``LinearFit``."""

    def __init__(self, adapter: Adapter, counts: Tensor) -> None:
        self.adapter = adapter
        self._tokens = int(counts.sum())
        values, basis = torch.linalg.eigh(_weighted_gram(adapter, counts))
        self.values = values.flip(0).clamp_min(0).cpu().numpy()
        self.basis = basis.flip(1)
        ranks = min(adapter.out_features, adapter.module.in_features)
        self._linearity = _shares(self.values[:ranks])
        self._linearity.flags.writeable = False

    @property
    def linearity(self) -> np.ndarray:
        return self._linearity

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def max_rank(self) -> int:
        return len(self._linearity) - 1

    def energy_rank(self, energy: float) -> int:
        """The smallest rank (at least 1) whose table keeps ``energy`` of the weighted
        table's energy (all of it at full rank: a LoRA embedding is linear in the id's
        one-hot vector, so every table is one)."""
        return max(1, int(np.searchsorted(self._linearity, energy - 1e-12)))

    def linearity_on(self, held_out: TokenCounts) -> np.ndarray:
        """Every rank's linearity over the held-out tokens' ids."""
        gram = _weighted_gram(self.adapter, held_out.counts)
        captured = torch.einsum("ik,ij,jk->k", self.basis, gram, self.basis).cpu().numpy()
        return _shares(captured[: self.max_rank], float(torch.trace(gram)))

    def factors(self, k: int) -> tuple[Tensor, Tensor, None]:
        """``(B, A, None)``: ``B`` ``(d_out, k)``, ``A`` ``(k, vocab)``, balanced (each
        of B's columns and A's rows scaled by the square root of A's row norm: for
        uniform counts the balanced truncated SVD ``U_k S^(1/2)``, ``S^(1/2) V_k^T``)."""
        if not 1 <= k <= self.max_rank:
            raise ValueError(f"k must be in 1..{self.max_rank} (min(d_out, vocab)), got {k}")
        u = self.basis[:, :k]
        a = torch.cat([u.T @ table for table in table_chunks(self.adapter)], dim=1)
        norms = a.norm(dim=1).sqrt()
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        return u * norms, a / norms[:, None], None


def _shares(captured: np.ndarray, total: float | None = None) -> np.ndarray:
    """``[0, c_1, c_1 + c_2, ...] / total`` (total: the sum); all ones for a zero table,
    which the zero map reproduces exactly (as ``LinearFit`` counts it)."""
    total = float(np.sum(captured)) if total is None else total
    if total <= 0:
        return np.ones(len(captured) + 1)
    return np.concatenate([[0.0], np.cumsum(captured)]) / total


def solve(
    adapters: list[Adapter], accs: list, ridge: float, bias: bool
) -> list[LinearFit | TableFit]:
    """Each adapter's fit: the regressions solved together, the tables one by one."""
    regressions = [acc for acc in accs if isinstance(acc, StreamingRegression)]
    solved = iter(solve_all(regressions, ridge=ridge, bias=bias)) if regressions else iter(())
    return [
        TableFit(a, acc.counts) if isinstance(acc, TokenCounts) else next(solved)
        for a, acc in zip(adapters, accs)
    ]


def lora_tensors(
    adapter: Adapter, fit: LinearFit | TableFit, k: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The rank-``k`` map as PEFT's saved LoRA tensors of this layer, by key suffix."""
    b, a, b_bias = fit.factors(k)
    out = lambda t: t.to("cpu", dtype).contiguous()  # noqa: E731
    if adapter.kind == "embedding":
        return {"lora_embedding_A": out(a), "lora_embedding_B": out(b)}
    if adapter.kind == "conv":
        base = adapter.module.base_layer
        a = a.reshape(k, base.in_channels, *base.kernel_size)
        b = b.reshape(*b.shape, *(1,) * len(base.kernel_size))
    tensors = {"lora_A.weight": out(a), "lora_B.weight": out(b)}
    if b_bias is not None:
        tensors["lora_B.bias"] = out(b_bias)
    return tensors
