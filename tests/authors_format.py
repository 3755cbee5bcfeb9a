"""The CeRA authors' adapter and checkpoint format, re-implemented from their description
(repository hhchen1105/cera-refactored, cera/adapters.py, cera/peft_pipeline.py,
train_peft.py) to write the fixture files the import is tested against.

Their wrapper keeps the frozen layer as ``original_layer`` and the branch as ``cera``
with ``A`` (d_in -> r) and ``B`` (r -> d_out), both ``nn.Linear`` without bias, in the
adapter dtype; the branch casts its input to that dtype and the wrapper casts the delta
back. ``legacy``: ``B(Dropout(act(A x)))``; ``peft_aligned``: ``scale * B(act(A(Dropout(x))))``
with ``scale = alpha / rank``. A checkpoint holds the trainable parameters under their
``named_parameters`` names; files from before their A/B rename call A ``up_proj`` and
B ``down_proj``. Their ``train.py`` (read in the Howardisme/cera copy: train.py,
cera/trainer.py) saves no config in the checkpoint: its run config goes into
``<model_type>_log.json`` beside the checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ACT = {"silu": nn.SiLU, "relu": nn.ReLU, "identity": nn.Identity}


class Branch(nn.Module):
    def __init__(self, d_in, d_out, rank, *, variant, act_fn, dropout, scale, dtype):
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False, dtype=dtype)
        self.B = nn.Linear(rank, d_out, bias=False, dtype=dtype)
        self.act = ACT[act_fn]()
        self.drop = nn.Dropout(dropout)
        self.variant, self.scale = variant, scale
        with torch.no_grad():  # a trained adapter: both factors non-zero
            self.A.weight.normal_(0, d_in**-0.5)
            self.B.weight.normal_(0, 0.3)

    def forward(self, x):
        x = x.to(self.A.weight.dtype)
        if self.variant == "peft_aligned":
            return self.B(self.act(self.A(self.drop(x)))) * self.scale
        return self.B(self.drop(self.act(self.A(x))))


class Wrapper(nn.Module):
    def __init__(self, original_layer: nn.Linear, **branch):
        super().__init__()
        self.original_layer = original_layer.requires_grad_(False)
        self.cera = Branch(original_layer.in_features, original_layer.out_features, **branch)

    def forward(self, x):
        base = self.original_layer(x)
        return base + self.cera(x).to(base.dtype)


def adapt(
    model,
    *,
    rank=4,
    targets=("q_proj", "v_proj"),
    variant="legacy",
    act_fn="silu",
    dropout=0.1,
    alpha=None,
    dtype=None,
    seed=0,
    layers=None,
):
    """Wraps the named projections of every decoder layer of a Llama (of the layers
    with these indices: their ``layer_indices``), in place."""
    torch.manual_seed(seed)
    model.requires_grad_(False)
    scale = (alpha if alpha is not None else rank) / rank if variant == "peft_aligned" else 1.0
    for index, layer in enumerate(model.model.layers):
        if layers is not None and index not in layers:
            continue
        for group in (layer.self_attn, layer.mlp):
            for name, module in list(group.named_children()):
                if name in targets:
                    wrapper = Wrapper(
                        module,
                        rank=rank,
                        variant=variant,
                        act_fn=act_fn,
                        dropout=dropout,
                        scale=scale,
                        dtype=dtype or module.weight.dtype,
                    )
                    setattr(group, name, wrapper)
    return model


def config_of(
    *,
    rank=4,
    targets=("q_proj", "v_proj"),
    variant="legacy",
    act_fn="silu",
    dropout=0.1,
    alpha=None,
    dtype="float32",
    version=2,
):
    """The metadata their training script stores with a fixed-rank CeRA checkpoint."""
    alpha = rank if alpha is None else alpha
    config = {
        "pipeline": "peft",
        "model": "tiny-llama",
        "model_type": "CeRA",
        "dataset": "math",
        "rank": rank,
        "lr": 3e-4,
        "dropout": dropout,
        "act_fn": act_fn,
        "cera_variant": variant,
        "recurrent_steps": 0,
        "alpha": None,
        "target_modules": ",".join(targets),
        "epochs": 1,
        "seed": 42,
    }
    if version >= 2:
        config.update(
            cera_format_version=version,
            rank_mode="fixed",
            scale=alpha / rank if variant == "peft_aligned" else 1.0,
            alpha=alpha,
            adapter_dtype=dtype,
            initialization="kaiming_uniform_A_zero_B"
            if variant == "peft_aligned"
            else "kaiming_normal_A_zero_B",
            dropout_position="input" if variant == "peft_aligned" else "post_activation",
        )
    else:
        config.update(cera_format_version=1, rank_mode="fixed", scale=1.0, adapter_dtype=dtype)
    return config


def train_py_config(*, rank=4, targets=("q_proj", "v_proj"), act_fn="silu", dropout=0.1):
    """The config their ``train.py`` builds for a CeRA run: it goes into the run log only,
    never into the checkpoint."""
    return {
        "model": "tiny-llama",
        "model_type": "CeRA",
        "dataset": "math",
        "rank": rank,
        "lr": 5e-4,
        "dropout": dropout,
        "act_fn": act_fn,
        "alpha": None,
        "target_modules": ",".join(targets),
        "epochs": 3,
        "grad_accum": 16,
        "batch_size": 4,
    }


def write_run_log(folder, config, model_type="CeRA"):
    """The run log their trainer keeps beside its checkpoints (``save_logs``)."""
    log = {"config": config, "history": [{"step": 0, "data_seen": 0}]}
    path = Path(folder) / f"{model_type}_log.json"
    path.write_text(json.dumps(log, indent=4))
    return path


def save(model, path, *, config=None, legacy_names=False, wrapped=True, write=True):
    """Writes the adapted model's trainable parameters as their trainer does; returns
    the state dict (alone: ``write=False`` writes nothing)."""
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if legacy_names:
        state = {
            name.replace(".cera.A.", ".cera.up_proj.").replace(
                ".cera.B.", ".cera.down_proj."
            ): value
            for name, value in state.items()
        }
    if not write:
        return state
    if wrapped:
        payload = {
            "step": 10,
            "data_count": 640,
            "model_type": "CeRA",
            "model_state_dict": state,
            "metrics": {"test_loss": 1.5},
        }
        if config is not None:
            payload["config"] = config
        torch.save(payload, path)
    else:
        torch.save(state, path)
    return state
