"""How much of a trained CeRA adapter is linear, measured in the demo: each CeRA
adapter's linearity (``cera_rs.export``: the share of its output energy the best
rank-``k`` linear map reproduces) and the score of that map exported as a PEFT LoRA,
loaded and merged into a copy of the base model, beside the CeRA adapter it came
from. Both parts call ``export_and_merge``; the tables and findings are built here."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np
from peft import PeftModel
from torch import nn

from cera_rs.export import LinearityReport, save_gguf_lora, save_lora, to_lora
from cera_rs.table import markdown_table, pct


def export_and_merge(
    model: nn.Module,
    base: nn.Module,
    batches: Iterable[Any],
    rank: int,
    held_out: Iterable[Any],
    gguf: str | os.PathLike | None = None,
    base_gguf: str | os.PathLike | None = None,
) -> tuple[nn.Module, LinearityReport]:
    """The rank-``rank`` LoRA of ``model``'s CeRA adapters fitted on ``batches``,
    written as a PEFT adapter folder, loaded by plain ``PeftModel.from_pretrained``
    onto a copy of ``base`` and merged (``merge_and_unload``): the model a LoRA-only
    serving stack would run, and the linearity report (on ``held_out`` too). With
    ``gguf``, the same LoRA is also written there as a llama.cpp adapter for the
    GGUF model ``base_gguf``.

    The copy shares every parameter of ``base`` except the weights the merge writes,
    so ``base`` (often shared by other runs) is never modified and little is copied.
    """
    export = to_lora(model, batches, rank=rank, held_out=held_out, progress=False)
    if gguf is not None:
        save_gguf_lora(export, gguf, base_gguf=base_gguf)
    kinds = ("weight", "bias") if export.config.lora_bias else ("weight",)
    written = {f"{m.name}.{kind}" for m in export.report for kind in kinds}
    memo = {id(p): p for n, p in base.named_parameters() if n not in written}
    with tempfile.TemporaryDirectory(prefix="cera-rs-export-") as folder:
        save_lora(export, folder)
        lora = PeftModel.from_pretrained(copy.deepcopy(base, memo=memo), folder)
    merged = lora.merge_and_unload().eval()
    return merged, export.report


SUMMARY = {
    "linearity_at_r": "linearity_at_adapter_rank",
    "linearity_full_rank": "linearity_full_rank",
    "held_out_linearity_at_r": "held_out_linearity_at_adapter_rank",
    "held_out_linearity_full_rank": "held_out_linearity_full_rank",
}
"""Summary key: the report column averaged over layers."""


def summary(report: LinearityReport) -> dict:
    """Linearity at the adapter's own rank and at full rank, on the calibration and
    the held-out tokens, averaged over layers."""
    return {**{key: report.mean(column) for key, column in SUMMARY.items()}, "layers": len(report)}


def mean_over_seeds(summaries: list[dict]) -> dict:
    return {key: float(np.mean([s[key] for s in summaries])) for key in SUMMARY}


def _pair(lin: dict) -> dict[str, str]:
    """Two table cells: at r and at full rank, each "calibration / held out"."""
    return {
        "at_r": f"{lin['linearity_at_r']:.4f} / {lin['held_out_linearity_at_r']:.4f}",
        "full": f"{lin['linearity_full_rank']:.4f} / {lin['held_out_linearity_full_rank']:.4f}",
    }


def ceiling_table(part1: dict) -> str:
    """Part 1: each CeRA adapter's linearity and its exported LoRA's held-out error."""
    columns = [
        ("family", "family", "s"),
        ("method", "method", "s"),
        ("linearity at r (train / held out)", "at_r", ">s"),
        ("full-rank linearity (train / held out)", "full", ">s"),
        ("CeRA unexplained", "cera", ".3f"),
        ("exported LoRA (merged) unexplained", "lora", ".3f"),
    ]
    rows = [
        {
            "family": family,
            "method": name,
            **_pair(row["linearity"]),
            "cera": row["test_error_mean"],
            "lora": row["exported_lora_test_error_mean"],
        }
        for family, block in part1["families"].items()
        for name, row in block["methods"].items()
        if "linearity" in row
    ]
    return "\n".join(markdown_table(columns, rows))


def ceiling_findings(part1: dict) -> list[str]:
    out = []
    for family, block in part1["families"].items():
        rows = [(name, row) for name, row in block["methods"].items() if "linearity" in row]
        if not rows:
            continue
        parts = ", ".join(
            f"{name} {row['linearity']['held_out_linearity_at_r']:.2f} (its merged LoRA leaves "
            f"{row['exported_lora_test_error_mean']:.3f} unexplained against CeRA's "
            f"{row['test_error_mean']:.3f})"
            for name, row in rows
        )
        out.append(
            f"{family}: share of each CeRA adapter's output energy on held-out "
            f"inputs that the best linear map of its rank reproduces: {parts}."
        )
    return out


def _exported_rows(part2: dict):
    for name, row in part2["methods"].items():
        if "linearity" in row:
            yield name, row


def lm_table(part2: dict) -> str:
    """Part 2: the exported CeRA adapter's linearity (first seed) and the recall of its
    exported, merged LoRA beside the adapter's own on the same seed."""
    columns = [
        ("method", "method", "s"),
        ("linearity at r (train / test)", "at_r", ">s"),
        ("full-rank linearity (train / test)", "full", ">s"),
        ("CeRA recall % (first seed)", "cera", ">s"),
        ("exported LoRA (merged) recall %", "lora", ">s"),
        ("Wilson 95 %", "wilson", ">s"),
        ("same verdict %", "same", ">s"),
    ]
    rows = [
        {
            "method": name,
            **_pair(row["linearity"]),
            "cera": pct(row["recall"][0]),
            "lora": pct(row["exported_lora_test_exact_match"]),
            "wilson": "-".join(pct(x) for x in row["exported_lora_wilson95"]),
            "same": pct(row["exported_lora_same_verdict"]),
        }
        for name, row in _exported_rows(part2)
    ]
    return "\n".join(markdown_table(columns, rows))


def lm_findings(part2: dict) -> list[str]:
    out = []
    for name, row in _exported_rows(part2):
        cera, lora = row["recall"][0], row["exported_lora_test_exact_match"]
        change = "keeps" if lora == cera else "gains" if lora > cera else "loses"
        out.append(
            f"{name}: the best linear map of rank {row['r']} leaves "
            f"{1 - row['linearity']['held_out_linearity_at_r']:.1e} of the adapter's output "
            f"energy on the test tokens unexplained ({1 - row['linearity']['linearity_at_r']:.1e}"
            f" on the training tokens it was fitted on; for a memorised task they are the same "
            f"facts): the non-linear part. Exported as a LoRA and merged, it {change} recall "
            f"({pct(cera)} % -> {pct(lora)} %, same verdict on "
            f"{pct(row['exported_lora_same_verdict'])} % of the facts)."
        )
        out.append(_llama_cpp_finding(name, row))
    return out


def _llama_cpp_finding(name: str, row: dict) -> str:
    """The exported LoRA as a GGUF adapter run by llama.cpp, or why it was not run."""
    if "llama_cpp_skipped" in row:
        return (
            f"{name}: the GGUF adapter was not run in llama.cpp "
            f"(skipped: {row['llama_cpp_skipped']})."
        )
    return (
        f"{name}: the same LoRA as a GGUF adapter, run by llama.cpp on the SmolLM2 GGUF: "
        f"recall {pct(row['llama_cpp_exact_match'])} % (CeRA {pct(row['recall'][0])} %, "
        f"merged LoRA in PyTorch {pct(row['exported_lora_test_exact_match'])} %; same "
        f"verdict as the merged LoRA on {pct(row['llama_cpp_same_verdict'])} % of the "
        f"facts)."
    )
