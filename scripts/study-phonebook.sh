#!/usr/bin/env bash
# The capacity study (docs/study/phonebook/): where does LoRA's score stop rising with
# rank, and where does CeRA sit on that curve? SmolLM2-135M-Instruct (4-bit weights,
# offline) memorises phonebook:N (made-up names -> 5-digit numbers); adapters on the
# attention and MLP projections of the last block only (where facts can live, and few
# enough weights that capacity binds); LoRA r=1..64 and at every layer's full rank (the
# linear ceiling), rsLoRA (alpha/sqrt(r): one rate grid suits every rank); CeRA r=1..16;
# the identity-activation control at r=4. One rate, 1e-2: in the first grid {1e-2, 3e-2}
# (2026-12-06, LoRA r=1/4/16 and CeRA r=4, seed 0) 3e-2 was worse for all four (valid
# loss 1.75-2.43 nats a token against 1.21-1.57), and 3e-3 had learnt less than 1e-2 in
# the pilot (LoRA r=1, phonebook:300). Seeds: the first two, then more until every
# interval against CeRA r=4 is within +-5 points (--resolve 5), at most MAX_SEEDS.
# Each run is a Ray task on this machine (2 workers of one thread: --ray).
# Usage: scripts/study-phonebook.sh [OUT]   (default results/study-phonebook; resumable)
# Then copy OUT/report.md, summary.json, curves.png, exact_match.png to docs/study/phonebook/.
set -euo pipefail
out=${1:-results/study-phonebook}
t='target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
exec cera-rs compare \
    "cera:r=4,$t" "lora:r=[1,4,16,64],lora_alpha=8,use_rslora=true,$t" \
    "lora:r=full,lora_alpha=8,use_rslora=true,$t" "cera:r=[1,16],$t" \
    "cera:r=4,activation=identity,cera_dropout=0,$t" \
    --model smollm2 --data "phonebook:${FACTS:-200}" --adapted-layers 1 \
    --steps "${STEPS:-300}" --batch 16 --lrs "${LRS:-1e-2}" --seeds 0,1 \
    --resolve 5 --max-seeds "${MAX_SEEDS:-3}" --out "$out" --ray --cpus-per-run 1
