"""The llama.cpp check's two Python steps (``scripts/llama-cpp-check.sh`` runs them
around ``cera-rs export-lora --gguf``):

``train OUT``: CeRA r=8 on SmolLM2's hard arithmetic tier as the demo's part 2 trained
it before that part became the phonebook rank curve (seed 0, its chosen rate), saved
to ``OUT/cera``; the training problems'
token ids in ``OUT/train.txt`` (export-lora's ``--data``), the test problems' in
``OUT/test.txt`` (``--held-out``).

``compare OUT``: the PyTorch model with ``OUT/lora`` (the exported PEFT LoRA) merged
against llama.cpp running ``OUT/adapter.gguf`` on the 150 held-out test problems, the
same token ids on both sides: greedy continuations, logits at every position of
prompt and answer, exact match, tokens per second; the base alone compared the same
way beside it. Two GGUF bases, both the same weights PyTorch holds:

- the F32 GGUF of the dequantised Q4_1 weights (written here, ``OUT/base-f32.gguf``):
  llama.cpp then computes in float32 as PyTorch does, so the two differ by float32
  round-off and accumulation order only. The strict check: the adapter's logits
  agree within ``LOGIT_TOL`` and every greedy continuation is the same.
- the Q4_1 GGUF itself, as users serve it: llama.cpp multiplies Q4_1 weights by
  activations it rounds to 8 bits per block of 32 (Q8_1), PyTorch by float32 ones.
  That rounding, not the adapter, is most of the difference there (the base alone
  shows it); reported, not held to a tolerance.

Writes ``OUT/llama-cpp-check.json``; exit status 1 when a check fails.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cera_rs import save_pretrained, smollm2
from cera_rs.atomic import atomic_file, atomic_path
from cera_rs.compare import data
from cera_rs.compare.methods import parse_spec
from cera_rs.compare.runner import Runner, answered, greedy_tokens
from cera_rs.demo.llama_cpp import LlamaCpp
from cera_rs.measure import describe_machine

TIER, RANK, LR, SEED = "hard", 8, 6e-3, 0
NAME = f"CeRA r={RANK}"
METHOD = parse_spec(f'cera:r={RANK},target_modules=["q_proj","v_proj"]')  # SiLU, dropout 0.1
SIZES, STEPS, BATCH, ADAPTED_LAYERS = (960, 150, 150), 60, 16, 10
"""Train, valid and test problems, steps, batch and adapted layers: the sizes the
tolerances below were measured with."""
SPEED_TOKENS = 64
LOGIT_TOL = 0.1
"""Max |logit difference| allowed on the F32 base. Measured (2026-12-02): the base
alone differs by up to 0.021 between the two engines (float32 accumulation order
through 30 layers, logits up to ~30), the adapted model by up to 0.061 (llama.cpp adds
``B (A x)`` beside ``W x`` where PyTorch multiplies by the merged ``W + B A``, and its
logits reach ~42). A LoRA written wrongly moves the logits by a share of the adapter's
effect (~47): the same adapter without the q/k row reordering differs by 25."""


def f32_gguf(source: Path, target: Path) -> None:
    """``source`` with every tensor dequantised to float32 (the gguf package's own
    dequantisation, which transformers uses too) and its metadata as it is."""
    import gguf
    from gguf.quants import dequantize

    if target.is_file():
        return
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(None, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = gguf.GGMLQuantizationType.F32 if name == "general.file_type" else field.contents()
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32))
    with atomic_path(target) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _runner(base, tokenizer, adapted_layers: int | None) -> Runner:
    """The hard-tier problems, encoded as ``cera_rs.compare`` trains and scores them."""
    problems = data.tier(TIER, *SIZES)
    return Runner(
        base,
        tokenizer,
        problems,
        steps=STEPS,
        batch=BATCH,
        adapted_layers=adapted_layers,
        device=torch.device("cpu"),
    )


def _ids_file(path: Path, encoded: data.Encoded) -> None:
    """One problem per line: prompt, answer and the end token, as the runner trains."""
    with atomic_file(path) as f:
        for row, n in zip(encoded.ids.tolist(), encoded.lengths.tolist()):
            f.write(" ".join(map(str, row[:n])) + "\n")


def train(out: Path) -> None:
    base, tokenizer = smollm2.load()
    runner = _runner(base, tokenizer, ADAPTED_LAYERS)
    start = time.perf_counter()
    model = runner.build(METHOD, SEED)
    runner.train(model, METHOD, LR, SEED)
    print(f"trained {NAME} in {time.perf_counter() - start:.0f} s")
    save_pretrained(model, out / "cera")
    _ids_file(out / "train.txt", runner.splits["train"].data)
    _ids_file(out / "test.txt", runner.splits["test"].data)


def _pytorch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _pytorch_speed(model, ids: list[int], new_tokens: int, repeats: int) -> float:
    best = 0.0
    prompt = torch.tensor([ids])
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        best = max(best, new_tokens / (time.perf_counter() - start))
    return best


def _engines(pytorch, gguf: Path, lora: Path | None, sequences, encoded: data.Encoded, tokenizer):
    """PyTorch against llama.cpp on the same token ids: logits everywhere, greedy
    continuations; and llama.cpp's logits, to measure the adapter's effect."""
    runner = LlamaCpp(gguf, lora)
    try:
        diffs, top1, theirs_all = [], [], []
        for seq in sequences:
            ours, theirs = _pytorch_logits(pytorch, seq), runner.logits(seq)
            diffs.append(float(np.abs(ours - theirs).max()))
            top1.append(float((ours.argmax(-1) == theirs.argmax(-1)).mean()))
            theirs_all.append(theirs)
        eos = tokenizer.eos_token_id
        budget = encoded.completion_tokens() + 4  # as compare scores
        prompts, items = encoded.prompts(), encoded.items
        llama_rows = [runner.greedy(p, budget, eos) for p in prompts]
    finally:
        runner.close()
    torch_rows = greedy_tokens(pytorch, prompts, budget, eos)
    texts = [
        [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        for rows in (torch_rows, llama_rows)
    ]
    hits = [
        np.array([answered(tokenizer, r, a, eos) for r, (_, a) in zip(rows, items)])
        for rows in (torch_rows, llama_rows)
    ]
    return {
        "max_abs_logit_diff": max(diffs),
        "mean_max_abs_logit_diff": float(np.mean(diffs)),
        "top1_agreement_all_positions": float(np.mean(top1)),
        "same_continuation": float(np.mean([a == b for a, b in zip(torch_rows, llama_rows)])),
        "same_answer": float(np.mean([a.strip() == b.strip() for a, b in zip(*texts)])),
        "same_verdict": float((hits[0] == hits[1]).mean()),
        "pytorch_exact_match": float(hits[0].mean()),
        "llama_cpp_exact_match": float(hits[1].mean()),
        "disagreements": [
            {"prompt": items[i][0], "pytorch": texts[0][i], "llama_cpp": texts[1][i]}
            for i in range(len(items))
            if torch_rows[i] != llama_rows[i]
        ][:10],
    }, theirs_all


def _speeds(merged, base, gguf: Path, lora: Path, prompt: list[int], rounds: int = 3) -> dict:
    """Greedy decoding at batch 1, tokens per second, best of ``rounds`` rounds that
    each time all four in turn (a shared machine's load hits them alike)."""
    runners = {"llama_cpp_adapter": LlamaCpp(gguf, lora), "llama_cpp_base": LlamaCpp(gguf)}
    best = dict.fromkeys(["pytorch_merged", "pytorch_base", *runners], 0.0)
    try:
        for _ in range(rounds):
            for name, runner in runners.items():
                best[name] = max(best[name], runner.tokens_per_second(prompt, SPEED_TOKENS, 1))
            for name, model in (("pytorch_merged", merged), ("pytorch_base", base)):
                best[name] = max(best[name], _pytorch_speed(model, prompt, SPEED_TOKENS, 1))
    finally:
        for runner in runners.values():
            runner.close()
    return best


def compare(out: Path) -> int:
    from peft import PeftModel

    base, tokenizer = smollm2.load()
    q4 = smollm2.gguf_path()
    f32 = out / "base-f32.gguf"
    f32_gguf(q4, f32)
    runner = _runner(base, tokenizer, None)
    encoded = runner.splits["test"].data
    items = encoded.items
    sequences = [row[:n] for row, n in zip(encoded.ids.tolist(), encoded.lengths.tolist())]
    prompts = encoded.prompts()
    cera = PeftModel.from_pretrained(base, str(out / "cera")).eval()
    cera_hits = runner.generated(cera)
    merged = PeftModel.from_pretrained(smollm2.load()[0], str(out / "lora")).merge_and_unload()
    base = smollm2.load()[0].eval()
    adapter = out / "adapter.gguf"
    runs, effect = {}, {}
    for name, gguf in (("f32", f32), ("q4_1", q4)):
        adapted, with_logits = _engines(merged.eval(), gguf, adapter, sequences, encoded, tokenizer)
        plain, without_logits = _engines(base, gguf, None, sequences, encoded, tokenizer)
        runs[name] = {"with_adapter": adapted, "base_only": plain}
        effect[name] = max(float(np.abs(a - p).max()) for a, p in zip(with_logits, without_logits))
    speed = _speeds(merged, base, q4, adapter, prompts[0])
    strict = runs["f32"]["with_adapter"]
    moved = min(effect.values()) > 100 * LOGIT_TOL
    near = strict["max_abs_logit_diff"] <= LOGIT_TOL
    same = strict["same_continuation"] == 1.0
    checks = {
        "the adapter moves llama.cpp's logits (it is applied), by over 100x the tolerance": moved,
        f"F32 base: PyTorch merged LoRA and llama.cpp GGUF adapter logits within {LOGIT_TOL}": near,
        "F32 base: the same greedy continuation on every test problem": same,
    }
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe_machine(),
        "llama_cpp_python": _llama_cpp_version(),
        "problems": len(items),
        "tier": TIER,
        "method": NAME,
        "lora_rank": RANK,
        "cera_exact_match": float(cera_hits.mean()),
        "runs": runs,
        "adapter_effect_max_abs_logit": effect,
        "tokens_per_s": speed,
        "logit_tolerance": LOGIT_TOL,
        "checks": checks,
        "ok": all(checks.values()),
    }
    with atomic_file(out / "llama-cpp-check.json") as f:
        json.dump(result, f, indent=2)
    _print(result)
    return 0 if result["ok"] else 1


def _llama_cpp_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def _print(result: dict) -> None:
    print(
        f"{result['problems']} held-out problems ({TIER} tier), {NAME} exported at "
        f"rank {RANK}; {result['machine']}; llama-cpp-python "
        f"{result['llama_cpp_python']}"
    )
    print(
        "| PyTorch vs llama.cpp | F32 base + adapter | F32 base | Q4_1 base + adapter | "
        "Q4_1 base |\n|---|---:|---:|---:|---:|"
    )
    runs = result["runs"]
    for key, fmt in (
        ("same_answer", "{:.1%}"),
        ("same_continuation", "{:.1%}"),
        ("top1_agreement_all_positions", "{:.2%}"),
        ("max_abs_logit_diff", "{:.4f}"),
        ("mean_max_abs_logit_diff", "{:.4f}"),
        ("pytorch_exact_match", "{:.1%}"),
        ("llama_cpp_exact_match", "{:.1%}"),
    ):
        cells = [
            fmt.format(runs[b][side][key])
            for b in ("f32", "q4_1")
            for side in ("with_adapter", "base_only")
        ]
        print(f"| {key} | " + " | ".join(cells) + " |")
    print(
        f"CeRA adapter's own exact match (PyTorch): {result['cera_exact_match']:.1%}; the "
        f"adapter moves llama.cpp's logits by up to "
        f"{max(result['adapter_effect_max_abs_logit'].values()):.1f}"
    )
    print(
        "tokens/s, greedy, batch 1: "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["tokens_per_s"].items())
    )
    for name, passed in result["checks"].items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")


if __name__ == "__main__":
    step, folder = sys.argv[1], Path(sys.argv[2])
    if step == "train":
        train(folder)
    else:
        sys.exit(compare(folder))
