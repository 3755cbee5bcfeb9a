"""The llama.cpp LoRA adapter (``save_gguf_lora``), read back with the gguf package and
checked against what llama.cpp's loader (``src/llama-adapter.cpp``) requires of it on
the SmolLM2 GGUF it is written for. ``scripts/llama-cpp-check.sh`` runs it in
llama.cpp itself."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from models import tiny_llama

from cera_rs import CeraConfig, cli, get_cera_model, smollm2
from cera_rs.export import save_gguf_lora, to_lora
from cera_rs.export.gguf_lora import BaseGGUF, _rope_rows

LAYERS = (28, 29)
TARGETS = r".*\.layers\.(28|29)\.(self_attn\.(q_proj|k_proj|v_proj)|mlp\.down_proj)"
PROJ = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "ffn_down": "mlp.down_proj",
}
HEADS = {"attn_q": 9, "attn_k": 3}
"""SmolLM2-135M's query heads and key/value heads: the row groups of q and k."""


@pytest.fixture(scope="module")
def smollm():
    base, _ = smollm2.load()
    return base


def cera_on(base, seed):
    """CeRA adapters (non-zero B) on two layers' q, k, v and down of a copy of ``base``
    that shares its weights."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    return get_cera_model(model, CeraConfig(r=4, target_modules=TARGETS, init_weights=False))


@pytest.fixture(scope="module")
def exported(smollm):
    """The rank-4 LoRA of ``cera_on``'s adapters."""
    ids = torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(0))
    return to_lora(cera_on(smollm, 0), [{"input_ids": ids}], rank=4, progress=False)


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def test_file_is_what_llama_cpp_loads_onto_the_base(exported, tmp_path):
    path = tmp_path / "adapter.gguf"
    save_gguf_lora(exported, path, base_gguf=smollm2.gguf_path())
    reader = gguf.GGUFReader(path)
    kv = fields(reader)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama"  # the loader refuses another arch
    alpha = reader.fields["adapter.lora.alpha"]
    assert alpha.types == [gguf.GGUFValueType.FLOAT32] and kv["adapter.lora.alpha"] == 4.0

    base = {t.name: t for t in gguf.GGUFReader(smollm2.gguf_path()).tensors}
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 4 * len(LAYERS)
    state = exported.state_dict
    for name, t in tensors.items():
        assert name.endswith((".lora_a", ".lora_b"))
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
    for layer in LAYERS:
        for short, module in PROJ.items():
            weight = f"blk.{layer}.{short}.weight"
            a, b = tensors[weight + ".lora_a"], tensors[weight + ".lora_b"]
            # llama.cpp's checks, in ggml's order (ne[0] is the contiguous dimension).
            w = [int(n) for n in base[weight].shape]
            assert int(a.shape[0]) == w[0] and int(b.shape[1]) == w[1]
            assert int(a.shape[1]) == int(b.shape[0]) == 4
            key = f"base_model.model.model.layers.{layer}.{module}"
            want_a, want_b = state[key + ".lora_A.weight"], state[key + ".lora_B.weight"]
            if short in HEADS:  # the base file's row order of q and k
                want_b = want_b[_rope_rows(want_b.shape[0], HEADS[short])]
            np.testing.assert_array_equal(np.asarray(a.data), want_a.numpy())
            np.testing.assert_array_equal(np.asarray(b.data), want_b.numpy())


def test_q_and_k_rows_are_reordered_as_the_base_file_orders_its_weights(smollm):
    """transformers undoes llama.cpp's row order when it loads the GGUF: reordering the
    loaded q/k weights with ``_rope_rows`` gives the file's own weights back exactly,
    and without the reordering they differ; v is not reordered."""
    from gguf.quants import dequantize

    base = {t.name: t for t in gguf.GGUFReader(smollm2.gguf_path()).tensors}
    layer = smollm.model.layers[29]
    for short in ("attn_q", "attn_k", "attn_v"):
        t = base[f"blk.29.{short}.weight"]
        in_file = torch.from_numpy(dequantize(t.data, t.tensor_type))
        loaded = layer.get_submodule(PROJ[short]).weight
        if short in HEADS:
            assert not torch.equal(in_file, loaded)
            loaded = loaded[_rope_rows(loaded.shape[0], HEADS[short])]
        assert torch.equal(in_file, loaded)


def test_rank_pattern_and_scaling_are_folded_into_b(exported, tmp_path):
    """llama.cpp has one alpha per file and scales each layer by alpha / r: a layer
    of another rank or scaling gets PEFT's scale through its B."""
    state = dict(exported.state_dict)
    key = "base_model.model.model.layers.29.self_attn.v_proj"
    state[key + ".lora_A.weight"] = state[key + ".lora_A.weight"][:2]
    state[key + ".lora_B.weight"] = state[key + ".lora_B.weight"][:, :2]
    config = exported.config
    pattern = {"model.layers.29.self_attn.v_proj": 2}
    config = type(config)(
        **{
            **config.to_dict(),
            "rank_pattern": pattern,
            "alpha_pattern": {"model.layers.29.self_attn.v_proj": 6},
        }
    )
    changed = type(exported)(config, state, exported.report)
    save_gguf_lora(changed, tmp_path / "a.gguf", base_gguf=smollm2.gguf_path())
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    alpha = fields(reader)["adapter.lora.alpha"]
    b = tensors["blk.29.attn_v.weight.lora_b"]
    assert b.shape == (192, 2) and alpha == 4.0
    # llama.cpp's scale alpha / r times the written B is PEFT's scale 6 / 2 times B.
    np.testing.assert_allclose(
        alpha / 2 * b, 6 / 2 * state[key + ".lora_B.weight"].numpy(), rtol=1e-6
    )


def test_what_llama_cpp_cannot_hold_is_refused(exported, tmp_path, smollm):
    base = smollm2.gguf_path()
    out = tmp_path / "a.gguf"
    biased = dict(exported.state_dict)
    biased["base_model.model.model.layers.29.self_attn.v_proj.lora_B.bias"] = torch.zeros(192)
    with pytest.raises(ValueError, match="lora_B.bias is a LoRA bias"):
        save_gguf_lora(type(exported)(exported.config, biased, exported.report), out, base)
    nan = dict(exported.state_dict)
    key = "base_model.model.model.layers.29.self_attn.v_proj.lora_A.weight"
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_gguf_lora(type(exported)(exported.config, nan, exported.report), out, base)
    with pytest.raises(TypeError, match="takes what to_lora returns"):
        save_gguf_lora(exported.state_dict, out, base)
    with pytest.raises(FileNotFoundError, match="base GGUF .* does not exist"):
        save_gguf_lora(exported, out, tmp_path / "missing.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf file")
    with pytest.raises(ValueError, match="text.gguf is not a GGUF file"):
        save_gguf_lora(exported, out, tmp_path / "text.gguf")
    save_gguf_lora(exported, tmp_path / "adapter.gguf", base)
    with pytest.raises(ValueError, match="is a GGUF adapter, not a model"):
        save_gguf_lora(exported, out, tmp_path / "adapter.gguf")
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        save_gguf_lora(exported, out, tmp_path / "gpt2.gguf")
    # A LoRA of another model (a tiny Llama: 64-wide layers) does not fit SmolLM2's file.
    tiny = get_cera_model(tiny_llama(0), CeraConfig(r=2, target_modules=["q_proj"]))
    other = to_lora(tiny, [{"input_ids": torch.randint(0, 128, (2, 8))}], rank=2, progress=False)
    with pytest.raises(ValueError, match=r"do not fit the base tensor blk.0.attn_q.weight"):
        save_gguf_lora(other, out, base)
    assert not out.exists()


def test_a_failed_write_leaves_the_previous_file(exported, tmp_path, monkeypatch):
    path = tmp_path / "adapter.gguf"
    path.write_bytes(b"previous")

    def broken(self, *args, **kwargs):
        self.fout[0].write(b"half a file")
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="simulated"):
        save_gguf_lora(exported, path, base_gguf=smollm2.gguf_path())
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.gguf"]  # no temporary left


def test_base_gguf_header(tmp_path):
    base = BaseGGUF.read(smollm2.gguf_path())
    assert (base.arch, base.blocks, base.heads, base.kv_heads) == ("llama", 30, 9, 3)
    assert base.shapes["blk.0.attn_k.weight"] == (576, 192)


def test_cli_export_lora_writes_the_gguf_adapter(smollm, tmp_path, capsys):
    """The issue's command: a saved CeRA adapter on SmolLM2 (its converted folder as
    the base), token ids, ``--gguf`` and the base GGUF; the file equals the API's."""
    cera_on(smollm, 1).save_pretrained(tmp_path / "cera")
    ids = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "ids.npy", ids.numpy())
    out, gguf_out = tmp_path / "lora", tmp_path / "adapter.gguf"
    argv = [
        "export-lora",
        str(tmp_path / "cera"),
        str(out),
        "--data",
        str(tmp_path / "ids.npy"),
        "--rank",
        "4",
        "--base",
        str(smollm2.cached_dir()),
        "--gguf",
        str(gguf_out),
        "--gguf-base",
        str(smollm2.gguf_path()),
    ]
    assert cli.main(argv) == 0
    assert f"written: {out}, {gguf_out}" in capsys.readouterr().out
    reader = gguf.GGUFReader(gguf_out)
    assert len(reader.tensors) == 16 and fields(reader)["adapter.type"] == "lora"
    # What the user could not mean is refused before any work: no base GGUF, a bias.
    for extra, message in (
        (["--gguf", str(tmp_path / "b.gguf")], "--gguf needs --gguf-base"),
        (
            ["--gguf", str(tmp_path / "b.gguf"), "--gguf-base", str(smollm2.gguf_path()), "--bias"],
            "no bias",
        ),
        (
            ["--gguf", str(tmp_path / "b.gguf"), "--gguf-base", str(tmp_path / "nope.gguf")],
            "does not exist",
        ),
    ):
        assert cli.main(argv[:9] + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b.gguf").exists()
