"""How much of a trained CeRA adapter is linear, measured in the demo: each CeRA
adapter's linearity (``cera_rs.export``: the share of its output energy the best
rank-``k`` linear map reproduces) and the score of that map exported as a PEFT LoRA,
loaded and merged into a copy of the base model, beside the CeRA adapter it came
from. Both parts call ``export_and_merge``; the tables and findings are built here."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
from peft import PeftModel
from torch import nn

from cera_rs.export import LinearityReport, save_lora, to_lora


def export_and_merge(model: nn.Module, base: nn.Module, batches: Iterable[Any],
                     rank: int) -> tuple[nn.Module, LinearityReport]:  # fmt: skip
    """The rank-``rank`` LoRA of ``model``'s CeRA adapters fitted on ``batches``,
    written as a PEFT adapter folder, loaded by plain ``PeftModel.from_pretrained``
    onto a copy of ``base`` and merged (``merge_and_unload``): the model a LoRA-only
    serving stack would run, and the linearity report.

    The copy shares every parameter of ``base`` except the weights the merge writes,
    so ``base`` (often shared by other runs) is never modified and little is copied.
    """
    export = to_lora(model, batches, rank=rank, progress=False)
    kinds = ("weight", "bias") if export.config.lora_bias else ("weight",)
    written = {f"{m.name}.{kind}" for m in export.report for kind in kinds}
    memo = {id(p): p for n, p in base.named_parameters() if n not in written}
    with tempfile.TemporaryDirectory(prefix="cera-rs-export-") as folder:
        save_lora(export, folder)
        lora = PeftModel.from_pretrained(copy.deepcopy(base, memo=memo), folder)
    merged = lora.merge_and_unload().eval()
    return merged, export.report


def summary(report: LinearityReport) -> dict:
    """Linearity at the adapter's own rank and at full rank, averaged over layers."""
    return {"linearity_at_r": report.mean("linearity_at_adapter_rank"),
            "linearity_full_rank": report.mean("linearity_full_rank"),
            "layers": len(report)}  # fmt: skip


def mean_over_seeds(summaries: list[dict]) -> dict:
    return {key: float(np.mean([s[key] for s in summaries]))
            for key in ("linearity_at_r", "linearity_full_rank")}  # fmt: skip


def ceiling_table(part1: dict) -> str:
    """Part 1: each CeRA adapter's linearity and its exported LoRA's held-out error."""
    lines = ["| family | method | linearity at r | full-rank linearity | CeRA unexplained | "
             "exported LoRA (merged) unexplained |", "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for family, block in part1["families"].items():
        for name, row in block["methods"].items():
            if "linearity" not in row:
                continue
            lin = row["linearity"]
            lines.append(f"| {family} | {name} | {lin['linearity_at_r']:.3f} | "
                         f"{lin['linearity_full_rank']:.3f} | {row['test_error_mean']:.3f} | "
                         f"{row['exported_lora_test_error_mean']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def ceiling_findings(part1: dict) -> list[str]:
    out = []
    for family, block in part1["families"].items():
        rows = [(name, row) for name, row in block["methods"].items() if "linearity" in row]
        if not rows:
            continue
        parts = ", ".join(
            f"{name} {row['linearity']['linearity_at_r']:.2f} (its merged LoRA leaves "
            f"{row['exported_lora_test_error_mean']:.3f} unexplained against CeRA's "
            f"{row['test_error_mean']:.3f})" for name, row in rows)  # fmt: skip
        out.append(f"{family}: share of each CeRA adapter's output energy that the best "
                   f"linear map of its own rank reproduces: {parts}.")  # fmt: skip
    return out
