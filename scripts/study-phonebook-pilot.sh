#!/usr/bin/env bash
# The pilot that chose the fair study's steps (scripts/study-phonebook-fair.sh): LoRA
# r=4 and LoRA at every layer's full rank (the linear ceiling), each at the rate the
# first study chose for it (3e-3), trained for 1200 steps on seed 1 (a seed the study
# neither chooses on nor reports) with the train and valid loss recorded at each
# quarter. Usage: scripts/study-phonebook-pilot.sh [OUT] (default results/study-pilot).
set -euo pipefail
out=${1:-results/study-pilot}
t='target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
rs='lora_alpha=8,use_rslora=true'
exec cera-rs compare "lora:r=full,$rs,lrs=[3e-3],$t" "lora:r=4,$rs,lrs=[3e-3],$t" \
    --model smollm2 --data phonebook:200 --adapted-layers 1 --steps 1200 --batch 16 \
    --seeds 1 --select-seed 0 --out "$out" --ray --cpus-per-run 1
