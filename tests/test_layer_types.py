"""CeRA on every layer type LoRA adapts besides Linear: nn.Embedding and nn.Conv1d/2d/3d
(groups, dilation, strides, padding modes). Each branch against the plain-PyTorch
composition of the formula, float64 gradcheck, the Rust fused pass shown to be what runs
(no activation or dropout op of torch's in the trace) and the saved tensors (x, A, B, h,
the seed: fewer bytes than the plain composition keeps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cera_rs import CeraConv, CeraEmbedding, CeraLayer, CeraLinear, functional, mapped_delta
from cera_rs.functional import ConvMaps, EmbeddingMaps
from conftest import dropped, max_rel, seed_after_manual_seed

ACT = {"silu": F.silu, "relu": torch.relu, "identity": lambda t: t}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

# (name, base layer, input spatial size)
CONVS = [
    ("conv1d", lambda: nn.Conv1d(6, 10, 3, stride=2, padding=1), (11,)),
    ("conv1d dilated", lambda: nn.Conv1d(6, 10, 3, dilation=2), (12,)),
    ("conv2d", lambda: nn.Conv2d(6, 10, 3, padding=1), (7, 6)),
    ("conv2d groups", lambda: nn.Conv2d(6, 10, 3, groups=2, padding=1), (7, 6)),
    ("conv2d depthwise", lambda: nn.Conv2d(6, 6, 3, groups=6), (6, 6)),
    (
        "conv2d same reflect",
        lambda: nn.Conv2d(6, 10, (2, 3), padding="same", padding_mode="reflect"),
        (6, 5),
    ),
    ("conv2d same even kernel", lambda: nn.Conv2d(6, 10, 4, padding="same"), (6, 6)),
    ("conv3d", lambda: nn.Conv3d(6, 10, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), (3, 5, 5)),
]


def conv_layer(make, r=6, **kwargs) -> CeraConv:
    torch.manual_seed(0)
    return CeraConv(make(), r=r, init_weights=False, **kwargs)


def conv_input(layer: CeraConv, spatial, n=3, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, layer.in_features, *spatial, generator=gen).to(dtype)


def plain_conv_branch(
    layer, x, a, b, *, activation="silu", scaling=1.0, p=0.0, seed=0, position="hidden"
):
    """scaling * B ⊛ Dropout(act(A ⊛ x)) with torch's conv ops, the padding done as the
    base layer does it, and the kernel's documented mask."""
    base = layer.base_layer
    conv = CONV_FN[a.dim() - 2]
    if p > 0 and position == "input":
        # the mask covers A's input as the conv reads it: padded first where torch's conv
        # cannot pad (a padding mode, uneven "same"), so reflected copies drop on their own
        x, padding = layer._padded(x)[0], layer._padded(x)[1].padding
        x = dropped(x, p, seed)
    elif base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    else:
        padding = base.padding
    h = conv(x, a, None, base.stride, padding, base.dilation, base.groups)
    out = ACT[activation](h)
    if p > 0 and position == "hidden":
        out = dropped(out, p, seed)
    return scaling * conv(out, b, None, 1, 0, 1, base.groups)


def plain_embedding_branch(layer, ids, a, b, *, activation="silu", scaling=1.0, p=0.0, seed=0):
    base = layer.base_layer
    h = F.embedding(
        ids, a.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq
    )
    out = ACT[activation](h)
    if p > 0:
        out = dropped(out, p, seed)
    return scaling * (out @ b.T)


def weights(layer: CeraLayer, name="default"):
    return layer.cera_A[name].weight, layer.cera_B[name].weight


# Forward and gradients against the plain composition


@pytest.mark.parametrize("name, make, spatial", CONVS, ids=[c[0] for c in CONVS])
@pytest.mark.parametrize(
    "activation, p, position",
    [
        ("silu", 0.0, "hidden"),
        ("silu", 0.3, "hidden"),
        ("relu", 0.2, "hidden"),
        ("identity", 0.25, "input"),
    ],
)
def test_conv_matches_plain_composition(name, make, spatial, activation, p, position):
    layer = conv_layer(
        make, dropout=p, activation=activation, scaling=0.7, dropout_position=position
    ).train()
    x = conv_input(layer, spatial).requires_grad_(True)
    g = torch.randn(layer.base_layer(x).shape, generator=torch.Generator().manual_seed(5))
    seed = seed_after_manual_seed(4)
    torch.manual_seed(4)
    y = layer(x)
    dx, da, db = torch.autograd.grad(y, (x, *weights(layer)), g)
    a, b = (w.detach().clone().requires_grad_(True) for w in weights(layer))
    x2 = x.detach().clone().requires_grad_(True)
    expected = layer.base_layer(x2) + plain_conv_branch(
        layer, x2, a, b, activation=activation, scaling=0.7, p=p, seed=seed, position=position
    )
    ex, ea, eb = torch.autograd.grad(expected, (x2, a, b), g)
    assert y.shape == expected.shape
    for got, want in ((y, expected), (dx, ex), (da, ea), (db, eb)):
        assert max_rel(got, want) < 2e-5


@pytest.mark.parametrize("activation, p", [("silu", 0.0), ("silu", 0.3), ("relu", 0.1)])
@pytest.mark.parametrize("padding_idx, freq", [(None, False), (3, True)])
def test_embedding_matches_plain_composition(activation, p, padding_idx, freq):
    torch.manual_seed(0)
    base = nn.Embedding(40, 12, padding_idx=padding_idx, scale_grad_by_freq=freq)
    layer = CeraEmbedding(
        base, r=5, dropout=p, activation=activation, scaling=1.5, init_weights=False
    ).train()
    ids = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = 3  # repeated ids, and the padding index where there is one
    g = torch.randn(4, 9, 12, generator=torch.Generator().manual_seed(5))
    seed = seed_after_manual_seed(4)
    torch.manual_seed(4)
    y = layer(ids)
    da, db = torch.autograd.grad(y, weights(layer), g)
    a, b = (w.detach().clone().requires_grad_(True) for w in weights(layer))
    expected = base(ids) + plain_embedding_branch(
        layer, ids, a, b, activation=activation, scaling=1.5, p=p, seed=seed
    )
    ea, eb = torch.autograd.grad(expected, (a, b), g)
    for got, want in ((y, expected), (da, ea), (db, eb)):
        assert max_rel(got, want) < 2e-5
    if padding_idx is not None:
        assert torch.all(da[:, padding_idx] == 0)


def test_conv_eval_and_no_grad_paths_agree_and_drop_nothing():
    layer = conv_layer(CONVS[3][1], dropout=0.5).eval()
    x = conv_input(layer, CONVS[3][2])
    a, b = weights(layer)
    expected = layer.base_layer(x) + plain_conv_branch(layer, x, a, b)
    with torch.no_grad():
        assert max_rel(layer(x), expected) < 1e-5
    assert max_rel(layer(x), expected) < 1e-5
    layer.train()  # training without autograd still drops out, with the same mask
    torch.manual_seed(8)
    with torch.no_grad():
        no_grad = layer(x)
    torch.manual_seed(8)
    assert torch.equal(no_grad, layer(x).detach())
    assert max_rel(no_grad, expected) > 1e-3


def test_unbatched_conv_input():
    layer = conv_layer(CONVS[2][1]).eval()
    x = conv_input(layer, CONVS[2][2])
    torch.testing.assert_close(layer(x[1]), layer(x)[1], rtol=1e-5, atol=1e-6)


# float64 gradcheck


@pytest.mark.parametrize("name, make, spatial", CONVS, ids=[c[0] for c in CONVS])
@pytest.mark.parametrize("p, position", [(0.0, "hidden"), (0.3, "hidden"), (0.3, "input")])
def test_conv_gradcheck_float64(name, make, spatial, p, position):
    layer = conv_layer(make, r=2 * make().groups if make().groups > 1 else 3).double()
    base = layer.base_layer
    x = conv_input(layer, spatial, n=2, dtype=torch.float64).requires_grad_(True)
    a, b = (w.detach().clone().requires_grad_(True) for w in weights(layer))
    padded, maps = layer._padded(x)

    def branch(x, a, b):
        torch.manual_seed(11)  # the same dropout mask on every call
        xp = layer._padded(x)[0]
        return mapped_delta(xp, a, b, maps, dropout=p, scaling=0.8, dropout_position=position)

    # fast mode: the Jacobian along random directions, two forwards per input, not per element
    assert torch.autograd.gradcheck(branch, (x, a, b), eps=1e-6, atol=1e-5, fast_mode=True)
    assert base.weight.dim() == a.dim()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_embedding_gradcheck_float64(p):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(4, 15, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(7, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, 15, (3, 6), generator=gen)
    # (padding_idx and scale_grad_by_freq change the gradient on purpose, as torch's own
    # embedding does: the plain-composition test above compares them with F.embedding's)
    maps = EmbeddingMaps(15)

    def branch(a, b):
        torch.manual_seed(11)
        return mapped_delta(ids, a, b, maps, dropout=p, activation="silu", scaling=0.8)

    assert torch.autograd.gradcheck(branch, (a, b), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(branch, (a, b), eps=1e-6, atol=1e-5, fast_mode=True)


# The Rust pass is what runs, and what is saved


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


ELEMENTWISE_OPS = (
    "silu",
    "sigmoid",
    "relu",
    "threshold",
    "dropout",
    "bernoulli",
    "mul",
    "native_dropout",
    "where",
)


def saved_tensors(fn):
    """The tensors autograd keeps for backward while ``fn`` runs, and its output."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def nbytes(tensors, exclude=()):
    ids = {id(t) for t in exclude}
    return sum(t.numel() * t.element_size() for t in tensors if id(t) not in ids)


@pytest.mark.parametrize("kind", ["conv2d groups", "conv3d", "embedding"])
def test_rust_pass_runs_and_only_h_is_saved(kind):
    if kind == "embedding":
        torch.manual_seed(0)
        layer = CeraEmbedding(nn.Embedding(50, 16), r=8, dropout=0.2, init_weights=False)
        x = torch.randint(0, 50, (6, 12))
    else:
        make, spatial = next((c[1], c[2]) for c in CONVS if c[0] == kind)
        layer = conv_layer(make, r=8, dropout=0.2)
        x = conv_input(layer, spatial).requires_grad_(True)
    layer.train()
    a, b = weights(layer)
    with OpLog() as log:
        saved, y = saved_tensors(lambda: layer(x))
        y.sum().backward()
    # torch's own activation, dropout or masking ops never run: the Rust pass does them
    assert not [op for op in log.ops if op.split(".")[0] in ELEMENTWISE_OPS], log.ops
    branch = [
        t
        for t in saved
        if t is not x and t is not a and t is not b and t.dim() > 0 and t.numel() > 0
    ]
    hidden = [t for t in branch if t.shape[-1 if kind == "embedding" else 1] == 8]
    # besides the inputs and the seed, the branch keeps one tensor: h (r channels)
    assert len(hidden) == 1 and all(t.dtype != torch.bool for t in hidden)
    # the plain composition keeps h, act(h) and the mask as well
    a2, b2 = (w.detach().clone().requires_grad_(True) for w in (a, b))
    if kind == "embedding":
        plain, _ = saved_tensors(lambda: plain_embedding_branch(layer, x, a2, b2, p=0.2, seed=1))
    else:
        plain, _ = saved_tensors(lambda: plain_conv_branch(layer, x, a2, b2, p=0.2, seed=1))
    ours = [t for t in saved if not any(t is p for p in layer.base_layer.parameters())]
    assert nbytes(ours, (x, a, b)) < nbytes(plain, (x, a2, b2)) / 2


def test_tensor_op_path_matches_the_fused_loops(monkeypatch):
    """Every non-CPU device takes the tensor-op path; forced on CPU, the same numbers."""
    layer = conv_layer(CONVS[3][1], dropout=0.3).train()
    x = conv_input(layer, CONVS[3][2]).requires_grad_(True)
    results = []
    for tensor_ops in (False, True):
        monkeypatch.setattr(functional, "_TENSOR_OPS", tensor_ops)
        torch.manual_seed(6)
        y = layer(x)
        results.append((y, *torch.autograd.grad(y.pow(2).sum(), (x, *weights(layer)))))
    for loops, ops in zip(*results):
        assert max_rel(ops, loops) < 1e-5


# Layer behaviour


def test_new_adapters_leave_outputs_unchanged_and_init():
    torch.manual_seed(0)
    conv = CeraConv(nn.Conv2d(8, 12, 3, groups=4), r=8)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(conv(x), conv.base_layer(x))
    a, b = weights(conv)
    assert a.shape == (8, 2, 3, 3) and b.shape == (12, 2, 1, 1) and torch.all(b == 0)
    emb = CeraEmbedding(nn.Embedding(1000, 8), r=16)
    a, b = weights(emb)
    assert a.shape == (16, 1000) and b.shape == (8, 16) and torch.all(b == 0)
    assert abs(a.std().item() - 1.0) < 0.05
    ids = torch.randint(0, 1000, (3, 4))
    assert torch.equal(emb(ids), emb.base_layer(ids))
    trainable = {n for n, p in emb.named_parameters() if p.requires_grad}
    assert trainable == {"cera_A.default.weight", "cera_B.default.weight"}


def test_settings_the_layer_types_cannot_take():
    with pytest.raises(ValueError, match="r=3 is not divisible by the Conv2d's groups=2"):
        CeraConv(nn.Conv2d(4, 4, 3, groups=2), r=3)
    with pytest.raises(ValueError, match="its input is token ids"):
        CeraEmbedding(nn.Embedding(10, 4), r=2, dropout=0.1, dropout_position="input")
    with pytest.raises(ValueError, match="max_norm"):
        CeraEmbedding(nn.Embedding(10, 4, max_norm=1.0), r=2)
    with pytest.raises(TypeError, match="CeraConv wraps"):
        CeraConv(nn.Linear(3, 3), r=2)
    layer = conv_layer(CONVS[2][1])
    with pytest.raises(TypeError, match="mixed dtypes"):
        mapped_delta(
            torch.randn(1, 6, 5, 5).double(), *weights(layer), ConvMaps((1, 1), (1, 1), (1, 1), 1)
        )
    with pytest.raises(ValueError, match="channels"):
        mapped_delta(torch.randn(1, 5, 5, 5), *weights(layer), ConvMaps((1, 1), (1, 1), (1, 1), 1))
    emb = CeraEmbedding(nn.Embedding(10, 4), r=2)
    with pytest.raises(TypeError, match="integer"):
        mapped_delta(torch.rand(2, 3), *weights(emb), EmbeddingMaps(10))


def test_set_scale_scale_layer_unscale_layer():
    """The API diffusers calls on PEFT layers: set_adapters' weights and lora_scale."""
    layer = conv_layer(CONVS[2][1], scaling=0.5).eval()
    x = conv_input(layer, CONVS[2][2])
    base, full = layer.base_layer(x), layer(x)
    layer.set_scale("default", 2.0)
    assert layer.scaling["default"] == 1.0
    torch.testing.assert_close(layer(x) - base, 2 * (full - base), rtol=1e-5, atol=1e-6)
    layer.scale_layer(0.25)
    assert layer.scaling["default"] == 0.25
    layer.unscale_layer(0.25)
    assert layer.scaling["default"] == 1.0
    layer.unscale_layer()
    assert layer.scaling["default"] == 0.5
    layer.set_scale("absent", 3.0)  # names the layer lacks are skipped, as LoRA's
    assert set(layer.scaling) == {"default"}


def test_mixed_adapter_batch_on_conv_and_embedding():
    layer = conv_layer(CONVS[3][1])
    layer.update_layer("other", 4, init_weights=False)
    layer.eval()
    x = conv_input(layer, CONVS[3][2], n=3)
    names = ["default", "__base__", "other"]
    mixed = layer(x, adapter_names=names)
    layer.set_adapter("other")
    assert max_rel(mixed[2], layer(x)[2]) < 1e-6
    layer.set_adapter("default")
    assert max_rel(mixed[0], layer(x)[0]) < 1e-6
    assert torch.equal(mixed[1], layer.base_layer(x)[1])


def test_linear_keeps_its_own_class():
    torch.manual_seed(0)
    layer = CeraLinear(nn.Linear(4, 3), r=2)
    assert isinstance(layer, CeraLayer) and not isinstance(layer, (CeraConv, CeraEmbedding))


def test_grouped_conv_full_gradcheck_float64():
    """Every Jacobian element, on a tiny grouped conv with hidden dropout."""
    torch.manual_seed(0)
    layer = CeraConv(nn.Conv2d(4, 4, 3, groups=2, padding=1), r=2, init_weights=False).double()
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    a, b = (w.detach().clone().requires_grad_(True) for w in weights(layer))
    maps = layer._padded(x)[1]

    def branch(x, a, b):
        torch.manual_seed(11)
        return mapped_delta(x, a, b, maps, dropout=0.3, scaling=0.8)

    assert torch.autograd.gradcheck(branch, (x, a, b), eps=1e-6, atol=1e-5)


# Other base layers: any x -> y layer with in_features/out_features, custom layers, refusals


class Int8Linear(nn.Module):
    """A stand-in for quantized linear layers that are not nn.Linear subclasses (HQQLinear,
    GPTQ/AWQ QuantLinear): int8 weight and a float scale as buffers, sizes as ints."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", (linear.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale).T


class Scale(nn.Module):
    """A layer CeRA does not know: an elementwise scale (no in_features/out_features)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.d = d

    def forward(self, x):
        return x * self.weight


class CeraScale(CeraLinear):
    """A user's CeRA layer for Scale: d -> d."""

    @staticmethod
    def features(base_layer):
        return base_layer.d, base_layer.d


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = Int8Linear(nn.Linear(12, 12))
        self.s = Scale(12)
        self.attn = nn.MultiheadAttention(12, 2, batch_first=True)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = self.s(torch.relu(self.q(x)))
        return self.out(self.attn(h, h, h, need_weights=False)[0]).mean(1)


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def test_quantized_style_layer_custom_module_and_round_trip(tmp_path):
    from peft import PeftModel, get_peft_model

    from cera_rs import CeraConfig

    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(1))
    config = CeraConfig(r=4, target_modules=["q", "s"], init_weights=False)
    with pytest.raises(TypeError, match=r"target module 's'.*got Scale.*_register_custom_module"):
        get_peft_model(net(), config)
    config._register_custom_module({Scale: CeraScale})
    model = get_peft_model(net(), config)
    assert isinstance(model.base_model.model.q, CeraLinear)
    assert isinstance(model.base_model.model.s, CeraScale)
    assert model.base_model.model.q.cera_A["default"].weight.dtype == torch.float32
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".cera_" in n for n in trainable)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    loaded_config = CeraConfig.from_pretrained(tmp_path)
    loaded_config._register_custom_module({Scale: CeraScale})
    loaded = PeftModel.from_pretrained(net(), tmp_path, config=loaded_config).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="dict from layer types"):
        config._register_custom_module([Scale])


@pytest.mark.parametrize("target", ["attn", "out_proj"])
def test_multihead_attention_is_refused_naming_why_and_what_instead(target):
    from peft import get_peft_model

    from cera_rs import CeraConfig

    with pytest.raises(
        TypeError,
        match=r"cannot adapt nn.MultiheadAttention: .*non-linear in "
        r"x, so no weight delta equals it.*Target the model's "
        r"query/key/value/output projections",
    ):
        get_peft_model(net(), CeraConfig(r=4, target_modules=[target]))


def test_target_parameters_is_refused_naming_why_and_what_instead():
    from cera_rs import CeraConfig

    with pytest.raises(
        TypeError,
        match=r"target_parameters.*no weight delta equals it; "
        r"target the Linear layers",
    ):
        CeraConfig(target_parameters=["experts.gate_up_proj"])


# torch.compile and mixed precision, as the Linear branch is tested (test_autocast.py)


def _compiled_case(kind: str, device: str = "cpu"):
    """A CeRA conv or embedding layer (dropout 0: eager and compiled draw masks apart),
    its input and the plain composition of base and branch with torch's ops."""
    torch.manual_seed(0)
    if kind == "conv":
        layer = conv_layer(CONVS[2][1], dropout=0.0).to(device).train()
        x = conv_input(layer, CONVS[2][2]).to(device).requires_grad_(True)

        def plain(x, a, b):
            return layer.base_layer(x) + plain_conv_branch(layer, x, a, b)
    else:
        layer = (
            CeraEmbedding(nn.Embedding(40, 12, padding_idx=3), r=4, dropout=0.0, init_weights=False)
            .to(device)
            .train()
        )
        x = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1)).to(device)

        def plain(x, a, b):
            return layer.base_layer(x) + plain_embedding_branch(layer, x, a, b)

    return layer, x, plain


def _run(fn, leaves, x, dtype):
    """Output and the gradients of ``leaves`` (and of x for a conv) of ``fn(x)`` under
    autocast (off for ``dtype=None``), backward outside the region."""
    leaves = list(leaves) + ([x] if x.is_floating_point() else [])
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = fn(x)
    return y.detach(), list(torch.autograd.grad(y.float().pow(2).sum(), leaves))


@pytest.mark.parametrize("kind", ["conv", "embedding"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_torch_compile_fullgraph_matches_eager(kind, dtype):
    """Dynamo and AOTAutograd trace the branch in one graph (fullgraph: the Rust pass is
    the custom ops, the maps torch's own), eagerly's numbers exactly, autocast included;
    aot_eager traces what inductor would compile in a tenth of the time."""
    torch._dynamo.reset()
    layer, x, _ = _compiled_case(kind)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    (y, grads), (y_c, grads_c) = (_run(fn, weights(layer), x, dtype) for fn in (layer, compiled))
    assert y_c.dtype == y.dtype
    torch.testing.assert_close(y_c, y, rtol=0, atol=0)
    for g, g_c in zip(grads, grads_c):
        assert g_c.dtype == torch.float32
        torch.testing.assert_close(g_c, g, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_bf16_autocast_matches_the_plain_composition_under_autocast(kind):
    """Under bf16 autocast the maps run in bf16 (as torch's conv and linear do; a lookup
    is not cast, the branch's table is), float32 weights get float32 gradients, and the
    result is the plain composition's within bf16 precision."""
    layer, x, plain = _compiled_case(kind)
    y, grads = _run(layer, weights(layer), x, torch.bfloat16)
    a, b = (w.detach().clone().requires_grad_(True) for w in weights(layer))
    y_ref, grads_ref = _run(lambda x: plain(x, a, b), (a, b), x, torch.bfloat16)
    assert y.dtype == y_ref.dtype
    assert max_rel(y, y_ref) < 2e-2
    y32, _ = _run(layer, weights(layer), x, None)
    assert max_rel(y, y32) < 2e-2
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32 and max_rel(g, g_ref) < 3e-2


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_cuda_matches_the_plain_composition_compiled_and_under_autocast(kind, monkeypatch):
    """On CUDA (scripts/gpu-check.sh): the tensor-op path against the plain composition
    in float32 (cuDNN's TF32 off, as it is for matmuls), then inductor's fullgraph
    compile and bf16 autocast."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    layer, x, plain = _compiled_case(kind, "cuda")
    y, grads = _run(layer, weights(layer), x, None)
    a, b = (w.detach().clone().requires_grad_(True) for w in weights(layer))
    y_ref, grads_ref = _run(lambda x: plain(x, a, b), (a, b), x, None)
    assert y.device.type == "cuda" and max_rel(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert max_rel(g, g_ref) < 1e-5
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y_c, grads_c = _run(compiled, weights(layer), x, torch.bfloat16)
    y_bf, grads_bf = _run(layer, weights(layer), x, torch.bfloat16)
    assert max_rel(y_c, y_bf) < 2e-2 and max_rel(y_bf, y) < 2e-2
    for g, g_c in zip(grads_bf, grads_c):
        assert g_c.dtype == torch.float32 and max_rel(g_c, g) < 3e-2
