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

import contextlib
import math
import os
from dataclasses import dataclass

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
    for kind in (
        "cpu",
        "cuda",
        "xpu",
        "mps",
        "hpu",
        "xla",
        "mtia",
        "maia",
        "ipu",
        torch._C._get_privateuse1_backend_name(),
    )
    if torch.amp.is_autocast_available(kind)
)


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
        x,
        a,
        b,
        activation=activation,
        scaling=scaling,
        dropout=dropout,
        seed=int(seed),
        dropout_position=dropout_position,
        tensor_ops=_TENSOR_OPS,
    )
    # Custom ops return tensors: an empty one stands for "no mask kept".
    return y, h, keep if keep is not None else x.new_empty(0, dtype=torch.bool)


_branch_forward = torch.library.custom_op(
    "cera_rs::branch_forward", _eager_forward, mutates_args=()
)


@_branch_forward.register_fake
def _(x, a, b, seed, activation, scaling, dropout, dropout_position="hidden"):
    rows = math.prod(x.shape[:-1])
    keep_shape = (rows, a.shape[0]) if _keeps_mask(x, dropout, dropout_position) else (0,)
    return (
        x.new_empty((*x.shape[:-1], b.shape[0])),
        x.new_empty((rows, a.shape[0])),
        x.new_empty(keep_shape, dtype=torch.bool),
    )


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
        grad,
        x,
        a,
        b,
        h,
        activation=activation,
        scaling=scaling,
        dropout=dropout,
        seed=int(seed),
        needs_x=needs[0],
        needs_a=needs[1],
        needs_b=needs[2],
        dropout_position=dropout_position,
        keep=keep if keep.dim() == 2 else None,
        tensor_ops=_TENSOR_OPS,
    )
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


def _check_branch_args(
    x: Tensor, A: Tensor, B: Tensor, dropout: float, activation: str, dropout_position: str
) -> None:
    """What every branch checks before its kernels: tensors, one device, the dropout
    probability, the activation and where the dropout goes."""
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
    _check_branch_args(x, A, B, dropout, activation, dropout_position)
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
            x,
            A,
            B,
            activation=activation,
            scaling=scaling,
            dropout=p,
            seed=int(_draw_seed()),
            dropout_position=position,
            tensor_ops=_TENSOR_OPS,
        )
        return y
    return _native.delta(x, A, B, activation=activation, scaling=scaling, tensor_ops=_TENSOR_OPS)


# The branch on layers whose two linear maps are not GEMMs over the last dimension
# (embedding lookups, convolutions). The maps are libtorch's own ops called from Python
# (``torch.embedding``, ``torch.convolution`` and their ``aten`` backward ops, one call
# each); the activation and dropout between them are the Rust fused pass, forward and
# backward, as in ``cera_delta``. The autograd Function saves what the Linear branch
# saves (x, A, B: inputs, not copies; h; the seed; the tensor-op path's bool mask), and
# backward recomputes act(h), act'(h) and the mask in one pass. Doing the maps in Rust
# through tch would call the same libtorch kernels; from Python they keep every
# argument torch's conv and embedding accept (strides, padding, dilation, groups,
# padding_idx) without a second copy of their checks.


def _ew_forward(
    h: Tensor, seed: Tensor, activation: str, scaling: float, dropout: float
) -> tuple[Tensor, Tensor]:
    out, keep = _native.elementwise_forward(
        h,
        activation=activation,
        scaling=scaling,
        dropout=dropout,
        seed=int(seed),
        tensor_ops=_TENSOR_OPS,
    )
    return out, keep if keep is not None else h.new_empty(0, dtype=torch.bool)


_elementwise_forward = torch.library.custom_op(
    "cera_rs::elementwise_forward", _ew_forward, mutates_args=()
)


@_elementwise_forward.register_fake
def _(h, seed, activation, scaling, dropout):
    keeps = dropout > 0 and (_TENSOR_OPS or h.device.type != "cpu")
    return h.new_empty(h.shape), h.new_empty(h.shape if keeps else (0,), dtype=torch.bool)


def _ew_backward(
    h: Tensor,
    gb: Tensor,
    keep: Tensor,
    seed: Tensor,
    activation: str,
    scaling: float,
    dropout: float,
) -> tuple[Tensor, Tensor]:
    return _native.elementwise_backward(
        h,
        gb,
        activation=activation,
        scaling=scaling,
        dropout=dropout,
        seed=int(seed),
        keep=keep if keep.shape == h.shape else None,
        tensor_ops=_TENSOR_OPS,
    )


_elementwise_backward = torch.library.custom_op(
    "cera_rs::elementwise_backward", _ew_backward, mutates_args=()
)


@_elementwise_backward.register_fake
def _(h, gb, keep, seed, activation, scaling, dropout):
    return h.new_empty(h.shape), h.new_empty(h.shape)


def _ew_ops(t: Tensor):
    """The eager functions, or the custom ops while torch.compile traces."""
    if torch.compiler.is_compiling() or t.is_meta:
        return _elementwise_forward, _elementwise_backward
    return _ew_forward, _ew_backward


@dataclass(frozen=True)
class ConvMaps:
    """A: ``torch.convolution`` with the base layer's stride, padding, dilation and groups
    into r channels; B: a 1x1 convolution with the same groups back to d_out channels.
    ``padding`` is explicit (ints): ``"same"`` and non-zero padding modes are resolved by
    the layer before the call (``CeraConv``)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def a(self, x: Tensor, a: Tensor) -> Tensor:
        return torch.convolution(
            x, a, None, self.stride, self.padding, self.dilation, False, self._zeros, self.groups
        )

    def b(self, hidden: Tensor, b: Tensor) -> Tensor:
        ones = (1,) * len(self.stride)
        return torch.convolution(
            hidden, b, None, ones, self._zeros, ones, False, self._zeros, self.groups
        )

    def b_grads(self, g: Tensor, hidden: Tensor, b: Tensor, mask: tuple[bool, bool]):
        ones = (1,) * len(self.stride)
        dh, db, _ = torch.ops.aten.convolution_backward(
            g,
            hidden,
            b,
            None,
            ones,
            self._zeros,
            ones,
            False,
            self._zeros,
            self.groups,
            [mask[0], mask[1], False],
        )
        return dh, db

    def a_grads(self, dz: Tensor, x: Tensor, a: Tensor, mask: tuple[bool, bool]):
        dx, da, _ = torch.ops.aten.convolution_backward(
            dz,
            x,
            a,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            self._zeros,
            self.groups,
            [mask[0], mask[1], False],
        )
        return dx, da

    @property
    def _zeros(self) -> tuple[int, ...]:
        return (0,) * len(self.stride)


@dataclass(frozen=True)
class EmbeddingMaps:
    """A: the lookup ``A[:, ids]`` (A is ``(r, num_embeddings)``, as LoRA's embedding A),
    with the base layer's ``padding_idx`` (no gradient into that column) and
    ``scale_grad_by_freq``; B: ``(d_out, r)`` over the last dimension."""

    num_embeddings: int
    padding_idx: int | None = None
    scale_grad_by_freq: bool = False

    def a(self, ids: Tensor, a: Tensor) -> Tensor:
        return torch.embedding(a.t(), ids)

    def b(self, hidden: Tensor, b: Tensor) -> Tensor:
        return torch.nn.functional.linear(hidden, b)

    def b_grads(self, g: Tensor, hidden: Tensor, b: Tensor, mask: tuple[bool, bool]):
        dh = g @ b if mask[0] else None
        db = (
            g.reshape(-1, g.shape[-1]).t() @ hidden.reshape(-1, hidden.shape[-1])
            if mask[1]
            else None
        )
        return dh, db

    def a_grads(self, dz: Tensor, ids: Tensor, a: Tensor, mask: tuple[bool, bool]):
        if not mask[1]:
            return None, None
        padding = -1 if self.padding_idx is None else self.padding_idx
        grad = torch.ops.aten.embedding_backward(
            dz, ids, self.num_embeddings, padding, self.scale_grad_by_freq, False
        )
        return None, grad.t()


class _MappedBranch(torch.autograd.Function):
    """``scaling * maps.b(Dropout(act(maps.a(x, A))), B)``; saves x, A, B, h, the seed
    and (tensor-op path, hidden dropout) the bool mask, as ``_CeraBranch`` does."""

    @staticmethod
    def forward(ctx, x, a, b, seed, maps, activation, scaling, dropout, position):
        ew_forward, _ = _ew_ops(x)
        hidden_p, input_p = (dropout, 0.0) if position == "hidden" else (0.0, dropout)
        source = ew_forward(x, seed, "identity", 1.0, input_p)[0] if input_p else x
        h = maps.a(source, a)
        out, keep = ew_forward(h, seed, activation, scaling, hidden_p)
        ctx.save_for_backward(x, a, b, h, keep, seed)
        ctx.config = (maps, activation, scaling, hidden_p, input_p)
        return maps.b(out, b)

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h, keep, seed = ctx.saved_tensors
        maps, activation, scaling, hidden_p, input_p = ctx.config
        needs_x, needs_a, needs_b = ctx.needs_input_grad[:3]
        ew_forward, ew_backward = _ew_ops(x)
        with _autocast_off(x.device):
            gb, _ = maps.b_grads(grad, h, b, (True, False))
            am, dz = ew_backward(h, gb, keep, seed, activation, scaling, hidden_p)
            db = maps.b_grads(grad, am, b, (False, True))[1] if needs_b else None
            source = ew_forward(x, seed, "identity", 1.0, input_p)[0] if input_p and needs_a else x
            dx, da = maps.a_grads(dz, source, a, (needs_x, needs_a))
            if dx is not None and input_p:
                dx = ew_forward(dx, seed, "identity", 1.0, input_p)[0]
        return dx, da, db, None, None, None, None, None, None


def _autocast_off(device: torch.device):
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def mapped_delta(
    x: Tensor,
    A: Tensor,
    B: Tensor,
    maps: ConvMaps | EmbeddingMaps,
    *,
    dropout: float = 0.0,
    activation: str = "silu",
    training: bool = True,
    scaling: float = 1.0,
    dropout_position: str = "hidden",
) -> Tensor:
    """``scaling * B · Dropout(act(A x))`` where ``A x`` and ``B h`` are ``maps``' embedding
    lookups or convolutions (``cera_delta`` is the same over the last dimension).

    ``x`` is the base layer's input: token ids for ``EmbeddingMaps`` (``A`` is
    ``(r, num_embeddings)``, ``B`` ``(d_out, r)``), ``(N, C_in, *spatial)`` for
    ``ConvMaps`` (``A`` a conv weight ``(r, C_in / groups, *kernel)``, ``B``
    ``(d_out, r / groups, 1, ...)``). Dropout, scaling and autocast behave as in
    ``cera_delta``; ``dropout_position="input"`` drops elements of ``x`` (convolutions
    only: ids cannot be dropped out).
    """
    _check_branch_args(x, A, B, dropout, activation, dropout_position)
    embedding = isinstance(maps, EmbeddingMaps)
    if embedding and dropout_position == "input" and dropout > 0:
        raise ValueError(
            "dropout_position='input' cannot apply to an embedding: its input "
            "is token ids; use dropout_position='hidden'"
        )
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        x, A, B = (_autocast_cast(t, dtype) for t in (x, A, B))
    _check_mapped(x, A, B, maps)
    if not embedding and x.dim() == len(maps.stride) + 1:  # unbatched, as torch's conv takes
        return mapped_delta(
            x.unsqueeze(0),
            A,
            B,
            maps,
            dropout=dropout,
            activation=activation,
            training=training,
            scaling=scaling,
            dropout_position=dropout_position,
        ).squeeze(0)
    p = float(dropout) if training else 0.0
    with _autocast_off(x.device):
        needs_grad = (x.requires_grad and not embedding) or A.requires_grad or B.requires_grad
        if (torch.is_grad_enabled() and needs_grad) or torch.compiler.is_compiling():
            seed = _draw_seed() if p > 0 else torch.zeros((), dtype=torch.int64)
            return _MappedBranch.apply(
                x, A, B, seed, maps, activation, float(scaling), p, dropout_position
            )
        seed = _draw_seed() if p > 0 else torch.zeros((), dtype=torch.int64)
        hidden_p, input_p = (p, 0.0) if dropout_position == "hidden" else (0.0, p)
        if input_p:
            x = _ew_forward(x, seed, "identity", 1.0, input_p)[0]
        out, _ = _ew_forward(maps.a(x, A), seed, activation, float(scaling), hidden_p)
        return maps.b(out, B)


def _check_mapped(x: Tensor, A: Tensor, B: Tensor, maps: ConvMaps | EmbeddingMaps) -> None:
    """Shape and dtype errors in torch's names before libtorch sees the tensors."""
    if not A.is_floating_point() or B.dtype != A.dtype:
        raise TypeError(f"A and B must share one floating dtype, got {A.dtype} and {B.dtype}")
    if isinstance(maps, EmbeddingMaps):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"embedding ids must be an integer tensor, got {x.dtype}")
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"A must be (r, num_embeddings) and B (d_out, r), got A "
                f"{tuple(A.shape)} and B {tuple(B.shape)}"
            )
        if A.shape[1] != maps.num_embeddings:
            raise ValueError(
                f"A has {A.shape[1]} columns, the embedding {maps.num_embeddings} rows"
            )
        return
    nd = len(maps.stride)
    if x.dtype != A.dtype:
        raise TypeError(f"mixed dtypes: x is {x.dtype}, A is {A.dtype}, B is {B.dtype}")
    if x.dim() not in (nd + 1, nd + 2) or A.dim() != nd + 2 or B.dim() != nd + 2:
        raise ValueError(
            f"a {nd}-d convolution needs x (N, C_in, *{nd} dims) or unbatched, A and B of "
            f"{nd + 2} dims, got x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    c_in = x.shape[-nd - 1]
    if A.shape[1] * maps.groups != c_in or B.shape[1] * maps.groups != A.shape[0]:
        raise ValueError(
            f"x has {c_in} channels, A is {tuple(A.shape)} and B {tuple(B.shape)} with "
            f"groups={maps.groups}: expected A (r, {c_in // maps.groups}, ...) and B "
            f"(d_out, r / {maps.groups}, ...)"
        )
