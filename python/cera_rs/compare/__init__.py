"""Does CeRA beat LoRA on *my* model and data, beyond noise? ``compare`` trains and
scores several adapter methods on one base model and one data set the same way, and
reports each method against a reference with a paired 95 % interval and a
verdict that never says more than the data supports.

    from cera_rs.compare import compare
    summary = compare(["lora:r=8", "cera:r=8", "cera:r=8,activation=identity"],
                      model="smollm2", data="tiers:hard", out_dir="results/compare")

``cera-rs compare`` is the same from the command line."""

from cera_rs.compare.api import BUILTIN_MODEL, compare, load_model, load_problems
from cera_rs.compare.cluster import Ray
from cera_rs.compare.methods import Method
from cera_rs.compare.settings import Settings

__all__ = ["BUILTIN_MODEL", "Method", "Ray", "Settings", "compare", "load_model", "load_problems"]
