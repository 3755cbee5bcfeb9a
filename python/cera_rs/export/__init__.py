"""Export CeRA adapters to the best LoRA of a given rank, and measure how linear
each adapted layer really is.

- ``to_lora`` / ``save_lora``: fit the best rank-``k`` linear map of each layer's
  CeRA branch over calibration batches and write it as a PEFT LoRA adapter folder,
  which plain PEFT loads and ``merge_and_unload()`` merges (embeddings: the exact
  truncated SVD of the branch table; convolutions: a LoRA conv fitted on input
  patches; ``cera_rs.export.layers``).
- ``save_gguf_lora``: the exported LoRA as a llama.cpp LoRA adapter (GGUF) for the
  GGUF base model, checked against that file's names and shapes.
- ``measure_linearity``: that report without the export; ``LinearityCallback`` logs it
  every ``n`` steps of Trainer training.
- ``LinearityReport``: per layer, the share of the branch's output energy the best
  rank-``k`` map reproduces, for every ``k`` (table, JSON, figure).
- ``StreamingRegression``: the streaming float64 moments underneath, mergeable
  across processes; ``LinearFit``: one layer's solution at every rank.
"""

from cera_rs.export.callback import LinearityCallback
from cera_rs.export.gguf_lora import save_gguf_lora
from cera_rs.export.lora import LoraExport, measure_linearity, save_lora, to_lora
from cera_rs.export.regression import LinearFit, StreamingRegression, solve_all
from cera_rs.export.report import LinearityReport, ModuleLinearity

__all__ = [
    "LinearFit",
    "LinearityCallback",
    "LinearityReport",
    "LoraExport",
    "ModuleLinearity",
    "StreamingRegression",
    "measure_linearity",
    "save_gguf_lora",
    "save_lora",
    "solve_all",
    "to_lora",
]
