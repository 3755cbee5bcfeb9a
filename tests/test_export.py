"""cera_rs.export: the streamed regression against float64 numpy least squares and
reduced-rank regression, the exported LoRA folder in plain PEFT, the report, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from models import tiny_llama
from peft import PeftModel
from torch import nn

from cera_rs import CeraConfig, cli, get_cera_model
from cera_rs.export import (
    LinearityReport,
    StreamingRegression,
    save_lora,
    solve_all,
    to_lora,
)

D = 24


def silu_pairs(rng, n=400, d_in=12, d_out=9, r=4):
    """x with unequal feature scales and a mean, y = B silu(A x) + c: float64."""
    x = rng.standard_normal((n, d_in)) * np.linspace(0.3, 2.0, d_in) + 0.5
    a = rng.standard_normal((r, d_in)) / np.sqrt(d_in)
    b = rng.standard_normal((d_out, r))
    h = x @ a.T
    return x, (h / (1 + np.exp(-h))) @ b.T


def unexplained(x, y, w, bias=None):
    fit = x @ w.T + (0 if bias is None else bias)
    return ((y - fit) ** 2).sum() / (y**2).sum()


def fitted(x, y, **solve):
    stream = StreamingRegression(x.shape[1], y.shape[1])
    stream.update(torch.from_numpy(x), torch.from_numpy(y))
    return stream.solve(**solve)


# ---- the regression against numpy ------------------------------------------------------


def test_full_rank_equals_numpy_least_squares():
    x, y = silu_pairs(np.random.default_rng(0))
    fit = fitted(x, y)
    w = np.linalg.lstsq(x, y, rcond=None)[0].T
    np.testing.assert_allclose(fit.weight.numpy(), w, rtol=1e-9, atol=1e-10 * abs(w).max())
    assert fit.linearity[-1] == pytest.approx(1 - unexplained(x, y, w), abs=1e-10)
    assert fit.linearity[-1] < 0.999  # SiLU leaves a non-linear remainder
    assert fit.tokens == 400 and fit.max_rank == 9 and len(fit.linearity) == 10

    with_bias = fitted(x, y, bias=True)
    ones = np.ones((len(x), 1))
    solution = np.linalg.lstsq(np.hstack([x, ones]), y, rcond=None)[0]
    np.testing.assert_allclose(with_bias.weight.numpy(), solution[:-1].T, rtol=1e-8, atol=1e-10)
    _, _, bias = with_bias.factors(9)
    np.testing.assert_allclose(bias.numpy(), solution[-1], rtol=1e-8, atol=1e-10)


def test_every_rank_is_the_reduced_rank_optimum_and_beats_truncated_svd():
    x, y = silu_pairs(np.random.default_rng(1), r=5)
    fit = fitted(x, y)
    w = fit.weight.numpy()
    # Reduced-rank regression by the book: project W* on the top right singular
    # vectors of the fitted outputs X W*^T.
    v = np.linalg.svd(x @ w.T)[2].T
    u_w, s_w, vt_w = np.linalg.svd(w)
    for k in range(1, 8):
        b, a, bias = fit.factors(k)
        assert bias is None and b.shape == (9, k) and a.shape == (k, 12)
        wk = (b @ a).numpy()
        optimum = v[:, :k] @ v[:, :k].T @ w
        np.testing.assert_allclose(wk, optimum, atol=1e-9 * abs(w).max())
        err = unexplained(x, y, wk)
        assert 1 - fit.linearity[k] == pytest.approx(err, abs=1e-10)
        truncated = (u_w[:, :k] * s_w[:k]) @ vt_w[:k]
        assert err <= unexplained(x, y, truncated) + 1e-12
    assert np.all(np.diff(fit.linearity) >= -1e-12), "linearity must not fall with k"
    assert fit.linearity[0] == 0.0
    # The branch has rank 5: past it the curve is flat.
    np.testing.assert_allclose(fit.linearity[5:], fit.linearity[-1], atol=1e-12)


def test_order_splits_and_merge_give_one_state_of_constant_size():
    x, y = silu_pairs(np.random.default_rng(2), n=300)
    whole = StreamingRegression(12, 9)
    whole.update(x, y)
    perm = np.random.default_rng(3).permutation(300)
    parts = [StreamingRegression(12, 9) for _ in range(3)]
    sizes = None
    for i, chunk in enumerate(np.array_split(perm, 7)):
        part = parts[i % 3]
        part.update(torch.from_numpy(x[chunk]), torch.from_numpy(y[chunk]))
        size = sum(t.numel() for t in part.state().values())
        assert sizes is None or size == sizes  # the state does not grow with tokens
        sizes = size
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    assert parts[0].tokens_seen == 300
    for key, value in whole.state().items():
        torch.testing.assert_close(parts[0].state()[key], value, rtol=1e-12, atol=1e-12)
    fits = solve_all([whole, parts[0]])
    np.testing.assert_allclose(fits[0].linearity, fits[1].linearity, atol=1e-12)

    reloaded = StreamingRegression(12, 9)
    reloaded.load_state(whole.state())
    np.testing.assert_allclose(reloaded.solve().linearity, fits[0].linearity, atol=1e-15)


def test_bad_regression_input_is_a_clear_error():
    stream = StreamingRegression(4, 3)
    with pytest.raises(ValueError, match="no tokens"):
        stream.solve()
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\).*\(\.\.\., 3\)"):
        stream.update(torch.ones(5, 3), torch.ones(5, 3))
    with pytest.raises(ValueError, match="same leading"):
        stream.update(torch.ones(5, 4), torch.ones(6, 3))
    with pytest.raises(ValueError, match="NaN"):
        stream.update(torch.ones(5, 4), torch.full((5, 3), float("nan")))
    with pytest.raises(TypeError, match="real numbers"):
        stream.update(torch.ones(5, 4, dtype=torch.complex64), torch.ones(5, 3))
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array"):
        stream.update([[1.0] * 4], torch.ones(1, 3))
    assert stream.tokens_seen == 0
    stream.update(torch.randn(20, 4), torch.randn(20, 3))
    for ridge, error in ((-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(error, match="ridge"):
            stream.solve(ridge=ridge)
    with pytest.raises(ValueError, match="k must be in 1..3"):
        stream.solve().factors(4)
    with pytest.raises(TypeError, match="merge a StreamingRegression"):
        stream.merge(object())
    with pytest.raises(ValueError, match="d_in and d_out"):
        StreamingRegression(0, 3)
    with pytest.raises(ValueError, match="xx must be"):
        StreamingRegression(5, 3).load_state(stream.state())


def test_ridge_is_relative_to_the_mean_input_eigenvalue():
    x, y = silu_pairs(np.random.default_rng(4))
    ridge = 0.05
    cxx, cxy = x.T @ x / len(x), x.T @ y / len(x)
    shift = ridge * np.trace(cxx) / cxx.shape[0]
    expected = np.linalg.solve(cxx + shift * np.eye(len(cxx)), cxy).T
    np.testing.assert_allclose(fitted(x, y, ridge=ridge).weight.numpy(), expected, rtol=1e-9)
    # Scaling x scales W* by the inverse, ridge included.
    np.testing.assert_allclose(
        fitted(10 * x, y, ridge=ridge).weight.numpy(), expected / 10, rtol=1e-9
    )


# ---- to_lora on models -----------------------------------------------------------------


def cera_toy(activation="silu", r=4, seed=0, bias=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, D, bias=bias), nn.Linear(D, D, bias=bias))
    config = CeraConfig(r=r, target_modules=["0", "1"], cera_dropout=0.3, activation=activation)
    cera = get_cera_model(model, config)
    with torch.no_grad():
        for name, p in cera.named_parameters():
            if ".cera_B." in name:
                p.copy_(0.3 * torch.randn(p.shape))
    return cera


def toy_batches(n=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(64, D, generator=gen) for _ in range(n)]


def cera_factors(cera, layer):
    m = cera.base_model.model[layer]
    return m.cera_B["default"].weight.detach(), m.cera_A["default"].weight.detach()


def plain_base(seed=0, bias=True):
    """The same base weights as ``cera_toy(seed=seed)`` before adapters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, D, bias=bias), nn.Linear(D, D, bias=bias))


def test_identity_branch_exports_exactly_its_own_b_a(tmp_path):
    cera = cera_toy(activation="identity").train()  # dropout is on in train mode
    exported = to_lora(cera, toy_batches(), rank=4, progress=False)
    assert cera.training, "the model's mode is restored"
    for layer in (0, 1):
        b, a = cera_factors(cera, layer)
        lb = exported.state_dict[f"base_model.model.{layer}.lora_B.weight"]
        la = exported.state_dict[f"base_model.model.{layer}.lora_A.weight"]
        assert lb.shape == (D, 4) and la.shape == (4, D) and lb.dtype == torch.float32
        torch.testing.assert_close(lb @ la, b @ a, rtol=1e-5, atol=1e-5)
        row = exported.report[str(layer)]
        assert row.rank == 4 and row.adapter_rank == 4 and row.method == "cera"
        assert row.at(4) == pytest.approx(1.0, abs=1e-9)
        assert row.at(3) < 0.999
    config = exported.config
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 4, 0.0)
    assert config.target_modules == {"0", "1"} and not config.rank_pattern


def test_exported_folder_loads_in_plain_peft_and_matches_w_k_x(tmp_path):
    cera = cera_toy(activation="silu")
    calibration, held_out = toy_batches(), toy_batches(n=1, seed=7)[0]
    exported = to_lora(cera, calibration, rank=3, progress=False)
    save_lora(exported, tmp_path / "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no staging left
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 3 and saved["lora_alpha"] == 3

    # W_k from a numpy fit of the same layer inputs: layer 0 sees the raw x.
    with torch.no_grad():
        x = torch.cat(calibration).double().numpy()
        b, a = cera_factors(cera, 0)
        h = x @ a.double().numpy().T
        y = (h / (1 + np.exp(-h))) @ b.double().numpy().T
    w = np.linalg.lstsq(x, y, rcond=None)[0].T
    v = np.linalg.svd(x @ w.T)[2].T[:, :3]
    wk = v @ v.T @ w

    lora = PeftModel.from_pretrained(plain_base(), str(tmp_path / "lora")).eval()
    base = plain_base().eval()
    with torch.no_grad():
        first = lora.base_model.model[0](held_out)
        expected = base[0](held_out).double() + held_out.double() @ torch.from_numpy(wk).T
        torch.testing.assert_close(first.double(), expected, rtol=1e-4, atol=1e-4)
        outputs = lora(held_out)
        merged = lora.merge_and_unload()
        assert not any("lora" in n for n, _ in merged.named_modules())
        torch.testing.assert_close(merged(held_out), outputs, rtol=1e-5, atol=1e-5)


def test_energy_picks_per_layer_ranks_written_as_rank_pattern(tmp_path):
    cera = cera_toy(activation="identity", r=4)
    with torch.no_grad():  # layer 1's branch has rank 2
        cera.base_model.model[1].cera_B["default"].weight[:, 2:] = 0
    exported = to_lora(cera, toy_batches(), energy=0.999, progress=False)
    assert [m.rank for m in exported.report] == [4, 2]
    assert exported.config.r == 4 and exported.config.rank_pattern == {"1": 2}
    assert exported.config.alpha_pattern == {"1": 2}
    exported.save_pretrained(tmp_path)
    lora = PeftModel.from_pretrained(plain_base(), str(tmp_path)).eval()
    assert lora.base_model.model[1].lora_A["default"].weight.shape == (2, D)
    assert lora.base_model.model[1].scaling["default"] == 1.0
    x = toy_batches(n=1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(lora(x), cera.eval()(x), rtol=1e-4, atol=1e-4)


def test_bias_is_exported_as_lora_bias_and_merges(tmp_path):
    cera = cera_toy(activation="silu", r=4)
    exported = to_lora(cera, toy_batches(), rank=4, bias=True, progress=False)
    assert exported.config.lora_bias
    assert "base_model.model.0.lora_B.bias" in exported.state_dict
    plain = to_lora(cera, toy_batches(), rank=4, progress=False)
    for m_bias, m_plain in zip(exported.report, plain.report):
        assert m_bias.at(4) >= m_plain.at(4) - 1e-12  # an extra free parameter cannot hurt
    save_lora(exported, tmp_path)
    lora = PeftModel.from_pretrained(plain_base(), str(tmp_path)).eval()
    x = toy_batches(n=1, seed=6)[0]
    with torch.no_grad():
        before = lora(x)
        torch.testing.assert_close(lora.merge_and_unload()(x), before, rtol=1e-5, atol=1e-5)


def test_padding_is_left_out_and_batch_order_does_not_matter():
    model = get_cera_model(tiny_llama(0), CeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".cera_B." in name:
                p.copy_(0.1 * torch.randn(p.shape))
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 128, (3, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    forward = to_lora(model, batches, rank=8, progress=False)
    backward = to_lora(model, batches[::-1], rank=8, progress=False)
    assert {m.tokens for m in forward.report} == {4 * 26}
    assert len(forward.report) == 4
    for key, value in forward.state_dict.items():
        product = key.endswith("lora_A.weight")
        if product:
            b_key = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(
                forward.state_dict[b_key] @ value,
                backward.state_dict[b_key] @ backward.state_dict[key],
                rtol=1e-5,
                atol=1e-6,
            )
    for f, b in zip(forward.report, backward.report):
        np.testing.assert_allclose(f.linearity, b.linearity, atol=1e-9)
    assert forward.config.target_modules == {
        f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")
    }


def test_to_lora_refuses_bad_arguments():
    cera = cera_toy()
    for kwargs, error, match in (
        ({}, ValueError, "exactly one"),
        ({"rank": 2, "energy": 0.9}, ValueError, "exactly one"),
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": 2.0}, TypeError, "rank must be an int"),
        ({"energy": 1.5}, ValueError, r"energy must be in \(0, 1\]"),
        ({"rank": D + 1}, ValueError, "exceeds 0's min"),
        ({"rank": 2, "ridge": -1.0}, ValueError, "ridge"),
    ):
        with pytest.raises(error, match=match):
            to_lora(cera, toy_batches(n=1), progress=False, **kwargs)
    with pytest.raises(ValueError, match="batches is empty: to_lora needs"):
        to_lora(cera, [], rank=2, progress=False)
    with pytest.raises(ValueError, match="no active CeRA, LoRA or DoRA"):
        to_lora(plain_base(), toy_batches(n=1), rank=2, progress=False)
    with pytest.raises(TypeError, match="what to_lora returns"):
        save_lora({}, "unused")


def test_report_table_json_and_plot(tmp_path):
    exported = to_lora(cera_toy(), toy_batches(), rank=2, progress=False)
    report = exported.report
    assert isinstance(report, LinearityReport) and len(report) == 2
    text = str(report)
    assert text.splitlines()[0].split() == [
        "module",
        "method",
        "r",
        "tokens",
        "k",
        "lin@k",
        "lin@r",
        "lin",
        "full",
    ]
    assert "<table>" in report._repr_html_()
    row = report.rows()[0]
    assert row["rank"] == 2 and row["tokens"] == 384
    assert (
        row["linearity_at_rank"]
        <= row["linearity_at_adapter_rank"]
        <= row["linearity_full_rank"] + 1e-12
    )
    report.to_json(tmp_path / "linearity.json")
    saved = json.loads((tmp_path / "linearity.json").read_text())
    assert len(saved["modules"][0]["linearity"]) == D + 1
    assert report.mean("linearity_full_rank") == pytest.approx(np.mean([m.at(D) for m in report]))
    report.plot(tmp_path / "linearity.png")
    assert (tmp_path / "linearity.png").read_bytes()[:4] == b"\x89PNG"


def test_held_out_linearity_is_the_exported_maps_error_on_other_tokens(tmp_path):
    """``to_lora(held_out=...)``: each layer's held-out curve is one minus the direct
    error of every rank's map on the held-out tokens, from the model's own layer inputs;
    the table, JSON and figure carry it."""
    cera = cera_toy(activation="silu", bias=True)
    held_out = toy_batches(n=2, seed=7)
    exported = to_lora(cera, toy_batches(n=1), rank=3, bias=True, held_out=held_out, progress=False)
    b, a = (t.double().numpy() for t in cera_factors(cera, 0))

    def layer0(batches):  # layer 0's inputs and CeRA deltas (eval: no dropout)
        x = torch.cat(batches).double().numpy()
        h = x @ a.T
        return x, (h / (1 + np.exp(-h))) @ b.T

    x, y = layer0(held_out)
    fit = fitted(*layer0(toy_batches(n=1)), bias=True)
    module = exported.report["0"]
    assert module.held_out_tokens == 128 and module.tokens == 64
    assert len(module.held_out) == len(module.linearity) == D + 1
    for k in (1, 3, 12, D):
        fb, fa, bias = fit.factors(k)
        want = 1 - unexplained(x, y, (fb @ fa).numpy(), bias.numpy())
        # The model's deltas are float32, this fit's float64.
        assert module.at(k, held_out=True) == pytest.approx(want, abs=1e-6)
        assert module.at(k) == pytest.approx(fit.linearity[k], abs=1e-6)
    # 64 calibration tokens for 24 inputs: the full-rank map fits noise too.
    assert module.at(D, held_out=True) < module.at(D) - 1e-3
    row = exported.report.rows()[0]
    assert row["held_out_linearity_at_rank"] == module.at(3, held_out=True)
    assert "held-out" in str(exported.report) and "held-out" in exported.report._repr_html_()
    exported.report.to_json(tmp_path / "linearity.json")
    saved = json.loads((tmp_path / "linearity.json").read_text())["modules"][0]
    assert saved["held_out_linearity"] == pytest.approx(module.held_out.tolist())
    with pytest.raises(ValueError, match="no held-out tokens were measured"):
        to_lora(cera, toy_batches(n=1), rank=3, progress=False).report["0"].at(3, held_out=True)
    with pytest.raises(ValueError, match="held_out is empty: to_lora needs"):
        to_lora(cera, toy_batches(n=1), rank=3, held_out=[], progress=False)
    with pytest.raises(TypeError, match="StreamingRegression"):
        fit.linearity_on("tokens")
    with pytest.raises(ValueError, match="d_in=24, d_out=5"):
        fit.linearity_on(StreamingRegression(D, 5))


# ---- CLI -------------------------------------------------------------------------------


def test_cli_export_lora_from_saved_adapter_and_token_ids(tmp_path, capsys):
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "cera", tmp_path / "lora"
    tiny_llama(0).save_pretrained(base_dir)
    cera = get_cera_model(tiny_llama(0), CeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in cera.named_parameters():
            if ".cera_B." in name:
                p.copy_(0.1 * torch.randn(p.shape))
    cera.save_pretrained(adapter_dir)
    ids = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "ids.npy", ids.numpy())
    code = cli.main(
        [
            "export-lora",
            str(adapter_dir),
            str(out_dir),
            "--data",
            str(tmp_path / "ids.npy"),
            "--rank",
            "2",
            "--base",
            str(base_dir),
            "--json",
            str(tmp_path / "lin.json"),
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in stdout and "written:" in stdout
    assert len(json.loads((tmp_path / "lin.json").read_text())["modules"]) == 4
    lora = PeftModel.from_pretrained(tiny_llama(0), str(out_dir)).eval()
    with torch.no_grad():
        out = lora(input_ids=ids[:2]).logits
        torch.testing.assert_close(
            lora.merge_and_unload()(input_ids=ids[:2]).logits, out, rtol=1e-4, atol=1e-4
        )

    # A text file of ids gives the same export; ids out of the vocabulary are refused.
    (tmp_path / "ids.txt").write_text("\n".join(" ".join(map(str, r.tolist())) for r in ids))
    assert (
        cli.main(
            [
                "export-lora",
                str(adapter_dir),
                str(tmp_path / "lora2"),
                "--data",
                str(tmp_path / "ids.txt"),
                "--rank",
                "2",
                "--base",
                str(base_dir),
            ]
        )
        == 0
    )
    assert (tmp_path / "lora2" / "adapter_model.safetensors").read_bytes() == (
        out_dir / "adapter_model.safetensors"
    ).read_bytes()
    # --held-out: the same LoRA, the report measured on other ids too.
    np.save(tmp_path / "other.npy", torch.randint(0, 128, (3, 12)).numpy())
    capsys.readouterr()
    assert (
        cli.main(
            [
                "export-lora",
                str(adapter_dir),
                str(tmp_path / "lora4"),
                "--data",
                str(tmp_path / "ids.npy"),
                "--rank",
                "2",
                "--base",
                str(base_dir),
                "--held-out",
                str(tmp_path / "other.npy"),
                "--json",
                str(tmp_path / "lin4.json"),
            ]
        )
        == 0
    )
    assert "held-out lin@k" in capsys.readouterr().out
    saved = json.loads((tmp_path / "lin4.json").read_text())["modules"]
    assert all(m["held_out_tokens"] == 36 and len(m["held_out_linearity"]) > 2 for m in saved)
    assert (tmp_path / "lora4" / "adapter_model.safetensors").read_bytes() == (
        out_dir / "adapter_model.safetensors"
    ).read_bytes()
    (tmp_path / "bad.txt").write_text("1 2 500\n")
    capsys.readouterr()
    assert (
        cli.main(
            [
                "export-lora",
                str(adapter_dir),
                str(tmp_path / "lora3"),
                "--data",
                str(tmp_path / "bad.txt"),
                "--energy",
                "0.9",
                "--base",
                str(base_dir),
            ]
        )
        == 2
    )
    assert "token ids must be in [0, 128)" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "export-lora",
                str(adapter_dir),
                str(tmp_path / "lora3"),
                "--data",
                str(tmp_path / "ids.txt"),
                "--rank",
                "2",
            ]
        )
        == 2
    )
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "lora3").exists()


def test_demo_export_and_merge_leaves_the_shared_base_alone():
    from cera_rs.demo.linearity import export_and_merge, summary

    cera, base = cera_toy(), plain_base()
    before = {n: p.clone() for n, p in base.state_dict().items()}
    merged, report = export_and_merge(
        cera, base, toy_batches(), rank=3, held_out=toy_batches(n=1, seed=7)
    )
    for name, value in base.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} of the shared base was written"
    assert merged[0].bias is base[0].bias  # what the merge does not write is shared
    state = to_lora(cera, toy_batches(), rank=3, progress=False).state_dict
    for layer in (0, 1):
        b = state[f"base_model.model.{layer}.lora_B.weight"]
        a = state[f"base_model.model.{layer}.lora_A.weight"]
        torch.testing.assert_close(merged[layer].weight, base[layer].weight + b @ a)
    means = summary(report)
    assert set(means) == {
        "linearity_at_r",
        "linearity_full_rank",
        "held_out_linearity_at_r",
        "held_out_linearity_full_rank",
        "layers",
    }
    assert 0 < means["linearity_at_r"] <= means["linearity_full_rank"] < 1
    assert means["held_out_linearity_at_r"] == report.mean("held_out_linearity_at_adapter_rank")
