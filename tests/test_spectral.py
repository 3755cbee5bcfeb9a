"""cera_rs.spectral: metrics against their definitions, streaming against one-shot,
factor route against dense SVD, model analysis of CeRA / LoRA / DoRA, reports, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from cera_rs import CeraLinear, cera_delta, cli
from cera_rs.spectral import (
    ModelSpectrum,
    SpectralCallback,
    StreamingSpectrum,
    analyze,
    lowrank_spectrum,
    spectrum,
    weight_spectrum,
)

TARGETS = ("q_proj", "v_proj")
ADAPTED = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS]


def orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def with_singular_values(rng, rows, cols, s):
    """U diag(s) V^T with random orthonormal U, V."""
    k = len(s)
    return orthonormal(rng, rows, k) @ np.diag(s) @ orthonormal(rng, cols, k).T


def numpy_metrics(s):
    """Every metric by its definition in docs/cera-method.md."""
    p = s / s.sum()
    p = p[p > 0]
    e = s**2 / (s**2).sum()
    cumulative = np.cumsum(e)
    return {
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "stable_rank": float((s**2).sum() / s[0] ** 2),
        "participation_ratio": float((s**2).sum() ** 2 / (s**4).sum()),
        "energy_rank": {t: int(np.argmax(cumulative >= t)) + 1 for t in (0.5, 0.9, 0.95, 0.99)},
        "tail_energy": {r: float(e[r:].sum()) for r in (0, 1, 3, 7, len(s))},
    }


@pytest.mark.parametrize("as_torch", [False, True])
def test_metrics_equal_their_definitions(as_torch):
    rng = np.random.default_rng(0)
    s = np.sort(rng.uniform(0.05, 10.0, 12))[::-1] * np.geomspace(1, 1e-3, 12)
    m = with_singular_values(rng, 40, 25, s)
    spec = spectrum(torch.from_numpy(m) if as_torch else m, rank=4)
    expected = np.concatenate([s, np.zeros(25 - len(s))])
    np.testing.assert_allclose(spec.singular_values, expected, rtol=1e-9, atol=1e-12 * s[0])
    assert spec.singular_values.dtype == np.float64 and not spec.singular_values.flags.writeable
    ref = numpy_metrics(s)
    for name in ("effective_rank", "stable_rank", "participation_ratio"):
        assert getattr(spec, name) == pytest.approx(ref[name], rel=1e-9), name
    for tau, k in ref["energy_rank"].items():
        assert spec.energy_rank(tau) == k, tau
    for r, tail in ref["tail_energy"].items():
        assert spec.tail_energy(r) == pytest.approx(tail, rel=1e-9, abs=1e-15), r
    assert spec.tail_energy() == spec.tail_energy(4)
    d = spec.to_dict()
    assert d["rank"] == 4 and d["energy_rank_90"] == ref["energy_rank"][0.9]
    assert d["singular_values"] == spec.singular_values.tolist()
    json.dumps(d)


def test_wide_and_low_precision_matrices():
    rng = np.random.default_rng(1)
    s = np.array([5.0, 2.0, 1.0])
    m = with_singular_values(rng, 7, 30, s)
    np.testing.assert_allclose(spectrum(m).singular_values[:3], s, rtol=1e-9)
    got = spectrum(torch.from_numpy(m).float()).singular_values[:3]
    np.testing.assert_allclose(got, s, rtol=1e-5)


def test_streaming_over_any_split_equals_one_shot():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((301, 24)) * np.geomspace(3, 0.01, 24)
    one_shot = spectrum(x, rank=5)
    for trial in range(4):
        cuts = np.sort(rng.choice(np.arange(1, 301), size=trial * 3, replace=False))
        stream = StreamingSpectrum(24)
        for part in np.split(x, cuts):
            if len(part) % 2 == 0:  # leading shapes other than (N, d) too
                part = part.reshape(2, -1, 24)
            stream.update(torch.from_numpy(part))
        stream.update(torch.empty(0, 24))
        assert stream.tokens_seen == 301
        got = stream.spectrum(rank=5)
        np.testing.assert_allclose(got.singular_values, one_shot.singular_values, rtol=1e-8)
        for name in ("effective_rank", "stable_rank", "participation_ratio"):
            assert getattr(got, name) == pytest.approx(getattr(one_shot, name), rel=1e-8)
        assert got.tail_energy() == pytest.approx(one_shot.tail_energy(), rel=1e-8)


def test_merge_and_state_equal_one_stream(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(90, 16, dtype=torch.float64)
    one = StreamingSpectrum(16)
    one.update(x)
    parts = [StreamingSpectrum(16) for _ in range(3)]
    for part, rows in zip(parts, x.split(30)):
        part.update(rows)
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    assert parts[0].tokens_seen == 90 and parts[1].tokens_seen == 30
    expected = one.spectrum().singular_values
    np.testing.assert_allclose(parts[0].spectrum().singular_values, expected, rtol=1e-8)

    state = parts[1].state()
    assert state["gram"].dtype == torch.float64 and state["gram"].shape == (16, 16)
    torch.testing.assert_close(state["gram"], x[30:60].T @ x[30:60], rtol=1e-12, atol=1e-12)
    summed = {k: sum(p.state()[k] for p in parts[1:]) for k in state}
    restored = StreamingSpectrum(16)
    restored.load_state(summed)
    assert restored.tokens_seen == 60
    two = StreamingSpectrum(16)
    two.update(x[30:])
    np.testing.assert_allclose(
        restored.spectrum().singular_values, two.spectrum().singular_values, rtol=1e-8
    )

    # all_reduce in a one-process gloo group: the state survives the round trip.
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        one.all_reduce()
    finally:
        dist.destroy_process_group()
    assert one.tokens_seen == 90
    np.testing.assert_allclose(one.spectrum().singular_values, expected, rtol=1e-12)

    with pytest.raises(ValueError, match="dim"):
        one.merge(StreamingSpectrum(8))
    with pytest.raises(ValueError, match="itself"):
        one.merge(one)
    with pytest.raises(ValueError, match="symmetric"):
        one.load_state({"gram": torch.triu(torch.ones(16, 16)), "tokens_seen": torch.tensor(1)})


def test_centred_streaming_equals_numpy_svd_of_the_centred_matrix():
    rng = np.random.default_rng(11)
    # Column means far from zero, so centring changes the spectrum.
    x = rng.standard_normal((257, 20)) * np.geomspace(2, 0.05, 20) + rng.uniform(-3, 3, 20)
    expected = np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert abs(np.linalg.svd(x, compute_uv=False)[0] - expected[0]) > 0.1 * expected[0]
    parts = [StreamingSpectrum(20, center=True) for _ in range(3)]
    for part, rows in zip(parts, np.split(x, [1, 100])):
        part.update(torch.from_numpy(rows))
    for other in parts[1:]:
        parts[0].merge(other)
    got = parts[0].spectrum()
    assert parts[0].center and parts[0].tokens_seen == 257
    assert np.abs(got.singular_values - expected).max() <= 1e-8 * expected[0]
    p = expected / expected.sum()
    assert got.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-8)

    # The state carries the column sums; summed states (an all-reduce) load back.
    states = [part.state() for part in parts[1:]]
    assert set(states[0]) == {"gram", "tokens_seen", "column_sums"}
    torch.testing.assert_close(states[0]["column_sums"], torch.from_numpy(x[1:100].sum(0)))
    restored = StreamingSpectrum(20, center=True)
    restored.load_state({k: sum(s[k] for s in states) for k in states[0]})
    tail = np.linalg.svd(x[1:] - x[1:].mean(0), compute_uv=False)
    assert np.abs(restored.spectrum().singular_values - tail).max() <= 1e-8 * tail[0]

    with pytest.raises(ValueError, match="centred"):
        parts[0].merge(StreamingSpectrum(20))
    with pytest.raises(ValueError, match="column_sums"):
        StreamingSpectrum(20).load_state(states[0])
    with pytest.raises(ValueError, match="column_sums"):
        restored.load_state({"gram": states[0]["gram"], "tokens_seen": states[0]["tokens_seen"]})
    with pytest.raises(TypeError, match="center"):
        StreamingSpectrum(20, center="yes")


def test_lowrank_factor_route_equals_dense_svd():
    torch.manual_seed(4)
    for d_out, r, d_in in [(48, 6, 32), (5, 8, 40), (33, 3, 33)]:
        b = torch.randn(d_out, r, dtype=torch.float64)
        a = torch.randn(r, d_in, dtype=torch.float64)
        got = lowrank_spectrum(b, a, rank=r)
        dense = np.linalg.svd((b @ a).numpy(), compute_uv=False)
        assert got.singular_values.shape == dense.shape
        np.testing.assert_allclose(got.singular_values, dense, rtol=1e-9, atol=1e-12 * dense[0])
        assert got.effective_rank == pytest.approx(spectrum(b @ a).effective_rank, rel=1e-9)
        assert got.tail_energy() == 0.0


def test_bad_inputs_give_clear_errors():
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite.*NaN or infinite"):
        spectrum(bad)
    with pytest.raises(ValueError, match="non-finite"):
        lowrank_spectrum(torch.full((4, 2), float("inf")), torch.ones(2, 3))
    stream = StreamingSpectrum(3)
    with pytest.raises(ValueError, match="non-finite"):
        stream.update(torch.from_numpy(bad))
    assert stream.tokens_seen == 0
    with pytest.raises(ValueError, match="last dimension"):
        stream.update(torch.ones(4, 2))
    with pytest.raises(TypeError, match="nested"):
        stream.update(torch.nested.nested_tensor([torch.ones(2, 3)]))
    stream.update(torch.ones(2, 3))  # a rejected batch leaves the stream usable
    assert stream.tokens_seen == 2
    with pytest.raises(ValueError, match="2-D"):
        spectrum(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="B's columns must equal A's rows"):
        lowrank_spectrum(torch.ones(4, 2), torch.ones(3, 5))
    with pytest.raises(TypeError, match="real numbers"):
        spectrum(torch.ones(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="numpy array"):
        spectrum([[1.0, 2.0]])
    with pytest.raises(ValueError, match="tau"):
        spectrum(np.eye(3)).energy_rank(0.0)
    with pytest.raises(ValueError, match="needs r"):
        spectrum(np.eye(3)).tail_energy()
    with pytest.raises(ValueError, match="dim must be >= 1"):
        StreamingSpectrum(0)
    zero = spectrum(np.zeros((3, 3)), rank=1)
    assert zero.effective_rank == zero.stable_rank == zero.tail_energy() == 0.0


# ---- models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def cera_model(base):
    model = copy.deepcopy(base)
    torch.manual_seed(6)
    for layer in model.model.layers:
        for t in TARGETS:
            wrapped = CeraLinear(getattr(layer.self_attn, t), r=4, dropout=0.1, scaling=0.7)
            torch.nn.init.normal_(wrapped.cera_B["default"].weight, std=0.3)
            setattr(layer.self_attn, t, wrapped)
    return model


def lora_model(base, **kwargs):
    torch.manual_seed(7)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False, **kwargs
    )
    return get_peft_model(copy.deepcopy(base), config)


def batches():
    gen = torch.Generator().manual_seed(8)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 97, (2, 9), generator=gen)
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # padding: left out of the spectra
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def captured_inputs(model, module_name):
    """The inputs one module sees over batches(), padding removed."""
    module = model.get_submodule(module_name)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        for b in batches():
            model(**b)
            seen[-1] = seen[-1][b["attention_mask"].bool()]
    handle.remove()
    return torch.cat(seen)


def test_analyze_cera_and_lora_give_one_row_per_adapted_module(base_model):
    cera = cera_model(base_model).train()
    lora = lora_model(base_model)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches())
    reports = {}
    for method, model in (("cera", cera), ("lora", lora)):
        report = analyze(model, batches(), progress=False)
        assert [m.name for m in report.modules] == ADAPTED
        assert {m.method for m in report.modules} == {method}
        assert all(m.tokens == tokens and m.spectrum.rank == 4 for m in report.modules)
        reports[method] = report
    assert cera.training  # mode restored

    # The CeRA delta is the eval-mode branch on the inputs the layer saw.
    layer = cera.get_submodule(ADAPTED[0])
    x = captured_inputs(cera, ADAPTED[0])
    a, b = layer.cera_A["default"].weight, layer.cera_B["default"].weight
    with torch.no_grad():
        delta = cera_delta(x, a, b, scaling=0.7, training=False)
    expected = np.pad(spectrum(delta).singular_values, (0, 64 - len(x)))
    got = reports["cera"][ADAPTED[0]].spectrum.singular_values
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * expected[0])
    # Either delta lies in the column space of its (d_out, r) B: nothing beyond r.
    for report in reports.values():
        assert all(m.spectrum.tail_energy() < 1e-10 for m in report.modules)

    joined = ModelSpectrum(reports["cera"].modules + reports["lora"].modules)
    assert len(joined.rows()) == 8

    only_q = analyze(lora, batches(), modules=["q_proj"], progress=False)
    assert [m.name for m in only_q.modules] == ADAPTED[::2]
    with pytest.raises(ValueError, match="no adapter layer matches"):
        analyze(lora, batches(), modules=["k_proj"], progress=False)
    with pytest.raises(ValueError, match="no active CeRA, LoRA or DoRA"):
        analyze(base_model, batches(), progress=False)


def test_analyze_centred_is_the_spectrum_of_the_centred_delta(base_model):
    cera = cera_model(base_model)
    report = analyze(cera, batches(), progress=False, center=True)
    layer = cera.get_submodule(ADAPTED[1])
    x = captured_inputs(cera, ADAPTED[1])
    a, b = layer.cera_A["default"].weight, layer.cera_B["default"].weight
    with torch.no_grad():
        delta = cera_delta(x, a, b, scaling=0.7, training=False).double()
    expected = np.linalg.svd((delta - delta.mean(0)).numpy(), compute_uv=False)
    got = report[ADAPTED[1]].spectrum.singular_values[: len(expected)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * expected[0])
    uncentred = analyze(cera, batches(), progress=False)[ADAPTED[1]].spectrum
    assert abs(uncentred.singular_values[0] - got[0]) > 1e-3 * got[0]


def test_analyze_dora_uses_output_minus_base(base_model):
    dora = lora_model(base_model, use_dora=True)
    report = analyze(dora, batches(), progress=False)
    assert [m.name for m in report.modules] == ADAPTED
    assert {m.method for m in report.modules} == {"dora"}
    name = "base_model.model." + ADAPTED[1]
    layer = dora.get_submodule(name)
    x = captured_inputs(dora, name)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    expected = np.pad(spectrum(delta).singular_values, (0, 64 - len(x)))
    got = report[ADAPTED[1]].spectrum.singular_values
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * expected[0])


def test_weight_spectrum_of_each_method(base_model):
    lora = lora_model(base_model)
    report = weight_spectrum(lora)
    assert [m.name for m in report.modules] == ADAPTED
    layer = lora.get_submodule("base_model.model." + ADAPTED[0])
    b, a = (layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double())
    dense = np.linalg.svd(layer.scaling["default"] * (b @ a).detach().numpy(), compute_uv=False)
    got = report[ADAPTED[0]].spectrum
    np.testing.assert_allclose(got.singular_values, dense, rtol=1e-9, atol=1e-12 * dense[0])
    assert got.tail_energy() == 0.0
    cera = weight_spectrum(cera_model(base_model))
    assert {m.method for m in cera.modules} == {"cera"} and len(cera) == 4
    dora = weight_spectrum(lora_model(base_model, use_dora=True))
    assert {m.method for m in dora.modules} == {"dora"} and len(dora) == 4


def test_report_table_json_plot_html(base_model, tmp_path):
    report = analyze(cera_model(base_model), batches(), progress=False)
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["module", "method", "r", "tokens"] and len(lines) == 2 + 4
    assert all(name in text for name in ADAPTED)
    html = report._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == 5
    rows = report.rows()
    assert rows[0]["module"] == ADAPTED[0] and "tail_energy" in rows[0]

    path = tmp_path / "report.json"
    report.to_json(path)
    saved = json.loads(path.read_text())
    assert [m["module"] for m in saved["modules"]] == ADAPTED
    assert len(saved["modules"][0]["singular_values"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temp left

    png = tmp_path / "report.png"
    report.plot(png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_spectral_callback_logs_into_trainer(base_model, tmp_path):
    model = cera_model(base_model)
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 97, (8, 9), generator=gen)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=100,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SpectralCallback(batches(), every_n_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    logged = [h for h in trainer.state.log_history if any(k.startswith("spectral/") for k in h)]
    assert len(logged) == 1 and logged[0]["step"] == 2
    for name in ADAPTED:
        assert logged[0][f"spectral/{name}/effective_rank"] > 0
        assert 0 <= logged[0][f"spectral/{name}/tail_energy"] <= 1
    with pytest.raises(ValueError, match="every_n_steps"):
        SpectralCallback(batches(), every_n_steps=0)


# ---- CLI -----------------------------------------------------------------------------


def test_cli_analyze_saved_peft_lora_dir(base_model, tmp_path, capsys):
    lora = lora_model(base_model, use_rslora=True)
    lora.save_pretrained(tmp_path / "adapter")
    out_json, out_png = tmp_path / "lora.json", tmp_path / "lora.png"
    code = cli.main(
        ["analyze", str(tmp_path / "adapter"), "--json", str(out_json), "--plot", str(out_png)]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert all(name in stdout for name in ADAPTED)
    saved = {m["module"]: m for m in json.loads(out_json.read_text())["modules"]}
    expected = weight_spectrum(lora)  # rsLoRA: scaling alpha / sqrt(r), as PEFT applies it
    assert sorted(saved) == sorted(ADAPTED)
    for m in expected.modules:
        assert saved[m.name]["method"] == "lora"
        np.testing.assert_allclose(
            saved[m.name]["singular_values"], m.spectrum.singular_values, rtol=1e-6
        )
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_cli_analyze_cera_dir(tmp_path, capsys):
    torch.manual_seed(10)
    factors = {f"base_model.model.{n}": (torch.randn(24, 3), torch.randn(3, 16)) for n in ADAPTED}
    tensors = {}
    for prefix, (b, a) in factors.items():
        tensors[f"{prefix}.cera_B.weight"], tensors[f"{prefix}.cera_A.weight"] = b, a
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "CERA", "r": 3, "scaling": 0.5})
    )
    assert cli.main(["analyze", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count(" cera ") == 4
    from cera_rs.spectral import adapter_dir_spectrum

    report = adapter_dir_spectrum(tmp_path)
    b, a = factors["base_model.model." + ADAPTED[2]]
    dense = np.linalg.svd(0.5 * (b.double() @ a.double()).numpy(), compute_uv=False)
    np.testing.assert_allclose(
        report[ADAPTED[2]].spectrum.singular_values, dense, rtol=1e-9, atol=1e-12 * dense[0]
    )
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        adapter_dir_spectrum(tmp_path / "missing")
