"""The benchmark keeps working: tiny shapes, structure checked, no timing asserted."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from cera_rs.bench import suite
from cera_rs.bench.cases import Shape
from cera_rs.cli import main


def test_quick_bench_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    kinds = [row["kind"] for row in data["rows"]]
    # per dtype (float32, bfloat16): one training shape, two inference sizes
    assert kinds.count("branch_train") == 2 and kinds.count("layer_train") == 2
    assert kinds.count("branch_infer") == 4
    for row in data["rows"]:
        assert "cera_rs" in row["ms"] and row["floor_ms"] > 0
        assert all(math.isfinite(v) and v > 0 for v in row["ms"].values())
    train = next(row for row in data["rows"] if row["kind"] == "branch_train")
    assert set(train["saved_bytes"]) == {"cera_rs", "plain", "lora_p0", "lora_p0.1"}
    # what the kernel keeps is h (N x r) and the seed, never the plain composition's three
    assert train["saved_bytes"]["cera_rs"] < train["saved_bytes"]["plain"]
    assert "CeRA branch, forward+backward" in capsys.readouterr().out


def test_quick_export_bench_compares_both_routes(tmp_path, capsys):
    out = tmp_path / "export.json"
    assert main(["bench", "--export", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["layers"]) for r in rows] == [
        ("reference", 2),
        ("streaming", 2),
        ("streaming", 3),
        ("streaming", 3),
    ]
    assert all(r["seconds"] > 0 and math.isfinite(r["peak_mib"]) for r in rows)
    # both routes solve the same least-squares problem, in float64
    assert rows[1]["max_diff_vs_reference"] < 1e-8
    assert "streaming float64 moments" in capsys.readouterr().out


def test_gpu_grid_code_path_runs_on_cpu_and_checkpoints(tmp_path):
    """``--device cuda``'s grid (kinds, methods, decode, per-shape JSON) at tiny shapes
    on CPU; torch.compile is left out here (inductor's CPU build takes a minute)."""
    grid = dataclasses.replace(suite.Grid.cuda_quick(), device="cpu", compiled=False)
    path = tmp_path / "bench.json"
    results = suite.run(grid, progress=False, checkpoint=path)
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and len(data["rows"]) == len(results.rows) == 3
    assert [row["kind"] for row in data["rows"]] == ["branch_train", "layer_train", "branch_infer"]
    for row in data["rows"]:
        assert row["vs_plain"]["plain"] == 1.0 and math.isfinite(row["vs_plain"]["cera_rs"])
    assert data["rows"][0]["peak_bytes"].keys() == {"cera_rs", "plain", "lora_p0", "lora_p0.1"}


def test_cuda_target_is_the_branch_against_plain_at_the_headline_shape():
    results = suite.Results(machine="test", date="today", device="cuda")
    times = {"cera_rs": 1.05, "plain": 1.0, "lora_p0": 0.9, "floor": 0.8}
    memory = {"saved_bytes": {"cera_rs": 2**20, "plain": 2**21}, "peak_bytes": {}}
    results.add("branch_train", Shape(8192, 4096, 64, torch.bfloat16), dict(times), **memory)
    results.add(
        "branch_train", Shape(8192, 4096, 16, torch.bfloat16), {**times, "cera_rs": 2.0}, **memory
    )
    (check,) = suite.targets(results)
    assert check["met"] and check["ratio"] == pytest.approx(1.05) and check["bound"] == 1.10
    table = suite.format_table(results)
    assert "headline shape N=8192 d=4096 r=64" in table and "2.000x" in table


@pytest.mark.cuda
def test_cuda_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cuda", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["device"] == "cuda" and len(data["rows"]) == 3
    train = data["rows"][0]
    assert "plain_compiled" in train["ms"] and train["peak_bytes"]["cera_rs"] > 0


def test_quick_layers_bench_times_conv_and_embedding_against_plain_and_lora(tmp_path, capsys):
    out = tmp_path / "layers.json"
    assert main(["bench", "--layers", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["kind"], r["scope"]) for r in data["rows"]] == [
        ("conv", "branch"),
        ("conv", "layer"),
        ("embedding", "branch"),
        ("embedding", "layer"),
    ]
    for row in data["rows"]:
        assert {"cera_rs", "plain", "lora_p0"} <= row["ms"].keys()
        assert all(math.isfinite(v) and v > 0 for v in row["ms"].values())
        fastest_lora = min(v for k, v in row["ms"].items() if k.startswith("lora"))
        assert row["vs_lora"] == pytest.approx(row["ms"]["cera_rs"] / fastest_lora)
        assert row["vs_plain"] == pytest.approx(row["ms"]["cera_rs"] / row["ms"]["plain"])
    # the conv's LoRA with dropout drops its input; an embedding's LoRA has no dropout
    assert "lora_p0.1" in data["rows"][0]["ms"] and "lora_p0.1" not in data["rows"][2]["ms"]
    # what the branch keeps is x, A, B (not counted), h and the seed, never the plain
    # composition's activation and mask copies
    for row in data["rows"][0], data["rows"][2]:
        assert row["saved_bytes"]["cera_rs"] < row["saved_bytes"]["plain"]
    assert len(data["targets"]) == 8
    assert "cera_rs/plain" in capsys.readouterr().out


def test_whole_model_step_runs_every_method_on_both_paths():
    """``--model``'s step at tiny size on a tiny Llama: CeRA silu, CeRA identity and LoRA,
    on the whole model and on the split path, with the ratios to LoRA."""
    from models import tiny_llama

    from cera_rs.bench import layers

    results = layers.run_model(tiny_llama(0), layers.MODEL_QUICK, progress=False)
    assert [row["path"] for row in results["rows"]] == ["whole", "split"]
    for row in results["rows"]:
        assert row["ms"].keys() == {"cera_silu_p0.1", "cera_identity_p0", "lora"}
        assert row["vs_lora"]["lora"] == 1.0 and all(v > 0 for v in row["ms"].values())
    assert len(results["targets"]) == 4
    assert "split path (--adapted-layers)" in layers.format_model(results)
