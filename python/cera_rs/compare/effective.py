"""What each method's branch is, in one vocabulary for every method, read from the built
model and the training that ran (not restated from defaults): its form (linear, or
which activation), rank, dropout and where it acts, effective scale (LoRA's alpha/r or
alpha/sqrt(r), CeRA's scaling), A's initial spread per layer shape, B's init, and the
optimiser, rate, weight decay, clip and schedule. And the confounds: the settings in
which a method differs from the reference besides what the comparison is about (form
and rank), each of which the verdict also measures unless it was tuned for both."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

ABOUT = ("form", "rank", "trainable_params")
"""What a comparison is about: a difference here is the question, not a confound."""
SPREAD = 1.25
"""A's initial spreads differ when one is this many times the other or more (a measured
std over r x d_in draws is within a few percent of the init's)."""
WORDS = {
    "dropout": "dropout",
    "dropout_on": "dropout on",
    "scale": "scale",
    "b_init": "B's init",
    "optimizer": "optimiser",
    "weight_decay": "weight decay",
    "clip": "gradient clip",
    "schedule": "rate schedule",
    "lr": "rate",
}
"""The report's words for each setting a confound can be named by."""
MATCHED = ("dropout_on", "b_init", "optimizer", "schedule")
"""Settings a comparison matches rather than tunes."""


def _one(values: list) -> Any:
    """One value where every layer agrees, else the sorted distinct ones."""
    distinct = sorted(set(values), key=repr)
    return distinct[0] if len(distinct) == 1 else distinct


def _layers(model: nn.Module) -> list[dict[str, Any]]:
    """Each adapted layer's branch ("default" adapter), LoRA's (and DoRA's) and CeRA's."""
    from peft.tuners.lora import LoraLayer

    from cera_rs.layer import CeraLayer

    out = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            dropout = module.lora_dropout["default"]
            out.append(
                {
                    "form": "linear (DoRA)" if module.use_dora.get("default") else "linear",
                    "rank": module.r["default"],
                    "dropout": float(getattr(dropout, "p", 0.0)),
                    "dropout_on": "the input",
                    "scale": float(module.scaling["default"]),
                    "a": module.lora_A["default"].weight,
                    "b": module.lora_B["default"].weight,
                }
            )
        elif isinstance(module, CeraLayer) and "default" in module.cera_A:
            activation = module.activation["default"]
            out.append(
                {
                    "form": "linear" if activation == "identity" else activation,
                    "rank": module.r["default"],
                    "dropout": module.cera_dropout["default"],
                    "dropout_on": f"the {module.dropout_position['default']}"
                    + (" vector" if module.dropout_position["default"] == "hidden" else ""),
                    "scale": float(module.scaling["default"]),
                    "a": module.cera_A["default"].weight,
                    "b": module.cera_B["default"].weight,
                }
            )
    return out


def of_model(model: nn.Module) -> dict[str, Any]:
    """The branch as built, before training moves it. A method whose layers are neither
    LoRA's nor CeRA's gives its form as unknown and the rest as not read (None)."""
    layers = _layers(model)
    if not layers:
        return {"form": None}
    by_shape: dict[str, list[np.ndarray]] = {}
    for row in layers:
        a = row["a"].detach().float().cpu().numpy()
        by_shape.setdefault(f"{a.shape[1]}->{row['b'].shape[0]}", []).append(a.ravel())
    b = np.concatenate([row["b"].detach().float().cpu().numpy().ravel() for row in layers])
    return {
        **{k: _one([row[k] for row in layers]) for k in ("form", "rank", "dropout", "scale")},
        "dropout_on": _one([row["dropout_on"] for row in layers if row["dropout"] > 0] or ["-"]),
        "a_init_std": {
            shape: float(f"{np.concatenate(a).std():.3g}") for shape, a in by_shape.items()
        },
        "b_init": "zeros" if not b.any() else f"std {b.std():.3g}",
    }


def text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "/".join(text(v) for v in value)
    return str(value)


def confounds(
    method: dict[str, Any], reference: dict[str, Any], tuned: set[str], ref_tuned: set[str]
) -> list[str]:
    """Each effective setting in which ``method`` differs from ``reference`` besides form
    and rank, as "dropout 0.1 against 0.0: ...": the verdict measures it too unless it
    was tuned for both (``tuned``: the words tuned per method, "lr" for a rate grid)."""
    unread = [
        n for n, e in (("this method", method), ("the reference", reference)) if not e.get("form")
    ]
    if unread:
        return [
            f"the branch of {' and '.join(unread)} is not read here: check its settings by hand"
        ]
    both = tuned & ref_tuned
    out = []
    for key, word in WORDS.items():
        mine, theirs = method.get(key), reference.get(key)
        if mine == theirs or key in both:
            continue
        if key == "dropout_on" and not (
            _positive(method["dropout"]) and _positive(reference["dropout"])
        ):
            continue  # where dropout acts matters only where both drop out
        how = "match it" if key in MATCHED else "tune it for both, or match it"
        out.append(f"{word} {text(mine)} against {text(theirs)}: {how}")
    if "scale" not in both:  # tuning the scale (and the rate) for both takes A's spread in
        out += _init_confounds(method.get("a_init_std", {}), reference.get("a_init_std", {}))
    return out


def _positive(p: Any) -> bool:
    return any(x > 0 for x in (p if isinstance(p, list) else [p]))


def _init_confounds(mine: dict[str, float], theirs: dict[str, float]) -> list[str]:
    """A's initial std where the two differ on the layer shapes both adapt, in one line:
    with Adam a branch whose A starts k times larger trains as one of scale s k^2 at
    rate eta/k, so this is a hidden scale."""
    shapes = sorted(set(mine) & set(theirs))
    ratios = {s: mine[s] / theirs[s] if theirs[s] else np.inf for s in shapes}
    if all(1 / SPREAD < r < SPREAD for r in ratios.values()):
        return []
    each = "; ".join(f"{s} {mine[s]:.3g} against {theirs[s]:.3g}" for s in shapes)
    low, high = min(ratios.values()), max(ratios.values())
    times = f"{low:.2g}x" if f"{low:.2g}" == f"{high:.2g}" else f"{low:.2g}x-{high:.2g}x"
    return [
        f"A's initial std {times} the reference's ({each}): with Adam a hidden factor on "
        "the scale and the rate; tune the scale for both, or match the init"
    ]
