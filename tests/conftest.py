"""Shared helpers: the plain-PyTorch composition the kernels are checked against."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SEED_HIGH = 2**62


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (``pytest -m cuda``) need a GPU: skipped without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu-check.sh runs these)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def _lowbias32(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint32)
    with np.errstate(over="ignore"):
        z ^= z >> np.uint32(16)
        z *= np.uint32(0x7FEB352D)
        z ^= z >> np.uint32(15)
        z *= np.uint32(0x846CA68B)
        z ^= z >> np.uint32(16)
    return z


def mask_keep(seed: int, numel: int, p: float) -> np.ndarray:
    """The documented counter-based mask, reimplemented in numpy: element i is kept when
    the top 24 bits of lowbias32(lo32(i) ^ key) reach round(p * 2^24), with
    key = lowbias32(lo32(seed) ^ lowbias32(hi32(seed) ^ lowbias32(hi32(i))))."""
    i = np.arange(numel, dtype=np.uint64)
    high = (i >> np.uint64(32)).astype(np.uint32)
    seed_lo, seed_hi = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    key = _lowbias32(seed_lo ^ _lowbias32(seed_hi ^ _lowbias32(high)))
    u = _lowbias32(i.astype(np.uint32) ^ key)
    return (u >> np.uint32(8)) >= np.uint32(round(p * 2**24))


def seed_after_manual_seed(s: int) -> int:
    """The dropout seed cera_delta draws right after torch.manual_seed(s)."""
    torch.manual_seed(s)
    return int(torch.randint(0, SEED_HIGH, (), dtype=torch.int64))


def dropped(t, p, seed):
    """``t`` times the kernel's scaled keep mask over its elements in row-major order."""
    keep = mask_keep(seed, t.numel(), p).reshape(t.shape)
    return t * torch.from_numpy(keep).to(t.dtype) / (1 - p)


def plain_branch(x, a, b, *, activation="silu", scaling=1.0, p=0.0, seed=0, position="hidden"):
    """scaling * B · Dropout(act(A x)) with plain torch ops and the kernel's mask; with
    position="input", scaling * B · act(A Dropout(x)), the mask over x's elements."""
    if p > 0 and position == "input":
        x = dropped(x, p, seed)
    h = x @ a.T
    act = {"silu": torch.nn.functional.silu, "relu": torch.relu, "identity": lambda t: t}
    out = act[activation](h)
    if p > 0 and position == "hidden":
        out = dropped(out, p, seed)
    return scaling * (out @ b.T)


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


@pytest.fixture
def make_inputs():
    def make(shape=(3, 40, 32), r=8, d_out=24, dtype=torch.float32, requires_grad=True):
        gen = torch.Generator().manual_seed(1234)
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        a = (0.3 * torch.randn(r, shape[-1], generator=gen, dtype=torch.float64)).to(dtype)
        b = (0.3 * torch.randn(d_out, r, generator=gen, dtype=torch.float64)).to(dtype)
        return tuple(t.requires_grad_(requires_grad) for t in (x, a, b))

    return make
