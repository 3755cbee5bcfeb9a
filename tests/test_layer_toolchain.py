"""Embedding and convolution adapters through the toolchain after training: spectra
(``analyze``, ``weight_spectrum``, the callback, ``cera-rs analyze``), the export to
LoRA (an embedding's exact table SVD, a convolution's LoRA conv on input patches) that
PEFT and diffusers load back, and the llama.cpp export of ``token_embd``."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from models import tiny_llama
from peft import PeftModel
from torch import nn
from torch.nn import functional as F

from cera_rs import CeraConfig, cli, get_cera_model
from cera_rs.export import save_gguf_lora, save_lora, to_lora
from cera_rs.export.layers import conv_patches
from cera_rs.spectral import SpectralCallback, analyze, weight_spectrum
from cera_rs.spectral.adapter_dir import adapter_dir_spectrum
from conftest import max_rel

ACT = {"silu": F.silu, "identity": lambda t: t}


class ConvNet(nn.Module):
    """Two convolutions (the second strided, grouped or dilated as asked) and a head."""

    def __init__(self, groups: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=groups, dilation=dilation)

    def forward(self, x):
        return self.conv2(F.silu(self.conv1(x)))


def conv_base(seed=0, **net) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(**net).eval()


def conv_model(activation="silu", r=4, seed=0, **net) -> nn.Module:
    base = conv_base(seed, **net)
    config = CeraConfig(
        r=r,
        target_modules=["conv1", "conv2"],
        activation=activation,
        cera_dropout=0.0,
        init_weights=False,
    )
    return get_cera_model(base, config).eval()


def images(n=6, seed=1, size=8):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def embedding_model(activation="silu", r=4, seed=0, targets=("embed_tokens",)):
    torch.manual_seed(seed)
    config = CeraConfig(
        r=r,
        target_modules=list(targets),
        activation=activation,
        cera_dropout=0.0,
        init_weights=False,
    )
    return get_cera_model(tiny_llama(0), config).eval()


def token_batches(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 40, (2, 12), generator=gen)  # ids 40.. never seen
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def layer(model, name):
    return dict(model.named_modules())[name]


def branch_table(cera_embedding) -> torch.Tensor:
    """``B act(A)``, d x vocab, from the weights with torch's ops."""
    a, b = cera_embedding.cera_A["default"].weight, cera_embedding.cera_B["default"].weight
    act = ACT[cera_embedding.activation["default"]]
    return (b.double() @ act(a.double())).detach()


def plain_conv_delta(cera_conv, x):
    base, act = cera_conv.base_layer, ACT[cera_conv.activation["default"]]
    a, b = cera_conv.cera_A["default"].weight, cera_conv.cera_B["default"].weight
    with torch.no_grad():
        h = F.conv2d(x, a, None, base.stride, base.padding, base.dilation, base.groups)
        return F.conv2d(act(h), b, None, 1, 0, 1, base.groups)


def captured_input(model, name, x):
    seen = []
    handle = layer(model, name).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


# --- spectra ------------------------------------------------------------------------


def test_analyze_embedding_rows_are_tokens_and_conv_rows_are_output_positions():
    model = embedding_model()
    batches = token_batches()
    report = analyze(model, batches, progress=False)
    emb = layer(model, "base_model.model.model.embed_tokens")
    table = branch_table(emb)
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches])
    expected = torch.linalg.svdvals(table[:, ids].T).numpy()
    (row,) = report.modules
    assert row.name == "model.embed_tokens" and row.tokens == len(ids) == 63
    np.testing.assert_allclose(row.spectrum.singular_values[:4], expected[:4], rtol=1e-6)

    conv = conv_model()
    x = images()
    report = analyze(conv, [x[:4], x[4:]], progress=False)
    assert [m.name for m in report.modules] == ["conv1", "conv2"]
    for m, positions in zip(report.modules, (6 * 8 * 8, 6 * 4 * 4)):
        name = "base_model.model." + m.name
        rows = plain_conv_delta(layer(conv, name), captured_input(conv, name, x))
        rows = rows.movedim(1, -1).reshape(-1, rows.shape[1]).double()
        assert m.tokens == positions
        expected = torch.linalg.svdvals(rows).numpy()
        # rank r = 4: what lies beyond is round-off in both
        np.testing.assert_allclose(m.spectrum.singular_values[:4], expected[:4], rtol=1e-6)
        assert m.spectrum.tail_energy() < 1e-12
    # the callback reads the same report
    logged = SpectralCallback([x], every_n_steps=1).measure(conv)
    assert logged["spectral/conv2/effective_rank"] == pytest.approx(
        analyze(conv, [x], progress=False)["conv2"].spectrum.effective_rank
    )


def test_weight_spectra_of_grouped_convs_and_embeddings_and_their_folders(tmp_path, capsys):
    conv = conv_model(groups=2)
    emb = embedding_model()
    for model, name in (
        (conv, "base_model.model.conv2"),
        (emb, "base_model.model.model.embed_tokens"),
    ):
        m = layer(model, name)
        a, b = m.cera_A["default"].weight.double(), m.cera_B["default"].weight.double()
        if a.dim() > 2:  # grouped: output group j reads hidden group j reads input group j
            a = torch.block_diag(*a.reshape(4, -1).chunk(2))
            b = torch.block_diag(*b.reshape(6, -1).chunk(2))
        expected = torch.linalg.svdvals((b @ a).detach()).numpy()[:4]
        got = weight_spectrum(model)[name.removeprefix("base_model.model.")].spectrum
        np.testing.assert_allclose(got.singular_values[:4], expected, rtol=1e-9)
        assert not got.singular_values[4:].any()
        model.save_pretrained(tmp_path / name)
        from_dir = adapter_dir_spectrum(tmp_path / name)[name.removeprefix("base_model.model.")]
        np.testing.assert_allclose(from_dir.spectrum.singular_values[:4], expected, rtol=1e-6)
    assert cli.main(["analyze", str(tmp_path / "base_model.model.conv2")]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "conv2" in out


# --- export: embeddings -------------------------------------------------------------


def test_embedding_export_is_the_tables_truncated_svd_weighted_by_counts(tmp_path):
    model = embedding_model(r=6)
    table = branch_table(layer(model, "base_model.model.model.embed_tokens"))
    u, s, vt = torch.linalg.svd(table, full_matrices=False)
    # no data: every id alike, the plain truncated SVD and its energy shares
    export = to_lora(model, None, rank=3, progress=False)
    key = "base_model.model.model.embed_tokens.lora_embedding_"
    a, b = export.state_dict[key + "A"].double(), export.state_dict[key + "B"].double()
    assert a.shape == (3, 128) and b.shape == (64, 3)
    best = u[:, :3] @ torch.diag(s[:3]) @ vt[:3]
    assert max_rel(b @ a, best) < 1e-5
    (row,) = export.report.modules
    energy = (s**2).numpy()
    np.testing.assert_allclose(
        row.linearity[:7], np.r_[0, np.cumsum(energy[:6])] / energy.sum(), atol=1e-9
    )
    assert row.tokens == 128 and row.at(6) == pytest.approx(1.0)  # rank <= r: exact at r
    # with data: each id weighted by its count (ids >= 40 never occur)
    batches = token_batches()
    counts = torch.zeros(128, dtype=torch.float64)
    for batch in batches:
        counts += torch.bincount(
            batch["input_ids"][batch["attention_mask"].bool()], minlength=128
        ).double()
    held = token_batches(seed=7)
    export = to_lora(model, batches, rank=2, held_out=held, progress=False)
    uw, sw, _ = torch.linalg.svd(table * counts.sqrt(), full_matrices=False)
    a, b = export.state_dict[key + "A"].double(), export.state_dict[key + "B"].double()
    assert max_rel(b @ a, uw[:, :2] @ uw[:, :2].T @ table) < 1e-5
    (row,) = export.report.modules
    assert row.tokens == counts.sum() == 63
    assert row.at(2) == pytest.approx(float((sw[:2] ** 2).sum() / (sw**2).sum()), abs=1e-6)
    # the held-out figure is the exported table's error on the held-out tokens
    save_lora(export, tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "lora").eval()
    plain = tiny_llama(0)
    errors, energy = 0.0, 0.0
    for batch in held:
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        with torch.no_grad():
            ours = lora.get_input_embeddings()(ids) - plain.get_input_embeddings()(ids)
        errors += float(((ours.double() - table[:, ids].T) ** 2).sum())
        energy += float((table[:, ids] ** 2).sum())
    assert row.at(2, held_out=True) == pytest.approx(1 - errors / energy, abs=1e-5)


def test_cli_exports_embed_tokens_without_data_and_peft_reproduces_the_model(tmp_path, capsys):
    model = embedding_model(targets=("embed_tokens", "q_proj"))
    model.save_pretrained(tmp_path / "cera")
    tiny_llama(0).save_pretrained(tmp_path / "base")
    argv = [
        "export-lora",
        str(tmp_path / "cera"),
        str(tmp_path / "lora"),
        "--rank",
        "4",
        "--base",
        str(tmp_path / "base"),
    ]
    assert cli.main(argv) == 2  # q_proj needs data
    assert "batches are needed to fit model.layers.0.self_attn.q_proj" in capsys.readouterr().err
    embedding_only = embedding_model()
    embedding_only.save_pretrained(tmp_path / "cera")
    assert cli.main(argv) == 0
    assert "model.embed_tokens" in capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.embed_tokens"]
    lora = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "lora").eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = embedding_only(input_ids=ids).logits
        assert max_rel(lora(input_ids=ids).logits, expected) < 1e-4  # rank r is exact
    help_text = cli._parser()._subparsers._group_actions[0].choices["export-lora"].format_help()
    assert ".safetensors" in help_text and "diffusers" in help_text


# --- export: convolutions -----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
        lambda: nn.Conv2d(3, 5, (2, 3), padding="same", padding_mode="reflect"),
        lambda: nn.Conv1d(3, 5, 3, dilation=2, padding=2),
        lambda: nn.Conv3d(3, 5, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
    ],
)
def test_patches_are_what_a_zero_padded_conv_reads(make):
    torch.manual_seed(0)
    base = make()
    nd = len(base.kernel_size)
    x = torch.randn(2, 3, *(7,) * nd)
    w = torch.randn(4, 3, *base.kernel_size)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    padded = F.pad(x, base._reversed_padding_repeated_twice)
    expected = conv(padded, w, None, base.stride, 0, base.dilation).movedim(1, -1)
    torch.testing.assert_close(
        conv_patches(base, x) @ w.reshape(4, -1).T, expected, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(conv_patches(base, x[0]), conv_patches(base, x)[0])


def test_identity_conv_exports_exactly_at_full_rank_and_silu_within_its_linearity(tmp_path):
    x, held = images(8, seed=1), images(8, seed=2)
    model = conv_model(activation="identity")
    export = to_lora(model, [x], rank=4, held_out=[held], progress=False)
    assert export.report.mean("linearity_at_rank") == pytest.approx(1.0, abs=1e-9)
    save_lora(export, tmp_path / "identity")
    lora = PeftModel.from_pretrained(conv_base(), tmp_path / "identity").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        assert max_rel(lora(held), model(held)) < 1e-5

    model = conv_model(activation="silu")
    export = to_lora(model, [x], rank=3, held_out=[held], progress=False)
    save_lora(export, tmp_path / "silu")
    state = export.state_dict
    assert state["base_model.model.conv1.lora_A.weight"].shape == (3, 3, 3, 3)
    assert state["base_model.model.conv1.lora_B.weight"].shape == (8, 3, 1, 1)
    lora = PeftModel.from_pretrained(conv_base(), tmp_path / "silu").eval()
    # conv1's reloaded LoRA branch misses the CeRA branch by exactly the reported share
    name = "base_model.model.conv1"
    with torch.no_grad():
        target = plain_conv_delta(layer(model, name), held)
        got = layer(lora, name)(held) - layer(lora, name).base_layer(held)
    share = 1 - float(((got - target) ** 2).sum() / (target**2).sum())
    row = export.report["conv1"]
    assert share == pytest.approx(row.at(3, held_out=True), abs=1e-5)
    assert 0 < share < 1.0 - 1e-4  # SiLU is not linear


def test_convs_peft_cannot_hold_and_other_bad_requests_are_refused():
    x = images()
    with pytest.raises(ValueError, match=r"conv2: a grouped convolution \(groups=2\)"):
        to_lora(conv_model(groups=2), [x], rank=2, progress=False)
    with pytest.raises(ValueError, match=r"conv2: a dilated convolution .* leaves the dilation"):
        to_lora(conv_model(dilation=2), [x], rank=2, progress=False)
    # measuring is fine for both (a linear map of the patches)
    report = analyze(conv_model(groups=2), [x], progress=False)
    assert len(report.modules) == 2
    with pytest.raises(ValueError, match="batches are needed to fit conv1"):
        to_lora(conv_model(), None, rank=2, progress=False)
    with pytest.raises(
        ValueError, match="embed_tokens is an embedding: PEFT's LoRA embedding holds no bias"
    ):
        to_lora(embedding_model(), None, rank=2, bias=True, progress=False)
    with pytest.raises(ValueError, match="rank 200 exceeds model.embed_tokens's"):
        to_lora(embedding_model(), None, rank=200, progress=False)


# --- diffusers ----------------------------------------------------------------------


def test_unet_export_through_the_cli_loads_with_diffusers_load_lora_adapter(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file
    from test_diffusers import run, unet, unet_inputs

    from cera_rs.diffusion import save_adapter

    model = unet()
    targets = ["conv1", "conv2", "to_q", "to_v"]
    model.add_adapter(
        CeraConfig(
            r=4, target_modules=targets, activation="identity", cera_dropout=0.0, init_weights=False
        )
    )
    model.eval()
    unet().save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "cera")
    inputs = unet_inputs(2)
    gen = torch.Generator().manual_seed(5)
    calibration = {
        "sample": torch.randn(24, 4, 8, 8, generator=gen),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(24, 3, 8, generator=gen),
    }
    save_file(calibration, tmp_path / "inputs.safetensors")
    argv = [
        "export-lora",
        str(tmp_path / "cera"),
        str(tmp_path / "lora"),
        "--rank",
        "4",
        "--data",
        str(tmp_path / "inputs.safetensors"),
        "--base",
        str(tmp_path / "base"),
        "--batch-size",
        "8",
        "--json",
        str(tmp_path / "report.json"),
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "report.json").read_text())["modules"]
    assert {r["module"].rsplit(".", 1)[-1] for r in rows} == {"conv1", "conv2", "to_q", "to_v"}
    assert min(r["linearity_at_rank"] for r in rows) > 1 - 1e-6  # identity: exact at r
    fresh = unet()
    fresh.load_lora_adapter(
        tmp_path / "lora", prefix="base_model.model", weight_name="adapter_model.safetensors"
    )
    assert max_rel(run(fresh.eval(), inputs), run(model, inputs)) < 1e-4
    assert max_rel(run(unet(), inputs), run(model, inputs)) > 1e-3  # the adapter matters
    # and PEFT's own loader takes the same folder
    from peft import PeftModel as Peft

    assert (
        max_rel(
            run(Peft.from_pretrained(unet(), tmp_path / "lora").eval(), inputs), run(model, inputs)
        )
        < 1e-4
    )


# --- llama.cpp ----------------------------------------------------------------------


def tiny_base_gguf(path, tied: bool):
    """A tiny Llama's GGUF header and tensors as llama.cpp's converter names them (the
    values do not matter to the adapter checks), with or without its own output."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_tensor("token_embd.weight", np.zeros((128, 64), np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.zeros((128, 64), np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((64, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_token_embd_gguf_is_what_llama_cpp_computes_and_the_rest_is_refused(tmp_path):
    model = embedding_model(targets=("embed_tokens", "q_proj"))
    export = to_lora(model, token_batches(), rank=4, progress=False)
    base = tiny_base_gguf(tmp_path / "base.gguf", tied=False)
    save_gguf_lora(export, tmp_path / "adapter.gguf", base)
    reader = gguf.GGUFReader(tmp_path / "adapter.gguf")
    tensors = {t.name: (tuple(int(n) for n in t.shape), np.array(t.data)) for t in reader.tensors}
    alpha = reader.fields["adapter.lora.alpha"].contents()
    (ne_a, lora_a), (ne_b, lora_b) = (
        tensors["token_embd.weight.lora_a"],
        tensors["token_embd.weight.lora_b"],
    )
    # llama.cpp's loader: token_embd [n_embd, n_vocab]; b->ne[1] = n_embd, a->ne[1] = n_vocab
    assert ne_a == (4, 128) and ne_b == (4, 64)
    # build_inp_embd: scale * lora_b · get_rows(lora_a, ids), scale = alpha / b->ne[0]
    ids = torch.tensor([0, 5, 39, 127])
    state = export.state_dict
    key = "base_model.model.model.embed_tokens.lora_embedding_"
    peft_delta = (state[key + "B"] @ state[key + "A"][:, ids]).T.numpy()
    np.testing.assert_allclose(
        alpha / 4 * lora_a[ids.numpy()] @ lora_b.T, peft_delta, rtol=1e-5, atol=1e-6
    )
    assert tensors["blk.0.attn_q.weight.lora_a"][0] == (64, 4)  # linear layers as before
    # a base whose output is the token embedding: refused, naming why
    tied = tiny_base_gguf(tmp_path / "tied.gguf", tied=True)
    with pytest.raises(
        ValueError,
        match=r"model.embed_tokens: the base GGUF .* ties its output "
        r"to token_embd .* by tensor name",
    ):
        save_gguf_lora(export, tmp_path / "b.gguf", tied)
    # an embedding elsewhere, and a convolution
    moved = {
        k.replace("model.embed_tokens", "model.layers.0.self_attn.q_proj"): v
        for k, v in state.items()
        if "embed_tokens" in k
    }
    message = r"is an embedding mapped to blk.0.attn_q.weight: llama.cpp applies a LoRA to"
    with pytest.raises(ValueError, match=message + " the token embedding"):
        save_gguf_lora(type(export)(export.config, moved, export.report), tmp_path / "b.gguf", base)
    conv = to_lora(conv_model(), [images()], rank=2, progress=False)
    with pytest.raises(
        ValueError,
        match=r"conv1 is a convolution .* matrix multiplications "
        r"and the token embedding only",
    ):
        save_gguf_lora(conv, tmp_path / "b.gguf", base)
    assert not (tmp_path / "b.gguf").exists()


def test_input_files_for_diffusers_models_and_their_errors(tmp_path):
    from cera_rs.export.adapter_dir import load_inputs

    folder = tmp_path / "inputs"
    folder.mkdir()
    for i, n in enumerate((3, 2)):
        torch.save(
            {"sample": torch.full((n, 4, 2, 2), float(i)), "timestep": torch.tensor(7)},
            folder / f"part{i}.pt",
        )
    batches = load_inputs(folder, batch_size=2)
    assert [len(b["sample"]) for b in batches] == [2, 2, 1]
    assert torch.cat([b["sample"][:, 0, 0, 0] for b in batches]).tolist() == [0, 0, 0, 1, 1]
    assert all(int(b["timestep"]) == 7 for b in batches)  # 0-d: whole to every batch
    np.save(tmp_path / "x.npy", np.zeros((5, 3, 4, 4), np.float32))
    assert [tuple(b.shape) for b in load_inputs(tmp_path / "x.npy", 4)] == [
        (4, 3, 4, 4),
        (1, 3, 4, 4),
    ]
    torch.save(
        {"sample": torch.zeros(3, 1), "encoder_hidden_states": torch.zeros(2, 1)},
        tmp_path / "uneven.pt",
    )
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "ids.txt").write_text("1 2 3")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    torch.save(torch.zeros(2, 3), mixed / "a.pt")
    torch.save({"sample": torch.zeros(2, 3)}, mixed / "b.pt")
    for path, error, message in (
        (tmp_path / "uneven.pt", ValueError, "first dimensions differ"),
        (tmp_path / "list.pt", ValueError, "expected a tensor or a dict of tensors, got list"),
        (tmp_path / "ids.txt", ValueError, r"inputs must be one of \('.pt', '.safetensors'"),
        (tmp_path / "broken.safetensors", ValueError, "cannot be read as model inputs"),
        (tmp_path / "missing.pt", FileNotFoundError, "does not exist"),
        (mixed, ValueError, "every input file must hold the same kind"),
    ):
        with pytest.raises(error, match=message):
            load_inputs(path, 2)
