"""``compare()``: the one entry path of a comparison. Everything that can be refused
(specs, settings, data, the output folder, Ray's options) is refused here before the
model loads; then the model, ``r=full`` made concrete against it, the runs
(``engine``) and the report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cera_rs.atomic import check_folder_creatable
from cera_rs.compare import cluster
from cera_rs.compare import data as _data
from cera_rs.compare.cluster import Ray
from cera_rs.compare.engine import Extras, check, last_layers, run
from cera_rs.compare.methods import Method, at_full_rank, distinct, product, with_preset
from cera_rs.compare.methods import methods as expand
from cera_rs.compare.settings import Settings

DEFAULT_SIZES = (960, 100, 300)
"""Train, valid and test problems of a built-in tier (the easy tier has 810 in all)."""
BUILTIN_MODEL = "smollm2"
"""SmolLM2-135M-Instruct (4-bit-quantised (Q4_1) weights, dequantised; offline)."""


def load_model(name: str | os.PathLike) -> tuple[str, nn.Module, Any]:
    """The frozen base (float32, eval) and its tokenizer: the built-in SmolLM2, or
    anything ``AutoModelForCausalLM.from_pretrained`` takes (a local folder; a hub id
    goes to transformers, which may download it on a machine that can)."""
    if str(name) == BUILTIN_MODEL:
        from cera_rs import smollm2

        model, tokenizer = smollm2.load()
        return f"SmolLM2-135M-Instruct, {smollm2.WEIGHTS}", model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    model.requires_grad_(False).eval()
    return str(name), model, AutoTokenizer.from_pretrained(name)


def load_problems(
    data: str | None = None,
    train: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    valid: str | os.PathLike | None = None,
    sizes: tuple[int, int, int] | None = None,
) -> _data.Problems:
    """``data="tiers:hard"`` (or ``tiers:easy``) with ``sizes`` (train, valid, test;
    default 960, 100, 300), ``data="phonebook:N"`` (N made-up facts to memorise), or
    JSONL files ``train`` and ``test`` (and ``valid``)."""
    if data is not None:
        if train is not None or test is not None or valid is not None:
            raise ValueError("give either a built-in data set or JSONL files, not both")
        kind, _, name = data.partition(":")
        if kind == "phonebook":
            if sizes is not None:
                raise ValueError("sizes are for the arithmetic tiers; phonebook:N sets its own")
            if not name.isdigit() or int(name) < 1:
                raise ValueError(
                    f"--data {data}: phonebook:N needs a positive number of "
                    "facts, e.g. phonebook:200"
                )
            return _data.phonebook(int(name))
        sizes = DEFAULT_SIZES if sizes is None else tuple(sizes)
        if len(sizes) != 3 or not all(isinstance(n, int) and n > 0 for n in sizes):
            raise ValueError(f"sizes: three positive counts (train, valid, test), got {sizes}")
        if kind != "tiers" or name not in _data.TIERS:
            raise ValueError(
                f"unknown built-in data {data!r}; expected phonebook:N or one of "
                f"{', '.join(f'tiers:{t}' for t in _data.TIERS)}"
            )
        return _data.tier(name, *sizes)
    if sizes is not None:
        raise ValueError("sizes are for the built-in data; JSONL files give their own")
    if train is None or test is None:
        raise ValueError(
            "no data: give --data tiers:hard (or tiers:easy), or JSONL files as "
            "--train and --test (and optionally --valid)"
        )
    return _data.from_jsonl(train, test, valid)


def compare(
    methods: list[str | os.PathLike | Method],
    model: str | os.PathLike = BUILTIN_MODEL,
    data: str | None = None,
    train: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    valid: str | os.PathLike | None = None,
    out_dir: str | os.PathLike = "results/compare",
    settings: Settings | None = None,
    sizes: tuple[int, int, int] | None = None,
    progress: bool = True,
    extras: Extras | None = None,
    ray: Ray | str | bool | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) the comparison in ``out_dir`` and writes its report there;
    returns the summary (``summary.json``). ``ray``: each run a Ray task (True: a local
    Ray; an address such as "auto"; or ``Ray(address, gpus_per_run, cpus_per_run)``),
    the workers loading ``model`` themselves."""
    from cera_rs.compare import report

    settings = settings or Settings()
    chosen = distinct([x for m in methods for x in ([m] if isinstance(m, Method) else expand(m))])
    chosen = [with_preset(m, settings.tune) for m in chosen]
    for m in chosen:  # a config PEFT refuses stops here, before the model loads
        if not m.full_rank:
            for choice in product(m.tune):
                m.chosen(choice).config()
    check(chosen, settings)
    ray = cluster.options(ray)
    problems = load_problems(data, train, test, valid, sizes)
    check_folder_creatable(out_dir)
    name, base, tokenizer = load_model(model)
    layers = last_layers(base, settings.adapted_layers)
    chosen = [at_full_rank(m, base, layers) for m in chosen]
    comparison = run(
        name,
        base,
        tokenizer,
        problems,
        chosen,
        settings,
        Path(out_dir),
        progress=progress,
        extras=extras,
        ray=ray,
        model_source=model,
    )
    return report.write(comparison)
