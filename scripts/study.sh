#!/usr/bin/env bash
# The committed study (docs/study/): the paper's question on the demo's hard tier.
# CeRA r=8 against LoRA at its rank and at 8x, DoRA at its rank, and the linear
# control (CeRA's identity activation, no dropout); SmolLM2-135M-Instruct (4-bit
# weights, offline), adapters on q_proj/v_proj of the last 10 layers.
# Usage: scripts/study.sh [OUT]   (default results/study; resumable: run it again)
# Then copy OUT/report.md, summary.json, exact_match.png and peft_results/ to docs/study/.
set -euo pipefail
out=${1:-results/study}
exec cera-rs compare \
    'cera:r=8' 'lora:r=8,lora_alpha=32' 'lora:r=64,lora_alpha=32' 'dora:r=8,lora_alpha=32' \
    'cera:r=8,activation=identity,cera_dropout=0' \
    --model smollm2 --data tiers:hard --sizes "${SIZES:-1600,150,600}" --adapted-layers 10 \
    --steps 100 --batch 16 --lrs 1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2 --seeds "${SEEDS:-0,1,2}" --out "$out"
