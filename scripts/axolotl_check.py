"""Helpers of scripts/axolotl-check.sh, run with the check's venv (Axolotl and the wheel).

    python axolotl_check.py make DIR          a tiny Llama, its tokenizer, data, configs
    python axolotl_check.py losses DIR/out    the training losses Axolotl logged; fails
                                              unless the last ones are below the first
    python axolotl_check.py resumed DIR/out N the run went on from checkpoint-N
    python axolotl_check.py load DIR          the saved adapter through PeftModel.from_pretrained
    python axolotl_check.py merged DIR MERGED Axolotl's merge of the exported LoRA is that LoRA

Nothing comes from a hub: the tokenizer is a word-level one made here over the data's
words, the model a LlamaConfig's random weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = "zero one two three four five six seven eight nine".split()


def lines() -> list[str]:
    """Counting sequences from every start, wrapping: learnable by a tiny model."""
    out = []
    for start in range(len(WORDS)):
        for length in (12, 16, 20):
            out.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(length)))
    return out * 3


def config(root: Path, **changes: object) -> str:
    cfg = {
        "base_model": str(root / "model"),
        "plugins": ["cera_rs.integrations.axolotl.CeraPlugin"],
        "adapter": "cera",
        "lora_target_linear": True,
        "cera": {"r": 8, "dropout": 0.0, "activation": "silu", "scaling": 1.0},
        "gradient_checkpointing": True,
        "datasets": [{"path": str(root / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(root / "prepared"),
        "val_set_size": 0,
        "sequence_len": 64,
        "sample_packing": False,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 16,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_steps": 8,
        "output_dir": str(root / "out"),
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "seed": 0,
        "save_safetensors": True,
        "dataloader_num_workers": 0,
    }
    cfg.update(changes)
    return json.dumps(cfg, indent=2)  # JSON is YAML


def make(root: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            pad_token_id=vocab["<pad>"],
        )
    )
    model.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as f:
        for text in lines():
            f.write(json.dumps({"text": text}) + "\n")
    (root / "train.yml").write_text(config(root))
    (root / "resume.yml").write_text(
        config(root, max_steps=24, resume_from_checkpoint=str(root / "out" / "checkpoint-16"))
    )
    ids = [tokenizer(text).input_ids for text in lines()[:30]]
    (root / "tokens.txt").write_text("".join(" ".join(map(str, seq)) + "\n" for seq in ids))
    print(f"made {root}: tiny Llama ({model.num_parameters()} parameters), {len(lines())} lines")


def state(out: Path) -> dict:
    last = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())


def losses(out: Path) -> None:
    logged = [(e["step"], e["loss"]) for e in state(out)["log_history"] if "loss" in e]
    print("loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in logged))
    first = sum(v for _, v in logged[:3]) / 3
    last = sum(v for _, v in logged[-3:]) / 3
    print(f"mean of the first 3 logged losses {first:.3f}, of the last 3 {last:.3f}")
    if not last < 0.8 * first:
        sys.exit("FAIL: the loss did not fall by a fifth")


def resumed(out: Path, start: int) -> None:
    """The run went on from checkpoint-``start``: its history up to ``start`` is the
    checkpoint's, and its first new loss is near the checkpoint's last, not the start's."""
    before = [
        e
        for e in json.loads((out / f"checkpoint-{start}" / "trainer_state.json").read_text())[
            "log_history"
        ]
        if "loss" in e
    ]
    after = [e for e in state(out)["log_history"] if "loss" in e]
    new = [e for e in after if e["step"] > start]
    print(
        f"resumed: steps 1-{start} carried over from checkpoint-{start}, {len(new)} new steps "
        f"({new[0]['step'] if new else '-'} to {after[-1]['step']}); loss at step 1 "
        f"{before[0]['loss']:.3f}, at step {start} {before[-1]['loss']:.3f}, at step "
        f"{new[0]['step'] if new else '-'} {new[0]['loss'] if new else float('nan'):.3f}"
    )
    if after[: len(before)] != before or not new or new[0]["step"] != start + 1:
        sys.exit(f"FAIL: the run did not go on from step {start}")
    if not new[0]["loss"] < 0.8 * before[0]["loss"]:
        sys.exit("FAIL: the resumed run's loss is back at the start's: the adapter was not resumed")


def load(root: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cera_rs

    adapter = root / "out"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(root / "model")
    tok = AutoTokenizer.from_pretrained(root / "model")
    ids = tok(lines()[0], return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        model = PeftModel.from_pretrained(base, adapter).eval()
        after = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, cera_rs.CeraLinear)]
    change = (after - before).abs().max().item()
    print(
        f"PeftModel.from_pretrained: peft_type {saved['peft_type']}, r={saved['r']}, "
        f"{len(layers)} CeraLinear layers, logits moved by up to {change:.3f} from the base"
    )
    if saved["peft_type"] != "CERA" or not layers or change == 0:
        sys.exit("FAIL: the saved adapter did not load as a trained CeRA adapter")


def _logits(model, root: Path):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    ids = tok(lines()[:8], return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        return model.eval()(ids).logits


def merged(root: Path, folder: Path) -> None:
    """Axolotl's merge of the exported LoRA equals the LoRA PEFT loads unmerged; how close
    that LoRA is to the CeRA model is export-lora's fit (reported, not held to a bound)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import cera_rs  # noqa: F401

    def base():
        return AutoModelForCausalLM.from_pretrained(root / "model")

    plain = _logits(base(), root)
    cera = _logits(PeftModel.from_pretrained(base(), root / "out"), root)
    lora = _logits(PeftModel.from_pretrained(base(), root / "lora"), root)
    merged = _logits(AutoModelForCausalLM.from_pretrained(folder), root)
    gap = ((merged - lora).norm() / lora.norm()).item()
    far, near = (plain - cera).norm().item(), (lora - cera).norm().item()
    print(
        f"merged model vs the exported LoRA through PEFT: relative difference {gap:.1e}; "
        f"logits' distance to the CeRA model: base {far:.2f}, exported rank-4 LoRA {near:.2f}"
    )
    if not gap < 1e-4:
        sys.exit("FAIL: Axolotl's merge of the exported LoRA is not that LoRA")


if __name__ == "__main__":
    command, path, *rest = sys.argv[1:]
    if command == "make":
        make(Path(path))
    elif command == "losses":
        losses(Path(path))
    elif command == "resumed":
        resumed(Path(path), int(rest[0]))
    elif command == "load":
        load(Path(path))
    elif command == "merged":
        merged(Path(path), Path(rest[0]))
    else:
        sys.exit(f"unknown command {command!r}")
