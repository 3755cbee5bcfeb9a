"""``cera_delta``: the CeRA branch as a differentiable PyTorch function.

With autograd, a call goes ``autograd.Function`` -> ``torch.library`` custom op ->
``_native`` -> Rust; the custom ops carry fake implementations so ``torch.compile``
keeps them in its graph. Without autograd (inference, decoding one token at a time)
the Rust forward is called directly, with no bookkeeping.

Under ``torch.autocast`` the branch follows what autocast does for ``F.linear`` (so
PEFT LoRA's ``lora_B(lora_A(x))``): its floating inputs other than float64 are cast
to the autocast dtype outside the autograd Function, where autograd records the casts
(float32 master weights get float32 gradients), and the kernel runs with autocast off,
its GEMMs in that dtype and its fused elementwise pass in float32.
``torch.library.register_autocast`` does not fit: it fixes one cast dtype per device
type when registered, where autocast's dtype is the caller's choice, and it would cast
inside the Function, out of autograd's sight.

Setting the environment variable ``CERA_RS_TENSOR_OPS=1`` before import sends CPU
tensors down the tensor-op path that CUDA and other devices take instead of the fused
CPU loops: a testing switch (``_TENSOR_OPS``, read once), not a user option.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from cera_rs import _native
from cera_rs.config import ACTIVATIONS, check_dropout_position

# Seeds are drawn from torch's default generator, so torch.manual_seed fixes the mask.
_SEED_HIGH = 2**62

_TENSOR_OPS = os.environ.get("CERA_RS_TENSOR_OPS") == "1"


def _keeps_mask(x: Tensor, dropout: float, dropout_position: str) -> bool:
    """Whether the Rust forward returns a dropout mask: the tensor-op path does for the
    hidden one."""
    on_tensor_ops = _TENSOR_OPS or x.device.type != "cpu"
    return dropout > 0 and dropout_position == "hidden" and on_tensor_ops


def _draw_seed() -> Tensor:
    return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)


# Device types with an autocast mode, found once: torch.compile cannot trace
# torch.amp.is_autocast_available, and torch.is_autocast_enabled raises for the
# others (meta, lazy, ...).
_AUTOCAST_DEVICE_TYPES = frozenset(
    kind
    for kind in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu",
                 torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(kind)
)  # fmt: skip


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in on ``device``, or None when
    autocast is off there."""
    kind = device.type
    if kind not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _autocast_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Autocast's own eligibility rule: floating point, and float64 is left alone.
    if t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _eager_forward(
    x: Tensor,
    a: Tensor,
    b: Tensor,
    seed: Tensor,
    activation: str,
    scaling: float,
    dropout: float,
    dropout_position: str = "hidden",
) -> tuple[Tensor, Tensor, Tensor]:
    y, h, keep = _native.forward(
        x, a, b, activation=activation, scaling=scaling, dropout=dropout, seed=int(seed),
        dropout_position=dropout_position, tensor_ops=_TENSOR_OPS,
    )  # fmt: skip
    # Custom ops return tensors: an empty one stands for "no mask kept".
    return y, h, keep if keep is not None else x.new_empty(0, dtype=torch.bool)


_branch_forward = torch.library.custom_op(
    "cera_rs::branch_forward", _eager_forward, mutates_args=()
)


@_branch_forward.register_fake
def _(x, a, b, seed, activation, scaling, dropout, dropout_position="hidden"):
    rows = math.prod(x.shape[:-1])
    keep_shape = (rows, a.shape[0]) if _keeps_mask(x, dropout, dropout_position) else (0,)
    return (x.new_empty((*x.shape[:-1], b.shape[0])), x.new_empty((rows, a.shape[0])),
            x.new_empty(keep_shape, dtype=torch.bool))  # fmt: skip


def _eager_backward(
    grad: Tensor,
    x: Tensor,
    a: Tensor,
    b: Tensor,
    h: Tensor,
    keep: Tensor,
    seed: Tensor,
    activation: str,
    scaling: float,
    dropout: float,
    needs: list[bool],
    dropout_position: str = "hidden",
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _native.backward(
        grad, x, a, b, h,
        activation=activation, scaling=scaling, dropout=dropout, seed=int(seed),
        needs_x=needs[0], needs_a=needs[1], needs_b=needs[2],
        dropout_position=dropout_position,
        keep=keep if keep.dim() == 2 else None, tensor_ops=_TENSOR_OPS,
    )  # fmt: skip
    # Custom ops return tensors: an empty one stands for "not asked for".
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


_branch_backward = torch.library.custom_op(
    "cera_rs::branch_backward", _eager_backward, mutates_args=()
)


@_branch_backward.register_fake
def _(grad, x, a, b, h, keep, seed, activation, scaling, dropout, needs, dropout_position="hidden"):
    shapes = (x.shape, a.shape, b.shape)
    return tuple(x.new_empty(s if need else 0) for s, need in zip(shapes, needs))


class _CeraBranch(torch.autograd.Function):
    """Saves only x, A, B (inputs, not copies), h, the seed and, on the tensor-op path,
    the bool dropout mask for backward."""

    @staticmethod
    def forward(ctx, x, a, b, seed, activation, scaling, dropout, dropout_position):
        # Eager calls skip the custom op's Python dispatch (tens of microseconds a call);
        # torch.compile traces the custom op, which it can keep in its graph, and meta
        # tensors (shapes without data) take it to reach its fake implementation.
        op = _branch_forward if torch.compiler.is_compiling() or x.is_meta else _eager_forward
        y, h, keep = op(x, a, b, seed, activation, scaling, dropout, dropout_position)
        ctx.save_for_backward(x, a, b, h, keep, seed)
        ctx.config = (activation, scaling, dropout)
        ctx.dropout_position = dropout_position
        return y

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h, keep, seed = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        op = _branch_backward if torch.compiler.is_compiling() or x.is_meta else _eager_backward
        # The forward ran with autocast off; a backward called inside an autocast
        # region runs the same way (what torch.amp.custom_bwd does).
        if autocast_dtype(x.device) is None:
            grads = op(grad, x, a, b, h, keep, seed, *ctx.config, needs, ctx.dropout_position)
        else:
            with torch.autocast(x.device.type, enabled=False):
                grads = op(grad, x, a, b, h, keep, seed, *ctx.config, needs, ctx.dropout_position)
        dx, da, db = (g if need else None for g, need in zip(grads, needs))
        return dx, da, db, None, None, None, None, None


def cera_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    *,
    dropout: float = 0.0,
    activation: str = "silu",
    training: bool = True,
    scaling: float = 1.0,
    dropout_position: str = "hidden",
) -> Tensor:
    """``scaling * B · Dropout(act(A x))`` for every row of ``x``.

    ``x`` is ``(..., d_in)``, ``A`` is ``(r, d_in)`` and ``B`` is ``(d_out, r)``; the
    result is ``(..., d_out)`` in ``x``'s dtype, or in the autocast dtype inside a
    ``torch.autocast`` region (as ``F.linear``'s). Dropout applies only when
    ``training`` is true, with inverted scaling ``1 / (1 - dropout)``; with
    ``dropout_position="input"`` it drops elements of ``x`` instead:
    ``scaling * B · act(A Dropout(x))``.
    """
    for name, t in (("x", x), ("A", A), ("B", B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if A.device != x.device or B.device != x.device:
        raise _native.DeviceError(
            f"device error: mixed devices: x is on {x.device}, A on {A.device}, B on {B.device}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {ACTIVATIONS}")
    check_dropout_position(dropout_position)
    p = float(dropout) if training else 0.0
    dtype = autocast_dtype(x.device)
    if dtype is None:
        return _branch(x, A, B, activation, float(scaling), p, dropout_position)
    x, A, B = (_autocast_cast(t, dtype) for t in (x, A, B))
    with torch.autocast(x.device.type, enabled=False):
        return _branch(x, A, B, activation, float(scaling), p, dropout_position)


def _branch(
    x: Tensor, A: Tensor, B: Tensor, activation: str, scaling: float, p: float, position: str
) -> Tensor:
    needs_grad = x.requires_grad or A.requires_grad or B.requires_grad
    wants_graph = torch.is_grad_enabled() and needs_grad
    if wants_graph or torch.compiler.is_compiling():
        seed = _draw_seed() if p > 0 else torch.zeros((), dtype=torch.int64)
        return _CeraBranch.apply(x, A, B, seed, activation, scaling, p, position)
    if p > 0:
        y, _, _ = _native.forward(
            x, A, B, activation=activation, scaling=scaling, dropout=p, seed=int(_draw_seed()),
            dropout_position=position, tensor_ops=_TENSOR_OPS,
        )  # fmt: skip
        return y
    return _native.delta(x, A, B, activation=activation, scaling=scaling, tensor_ops=_TENSOR_OPS)
