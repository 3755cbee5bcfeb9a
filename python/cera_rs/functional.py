"""``cera_delta``: the CeRA branch as a differentiable PyTorch function.

With autograd, a call goes ``autograd.Function`` -> ``torch.library`` custom op ->
``_native`` -> Rust; the custom ops carry fake implementations so ``torch.compile``
keeps them in its graph. Without autograd (inference, decoding one token at a time)
the Rust forward is called directly, with no bookkeeping.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cera_rs import _native
from cera_rs.config import ACTIVATIONS

# Seeds are drawn from torch's default generator, so torch.manual_seed fixes the mask.
_SEED_HIGH = 2**62


def _draw_seed() -> Tensor:
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)


def _eager_forward(
    x: Tensor, a: Tensor, b: Tensor, seed: Tensor, activation: str, scaling: float, dropout: float
) -> tuple[Tensor, Tensor]:
    return _native.forward(
        x, a, b, activation=activation, scaling=scaling, dropout=dropout, seed=int(seed)
    )


_branch_forward = torch.library.custom_op(
    "cera_rs::branch_forward", _eager_forward, mutates_args=()
)


@_branch_forward.register_fake
def _(x, a, b, seed, activation, scaling, dropout):
    rows = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], b.shape[0])), x.new_empty((rows, a.shape[0]))


def _eager_backward(
    grad: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    h: Tensor,
    seed: Tensor,
    activation: str,
    scaling: float,
    dropout: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _native.backward(
        grad, x, a, b, h,
        activation=activation, scaling=scaling, dropout=dropout, seed=int(seed),
        needs_x=needs[0], needs_a=needs[1], needs_b=needs[2],
    )  # fmt: skip
    # Custom ops return tensors: an empty one stands for "not asked for".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


_branch_backward = torch.library.custom_op(
    "cera_rs::branch_backward", _eager_backward, mutates_args=()
)


@_branch_backward.register_fake
def _(grad, x, a, b, h, seed, activation, scaling, dropout, needs):
    shapes = (x.shape, a.shape, b.shape)
    return tuple(x.new_empty(s if need else 0) for s, need in zip(shapes, needs))


class _CeraBranch(torch.autograd.Function):
    """Saves only x, A, B (inputs, not copies), h and the seed for backward."""

    @staticmethod
    def forward(ctx, x, a, b, seed, activation, scaling, dropout):
        # Eager calls skip the custom op's Python dispatch (tens of microseconds a call);
        # torch.compile traces the custom op, which it can keep in its graph.
        op = _branch_forward if torch.compiler.is_compiling() else _eager_forward
        y, h = op(x, a, b, seed, activation, scaling, dropout)
        ctx.save_for_backward(x, a, b, h, seed)
        ctx.config = (activation, scaling, dropout)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h, seed = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        op = _branch_backward if torch.compiler.is_compiling() else _eager_backward
        grads = op(grad, x, a, b, h, seed, *ctx.config, needs)
        dx, da, db = (g if need else None for g, need in zip(grads, needs))
        return dx, da, db, None, None, None, None


def cera_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    dropout: float = 0.0,
    activation: str = "silu",
    training: bool = True,
    scaling: float = 1.0,
) -> Tensor:
    """``scaling * B · Dropout(act(A x))`` for every row of ``x``.

    ``x`` is ``(..., d_in)``, ``A`` is ``(r, d_in)`` and ``B`` is ``(d_out, r)``; the
    result is ``(..., d_out)`` in ``x``'s dtype. Dropout applies only when
    ``training`` is true, with inverted scaling ``1 / (1 - dropout)``.
    """
    for name, t in (("x", x), ("A", A), ("B", B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if A.device != x.device or B.device != x.device:
        raise ValueError(f"mixed devices: x is on {x.device}, A on {A.device}, B on {B.device}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")
    p = float(dropout) if training else 0.0
    needs_grad = x.requires_grad or A.requires_grad or B.requires_grad
    wants_graph = torch.is_grad_enabled() and needs_grad
    if wants_graph or torch.compiler.is_compiling():
        seed = _draw_seed() if p > 0 else torch.zeros((), dtype=torch.int64)
        return _CeraBranch.apply(x, A, B, seed, activation, float(scaling), p)
    if p > 0:
        y, _ = _native.forward(
            x, A, B, activation=activation, scaling=float(scaling), dropout=p,
            seed=int(_draw_seed()),
        )  # fmt: skip
        return y
    return _native.delta(x, A, B, activation=activation, scaling=float(scaling))
