"""ModelSpectrum as a user handles it: iterate, look up by suffix, read the repr."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cera_rs import CeraLinear
from cera_rs.spectral import ModelSpectrum, ModuleSpectrum, analyze, spectrum

NAMES = [f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in ("q_proj", "v_proj")]


def report() -> ModelSpectrum:
    rng = np.random.default_rng(0)
    modules = [
        ModuleSpectrum(n, "cera", spectrum(rng.standard_normal((20, 6)), rank=6), 20) for n in NAMES
    ]
    # an all-zero delta: every metric 0, tail energy exactly +0
    modules.append(ModuleSpectrum("model.lm_head", "lora", spectrum(np.zeros((5, 4)), rank=2), 5))
    return ModelSpectrum(modules)


def test_iterates_modules_in_order():
    r = report()
    assert [m.name for m in r] == NAMES + ["model.lm_head"]
    assert all(isinstance(m, ModuleSpectrum) for m in r)


def test_lookup_by_name_or_unique_suffix():
    r = report()
    assert r["model.layers.1.self_attn.v_proj"].name == NAMES[3]
    assert r["1.self_attn.v_proj"].name == NAMES[3]
    assert r["lm_head"].method == "lora"


def test_ambiguous_suffix_names_the_candidates():
    with pytest.raises(KeyError) as err:
        report()["q_proj"]
    message = str(err.value)
    assert "'q_proj' matches 2 modules" in message
    assert f"{NAMES[0]} (cera)" in message and f"{NAMES[2]} (cera)" in message


def test_unknown_name_and_positions():
    with pytest.raises(KeyError, match="no module is named or ends with 'k_proj'; modules: model"):
        report()["k_proj"]
    with pytest.raises(KeyError, match="ends with 'proj'"):
        report()["proj"]  # a suffix matches at a dot only
    with pytest.raises(TypeError, match="by name"):
        report()[0]


def test_repr_is_the_table_without_negative_zero():
    r = report()
    assert repr(r) == str(r)
    lines = repr(r).splitlines()
    assert lines[0].split()[:4] == ["module", "method", "r", "tokens"]
    assert len(lines) == 2 + 5
    assert "-0" not in repr(r)
    assert lines[-1].split()[-1] == "0.000e+00"
    assert np.copysign(1.0, r["lm_head"].row()["tail_energy"]) == 1.0


def test_empty_batches_are_an_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(CeraLinear(torch.nn.Linear(8, 8), r=2))
    with pytest.raises(ValueError, match="batches is empty"):
        analyze(model, [], progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        analyze(model, iter(()), progress=False)
    assert model.training  # its mode is restored
    ok = analyze(model, [torch.randn(3, 8)], progress=False)
    assert ok["0"].tokens == 3


def test_markdown_table_aligns_text_left_and_figures_right():
    """The reports' Markdown tables (compare's report.md) come from the same columns as
    the text and HTML tables: text left, figures right (``>s``: figures already written
    as text), a missing value as "-"."""
    from cera_rs.table import markdown_table, text_table

    columns = [("method", "m", "s"), ("params", "p", ",d"), ("interval", "i", ">s")]
    rows = [{"m": "lora:r=4", "p": 40704, "i": "1.0 to 2.0"}, {"m": "cera", "p": None, "i": "-"}]
    assert markdown_table(columns, rows) == [
        "| method | params | interval |",
        "|---|---:|---:|",
        "| lora:r=4 | 40,704 | 1.0 to 2.0 |",
        "| cera | - | - |",
    ]
    assert text_table(columns, rows).splitlines()[3] == "cera           -           -"
