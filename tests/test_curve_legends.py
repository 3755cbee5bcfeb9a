"""The rank-curve figure's legend names each family as the tables beside it do (the
kind's name, and only the fields that set it apart from its kind's other families), not
by its raw spec."""

from __future__ import annotations

import json

import pytest
from codeblocks import ROOT

from cera_rs.compare import curves

TARGETS = 'target_modules=["q_proj","k_proj","v_proj"]'


def test_a_spec_label_keeps_only_what_tells_it_from_its_kin():
    labels = [
        f"cera:{TARGETS}",
        f"lora:lora_alpha=8,use_rslora=true,{TARGETS}",
        f"cera:activation=identity,cera_dropout=0,{TARGETS}",
        f"cera:cera_dropout=0,{TARGETS}",
        "dora:lora_alpha=16",
        'hira:target_modules=["q_proj"]',
    ]
    assert curves.legend_names(labels) == {
        labels[0]: "CeRA",
        labels[1]: "LoRA",
        labels[2]: "CeRA (activation=identity, cera_dropout=0)",
        labels[3]: "CeRA (cera_dropout=0)",
        labels[4]: "DoRA",
        labels[5]: "hira",
    }


def test_labels_that_are_not_specs_stay_as_they_are():
    labels = ["LoRA", "CeRA", "CeRA, identity", "runs/my-adapter"]
    assert curves.legend_names(labels) == {label: label for label in labels}


def test_the_study_figure_legend_has_the_short_names(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    summary = json.loads((ROOT / "docs" / "study" / "phonebook" / "summary.json").read_text())
    drawn, close = [], plt.close
    monkeypatch.setattr(plt, "close", drawn.append)  # the figure, kept to be read
    curves.plot(summary["curves"], tmp_path / "curves.png", "phonebook")
    (figure,) = drawn
    shown = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    close(figure)
    assert sorted(shown) == sorted(
        ["CeRA", "LoRA", "CeRA (activation=identity, cera_dropout=0)", "CeRA (cera_dropout=0)"]
    )
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
