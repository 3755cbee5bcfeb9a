"""The benchmark keeps working: tiny shapes, structure checked, no timing asserted."""

from __future__ import annotations

import json
import math

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
        ("reference", 2), ("streaming", 2), ("streaming", 3), ("streaming", 3)]
    assert all(r["seconds"] > 0 and math.isfinite(r["peak_mib"]) for r in rows)
    # both routes solve the same least-squares problem, in float64
    assert rows[1]["max_diff_vs_reference"] < 1e-8
    assert "streaming float64 moments" in capsys.readouterr().out
