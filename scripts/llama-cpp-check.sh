#!/usr/bin/env bash
# The GGUF adapter in llama.cpp itself, against PyTorch: train CeRA on SmolLM2 (part 2's
# hard tier), export it with `cera-rs export-lora --gguf`, run both on the held-out
# problems. See scripts/README.md. Too slow for `make test` (about 16 minutes on 2
# cores); `tests/test_gguf_lora.py` checks the file's structure there.
#
#   LLAMA_CPP=/work/llama-cpp scripts/llama-cpp-check.sh [OUT]
#
# LLAMA_CPP: a folder holding llama-cpp-python (pip install --no-deps --target DIR
# llama-cpp-python==0.3.36, and diskcache beside it), put on PYTHONPATH; never the
# project's venv. PYTHON: the venv's python (default .venv/bin/python).
set -euo pipefail

OUT=${1:-results/llama-cpp-check}
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${LLAMA_CPP:-/work/llama-cpp}${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
"$PYTHON" -c 'import llama_cpp' || {
    echo "llama_cpp is not importable from $PYTHONPATH: build llama-cpp-python there first" >&2
    exit 2
}
"$PYTHON" scripts/llama_cpp_check.py train "$OUT"
base=$("$PYTHON" -c 'from cera_rs import smollm2; print(smollm2.cached_dir())')
gguf=$("$PYTHON" -c 'from cera_rs import smollm2; print(smollm2.gguf_path())')
# The user's command: a saved CeRA adapter and token ids in, a PEFT LoRA and a llama.cpp
# adapter out.
"$PYTHON" -m cera_rs.cli export-lora "$OUT/cera" "$OUT/lora" --data "$OUT/train.txt" \
    --held-out "$OUT/test.txt" --rank 8 --base "$base" --gguf "$OUT/adapter.gguf" \
    --gguf-base "$gguf" --json "$OUT/linearity.json" | tail -n 3
"$PYTHON" scripts/llama_cpp_check.py compare "$OUT"
