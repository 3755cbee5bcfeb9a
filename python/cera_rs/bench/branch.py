"""The CeRA branch, forward+backward: cera_rs against the plain-PyTorch composition
the paper's reference uses (nn.Linear, SiLU, Dropout, nn.Linear), and the GEMM floor."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from cera_rs.bench.measure import median_times, saved_bytes
from cera_rs.functional import cera_delta


class PlainBranch(nn.Module):
    """The reference's composition: B(Dropout(SiLU(A(x))))."""

    def __init__(self, d_in: int, d_out: int, r: int, p: float) -> None:
        super().__init__()
        self.A = nn.Linear(d_in, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.drop(self.act(self.A(x))))


@dataclass
class BranchResult:
    n: int
    d: int
    r: int
    dtype: str
    cera_rs_ms: float
    plain_ms: float
    gemm_floor_ms: float
    cera_rs_saved_bytes: int
    plain_saved_bytes: int

    def ratios(self) -> dict[str, float]:
        return {
            "cera_rs / plain": self.cera_rs_ms / self.plain_ms,
            "cera_rs / floor": self.cera_rs_ms / self.gemm_floor_ms,
            "plain / floor": self.plain_ms / self.gemm_floor_ms,
            "saved bytes cera_rs / plain": self.cera_rs_saved_bytes / self.plain_saved_bytes,
        }


def branch_forward_backward(
    n: int = 4096, d: int = 2048, r: int = 64, p: float = 0.1,
    dtype: torch.dtype = torch.float32, repeats: int = 7,
) -> BranchResult:  # fmt: skip
    torch.manual_seed(0)
    plain = PlainBranch(d, d, r, p).to(dtype).train()
    nn.init.normal_(plain.B.weight, std=0.02)
    a = plain.A.weight.detach().clone().requires_grad_(True)
    b = plain.B.weight.detach().clone().requires_grad_(True)
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    g = torch.randn(n, d, dtype=dtype)

    def ours() -> torch.Tensor:
        return cera_delta(x, a, b, dropout=p)

    def step(fn):
        def run():
            x.grad = a.grad = b.grad = None
            plain.zero_grad(set_to_none=True)
            fn().backward(g)

        return run

    def floor():
        with torch.no_grad():
            h = x @ a.T
            y = h @ b.T
            gb = g @ b
            g.T @ h, h.T @ x, gb @ a  # dB, dA, dx
        return y

    times = median_times(
        {"cera_rs": step(ours), "plain": step(lambda: plain(x)), "floor": floor},
        repeats=repeats,
    )
    keep = (x, a, b, plain.A.weight, plain.B.weight)
    return BranchResult(
        n=n, d=d, r=r, dtype=str(dtype).removeprefix("torch."),
        cera_rs_ms=1e3 * times["cera_rs"], plain_ms=1e3 * times["plain"],
        gemm_floor_ms=1e3 * times["floor"],
        cera_rs_saved_bytes=saved_bytes(ours, keep),
        plain_saved_bytes=saved_bytes(lambda: plain(x), keep),
    )  # fmt: skip


def format_result(res: BranchResult) -> str:
    lines = [
        f"CeRA branch forward+backward, N={res.n} d={res.d} r={res.r} {res.dtype}, train, p=0.1",
        f"  cera_rs          {res.cera_rs_ms:9.2f} ms   saved for backward "
        f"{res.cera_rs_saved_bytes / 2**20:7.2f} MiB",
        f"  plain PyTorch    {res.plain_ms:9.2f} ms   saved for backward "
        f"{res.plain_saved_bytes / 2**20:7.2f} MiB",
        f"  GEMM floor       {res.gemm_floor_ms:9.2f} ms",
    ]
    lines += [f"  {k:28s} {v:6.3f}" for k, v in res.ratios().items()]
    return "\n".join(lines)


def as_dict(res: BranchResult) -> dict:
    return {**asdict(res), "ratios": res.ratios()}
